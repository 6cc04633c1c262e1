"""Export saved models to TFLite (LiteRT) for fast CPU inference, checked against the Keras model.

    python tasks/export.py                          # every model folder under results/models/
    python tasks/export.py results/models/multitask

Writes model.tflite next to model.keras and records in metadata.json how far its predictions are from the
Keras model's on real test faces. `predict`, `compare`, the benchmark and the Spaces use the export when it
matches model.keras (Predictor backend "auto"); `--backend keras` in predict still runs the Keras model.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import typer
from rich.table import Table

from common.cli import UserError, console, user_errors, write_json
from common.data import DATA_DIR, MODELS_DIR, SEED, cache_is_current, file_sha256, load_split
from common.modelio import METADATA_FILE, MODEL_FILE, TFLITE_FILE

CHECK_FACES = 256
# float32 throughout, so only summation order differs; anything larger means a broken conversion
MAX_AGE_DIFF_YEARS = 0.05
MAX_P_FEMALE_DIFF = 1e-3

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def convert(model) -> bytes:
    """The Keras model as a float32 TFLite flatbuffer with a batch dimension left free."""
    import contextlib
    import io

    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints the whole SavedModel signature
        return converter.convert()


def check_faces(image_size: int, data_dir: Path, count: int) -> tuple[np.ndarray, str]:
    """Real test crops at the model's size when their cache is there, else seeded noise images."""
    if cache_is_current(image_size, data_dir):
        images, _ = load_split("test", image_size, data_dir, count)
        return images, "utkface test crops"
    noise = np.random.default_rng(SEED).integers(0, 256, (count, image_size, image_size, 3), dtype=np.uint8)
    return noise, "random images (no test cache at this size)"


def differences(keras_out: dict[str, np.ndarray], lite_out: dict[str, np.ndarray]) -> dict[str, float]:
    found = {}
    if "age" in keras_out:
        found["max_age_diff_years"] = float(np.max(np.abs(keras_out["age"] - lite_out["age"])))
    if "p_female" in keras_out:
        found["max_p_female_diff"] = float(np.max(np.abs(keras_out["p_female"] - lite_out["p_female"])))
    return found


def export_model(folder: Path, data_dir: Path = DATA_DIR, faces: int = CHECK_FACES) -> dict[str, Any]:
    """Write folder/model.tflite and its check into metadata.json; raise UserError if predictions differ."""
    from common.faces import Predictor, tflite_runner

    folder = Path(folder)
    keras_predictor = Predictor.load(folder, backend="keras")
    blob = convert(keras_predictor.model)
    tmp = folder / f".tmp-{os.getpid()}-{TFLITE_FILE}"
    tmp.write_bytes(blob)
    try:
        lite_predictor = Predictor(None, keras_predictor.metadata, folder, "tflite", _runner=tflite_runner(tmp))
        images, source = check_faces(keras_predictor.image_size, data_dir, faces)
        gaps = differences(keras_predictor.predict_arrays(images), lite_predictor.predict_arrays(images))
        if gaps.get("max_age_diff_years", 0.0) > MAX_AGE_DIFF_YEARS or \
                gaps.get("max_p_female_diff", 0.0) > MAX_P_FEMALE_DIFF:
            raise UserError(f"The TFLite export of {folder} predicts differently from model.keras ({gaps}); "
                            "it was not saved.")
        tmp.replace(folder / TFLITE_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    import tensorflow as tf

    record = {"file": TFLITE_FILE, "bytes": len(blob), "model_sha256": file_sha256(folder / MODEL_FILE),
              "parameters": keras_predictor.parameters, "checked_on": f"{len(images)} {source}", **gaps,
              "tensorflow": tf.__version__, "created": datetime.now(UTC).isoformat(timespec="seconds")}
    metadata = {**keras_predictor.metadata}
    metadata["exports"] = {**metadata.get("exports", {}), "tflite": record}
    write_json(folder / METADATA_FILE, metadata)
    return record


def model_folders(folders: list[Path] | None, models_dir: Path = MODELS_DIR) -> list[Path]:
    if folders:
        return folders
    found = sorted(p for p in models_dir.iterdir() if (p / MODEL_FILE).exists()) if models_dir.is_dir() else []
    if not found:
        raise UserError(f"No model folders in {models_dir}; train a model first.")
    return found


@app.command()
def main(
    folders: Annotated[list[Path] | None, typer.Argument(
        help="Model folders to export; default every folder in results/models/.")] = None,
    faces: Annotated[int, typer.Option(min=1, help="Test faces the export is checked on.")] = CHECK_FACES,
    data_dir: Annotated[Path, typer.Option(help="Folder prepare_data wrote (for the check faces).")] = DATA_DIR,
) -> None:
    """Export each model to TFLite and check it predicts what the Keras model predicts."""
    with user_errors():
        table = Table(title="TFLite exports")
        for column in ("model", "size", "max age diff (years)", "max p_female diff", "checked on"):
            table.add_column(column)
        for folder in model_folders(folders):
            with console.status(f"exporting {folder}"):
                record = export_model(folder, data_dir, faces)
            table.add_row(folder.name, f"{record['bytes'] / 1e6:.1f} MB",
                          f"{record['max_age_diff_years']:.2g}" if "max_age_diff_years" in record else "-",
                          f"{record['max_p_female_diff']:.2g}" if "max_p_female_diff" in record else "-",
                          record["checked_on"])
        console.print(table)


if __name__ == "__main__":
    app()
