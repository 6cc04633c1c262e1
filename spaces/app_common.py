"""The Gradio UI every Space shares: a photo in, a box per face with the model's gender and age out.

Each `spaces/<name>/app.py` is a few lines over `launch_app()`. This file runs in two layouts:

- in the repository: `spaces/app_common.py`, with the project installed (`pip install -e .`, which installs
  `common/` as the package `agegender`) and `results/` one folder up;
- in a Space staged by `tasks/publish.py`: `app_common.py`, `agegender/` (a copy of `common/`), `examples/`,
  `results/` and `hub_models.json` side by side.

In the repository the model is `results/models/<name>/` (or the best of `results/models/<name>/*/`), read with no
network. A staged Space carries no model: hub_models.json names its model repo and the revision publish pushed,
and `agegender.hub` downloads that revision through the Hub cache. Either way the bias analysis is
`results/comparison.json`, found through `agegender.data` (`AGEGENDER_RESULTS_DIR` moves it and the models).
Faces are found and prepared by `agegender.faces.Predictor`: the same code as `tasks/predict.py`.

Importing this module loads neither Gradio nor TensorFlow; `build_demo()` does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from agegender.cards import about_markdown, load_comparison
from agegender.cli import UserError
from agegender.data import MODELS_DIR
from agegender.faces import DEFAULT_DETECTOR, available_detectors
from agegender.families import FAMILIES
from agegender.hub import PINS_FILE, hub_entry, read_pins
from agegender.modelio import ModelEntry, find_model

HERE = Path(__file__).resolve().parent

SPACES = tuple(FAMILIES)  # one Space per model family, titled by the registry
EXAMPLES_DIR = HERE / "examples"
EXAMPLES = ("astronaut.jpg", "two_faces.jpg", "landscape.jpg")  # public domain / generated, never UTKFace
COLOURS = {"female": (214, 51, 132), "male": (13, 110, 253), None: (25, 135, 84)}  # box colour by gender
CACHE_CLEANUP = (1800, 3600)  # Gradio deletes uploaded/temporary files older than an hour, every 30 minutes


# ---------------------------------------------------------------- prediction and drawing


def gender_probability(row: dict[str, Any]) -> float:
    """The probability of the gender the model chose."""
    return row["p_female"] if row["gender"] == "female" else 1.0 - row["p_female"]


def face_label(index: int, row: dict[str, Any]) -> str:
    parts = [f"{index}:"]
    if "gender" in row:
        parts.append(f"{row['gender']} {gender_probability(row):.0%}")
    if "age" in row:
        parts.append(f"{row['age']:.0f} y")
    return " ".join(parts)


def draw_faces(image, rows: list[dict[str, Any]]):
    """A copy of the image with a numbered box and label per face, sized to the photo."""
    from PIL import ImageDraw, ImageFont

    out = image.copy()
    draw = ImageDraw.Draw(out)
    side = max(image.size)
    width = max(2, round(side / 300))
    try:
        font = ImageFont.load_default(size=max(12, round(side / 40)))
    except (TypeError, OSError):  # Pillow built without FreeType
        font = ImageFont.load_default()
    for index, row in enumerate(rows, start=1):
        x, y, w, h = row["box"]
        colour = COLOURS.get(row.get("gender"), COLOURS[None])
        draw.rectangle((x, y, x + w, y + h), outline=colour, width=width)
        text = face_label(index, row)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y - th - 2 * width if y - th - 2 * width >= 0 else y + h  # above the box, else below it
        draw.rectangle((x, ty, x + tw + 2 * width, ty + th + 2 * width), fill=colour)
        draw.text((x + width - left, ty + width - top), text, fill=(255, 255, 255), font=font)
    return out


def table_headers(outputs: list[str]) -> list[str]:
    headers = ["face"]
    if "gender" in outputs:
        headers += ["gender", "probability", "P(female)"]
    if "age" in outputs:
        headers += ["age (years)"]
    return headers + ["box (x, y, width, height)", "detector confidence"]


def table_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    table = []
    for index, row in enumerate(rows, start=1):
        line: list[Any] = [index]
        if "gender" in row:
            line += [row["gender"], round(gender_probability(row), 3), round(row["p_female"], 3)]
        if "age" in row:
            line += [round(row["age"], 1)]
        table.append(line + [", ".join(str(v) for v in row["box"]), round(row["confidence"], 3)])
    return table


def summary_message(rows: list[dict[str, Any]], size: tuple[int, int]) -> str:
    if not rows:
        return (f"**No face found** in this {size[0]} x {size[1]} photo. Try one where the face is larger, "
                "frontal and well lit.")
    lines = [f"**Found {len(rows)} face{'s' if len(rows) > 1 else ''}.**"]
    for index, row in enumerate(rows, start=1):
        said = []
        if "gender" in row:
            said.append(f"{row['gender']} ({gender_probability(row):.0%} probability)")
        if "age" in row:
            said.append(f"about {row['age']:.0f} years old")
        lines.append(f"- Face {index}: {', '.join(said)}")
    return "\n".join(lines)


def predict_photo(predictor, source, detector: str = DEFAULT_DETECTOR) -> tuple[Any, str, list[dict[str, Any]]]:
    """(photo with boxes, message, one row per face) for a file path, array or PIL image of any mode/size."""
    from agegender.faces import read_image

    image = read_image(source)
    rows = [row for row in predictor.predict_image(image, detector=detector) if "box" in row]
    return (draw_faces(image, rows) if rows else image), summary_message(rows, image.size), rows


# ---------------------------------------------------------------- the Gradio app


def model_panel(entry: ModelEntry, suffix: str = "") -> tuple[Any, Any]:
    """Predict and About tabs for one model, inside the current Blocks context; returns the About text's
    function and component, for build_demo to refresh at every page load."""
    import gradio as gr
    import pandas as pd

    from agegender.faces import Predictor

    predictor = Predictor.load(entry.folder)
    headers = table_headers(predictor.outputs)

    def predict(path: str | None, detector: str = DEFAULT_DETECTOR):
        if not path:
            raise gr.Error("Upload, paste or take a photo first.")
        try:
            image, message, rows = predict_photo(predictor, path, detector or DEFAULT_DETECTOR)
        except UserError as error:
            raise gr.Error(str(error)) from error
        return image, message, pd.DataFrame(table_rows(rows), columns=headers)

    def about() -> str:  # re-read at every page load: metrics and comparison are never hard-coded
        return about_markdown(entry.name, entry.folder, load_comparison())

    with gr.Tabs():
        with gr.Tab("Predict"), gr.Row():
            with gr.Column():
                photo = gr.Image(type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"],
                                 label="Photo (upload, webcam or paste)", elem_id=f"photo{suffix}")
                detector = gr.Dropdown(available_detectors(), value=DEFAULT_DETECTOR, label="Face detector",
                                       elem_id=f"detector{suffix}")
                button = gr.Button("Find faces and predict", variant="primary", elem_id=f"predict{suffix}")
                examples = [[str(EXAMPLES_DIR / name)] for name in EXAMPLES if (EXAMPLES_DIR / name).exists()]
                gr.Examples(examples, inputs=[photo], label="Public-domain examples (not UTKFace)",
                            cache_examples=False)
            with gr.Column():
                annotated = gr.Image(type="pil", format="jpeg", label="Faces found", interactive=False)
                message = gr.Markdown(elem_id=f"message{suffix}")
                table = gr.Dataframe(pd.DataFrame(columns=headers), label="One row per face",
                                     interactive=False)
        with gr.Tab("About this model"):
            about_text = gr.Markdown(about(), elem_id=f"about{suffix}")
    button.click(predict, inputs=[photo, detector], outputs=[annotated, message, table],
                 api_name=f"predict{suffix}")
    return about, about_text


def space_models(spaces: list[str] | tuple[str, ...], models_dir: Path = MODELS_DIR,
                 pins_file: Path = HERE / PINS_FILE) -> list[ModelEntry]:
    """In a staged Space (a pins file beside this one), each model from its Hub repo at the pinned revision;
    in the repository, the trained models in models_dir."""
    pins = read_pins(pins_file)
    if pins is not None:
        return [hub_entry(pin) for pin in pins if pin.space in spaces]
    return [entry for entry in (find_model(space, models_dir) for space in spaces) if entry is not None]


def build_demo(spaces: list[str] | tuple[str, ...], models_dir: Path = MODELS_DIR):
    """One model: its Predict and About tabs. Several: a tab per model (the combined Space).

    API names: /predict and /about for one model; /predict_<name> and /about_<name> for several."""
    entries = space_models(spaces, models_dir)
    if not entries:
        wanted = " or ".join(str(Path(models_dir) / space) for space in spaces)
        raise UserError(f"No trained model in {wanted}: train one (e.g. `python {FAMILIES[spaces[0]].script}`) "
                        "or point AGEGENDER_RESULTS_DIR at a results folder that has one.")
    import gradio as gr

    single = len(spaces) == 1
    title = FAMILIES[entries[0].space].title if single else "Age and gender from a face photo: every model"
    with gr.Blocks(title=title, delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown(f"# {title}\nUpload a photo, take one with the webcam or paste one from the clipboard. "
                    "Every face found gets a numbered box with the model's prediction; the *About* tab says "
                    "what the model was trained on, how accurate it is and where it is biased.")
        loads = []
        if single:
            loads.append(("", *model_panel(entries[0])))
        else:
            with gr.Tabs():
                for entry in entries:
                    with gr.Tab(entry.space):
                        loads.append((f"_{entry.space}", *model_panel(entry, f"_{entry.space}")))
        for suffix, about, about_text in loads:
            demo.load(about, outputs=[about_text], api_name=f"about{suffix}")
    return demo


def launch_app(spaces: list[str] | tuple[str, ...]) -> None:
    """Build and serve the app (127.0.0.1:7860 unless GRADIO_SERVER_NAME/PORT say otherwise, as on Spaces);
    a missing model ends in one sentence."""
    try:
        demo = build_demo(spaces)
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    import gradio as gr

    demo.launch(theme=gr.themes.Soft(), allowed_paths=[str(EXAMPLES_DIR)], show_error=True)
