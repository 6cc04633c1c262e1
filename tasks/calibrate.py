"""Calibrate saved models on the validation split and store it in their metadata.json: the 80% age interval of a
model with an age, and the calibrated p_female and certainty threshold of a model with a gender.

    python tasks/calibrate.py results/models/multitask results/models/age
    python tasks/calibrate.py results/models/ensemble --data-dir data-detected
    python tasks/calibrate.py results/models/ensemble --only gender   # the gender alone
    python tasks/calibrate.py                        # every model folder under results/models/

Trainers calibrate the models they save; this command does it for model folders saved before, or again after
a change (a data folder with more datasets). Only the validation split is read: UTKFace's for the age interval,
every dataset's, pooled, for the gender. How the interval is built: agegender.inference.intervals; the gender:
agegender.inference.gender_calibration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agegender.cli import UserError, check_choice, console, user_errors
from agegender.data.manifest import load_manifest
from agegender.data.paths import DATA_DIR, MODELS_DIR
from agegender.inference.gender_calibration import TARGET_ACCURACY, calibration_label
from agegender.inference.intervals import band_names, interval_label
from agegender.models.folders import model_folders, read_metadata
from agegender.reporting.certainty import percent
from agegender.reporting.tables import rich_table
from agegender.training.calibrate import calibrate_folder, calibrate_gender_folder

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


CALIBRATED_OUTPUTS = ("age", "gender")


def calibrate_models(folders: list[Path] | None, data_dir: Path = DATA_DIR, limit: int | None = None,
                     models_dir: Path = MODELS_DIR, only: str | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """({folder: age interval record}, {folder: gender calibration record}) for the folders given (each must
    predict age or gender, or the `only` one of them), or for every model folder under models_dir that does."""
    load_manifest(data_dir)  # fails in one sentence when prepare_data has not run
    wanted = {only} if only else set(CALIBRATED_OUTPUTS)
    found = model_folders(folders, models_dir)
    outputs = {folder: set(read_metadata(folder).get("outputs", [])) & wanted for folder in found}
    if folders:
        for folder in found:
            if not outputs[folder]:
                what = " nor ".join(sorted(wanted))
                raise UserError(f"{folder} predicts {'neither ' if len(wanted) > 1 else 'no '}{what}, so it has "
                                "nothing to calibrate.")
    found = [folder for folder in found if outputs[folder]]
    if not found:
        raise UserError(f"No model folder in {models_dir} predicts {' or '.join(sorted(wanted))}.")
    intervals, genders = {}, {}
    for folder in found:
        with console.status(f"calibrating {folder} on the validation split"):
            if "age" in outputs[folder]:
                intervals[str(folder)] = calibrate_folder(folder, data_dir, limit)
            if "gender" in outputs[folder]:
                genders[str(folder)] = calibrate_gender_folder(folder, data_dir, limit)
    return intervals, genders


def print_gender_records(records: dict[str, dict]) -> None:
    rows = []
    for folder, record in records.items():
        val = record["validation"]
        rows.append([Path(folder).name, calibration_label(record), f"{val['faces']:,}",
                     f"{val['ece_before']:.3f} -> {val['ece_after']:.3f}", f"{record['threshold']:.3f}",
                     percent(val["coverage"]), percent(val["certain_accuracy"]), percent(val["accuracy"])])
    console.print(rich_table(
        f"Gender calibrated on the validation split (certain: at least {TARGET_ACCURACY:.0%} right)",
        ["model", "calibration", "faces", "ECE", "threshold", "coverage", "certain acc.", "acc. (all)"], rows,
        left=["model", "calibration"]))
    for folder, record in records.items():
        datasets = ", ".join(f"{name} {count:,}" for name, count in record["datasets"].items())
        losses = ", ".join(f"{name} {found['log_loss_out_of_fold']:.4f}"
                           for name, found in record["candidates"].items())
        console.print(f"{Path(folder).name}: validation faces pooled from {datasets}; out-of-fold log loss {losses}; "
                      f"ECE after, out of fold {record['validation']['ece_after_out_of_fold']:.3f}.")


def print_records(records: dict[str, dict]) -> None:
    if not records:
        return
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
        help="Model folders to calibrate; default every folder under results/models/ that predicts age or "
             "gender.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Folder prepare_data wrote.")] = DATA_DIR,
    limit: Annotated[int | None, typer.Option(
        min=10, help="Use a seeded subset of N validation faces (quick checks).")] = None,
    only: Annotated[str | None, typer.Option(
        help="Calibrate only this output: age (the 80% interval) or gender (calibrated p_female and certainty "
             "threshold); default both.")] = None,
) -> None:
    """Fit each model's 80% age interval and gender calibration on the validation split and write them into its
    metadata.json."""
    check_choice(only, CALIBRATED_OUTPUTS, "--only")
    with user_errors():
        intervals, genders = calibrate_models(folders, data_dir, limit, only=only)
        print_records(intervals)
        if genders:
            print_gender_records(genders)
        console.print(f"Wrote the calibration into {len(set(intervals) | set(genders))} metadata.json file(s).")


if __name__ == "__main__":
    app()
