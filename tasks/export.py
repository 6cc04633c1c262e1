"""Export saved models to TFLite (LiteRT) for fast CPU inference, checked against the Keras model.

    python tasks/export.py                          # every model folder under results/models/
    python tasks/export.py results/models/multitask

Writes two files next to model.keras and records in metadata.json how far each one's predictions are from the
Keras model's on real test faces (a model with an age distribution, a DEX head, exports it as an extra output
named age_bins, which its calibrated age interval reads):
- model.tflite, float32 like the Keras model (only summation order differs; checked to tight tolerances).
  A model whose float32 flatbuffer would pass the 25 MB a committed file may take (the fine-tuned WideResNet,
  the ensemble) gets none, and its int8 export serves it;
- model-int8.tflite, the same with int8 weights (dynamic-range quantisation: activations are quantised on the
  fly, no calibration data), 2-3x faster again on a CPU. It is kept only when it stays within the INT8_
  tolerances below; else the table says why and the float export serves.
`predict`, `compare`, the benchmark and the Spaces take the fastest export that matches model.keras (Predictor
backend "auto"); `--backend keras|tflite|tflite-int8` in predict chooses.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer

from agegender.cli import UserError, console, user_errors, write_bytes, write_json
from agegender.data.manifest import cache_is_current, file_sha256, load_split
from agegender.data.paths import DATA_DIR, MODELS_DIR, SEED
from agegender.models.folders import EXPORT_FILES, FLOAT16_ABOVE_BYTES, METADATA_FILE, MODEL_FILE, model_folders
from agegender.reporting.tables import rich_table

CHECK_FACES = 1000
# float32 throughout, so only summation order differs; anything larger means a broken conversion
MAX_AGE_DIFF_YEARS = 0.05
MAX_P_FEMALE_DIFF = 1e-3
# int8 weights: each prediction moves a little; what users see (error against the labels, the gender
# called) must not. Chosen after measuring the multitask model only (0.13 y mean difference, 99.8% agreement).
INT8_MEAN_AGE_DIFF_YEARS = 0.5
INT8_AGE_MAE_CHANGE_YEARS = 0.15
INT8_MEAN_P_FEMALE_DIFF = 0.01
INT8_GENDER_AGREEMENT = 0.98

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def convert(model, kind: str = "tflite") -> bytes:
    """The Keras model (with its age distribution as an extra output when it has one) as a TFLite flatbuffer
    with a batch dimension left free; "tflite-int8" stores int8 weights (dynamic-range quantisation)."""
    import contextlib
    import io
    import os

    import tensorflow as tf

    from agegender import silenced_stderr
    from agegender.models.age_bins import with_age_distribution

    converter = tf.lite.TFLiteConverter.from_keras_model(with_age_distribution(model))
    if kind == "tflite-int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # without representative data: weights only
    # the converter prints the whole SavedModel signature, and its C++ side logs graph warnings to stderr
    quiet = contextlib.nullcontext() if os.environ.get("AGEGENDER_TF_LOGS") == "1" else silenced_stderr()
    with contextlib.redirect_stdout(io.StringIO()), quiet:
        return converter.convert()


def check_faces(image_size: int, data_dir: Path, count: int) -> tuple[np.ndarray, pd.DataFrame | None]:
    """Real test crops at the model's size and their labels when their cache is there, else seeded noise."""
    if cache_is_current(image_size, data_dir):
        images, rows = load_split("test", image_size, data_dir, count)
        return images, rows
    noise = np.random.default_rng(SEED).integers(0, 256, (count, image_size, image_size, 3), dtype=np.uint8)
    return noise, None


def differences(keras_out: dict[str, np.ndarray], lite_out: dict[str, np.ndarray],
                rows: pd.DataFrame | None = None) -> dict[str, float]:
    """How far the export's predictions are from the Keras model's and, with labels, both models' errors."""
    found = {}
    if "age" in keras_out:
        gap = np.abs(keras_out["age"] - lite_out["age"])
        found.update(max_age_diff_years=float(gap.max()), mean_age_diff_years=float(gap.mean()))
        if rows is not None:
            truth = rows["age"].to_numpy(dtype=float)
            found.update(age_mae_keras=float(np.mean(np.abs(keras_out["age"] - truth))),
                         age_mae_export=float(np.mean(np.abs(lite_out["age"] - truth))))
    if "age_low" in keras_out:  # the calibrated interval: the share of faces given the same whole years
        found["interval_agreement"] = float(np.mean((keras_out["age_low"] == lite_out["age_low"])
                                                    & (keras_out["age_high"] == lite_out["age_high"])))
    if "p_female" in keras_out:
        gap = np.abs(keras_out["p_female"] - lite_out["p_female"])
        called_keras, called_lite = keras_out["p_female"] > 0.5, lite_out["p_female"] > 0.5
        found.update(max_p_female_diff=float(gap.max()), mean_p_female_diff=float(gap.mean()),
                     gender_agreement=float(np.mean(called_keras == called_lite)))
        if rows is not None:
            truth = rows["gender"].to_numpy() == 1
            found.update(gender_accuracy_keras=float(np.mean(called_keras == truth)),
                         gender_accuracy_export=float(np.mean(called_lite == truth)))
    if "gender_certain" in keras_out:  # the calibrated certainty: the share of faces both call certain or not
        found["certainty_agreement"] = float(np.mean(keras_out["gender_certain"] == lite_out["gender_certain"]))
    return found


def out_of_tolerance(kind: str, gaps: dict[str, float]) -> list[str]:
    """The tolerances an export breaks (empty when it may be used)."""
    if kind == "tflite":
        limits = [("max_age_diff_years", MAX_AGE_DIFF_YEARS), ("max_p_female_diff", MAX_P_FEMALE_DIFF)]
    else:
        limits = [("mean_age_diff_years", INT8_MEAN_AGE_DIFF_YEARS), ("mean_p_female_diff", INT8_MEAN_P_FEMALE_DIFF)]
    broken = [f"{name} {gaps[name]:.3g} > {limit}" for name, limit in limits if gaps.get(name, 0.0) > limit]
    if kind == "tflite-int8":
        if "age_mae_export" in gaps and abs(gaps["age_mae_export"] - gaps["age_mae_keras"]) > INT8_AGE_MAE_CHANGE_YEARS:
            broken.append(f"age MAE {gaps['age_mae_keras']:.2f} -> {gaps['age_mae_export']:.2f} years")
        if gaps.get("gender_agreement", 1.0) < INT8_GENDER_AGREEMENT:
            broken.append(f"gender agreement {gaps['gender_agreement']:.3f} < {INT8_GENDER_AGREEMENT}")
    return broken


class TooLarge(Exception):
    """A float export over the size a committed file may take: skipped, the int8 export serves the model."""


def export_one(folder: Path, keras_predictor, kind: str, images: np.ndarray, rows: pd.DataFrame | None,
               keras_out: dict[str, np.ndarray], model_sha256: str) -> tuple[dict[str, Any] | None, list[str]]:
    """Convert, check and (when within tolerance) save one export; returns (its record or None, problems). A float
    export over FLOAT16_ABOVE_BYTES raises TooLarge."""
    import tensorflow as tf

    from agegender.inference.predictor import Predictor
    from agegender.inference.runtime import tflite_runner

    blob = convert(keras_predictor.model, kind)
    if kind == "tflite" and len(blob) > FLOAT16_ABOVE_BYTES:  # the files we commit stay under this size
        raise TooLarge(f"{len(blob) / 1e6:.0f} MB of float32 weights, over the {FLOAT16_ABOVE_BYTES / 1e6:.0f} MB "
                       "a committed file may take; the int8 export serves this model")
    with tempfile.TemporaryDirectory(prefix="export-") as scratch:  # checked before it goes next to the model
        candidate = Path(scratch) / EXPORT_FILES[kind]
        candidate.write_bytes(blob)
        lite = Predictor(None, keras_predictor.metadata, folder, kind, _runner=tflite_runner(candidate))
        gaps = differences(keras_out, lite.predict_arrays(images), rows)
    problems = out_of_tolerance(kind, gaps)
    if problems:
        return None, problems
    write_bytes(folder / EXPORT_FILES[kind], blob)

    record = {"file": EXPORT_FILES[kind], "bytes": len(blob), "model_sha256": model_sha256,
              "parameters": keras_predictor.parameters, "outputs": sorted(lite._runner.get_output_details()),
              "checked_on": f"{len(images)} {source_of(rows)}",
              **gaps, "tensorflow": tf.__version__, "created": datetime.now(UTC).isoformat(timespec="seconds")}
    return record, []


def source_of(rows: pd.DataFrame | None) -> str:
    return "utkface test crops" if rows is not None else "random images (no test cache at this size)"


def export_model(folder: Path, data_dir: Path = DATA_DIR, faces: int = CHECK_FACES,
                 int8: bool = True) -> dict[str, dict[str, Any]]:
    """Write folder/model.tflite (and model-int8.tflite when it passes) with their checks in metadata.json.

    Returns {backend: record, or {"rejected": [problems]}}; a float export outside tolerance raises UserError."""
    from agegender.inference.predictor import Predictor

    folder = Path(folder)
    keras_predictor = Predictor.load(folder, backend="keras")
    images, rows = check_faces(keras_predictor.image_size, data_dir, faces)
    keras_out = keras_predictor.predict_arrays(images)
    model_sha256 = file_sha256(folder / MODEL_FILE)
    exports = {k: v for k, v in keras_predictor.metadata.get("exports", {}).items() if k in EXPORT_FILES}
    results: dict[str, dict[str, Any]] = {}
    for kind in ("tflite", "tflite-int8") if int8 else ("tflite",):
        oversized = False
        try:
            record, problems = export_one(folder, keras_predictor, kind, images, rows, keras_out, model_sha256)
        except TooLarge as error:
            record, problems, oversized = None, [str(error)], True
        if kind == "tflite" and problems and not oversized:
            raise UserError(f"The TFLite export of {folder} predicts differently from model.keras "
                            f"({'; '.join(problems)}); it was not saved.")
        if record is None:  # an int8 export outside tolerance: none at all rather than a stale one
            exports.pop(kind, None)
            (folder / EXPORT_FILES[kind]).unlink(missing_ok=True)
            results[kind] = {"rejected": problems}
        else:
            exports[kind] = results[kind] = record
    write_json(folder / METADATA_FILE, {**keras_predictor.metadata, "exports": exports})
    return results


def describe(record: dict[str, Any]) -> list[str]:
    """A table row's cells for one export: size, how it differs from Keras, the faces it was checked on."""
    if "rejected" in record:
        return ["not kept (see below)", "", "", "", "", ""]
    age = (f"{record['mean_age_diff_years']:.3f} / {record['max_age_diff_years']:.2f}"
           if "max_age_diff_years" in record else "-")
    gender = (f"{record['mean_p_female_diff']:.4f} / {record['max_p_female_diff']:.3f}"
              if "max_p_female_diff" in record else "-")
    same = f"{record['gender_agreement']:.1%}" if "gender_agreement" in record else "-"
    interval = f"{record['interval_agreement']:.1%}" if "interval_agreement" in record else "-"
    return [f"{record['bytes'] / 1e6:.1f} MB", age, gender, same, interval, record["checked_on"]]


@app.command()
def main(
    folders: Annotated[list[Path] | None, typer.Argument(
        help="Model folders to export; default every folder in results/models/.")] = None,
    faces: Annotated[int, typer.Option(min=1, help="Test faces the exports are checked on.")] = CHECK_FACES,
    int8: Annotated[bool, typer.Option(help="Also write model-int8.tflite (int8 weights) when it passes.")] = True,
    data_dir: Annotated[Path, typer.Option(help="Folder prepare_data wrote (for the check faces).")] = DATA_DIR,
) -> None:
    """Export each model to TFLite and check it predicts what the Keras model predicts."""
    with user_errors():
        found = model_folders(folders, MODELS_DIR)
        if not found:
            raise UserError(f"No model folders in {MODELS_DIR}; train a model first.")
        rows, rejected = [], []
        for folder in found:
            with console.status(f"exporting {folder}"):
                results = export_model(folder, data_dir, faces, int8)
            rows += [[folder.name, kind, *describe(record)] for kind, record in results.items()]
            rejected += [f"{folder / EXPORT_FILES[kind]} not kept: {'; '.join(record['rejected'])}."
                         for kind, record in results.items() if "rejected" in record]
        headers = ["model", "backend", "size", "age diff mean / max (y)", "p_female diff mean / max", "same gender",
                   "same age interval", "checked on"]
        console.print(rich_table("TFLite exports (differences from model.keras)", headers, rows, left=headers))
        for line in rejected:  # below the table, where a narrow terminal does not cut the reasons
            console.print(f"[yellow]{line}[/]")


if __name__ == "__main__":
    app()
