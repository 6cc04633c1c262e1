"""Batch inference: age and gender for every face in image files and folders, with any saved model.

    python tasks/predict.py results/models/multitask photos/ --out predictions.csv
    python tasks/predict.py results/models/gender face_crop.jpg --no-detect
    python tasks/predict.py results/models/multitask photos/ --detector mtcnn

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
from rich.table import Table

from agegender.cli import UserError, check_choice, console, err_console, user_errors, write_text
from agegender.data import IMAGE_SUFFIXES
from agegender.faces import BACKENDS, DEFAULT_DETECTOR, DETECTORS, Predictor, UnreadableImage, read_image

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def collect_images(paths: list[Path]) -> list[Path]:
    """Files given directly, plus image files found (recursively) in folders given."""
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise UserError(f"{path} does not exist.")
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise UserError(f"The folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
            found.extend(images)
        else:
            found.append(path)
    return found


def predict_files(predictor: Predictor, files: list[Path], detect: bool = True, batch_size: int = 64,
                  progress: Progress | None = None,
                  detector: str = DEFAULT_DETECTOR) -> tuple[pd.DataFrame, list[str]]:
    """One row per face (or per image with --no-detect); returns (rows, unreadable-file messages)."""
    rows, skipped = [], []
    task = progress.add_task("predicting", total=len(files)) if progress else None
    pending: list[tuple[Path, np.ndarray]] = []  # --no-detect crops, predicted a batch at a time

    def flush() -> None:
        if not pending:
            return
        predicted = predictor.predict_arrays(np.stack([crop for _, crop in pending]), batch_size)
        for index, (path, _) in enumerate(pending):
            rows.append({"file": str(path), **_prediction(predictor, predicted, index)})
        pending.clear()

    for path in files:
        try:
            image = read_image(path)
        except UnreadableImage as error:
            skipped.append(str(error))
        else:
            if detect:
                for face_index, face in enumerate(predictor.predict_image(image, detect=True, detector=detector)):
                    box = face.get("box")
                    rows.append({"file": str(path), "face": face_index if box else None,
                                 **_box_columns(box), "confidence": face.get("confidence"),
                                 **{k: face[k] for k in ("age", "gender", "p_female") if k in face},
                                 "reason": face.get("reason", "")})
            else:
                pending.append((path, predictor.prepare_crop(image)))
                if len(pending) >= batch_size:
                    flush()
        if progress:
            progress.advance(task)
    flush()
    return _ordered(pd.DataFrame(rows), predictor, detect), skipped


def _prediction(predictor: Predictor, predicted: dict[str, np.ndarray], index: int) -> dict:
    row = {}
    if "age" in predicted:
        row["age"] = float(predicted["age"][index])
    if "p_female" in predicted:
        p_female = float(predicted["p_female"][index])
        row["gender"] = predictor.metadata["labels"]["1" if p_female >= 0.5 else "0"]
        row["p_female"] = p_female
    return row


def _box_columns(box) -> dict:
    if not box:
        return {"x": None, "y": None, "width": None, "height": None}
    return dict(zip(("x", "y", "width", "height"), box, strict=True))


def _ordered(frame: pd.DataFrame, predictor: Predictor, detect: bool) -> pd.DataFrame:
    columns = ["file"]
    if "age" in predictor.outputs:
        columns.append("age")
    if "gender" in predictor.outputs:
        columns += ["gender", "p_female"]
    if detect:
        columns += ["face", "x", "y", "width", "height", "confidence", "reason"]
    return frame.reindex(columns=columns)


def print_table(frame: pd.DataFrame) -> None:
    table = Table(title=f"{len(frame)} prediction(s)")
    for column in frame.columns:
        table.add_column(column, justify="left" if column in ("file", "gender", "reason") else "right")
    for _, row in frame.iterrows():
        cells = []
        for column in frame.columns:
            value = row[column]
            if value is None or (isinstance(value, float) and np.isnan(value)):
                cells.append("")
            elif column == "file":
                cells.append(Path(value).name)
            elif column == "age":
                cells.append(f"{value:.1f}")
            elif column in ("p_female", "confidence"):
                cells.append(f"{value:.3f}")
            elif isinstance(value, float):
                cells.append(f"{value:.0f}")
            else:
                cells.append(str(value))
        table.add_row(*cells)
    console.print(table)


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
) -> None:
    """Predict age and/or gender for every face in the given images."""
    check_choice(backend, BACKENDS, "--backend")
    check_choice(detector, tuple(DETECTORS), "--detector")
    with user_errors():
        files = collect_images(paths)
        predictor = Predictor.load(model_dir, backend)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True) as progress:
            frame, skipped = predict_files(predictor, files, detect, batch_size, progress, detector)
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
