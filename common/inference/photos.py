"""Photos in, one row per face out: image files and folders collected, read, faces found and predicted in
batches through agegender.inference.predictor.Predictor (the one inference path). tasks/predict.py writes these
rows (and, when asked, an annotated copy of each photo and a heatmap per face and output); the benchmark times
them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from rich.progress import Progress

from agegender.cli import UserError, atomic_path
from agegender.data.images import IMAGE_SUFFIXES, UnreadableImage, read_image
from agegender.data.labels import age_band
from agegender.inference.detectors import DEFAULT_DETECTOR
from agegender.inference.drawing import draw_faces
from agegender.inference.gradcam import face_heatmaps
from agegender.inference.predictor import Predictor

# a face's predicted columns
PREDICTED = ("age", "gender", "p_female", "gender_certain", "age_low", "age_high", "age_band")
# called with each photo, as read, and its rows (one per face, or the photo's one row with --no-detect)
PhotoHandler = Callable[[Path, Image.Image, list[dict[str, Any]]], None]


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
                  progress: Progress | None = None, detector: str = DEFAULT_DETECTOR,
                  on_photo: PhotoHandler | None = None,
                  read: Callable[[Path], Image.Image] = read_image) -> tuple[pd.DataFrame, list[str]]:
    """One row per face (or per image with --no-detect); returns (rows, unreadable-file messages). on_photo,
    when given, is called with each readable photo and its rows; `read` decodes a file as read_image does
    (tasks/predict.py passes one that decodes the next files on threads while the model works)."""
    rows, skipped = [], []
    task = progress.add_task("predicting", total=len(files)) if progress else None
    pending: list[tuple[Path, np.ndarray, Image.Image | None]] = []  # --no-detect crops, a batch at a time

    def flush() -> None:
        if not pending:
            return
        predicted = predictor.predict_arrays(np.stack([crop for _, crop, _ in pending]), batch_size)
        for index, (path, _, image) in enumerate(pending):
            found = _prediction(predictor, predicted, index)
            rows.append({"file": str(path), **found})
            if on_photo is not None:
                on_photo(path, image, [{**found, "box": (0, 0, *image.size), "confidence": 1.0}])
        pending.clear()

    for path in files:
        try:
            image = read(path)
        except UnreadableImage as error:
            skipped.append(str(error))
        else:
            if detect:
                faces = predictor.predict_image(image, detect=True, detector=detector)
                for number, face in enumerate(faces, start=1):  # numbered as the annotated copy's boxes
                    box = face.get("box")
                    rows.append({"file": str(path), "face": number if box else None,
                                 **_box_columns(box), "confidence": face.get("confidence"),
                                 **{k: face[k] for k in PREDICTED if k in face},
                                 "reason": face.get("reason", "")})
                if on_photo is not None:
                    on_photo(path, image, [face for face in faces if face.get("box")])
            else:
                pending.append((path, predictor.prepare_crop(image), image if on_photo is not None else None))
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
        row["age_band"] = age_band(row["age"])
        if "age_low" in predicted:
            row["age_low"], row["age_high"] = int(predicted["age_low"][index]), int(predicted["age_high"][index])
    if "p_female" in predicted:
        p_female = float(predicted["p_female"][index])
        row["gender"] = predictor.metadata["labels"]["1" if p_female >= 0.5 else "0"]
        row["p_female"] = p_female
        row["gender_certain"] = bool(predicted["gender_certain"][index])
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
        columns += ["gender", "p_female", "gender_certain"]
    if "age" in predictor.outputs:  # the interval's columns stay empty for a model without a calibrated one
        columns += ["age_low", "age_high", "age_band"]
    if detect:
        columns += ["face", "x", "y", "width", "height", "confidence", "reason"]
    return frame.reindex(columns=columns)


# ---------------------------------------------------------------- annotated copies and heatmaps


def output_names(files: list[Path], folder: Path) -> dict[Path, str]:
    """A file stem per photo for what is written about it into `folder`: its own stem, numbered when two
    photos share one. Fails when a name would land on one of the photos."""
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for path in files:
        stem, count = path.stem, 2
        while stem in taken:
            stem, count = f"{path.stem}-{count}", count + 1
        taken.add(stem)
        names[path] = stem
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder to write into.")
    inputs = {path.resolve() for path in files}
    if any((folder / f"{names[path]}{path.suffix}").resolve() in inputs for path in files):
        raise UserError(f"{folder} holds the input photos; choose another folder, so that none is overwritten.")
    return names


def save_image(image: Image.Image, path: Path) -> None:
    """Write an image atomically in the format its suffix names (JPEG at quality 95)."""
    kind = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with atomic_path(path) as tmp:
        image.save(tmp, format=kind, **({"quality": 95} if kind == "JPEG" else {}))


class AnnotatedCopies:
    """on_photo handler: a copy of each photo, same size and format, with a numbered box and label per face
    drawn as the Spaces draw them, written into `folder` under the photo's own name."""

    def __init__(self, folder: Path, files: list[Path]):
        self.folder, self.names, self.written = Path(folder), output_names(files, Path(folder)), 0

    def __call__(self, path: Path, image: Image.Image, rows: list[dict[str, Any]]) -> None:
        save_image(draw_faces(image, rows), self.folder / f"{self.names[path]}{path.suffix}")
        self.written += 1


class HeatmapFiles:
    """on_photo handler: per face and output, the aligned crop with its Grad-CAM heatmap, written into `folder`
    as <photo>-face<N>-<output>.png (N as in the annotated copy)."""

    def __init__(self, folder: Path, files: list[Path], cam, detect: bool):
        self.folder, self.names, self.cam, self.detect = Path(folder), output_names(files, Path(folder)), cam, detect
        self.written = 0

    def __call__(self, path: Path, image: Image.Image, rows: list[dict[str, Any]]) -> None:
        for found in face_heatmaps(self.cam, image, rows, self.detect):
            save_image(found["image"], self.folder / f"{self.names[path]}-face{found['face']}-{found['output']}.png")
            self.written += 1


def each(*handlers: PhotoHandler | None) -> PhotoHandler | None:
    """One on_photo handler calling every handler given (None when none is)."""
    chosen = [handler for handler in handlers if handler is not None]
    if not chosen:
        return None

    def call(path: Path, image: Image.Image, rows: list[dict[str, Any]]) -> None:
        for handler in chosen:
            handler(path, image, rows)

    return call
