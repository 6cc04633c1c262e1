"""Model folders: model.keras beside metadata.json, written atomically, loaded without their folder name."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agegender.cli import UserError, replace_dir, write_json
from agegender.data import AGE_SCALE, GENDER_LABELS

MODEL_FILE = "model.keras"
# optional exports, backend name -> file: float32 TFLite and the same with int8 weights (dynamic-range
# quantisation); tasks/export.py writes and checks each and records it as metadata["exports"][backend]
EXPORT_FILES = {"tflite": "model.tflite", "tflite-int8": "model-int8.tflite"}
METADATA_FILE = "metadata.json"
METRICS_FILE = "metrics.json"
TASKS = ("gender", "age", "multitask")
PIXEL_SCALING = "divide_by_255"  # models take RGB floats in [0, 1]; backbone-specific scaling is inside


def make_metadata(task: str, image_size: int, params: dict[str, Any], manifest_sha256: str,
                  backbone: str = "cnn", weights: str = "none", **extra: Any) -> dict[str, Any]:
    """Everything prediction needs, plus how the model was made."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task}")
    import keras
    import tensorflow as tf

    return {
        "task": task,
        "outputs": {"gender": ["gender"], "age": ["age"], "multitask": ["age", "gender"]}[task],
        "image_size": int(image_size),
        "pixel_scaling": PIXEL_SCALING,
        "color": "RGB",
        "age_scale": AGE_SCALE,
        "labels": GENDER_LABELS,
        "gender_output": "p_female",
        "backbone": backbone,
        "weights": weights,
        "params": params,
        "manifest_sha256": manifest_sha256,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        **extra,
    }


@contextmanager
def staging_dir(final_dir: Path) -> Iterator[Path]:
    """A temporary sibling folder to write a model into; it replaces final_dir only if the block succeeds."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.with_name(f".tmp-{os.getpid()}-{final_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final_dir)


# a float32 model.keras above this size is stored with float16 weights (Keras casts them back on loading)
FLOAT16_ABOVE_BYTES = 25_000_000


def save_model(model, folder: Path, metadata: dict[str, Any]) -> None:
    """model.keras and metadata.json into folder (normally a staging_dir); metadata["stored_weights"] says
    whether the file holds float32 or, for models over FLOAT16_ABOVE_BYTES, float16 weights."""
    import keras

    folder.mkdir(parents=True, exist_ok=True)
    # an uncompiled twin sharing the weights: no optimizer state in the file (a third of the size)
    keras.Model(model.input, model.output, name=model.name).save(folder / MODEL_FILE)  # .output keeps the dict
    stored = "float32"
    if (folder / MODEL_FILE).stat().st_size > FLOAT16_ABOVE_BYTES:
        store_float16(folder / MODEL_FILE)
        stored = "float16"
    write_json(folder / METADATA_FILE, {**metadata, "stored_weights": stored})


def store_float16(path: Path) -> None:
    """Rewrite a .keras file with its float32 weights stored as float16: half the size, loaded by plain
    keras.saving.load_model into float32 variables (values rounded to float16's 11-bit mantissa)."""
    import io
    import zipfile

    import h5py
    import numpy as np

    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    source, target = io.BytesIO(members["model.weights.h5"]), io.BytesIO()
    with h5py.File(source, "r") as old, h5py.File(target, "w") as new:  # a new file: h5py never shrinks one

        def copy(group, into):
            into.attrs.update(group.attrs)
            for name, item in group.items():
                if isinstance(item, h5py.Group):
                    copy(item, into.create_group(name))
                else:
                    values = item[()]
                    stored = into.create_dataset(
                        name, data=values.astype(np.float16) if item.dtype == np.float32 else values)
                    stored.attrs.update(item.attrs)

        copy(old, new)
    members["model.weights.h5"] = target.getvalue()
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with zipfile.ZipFile(tmp, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    tmp.replace(path)


def read_metadata(folder: Path) -> dict[str, Any]:
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        raise UserError(f"{folder} is not a model folder: it has no {METADATA_FILE}.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error.msg}).") from error


def load_model(folder: Path) -> tuple[Any, dict[str, Any]]:
    """The Keras model and its metadata; a missing or broken folder raises UserError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"Model folder {folder} does not exist.")
    metadata = read_metadata(folder)
    if not (folder / MODEL_FILE).exists():
        raise UserError(f"{folder} has no {MODEL_FILE}.")
    import keras

    import agegender.layers  # noqa: F401  (registers the custom layers)

    try:
        model = keras.saving.load_model(folder / MODEL_FILE, compile=False)
    except Exception as error:  # a truncated or foreign file
        raise UserError(f"Could not load {folder / MODEL_FILE}: {error}".split("\n")[0]) from error
    return model, metadata


def model_folders(given: list[Path] | None, models_dir: Path) -> list[Path]:
    """The model folders given (each checked), or every folder of models_dir with a metadata.json."""
    if given:
        for folder in given:
            if not Path(folder).is_dir():
                raise UserError(f"Model folder {folder} does not exist.")
            if not (Path(folder) / METADATA_FILE).exists():
                raise UserError(f"{folder} is not a model folder: it has no {METADATA_FILE}.")
        return [Path(folder) for folder in given]
    if not Path(models_dir).is_dir():
        return []
    return sorted(p for p in Path(models_dir).iterdir() if (p / METADATA_FILE).exists())
