"""Model folders: model.keras beside metadata.json, written atomically, loaded without their folder name."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agegender.cli import UserError, atomic_path, replace_dir, write_json
from agegender.data.labels import AGE_SCALE, GENDER_LABELS, TASK_OUTPUTS
from agegender.data.paths import RUNS_DIR
from agegender.models.registry import FAMILIES, Family

MODEL_FILE = "model.keras"
# optional exports, backend name -> file: float32 TFLite and the same with int8 weights (dynamic-range
# quantisation); tasks/export.py writes and checks each and records it as metadata["exports"][backend]
EXPORT_FILES = {"tflite": "model.tflite", "tflite-int8": "model-int8.tflite"}
METADATA_FILE = "metadata.json"
METRICS_FILE = "metrics.json"
PIXEL_SCALING = "divide_by_255"  # models take RGB floats in [0, 1]; backbone-specific scaling is inside


def make_metadata(task: str, image_size: int, params: dict[str, Any], manifest_sha256: str,
                  backbone: str = "cnn", weights: str = "none", **extra: Any) -> dict[str, Any]:
    """Everything prediction needs, plus how the model was made."""
    if task not in TASK_OUTPUTS:
        raise ValueError(f"unknown task {task}")
    import keras
    import tensorflow as tf

    return {
        "task": task,
        "outputs": list(TASK_OUTPUTS[task]),
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
    """Rewrite a .keras file with its float32 weights stored as float16 and the archive deflated: less than half
    the size, loaded by plain keras.saving.load_model into float32 variables (values rounded to float16's 11-bit
    mantissa)."""
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
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def read_metadata(folder: Path) -> dict[str, Any]:
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        raise UserError(f"{folder} is not a model folder: it has no {METADATA_FILE}.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error.msg}).") from error


def training_datasets(metadata: dict[str, Any]) -> list[str]:
    """The labelled datasets besides UTKFace a model learned from: its own `extra_datasets` and, for an ensemble,
    its members'."""
    names = list(metadata.get("extra_datasets") or [])
    for member in metadata.get("members") or []:
        names += member.get("extra_datasets") or []
    return list(dict.fromkeys(names))


def learned_manifests(metadata: dict[str, Any], folder: Path, datasets: set[str]) -> list[str | None]:
    """The prepare_data manifests (their sha256) on which the parts of a model that learned from any of `datasets`
    were trained: the model itself and, for an ensemble, each such member (its metadata read from its recorded
    folder, or from the folder of its name beside the ensemble's); None where that is not recorded."""
    hashes = []
    if datasets & set(metadata.get("extra_datasets") or []):
        hashes.append(metadata.get("manifest_sha256"))
    for member in metadata.get("members") or []:
        if not datasets & set(member.get("extra_datasets") or []):
            continue
        found = member.get("manifest_sha256")  # train_ensemble records it; older ensembles do not
        places = [Path(member[key]) if key == "folder" else Path(folder).parent / member[key]
                  for key in ("folder", "name") if member.get(key)]
        for place in places if found is None else []:
            if (place / METADATA_FILE).is_file():
                found = read_metadata(place).get("manifest_sha256")
                break
        hashes.append(found)
    return hashes


def load_model(folder: Path) -> tuple[Any, dict[str, Any]]:
    """The Keras model and its metadata; a missing or broken folder raises UserError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"Model folder {folder} does not exist.")
    metadata = read_metadata(folder)
    if not (folder / MODEL_FILE).exists():
        raise UserError(f"{folder} has no {MODEL_FILE}.")
    import keras

    import agegender.models.layers  # noqa: F401  (registers the custom layers)

    try:
        model = keras.saving.load_model(folder / MODEL_FILE, compile=False)
    except Exception as error:  # a truncated or foreign file
        raise UserError(f"Could not load {folder / MODEL_FILE}: {error}".split("\n")[0]) from error
    return model, metadata


def is_model_folder(folder: Path) -> bool:
    """A folder that holds a model, or what is left of one (its loader then says what is wrong)."""
    return (folder / METADATA_FILE).exists() or (folder / MODEL_FILE).exists()


def find_models(models_dir: Path, pattern: str = "*") -> tuple[list[Path], list[str]]:
    """Every model folder under models_dir whose name matches `pattern`, sorted, searching one level down in
    folders that are not models themselves (results/models/<group>/<model>); and one line per folder that holds
    none. Hidden folders (a model being written) are passed over."""
    def visible(folder: Path) -> list[Path]:
        return sorted(p for p in folder.glob(pattern) if p.is_dir() and not p.name.startswith((".", "_")))

    found, skipped = [], []
    for folder in visible(Path(models_dir)) if Path(models_dir).is_dir() else []:
        if is_model_folder(folder):
            found.append(folder)
            continue
        inner = [p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith((".", "_"))
                 and is_model_folder(p)]
        found.extend(inner)
        if not inner:
            skipped.append(f"{folder.name}: no {METADATA_FILE} or {MODEL_FILE} in {folder}; skipped.")
    return found, skipped


def is_complete(folder: Path) -> bool:
    return (folder / METADATA_FILE).is_file() and (folder / MODEL_FILE).is_file()


def ranking_key(folder: Path) -> tuple[float, float]:
    """Lower is better: test age MAE first, then minus gender accuracy (from metrics.json)."""
    try:
        metrics = json.loads((Path(folder) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        metrics = {}
    mae = metrics.get("age", {}).get("mae")
    accuracy = metrics.get("gender", {}).get("accuracy")
    return (float(mae) if mae is not None else math.inf, -float(accuracy) if accuracy is not None else 0.0)


def family_model(family: Family, models_dir: Path) -> Path | None:
    """The family's model folder (results/models/<family.folder>) when it holds a model, else the best by
    ranking_key of its other ones: <folder prefix>* beside it (finetune_transfer writes transfer-<backbone>)
    or inside results/models/<family>/; None when there is none."""
    models_dir = Path(models_dir)
    if is_complete(models_dir / family.folder):
        return models_dir / family.folder
    prefix = family.folder_prefix or f"{family.name}-"
    candidates = [folder for pattern in (f"{prefix}*", family.name) for folder in find_models(models_dir, pattern)[0]
                  if is_complete(folder)]
    return min(candidates, key=ranking_key) if candidates else None


@dataclass
class ModelEntry:
    """A family's model as its Space and model card name it."""

    space: str  # its model family: gender, age, multitask, transfer or ensemble
    name: str  # its path under results/models/ (and its name in comparison.json), e.g. "transfer-wrn16-8-imdbwiki"
    folder: Path


def find_model(space: str, models_dir: Path) -> ModelEntry | None:
    """The model of a family's Space (family_model), named by its path under models_dir."""
    folder = family_model(FAMILIES[space], Path(models_dir))
    return None if folder is None else ModelEntry(space, folder.relative_to(Path(models_dir)).as_posix(), folder)


def model_folders(given: list[Path] | None, models_dir: Path) -> list[Path]:
    """The model folders given (each checked), or every model folder under models_dir that has its metadata."""
    if given:
        for folder in given:
            if not Path(folder).is_dir():
                raise UserError(f"Model folder {folder} does not exist.")
            if not (Path(folder) / METADATA_FILE).exists():
                raise UserError(f"{folder} is not a model folder: it has no {METADATA_FILE}.")
        return [Path(folder) for folder in given]
    return [folder for folder in find_models(models_dir)[0] if (folder / METADATA_FILE).exists()]


def run_path(name: str, runs_dir: Path = RUNS_DIR) -> Path:
    """runs_dir/<name>/<UTC time>, a new run folder's path (not created yet)."""
    path = Path(runs_dir) / name / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for count in range(2, 100):  # two runs within the same second
        if not path.exists():
            break
        path = path.with_name(f"{path.name.split('-')[0]}-{count}")
    return path
