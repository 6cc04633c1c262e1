"""The Gradio UI every Space shares: a photo in, a box per face with the model's gender and age (with its 80%
interval) out; what the model looked at in a chosen face (Grad-CAM heatmaps); and a live webcam tab whose faces
are tracked from frame to frame so their numbers hold still.

Each `spaces/<name>/app.py` is a few lines over `launch_app()`. This file runs in two layouts:

- in the repository: `spaces/app_common.py`, with the project installed (`pip install -e .`, which installs
  `common/` as the package `agegender`) and `results/` one folder up;
- in a Space staged by `tasks/publish.py`: `app_common.py`, `agegender/` (a copy of `common/`), `examples/`,
  `results/` and `hub_models.json` side by side.

In the repository the model is `results/models/<name>/` (or the best of `results/models/<name>/*/`), read with no
network. A staged Space carries no model: hub_models.json names its model repo and the revision publish pushed,
and `agegender.inference.hub` downloads that revision through the Hub cache. Either way the bias analysis is
`results/comparison.json`, found through `agegender.data.paths` (`AGEGENDER_RESULTS_DIR` moves it and the models).
Faces are found and prepared by `agegender.inference.predictor.Predictor` and drawn by
`agegender.inference.drawing`: the same code as `tasks/predict.py`; heatmaps come from
`agegender.inference.gradcam`, the webcam's tracking from `agegender.inference.tracking`.

Importing this module loads neither Gradio nor TensorFlow; `build_demo()` does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from agegender.cli import UserError
from agegender.data.paths import MODELS_DIR
from agegender.inference.detectors import DEFAULT_DETECTOR, available_detectors
from agegender.inference.drawing import age_text, draw_faces, gender_probability, gender_text, is_uncertain
from agegender.inference.gradcam import load_gradcam
from agegender.inference.hub import PINS_FILE, hub_entry, read_pins
from agegender.inference.tracking import WINDOW, LiveSession
from agegender.models.folders import ModelEntry, find_model
from agegender.models.registry import FAMILIES
from agegender.reporting.cards import about_markdown, load_comparison

HERE = Path(__file__).resolve().parent

SPACES = tuple(FAMILIES)  # one Space per model family, titled by the registry
EXAMPLES_DIR = HERE / "examples"
EXAMPLES = ("astronaut.jpg", "two_faces.jpg", "landscape.jpg")  # public domain / generated, never UTKFace
CACHE_CLEANUP = (1800, 3600)  # Gradio deletes uploaded/temporary files older than an hour, every 30 minutes
LIVE_DETECTOR = "blazeface-back"  # the fastest detector: every webcam frame goes through it
LIVE_EVERY_S = 0.2  # how often the browser sends a webcam frame
LIVE_LIMIT_S = 600  # a viewer's stream stops after this long (a Space's CPU is shared)


# ---------------------------------------------------------------- prediction and drawing


def table_headers(outputs: list[str]) -> list[str]:
    headers = ["face"]
    if "gender" in outputs:
        headers += ["gender", "probability", "P(female)"]
    if "age" in outputs:
        headers += ["age (years)", "80% interval", "age band"]
    return headers + ["box (x, y, width, height)", "detector confidence"]


def table_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    table = []
    for index, row in enumerate(rows, start=1):
        line: list[Any] = [index]
        if "gender" in row:
            gender = gender_text(row) if is_uncertain(row) else row["gender"]
            line += [gender, round(gender_probability(row), 3), round(row["p_female"], 3)]
        if "age" in row:
            interval = f"{row['age_low']}–{row['age_high']}" if "age_low" in row else "none (not calibrated)"
            line += [round(row["age"], 1), interval, row["age_band"]]
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
            said.append(gender_text(row) if is_uncertain(row)
                        else f"{row['gender']} ({gender_probability(row):.0%} probability)")
        if "age" in row:
            said.append(f"about {age_text(row)} years old")
        lines.append(f"- Face {index}: {', '.join(said)}")
    return "\n".join(lines)


def predict_photo(predictor, source, detector: str = DEFAULT_DETECTOR) -> tuple[Any, str, list[dict[str, Any]]]:
    """(photo with boxes, message, one row per face) for a file path, array or PIL image of any mode/size."""
    from agegender.data.images import read_image

    image = read_image(source)
    rows = [row for row in predictor.predict_image(image, detector=detector) if "box" in row]
    return (draw_faces(image, rows) if rows else image), summary_message(rows, image.size), rows


def looked_at(predictor, cam, source, face: int, detector: str = DEFAULT_DETECTOR) -> list[tuple[Any, str]]:
    """(picture, caption) pairs for one face of a photo (numbered as in its boxes): its aligned crop, then the
    crop under each output's Grad-CAM heatmap."""
    from agegender.data.images import face_crop, read_image
    from agegender.inference.gradcam import DISPLAY_SIDE, face_heatmaps, row_face

    image = read_image(source)
    rows = [row for row in predictor.predict_image(image, detector=detector) if "box" in row]
    if not rows:
        raise UserError("No face was found in this photo, so there is nothing to show.")
    if not 1 <= face <= len(rows):
        raise UserError(f"There is no face {face}: the photo has {len(rows)} (numbered from 1 on the boxes).")
    row = rows[face - 1]
    said = {"age": f"age: what made it say {age_text(row)}" if "age" in row else "",
            "gender": f"gender: what made it say {row['gender']}" if "gender" in row else ""}
    found = face_heatmaps(cam, image, [row])
    return [(face_crop(image, row_face(row), DISPLAY_SIDE), f"face {face}, aligned as the model sees it"),
            *((item["image"], said[item["output"]]) for item in found)]


def live_frame(predictor, frame, session: LiveSession | None) -> tuple[Any, str, LiveSession | None]:
    """One webcam frame: (the frame with tracked, smoothed labels, a line with the frame rate, the viewer's
    session, started on the first frame)."""
    if frame is None:
        return None, "", session
    session = session or LiveSession(predictor, LIVE_DETECTOR)
    drawn, rows, fps = session.frame(frame)
    rate = "measuring the frame rate..." if fps is None else f"{fps:.1f} frames per second"
    faces = f"{len(rows)} face{'s' if len(rows) != 1 else ''}"
    return drawn, f"{faces}, {rate}; each face's numbers are averaged over its last {WINDOW} frames.", session


# ---------------------------------------------------------------- the Gradio app


def model_panel(entry: ModelEntry, suffix: str = "") -> tuple[Any, Any]:
    """Predict and About tabs for one model, inside the current Blocks context; returns the About text's
    function and component, for build_demo to refresh at every page load."""
    import gradio as gr
    import pandas as pd

    from agegender.inference.predictor import Predictor

    predictor = Predictor.load(entry.folder)
    headers = table_headers(predictor.outputs)
    cams: dict[str, Any] = {}  # the Grad-CAM model, loaded from model.keras when first asked for

    def heatmaps(path: str | None, face: float | None, detector: str = DEFAULT_DETECTOR):
        if not path:
            raise gr.Error("Upload, paste or take a photo first.")
        try:
            if "cam" not in cams:
                cams["cam"] = load_gradcam(entry.folder)
            return looked_at(predictor, cams["cam"], path, int(face or 1), detector or DEFAULT_DETECTOR)
        except UserError as error:
            raise gr.Error(str(error)) from error

    def live(frame, session):
        return live_frame(predictor, frame, session)

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
                with gr.Accordion("What the model looked at", open=False):
                    gr.Markdown("Grad-CAM heatmaps of one face: the warmer a region, the more it moved the model "
                                "towards the age and the gender it gave.")
                    with gr.Row():
                        face = gr.Number(1, minimum=1, precision=0, label="Face number", elem_id=f"face{suffix}")
                        look = gr.Button("Show heatmaps", elem_id=f"heatmaps{suffix}")
                    gallery = gr.Gallery(label="Aligned face and its heatmaps", columns=3, height="auto")
        with gr.Tab("Live webcam"):
            gr.Markdown("Faces are boxed and labelled as the webcam streams; each face keeps its number while it "
                        "stays in view, and its age and gender are averaged over its last frames.")
            with gr.Row():
                webcam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Webcam",
                                  elem_id=f"webcam{suffix}")
                live_view = gr.Image(type="pil", format="jpeg", label="Faces, tracked", interactive=False)
            live_message = gr.Markdown(elem_id=f"live{suffix}")
            session = gr.State(None)
        with gr.Tab("About this model"):
            about_text = gr.Markdown(about(), elem_id=f"about{suffix}")
    button.click(predict, inputs=[photo, detector], outputs=[annotated, message, table],
                 api_name=f"predict{suffix}")
    look.click(heatmaps, inputs=[photo, face, detector], outputs=[gallery], api_name=f"heatmaps{suffix}")
    webcam.stream(live, inputs=[webcam, session], outputs=[live_view, live_message, session],
                  stream_every=LIVE_EVERY_S, time_limit=LIVE_LIMIT_S, api_name=f"live{suffix}")
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
    """One model: its Predict (with "What the model looked at"), Live webcam and About tabs. Several: a tab per
    model (the combined Space).

    API names: /predict, /heatmaps, /live and /about for one model; /predict_<name>, /heatmaps_<name>,
    /live_<name> and /about_<name> for several."""
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
