"""Fitting a model's calibrations on its validation predictions: the gender calibration that
agegender.inference.gender_calibration applies (temperature and isotonic candidates compared by out-of-fold log
loss, the better refitted on every face, then its certainty threshold), which the trainers fit while saving; and
a saved model's age interval (agegender.inference.intervals) and gender calibration refitted on the validation
split and stored in its metadata.json, which tasks/calibrate.py runs. Prediction only applies them."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agegender.cli import UserError, without_nan, write_json
from agegender.data.manifest import load_split
from agegender.inference.gender_calibration import (
    CALIBRATION_KEY,
    ECE_BINS,
    ISOTONIC,
    TARGET_ACCURACY,
    TEMPERATURE,
    GenderCalibration,
    certainty_threshold,
    coverage_and_accuracy,
    expected_calibration_error,
    log_loss,
    logit,
    sigmoid,
)
from agegender.inference.intervals import INTERVAL_KEY, calibrate
from agegender.inference.predictor import Predictor
from agegender.models.age_bins import DISTRIBUTION_LAYER
from agegender.models.folders import METADATA_FILE, read_metadata
from agegender.reporting.certainty import certainty_by_group, race_spreads

# ---------------------------------------------------------------- the age interval


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


# ---------------------------------------------------------------- the gender calibration


FOLDS = 5


def fit_temperature(p_model: np.ndarray, truth: np.ndarray) -> GenderCalibration:
    """The temperature that minimises the log loss (searched over log T in [-3, 3])."""
    from scipy.optimize import minimize_scalar

    z, y = logit(p_model), np.asarray(truth, dtype=float)

    def loss(log_t: float) -> float:
        return log_loss(sigmoid(z / np.exp(log_t)), y)

    found = minimize_scalar(loss, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-6})
    return GenderCalibration(TEMPERATURE, float(np.exp(found.x)))


def fit_isotonic(p_model: np.ndarray, truth: np.ndarray) -> GenderCalibration:
    from sklearn.isotonic import IsotonicRegression

    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
        np.asarray(p_model, dtype=float), np.asarray(truth, dtype=float))
    return GenderCalibration(ISOTONIC, breakpoints=(tuple(float(x) for x in fitted.X_thresholds_),
                                                    tuple(float(y) for y in fitted.y_thresholds_)))


FITTERS = {TEMPERATURE: fit_temperature, ISOTONIC: fit_isotonic}


def out_of_fold(p_model: np.ndarray, truth: np.ndarray, fit, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Each face's calibrated p_female from a calibration fitted on the other folds."""
    fold = np.random.default_rng(seed).permutation(len(p_model)) % folds
    found = np.empty(len(p_model))
    for number in range(folds):
        held = fold == number
        found[held] = fit(p_model[~held], truth[~held]).apply(p_model[held])
    return found


def can_fit_calibration(truth: np.ndarray) -> bool:
    """Whether there are enough labelled faces, of both genders, to fit and cross-check a calibration."""
    truth = np.asarray(truth, dtype=float)
    return len(truth) >= 2 * FOLDS and len(np.unique(truth)) == 2


def fit_calibration(p_model: np.ndarray, truth: np.ndarray, target: float = TARGET_ACCURACY,
                    methods: tuple[str, ...] = (TEMPERATURE, ISOTONIC), rows: pd.DataFrame | None = None
                    ) -> dict[str, Any]:
    """The metadata.json record fitted on validation predictions: the method with the lower out-of-fold log
    loss, refitted on every face, its certainty threshold, and the validation figures before and after (with
    `rows`, the faces' labels, also per group and the race spreads)."""
    p_model, truth = np.asarray(p_model, dtype=float), np.asarray(truth, dtype=float)
    if not can_fit_calibration(truth):
        raise ValueError("the gender calibration needs faces of both genders, at least "
                         f"{2 * FOLDS} of them")
    candidates = {}
    for method in methods:
        held_out = out_of_fold(p_model, truth, FITTERS[method])
        candidates[method] = {"log_loss_out_of_fold": log_loss(held_out, truth),
                              "ece_out_of_fold": expected_calibration_error(held_out, truth)}
    method = min(candidates, key=lambda name: candidates[name]["log_loss_out_of_fold"])
    calibration = FITTERS[method](p_model, truth)
    calibrated = calibration.apply(p_model)
    threshold = certainty_threshold(calibrated, truth, target)
    calibration = GenderCalibration(calibration.method, calibration.temperature, calibration.breakpoints, threshold)
    validation = {"ece_before": expected_calibration_error(p_model, truth),
                  "ece_after": expected_calibration_error(calibrated, truth),
                  "ece_after_out_of_fold": candidates[method]["ece_out_of_fold"],
                  "log_loss_before": log_loss(p_model, truth), "log_loss_after": log_loss(calibrated, truth),
                  **coverage_and_accuracy(calibrated, truth, threshold)}
    if rows is not None:
        validation["groups"] = certainty_by_group(calibrated, rows.reset_index(drop=True), threshold)
        validation["race_spreads"] = race_spreads(validation["groups"])
    return without_nan({**calibration.record(), "target_accuracy": target, "ece_bins": ECE_BINS, "split": "val",
                        "validation": validation, "candidates": candidates,
                        "created": datetime.now(UTC).isoformat(timespec="seconds")})


def calibrate_gender_folder(folder: Path, data_dir: Path, limit: int | None = None,
                            predictor=None, split=None) -> dict[str, Any]:
    """Fit the gender calibration of a saved model on the validation split (every dataset in it, pooled) and
    store it in its metadata.json. `predictor` and `split` (images, rows) skip loading them again."""
    predictor = predictor or Predictor.load(folder, backend="keras")
    if "gender" not in predictor.outputs:
        raise UserError(f"{folder} predicts no gender, so it has no gender calibration to fit.")
    images, rows = split if split is not None else load_split("val", predictor.image_size, data_dir, limit,
                                                                         datasets=None)
    known = rows["gender"].notna().to_numpy()
    if not can_fit_calibration(rows["gender"].to_numpy()[known]):
        raise UserError(f"The validation split in {data_dir} has too few faces with a known gender (at least "
                        f"{2 * FOLDS}, of both genders) to calibrate {folder}.")
    predicted = predictor.predict_arrays(images[known], batch_size=128)
    record = fit_calibration(predicted["p_female_model"], rows["gender"].to_numpy()[known], rows=rows[known])
    datasets = rows.loc[known, "dataset"] if "dataset" in rows else pd.Series(["utkface"] * int(known.sum()))
    record["datasets"] = {str(name): int(count) for name, count in datasets.value_counts(sort=False).items()}
    write_json(Path(folder) / METADATA_FILE, {**read_metadata(folder), CALIBRATION_KEY: record})
    return record
