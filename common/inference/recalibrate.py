"""A saved model's calibration refitted on the validation split and stored in its metadata.json: what
tasks/calibrate.py runs (the trainers fit it while saving)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agegender.cli import UserError, write_json
from agegender.data.manifest import load_split
from agegender.inference.intervals import DISTRIBUTION_LAYER, INTERVAL_KEY, calibrate
from agegender.inference.predictor import Predictor
from agegender.models.folders import METADATA_FILE, read_metadata


def calibrate_predictor(predictor, images: np.ndarray, rows: pd.DataFrame) -> dict[str, Any]:
    """The calibration record of a Keras-backed Predictor on a split's cached crops and labels."""
    predicted = predictor.predict_arrays(images, batch_size=128, age_bins=True)
    return calibrate(predicted["age"], rows["age"].to_numpy(), predicted.get(DISTRIBUTION_LAYER))


def calibrate_folder(folder: Path, data_dir: Path, limit: int | None = None) -> dict[str, Any]:
    """Fit the interval of a saved model on the validation split and store it in its metadata.json."""
    predictor = Predictor.load(folder, backend="keras")
    if "age" not in predictor.outputs:
        raise UserError(f"{folder} predicts no age, so it has no age interval to calibrate.")
    images, rows = load_split("val", predictor.image_size, data_dir, limit)
    record = calibrate_predictor(predictor, images, rows)
    write_json(Path(folder) / METADATA_FILE, {**read_metadata(folder), INTERVAL_KEY: record})
    return record
