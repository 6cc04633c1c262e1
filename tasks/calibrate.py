"""Calibrate the 80% age interval of saved models on the validation split and store it in their metadata.json.

    python tasks/calibrate.py results/models/multitask results/models/age
    python tasks/calibrate.py                        # every model folder under results/models/ with an age

Trainers calibrate the models they save; this command does it for model folders saved before, or again after
a change. Only the validation split is read. How the interval is built: agegender.inference.intervals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agegender.cli import UserError, console, user_errors
from agegender.data.manifest import load_manifest
from agegender.data.paths import DATA_DIR, MODELS_DIR
from agegender.inference.intervals import band_names, interval_label
from agegender.inference.recalibrate import calibrate_folder
from agegender.models.folders import model_folders, read_metadata
from agegender.reporting.tables import rich_table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def calibrate_models(folders: list[Path] | None, data_dir: Path = DATA_DIR, limit: int | None = None,
                     models_dir: Path = MODELS_DIR) -> dict[str, dict]:
    """{folder: calibration record} for the folders given (each must predict age), or for every model folder
    under models_dir that predicts age."""
    load_manifest(data_dir)  # fails in one sentence when prepare_data has not run
    found = model_folders(folders, models_dir)
    if not folders:
        found = [folder for folder in found if "age" in read_metadata(folder).get("outputs", [])]
    if not found:
        raise UserError(f"No model folder in {models_dir} predicts age.")
    records = {}
    for folder in found:
        with console.status(f"calibrating {folder} on the validation split"):
            records[str(folder)] = calibrate_folder(folder, data_dir, limit)
    return records


def print_records(records: dict[str, dict]) -> None:
    rows = []
    for folder, record in records.items():
        val = record["validation"]
        rows.append([Path(folder).name, interval_label(record), f"{record['scale']:.3f}", f"{val['faces']:,}",
                     f"{val['coverage']:.1%}", f"{val['mean_width']:.1f}"])
    console.print(rich_table("Age interval calibrated on the validation split (target 80%)",
                             ["model", "interval", "scale", "faces", "coverage", "mean width (y)"], rows,
                             left=["model", "interval"]))
    for folder, record in records.items():
        by_band = record["validation"]["by_band"]
        cells = [[band, f"{by_band[band]['faces']:,}", f"{by_band[band]['coverage']:.1%}",
                  f"{by_band[band]['mean_width']:.1f}"] for band in band_names() if band in by_band]
        console.print(rich_table(f"{Path(folder).name}: validation by true age band", ["age band", "faces", "coverage",
                                                                                       "mean width (y)"], cells))
        widths = ", ".join(f"{name} {found['mean_width']:.1f} y" for name, found in record["candidates"].items())
        console.print(f"Mean width of each candidate at 80%: {widths}.")


@app.command()
def main(
    folders: Annotated[list[Path] | None, typer.Argument(
        help="Model folders to calibrate; default every folder under results/models/ that predicts age.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Folder prepare_data wrote.")] = DATA_DIR,
    limit: Annotated[int | None, typer.Option(
        min=10, help="Use a seeded subset of N validation faces (quick checks).")] = None,
) -> None:
    """Fit each model's 80% age interval on the validation split and write it into its metadata.json."""
    with user_errors():
        records = calibrate_models(folders, data_dir, limit)
        print_records(records)
        console.print(f"Wrote the calibration into {len(records)} metadata.json file(s).")


if __name__ == "__main__":
    app()
