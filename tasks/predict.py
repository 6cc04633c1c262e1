"""Batch inference: age and gender for every face in image files and folders, with any saved model.

    python tasks/predict.py results/models/multitask photos/ --out predictions.csv
    python tasks/predict.py results/models/gender face_crop.jpg --no-detect
    python tasks/predict.py results/models/multitask photos/ --detector mtcnn
    python tasks/predict.py results/models/multitask photos/ --annotate annotated/ --heatmaps heatmaps/

Each face gets its age band and, when the model's interval is calibrated (tasks/calibrate.py), age_low and
age_high: whole years holding the true age 80% of the time on the validation split. --annotate writes a copy of
each photo with a numbered box and label per face; --heatmaps the aligned crop of each face with a Grad-CAM
heatmap per output (computed from model.keras whatever the backend).

A folder with exports from tasks/export.py runs the fastest that matches model.keras (model-int8.tflite, else
model.tflite; int8 is about 4x faster per face than Keras on a 2-core CPU); --backend keras|tflite|tflite-int8 chooses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agegender.cli import UserError, check_choice, console, err_console, user_errors, write_text
from agegender.faces import BACKENDS, DEFAULT_DETECTOR, DETECTORS, Predictor
from agegender.gradcam import load_gradcam
from agegender.photos import AnnotatedCopies, HeatmapFiles, collect_images, each, predict_files
from agegender.tables import rich_table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def cell(column: str, value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if column == "file":
        return Path(value).name
    if column == "age":
        return f"{value:.1f}" if isinstance(value, float) else str(value)
    if column in ("p_female", "confidence"):
        return f"{value:.3f}"
    return f"{value:.0f}" if isinstance(value, float) else str(value)


def print_table(frame: pd.DataFrame) -> None:
    """The rows on the console, narrower than the CSV: the interval beside the age, the box in one cell."""
    shown = frame.copy()
    if "age_low" in shown:
        interval = [f" ({low:.0f}–{high:.0f})" if low == low else "" for low, high in
                    zip(shown["age_low"], shown["age_high"], strict=True)]
        shown["age"] = [cell("age", age) + (extra if age == age else "") for age, extra in
                        zip(shown["age"], interval, strict=True)]
        shown = shown.drop(columns=["age_low", "age_high"]).rename(columns={"age_band": "band"})
    if "x" in shown:
        shown.insert(shown.columns.get_loc("x"), "box", [
            "" if x != x else f"{x:.0f},{y:.0f} {w:.0f}x{h:.0f}"
            for x, y, w, h in shown[["x", "y", "width", "height"]].itertuples(index=False)])
        shown = shown.drop(columns=["x", "y", "width", "height"])
    rows = [[cell(column, row[column]) for column in shown.columns] for _, row in shown.iterrows()]
    console.print(rich_table(f"{len(frame)} prediction(s)", list(shown.columns), rows,
                             left=("file", "gender", "band", "reason")))


@app.command()
def main(
    model_dir: Annotated[Path, typer.Argument(help="A saved model folder, e.g. results/models/multitask.")],
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders of images.")],
    out: Annotated[Path | None, typer.Option(help="Write the predictions to this CSV instead of a table.")] = None,
    detect: Annotated[bool, typer.Option(
        "--detect/--no-detect", help="Find and align faces (default), or treat each image as an aligned face crop.")]
    = True,
    batch_size: Annotated[int, typer.Option(min=1, help="Faces per model call.")] = 64,
    backend: Annotated[str, typer.Option(
        help="auto (the fastest checked export the folder has: tflite-int8, tflite, else keras), keras, tflite "
             "or tflite-int8.")] = "auto",
    detector: Annotated[str, typer.Option(
        help=f"Face detector: {', '.join(DETECTORS)} (tasks/bench_detectors.py compares them).")]
    = DEFAULT_DETECTOR,
    annotate: Annotated[Path | None, typer.Option(
        help="Write a copy of each photo into this folder with a numbered box and label per face.")] = None,
    heatmaps: Annotated[Path | None, typer.Option(
        help="Write each face's aligned crop with a Grad-CAM heatmap per output into this folder.")] = None,
    heatmap_layer: Annotated[str | None, typer.Option(
        help="Layer the heatmaps are taken at (its name, or path through nested models); default the last "
             "convolutional layer.")] = None,
) -> None:
    """Predict age and/or gender for every face in the given images."""
    check_choice(backend, BACKENDS, "--backend")
    check_choice(detector, tuple(DETECTORS), "--detector")
    with user_errors():
        if heatmap_layer is not None and heatmaps is None:
            raise UserError("--heatmap-layer chooses the layer of --heatmaps; give --heatmaps DIR too.")
        files = collect_images(paths)
        predictor = Predictor.load(model_dir, backend)
        copies = AnnotatedCopies(annotate, files) if annotate is not None else None
        maps = HeatmapFiles(heatmaps, files, load_gradcam(model_dir, heatmap_layer), detect) if heatmaps else None
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True) as progress:
            frame, skipped = predict_files(predictor, files, detect, batch_size, progress, detector,
                                           on_photo=each(copies, maps))
        for handler, what in ((copies, "annotated photo(s)"), (maps, "heatmap(s)")):
            if handler is not None:
                console.print(f"Wrote {handler.written} {what} to {handler.folder}.")
        for message in skipped:
            err_console.print(f"[yellow]skipped[/] {message}")
        if frame.empty:
            raise UserError(f"None of the {len(files)} file(s) could be read as an image.")
        if out is not None:
            write_text(out, frame.to_csv(index=False, float_format="%.4f"))
            console.print(f"Wrote {len(frame)} row(s) to {out}.")
        else:
            print_table(frame)


if __name__ == "__main__":
    app()
