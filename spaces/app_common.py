"""The Gradio UI every Space shares: a photo in, a box per face with the model's gender and age out.

Each `spaces/<name>/app.py` is a few lines over `launch_app()`. This file runs in two layouts:

- in the repository: `spaces/app_common.py`, with the project installed (`pip install -e .`, which installs
  `common/` as the package `agegender`) and `results/` one folder up;
- in a Space staged by `tasks/publish.py`: `app_common.py`, `agegender/` (a copy of `common/`), `examples/`,
  `results/` side by side.

Either way the model lives in `results/models/<name>/` (or the best of `results/models/<name>/*/`) and the
bias analysis in `results/comparison.json`, found through `agegender.data` (`AGEGENDER_RESULTS_DIR` moves both).
Faces are found and prepared by `agegender.faces.Predictor`: the same code as `tasks/predict.py`.

Importing this module loads neither Gradio nor TensorFlow; `build_demo()` does.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agegender.cli import UserError
from agegender.data import AGE_BANDS, MODELS_DIR, RACE_LABELS, RESULTS_DIR
from agegender.faces import DEFAULT_DETECTOR, DETECTORS, available_detectors
from agegender.modelio import METADATA_FILE, METRICS_FILE, MODEL_FILE

HERE = Path(__file__).resolve().parent

MODEL_NAMES = ("gender", "age", "multitask", "transfer")
TITLES = {
    "gender": "Gender from a face photo",
    "age": "Age from a face photo",
    "multitask": "Age and gender from a face photo",
    "transfer": "Age and gender from a face photo (fine-tuned pretrained backbone)",
}
EXAMPLES_DIR = HERE / "examples"
EXAMPLES = ("astronaut.jpg", "two_faces.jpg", "landscape.jpg")  # public domain / generated, never UTKFace
COMPARISON_FILE = "comparison.json"
UTKFACE_URL = "https://susanqq.github.io/UTKFace/"
COLOURS = {"female": (214, 51, 132), "male": (13, 110, 253), None: (25, 135, 84)}  # box colour by gender
HEADLINE_BIAS_METRICS = ("accuracy", "f1", "mae", "cs5")
CACHE_CLEANUP = (1800, 3600)  # Gradio deletes uploaded/temporary files older than an hour, every 30 minutes


# ---------------------------------------------------------------- finding the model and its results


@dataclass
class ModelEntry:
    space: str  # gender, age, multitask or transfer
    name: str  # its name under results/models/ and in comparison.json, e.g. "transfer/efficientnetb0"
    folder: Path


def is_model_folder(folder: Path) -> bool:
    return (folder / METADATA_FILE).is_file() and (folder / MODEL_FILE).is_file()


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file as a dict, or None when it is missing or unreadable (the page then says so)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def ranking_key(folder: Path) -> tuple[float, float]:
    """Lower is better: test age MAE first, then minus gender accuracy (from metrics.json)."""
    metrics = read_json(folder / METRICS_FILE) or {}
    mae = metrics.get("age", {}).get("mae")
    accuracy = metrics.get("gender", {}).get("accuracy")
    return (float(mae) if mae is not None else math.inf, -float(accuracy) if accuracy is not None else 0.0)


def find_model(space: str, models_dir: Path = MODELS_DIR) -> ModelEntry | None:
    """results/models/<space>/ when it is a model folder, else the best of the model folders named
    <space>-* beside it (finetune_transfer writes results/models/transfer-<backbone>/) or one level down,
    ranked by ranking_key; None when there is none."""
    models_dir = Path(models_dir)
    folder = models_dir / space
    if is_model_folder(folder):
        return ModelEntry(space, space, folder)
    inner = sorted(folder.iterdir()) if folder.is_dir() else []
    siblings = sorted(models_dir.glob(f"{space}-*")) if models_dir.is_dir() else []
    candidates = [p for p in [*inner, *siblings]
                  if p.is_dir() and not p.name.startswith((".", "_")) and is_model_folder(p)]
    if not candidates:
        return None
    best = min(candidates, key=ranking_key)
    label = best.name if best.parent == models_dir else f"{space}/{best.name}"
    return ModelEntry(space, label, best)


def find_models(spaces: list[str] | tuple[str, ...], models_dir: Path = MODELS_DIR) -> list[ModelEntry]:
    return [entry for entry in (find_model(space, models_dir) for space in spaces) if entry is not None]


def load_comparison(results_dir: Path = RESULTS_DIR) -> dict[str, Any] | None:
    return read_json(Path(results_dir) / COMPARISON_FILE)


# ---------------------------------------------------------------- the "about this model" page


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_markdown(metrics: dict[str, Any] | None) -> str:
    """The test metrics of metrics.json as a table (read when the page is built, never hard-coded)."""
    if not metrics or not ({"gender", "age"} & set(metrics)):
        return "No `metrics.json` beside this model, so its accuracy is not known here."
    rows = []
    gender, age = metrics.get("gender"), metrics.get("age")
    if gender:
        rows += [["gender accuracy", _fmt(gender.get("accuracy")), "share of faces whose gender is right"],
                 ["gender F1", _fmt(gender.get("f1")), "female taken as the positive class"],
                 ["gender ROC AUC", _fmt(gender.get("roc_auc")), "ranking quality of P(female)"]]
    if age:
        rows += [["age MAE", f"{_fmt(age.get('mae'), 2)} years", "mean absolute error"],
                 ["age RMSE", f"{_fmt(age.get('rmse'), 2)} years", "root mean squared error"],
                 ["age CS@5", _fmt(age.get("cs5"), 3), "share of faces within 5 years"]]
    n = (gender or age or {}).get("n")
    split = metrics.get("split", "test")
    return (f"Measured on the {split} split of UTKFace ({n:,} faces the model never saw in training):\n\n"
            if isinstance(n, int) else f"Measured on the {split} split of UTKFace:\n\n") + _table(
        ["metric", "value", "meaning"], rows)


def bias_markdown(name: str, comparison: dict[str, Any] | None) -> str:
    """Best and worst group per headline metric, and the per-race table, from compare's comparison.json."""
    bias = (comparison or {}).get("bias") or {}
    gaps = [g for g in bias.get("gaps", [])
            if g.get("model") == name and g.get("metric") in HEADLINE_BIAS_METRICS]
    groups = [g for g in bias.get("groups", []) if g.get("model") == name]
    if not gaps and not groups:
        return ("Not measured for this model yet: `python tasks/compare.py` writes the bias analysis to "
                "`results/comparison.json`; publish again afterwards.")
    faces = (comparison or {}).get("settings", {}).get("test_faces", "?")
    parts = [f"From `python tasks/compare.py` on the test split ({faces} faces). UTKFace's labels are the "
             "dataset's own: binary gender and five broad race groups.\n"]
    if gaps:
        parts.append(_table(["grouping", "metric", "best group", "worst group", "gap"], [
            [g["grouping"], g["metric"], f"{g['best_group']} ({_fmt(g.get('best'), 3)})",
             f"{g['worst_group']} ({_fmt(g.get('worst'), 3)})", _fmt(g.get("gap"), 3)] for g in gaps]))
    for grouping in ("race", "age band", "gender"):
        part = [g for g in groups if g.get("grouping") == grouping]
        columns = [key for key in ("accuracy", "mae", "cs5") if any(key in g for g in part)]
        if part and columns:
            parts.append(f"\nBy {grouping}:\n\n" + _table(["group", "faces", *columns], [
                [g["group"], g.get("n", "?"), *(_fmt(g.get(key), 3) for key in columns)] for g in part]))
    return "\n".join(parts)


def about_markdown(entry: ModelEntry, comparison: dict[str, Any] | None = None) -> str:
    """What the model is, what it was trained on, how accurate it is and where it is biased, and its limits.

    The Space's "About" tab and the model card (tasks/publish.py) both use this text."""
    metadata = read_json(entry.folder / METADATA_FILE) or {}
    metrics = read_json(entry.folder / METRICS_FILE)
    outputs = metadata.get("outputs", [])
    said = {"age": "age in years", "gender": "gender (probability of female)"}
    predicts = " and ".join(said[o] for o in outputs if o in said) or "unknown outputs"
    races = ", ".join(RACE_LABELS.values())
    bands = ", ".join(f"{low}-{high}" if high < 200 else f"{low}+" for low, high in AGE_BANDS)
    return "\n".join([
        f"## Model `{entry.name}`",
        f"Predicts {predicts} from a face. Task `{metadata.get('task', '?')}`, backbone "
        f"`{metadata.get('backbone', '?')}` (initial weights: {metadata.get('weights', '?')}), input "
        f"{metadata.get('image_size', '?')} x {metadata.get('image_size', '?')} RGB, trained "
        f"{metadata.get('created', '?')}.",
        "",
        "## Trained on",
        f"[UTKFace]({UTKFACE_URL}): aligned and cropped face photos of people aged 0 to 116, labelled with "
        f"age, binary gender (male/female) and one of five race groups ({races}). The project splits it into "
        "train, validation and test sets (`tasks/prepare_data.py`). **UTKFace is licensed for non-commercial "
        "research only, and so is this model.**",
        "",
        "## Measured accuracy",
        metrics_markdown(metrics),
        "",
        "## Known biases",
        bias_markdown(entry.name, comparison),
        "",
        "## Intended use and limits",
        "- A demonstration and research tool. Do not use it to make decisions about people (access, "
        "hiring, age verification, identification) or to infer anyone's gender identity: it predicts the "
        "binary label UTKFace's annotators gave from appearance.",
        "- Age is an estimate: expect errors of several years (see the MAE above), larger for the young, the "
        f"old and groups with few training faces (age bands used above: {bands}).",
        f"- It works best on frontal, well-lit faces like UTKFace's. Faces are found by {detector_text()}, "
        "aligned on the eyes and cropped like UTKFace's crops; small, turned or covered faces may be missed or "
        "predicted badly. The Predict tab offers the other detectors.",
        "- Photos sent to this demo are not stored by the app; Gradio's temporary copies are deleted within "
        "about two hours.",
    ])


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


def detector_text(name: str = DEFAULT_DETECTOR) -> str:
    spec = DETECTORS[name]
    threshold = "" if spec.min_confidence is None else f", confidence {spec.min_confidence} or more"
    return f"`{name}` ({spec.description}{threshold})"


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
        return about_markdown(entry, load_comparison())

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


def build_demo(spaces: list[str] | tuple[str, ...], models_dir: Path = MODELS_DIR):
    """One model: its Predict and About tabs. Several: a tab per model (the combined Space).

    API names: /predict and /about for one model; /predict_<name> and /about_<name> for several."""
    entries = find_models(spaces, models_dir)
    if not entries:
        wanted = " or ".join(str(Path(models_dir) / space) for space in spaces)
        raise UserError(f"No trained model in {wanted}: train one (e.g. `python tasks/train_{spaces[0]}.py`) "
                        "or point AGEGENDER_RESULTS_DIR at a results folder that has one.")
    import gradio as gr

    single = len(spaces) == 1
    title = TITLES[entries[0].space] if single else "Age and gender from a face photo: every model"
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
