"""Photos in, one row per face out: image files and folders collected, read, faces found and predicted in
batches through agegender.faces.Predictor (the one inference path). tasks/predict.py writes these rows; the
benchmark times them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import Progress

from agegender.cli import UserError
from agegender.data import IMAGE_SUFFIXES
from agegender.faces import DEFAULT_DETECTOR, Predictor, UnreadableImage, read_image


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
