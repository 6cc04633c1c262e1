"""The command line of the three CNN trainers (tasks/train_gender.py, train_age.py, train_multitask.py): one Typer
app per family, over the registry (agegender.models.registry) and the families' trainers
(agegender.training.trainers, through the shared loop agegender.training.loop).

Every parameter a CNN family has is a flag; the flags of parameters another CNN family has are hidden from
--help and refused. The run's parameters: the family's defaults, then --recipe, then --params, then flags; its
settings (--epochs, --image-size, --patience, --seed) the same way, without --params.

Each run has a folder (results/runs/<model folder>/<UTC time>, or --run-dir) with its TensorBoard logs and,
while it trains, a backup of its state after every epoch: when a run is killed, the same command run again
finds that folder and continues from the last finished epoch (agegender.training.distribution; --no-backup turns
it off).
"""

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from agegender import cli
from agegender.cli import UserError, console, user_errors
from agegender.data.paths import DATA_DIR, MODELS_DIR
from agegender.models.cnn import AGE_HEADS
from agegender.models.folders import run_path
from agegender.models.registry import FAMILIES
from agegender.training.distribution import (
    BACKUP_FOLDER,
    RUN_KEY_FILE,
    STRATEGIES,
    cluster_task,
    distributed,
    interrupted_run,
    is_chief,
    mark_run,
    run_key,
    training_backup,
)
from agegender.training.loop import LR_SCHEDULES, TrainResult, print_metrics
from agegender.training.recipes import plan_run, prepared_data
from agegender.training.sampling import parse_balance, parse_dataset_weights
from agegender.training.trainers import TRAINERS


def report(name: str, result: TrainResult) -> None:
    for split, metrics in (("validation", result.val_metrics), ("test", result.test_metrics)):
        datasets = metrics.get("datasets") or {}
        if len(datasets) > 1:  # several datasets: each one's figures
            for dataset, found in datasets.items():
                print_metrics(f"{name}: {split} split, {dataset}", found)
        else:
            print_metrics(f"{name}: {split} split", metrics)
    console.print(f"Saved to {result.out_dir} ({result.seconds_per_epoch:.1f} s per epoch, "
                  f"{len(result.history)} epochs).")


def run_folder(name: str, plan, limit, data_dir: Path, out: Path, init_from: Path | None, run_dir: Path | None,
               backup: bool, sampling: dict) -> tuple[Path, list]:
    """The run's folder and, with backup, the callback that backs its state up there: --run-dir, else the
    folder of an interrupted run of the same command (which then continues), else a new one."""
    settings = {"family": name, "params": plan.params, "settings": plan.settings, "limit": limit,
                "data_dir": str(Path(data_dir).resolve()), "out": str(Path(out).resolve()),
                "init_from": None if init_from is None else str(init_from), "sampling": sampling}
    kind, index, _ = cluster_task()
    run_name = Path(out).name if is_chief() else f"{Path(out).name}-{kind}{index}"  # each worker backs up its own
    key = run_key({**settings, "task": f"{kind}:{index}"})
    folder = run_dir or (interrupted_run(run_path(run_name).parent, key) if backup else None) or run_path(run_name)
    if not backup:
        return folder, []
    marker = folder / BACKUP_FOLDER / RUN_KEY_FILE
    if marker.exists() and json.loads(marker.read_text()).get("key") != key:
        raise UserError(f"{folder} holds the backup of an interrupted run with other settings; run that command "
                        f"again to finish it, or delete {marker.parent} (or choose another --run-dir).")
    mark_run(folder, key, settings)
    return folder, [training_backup(folder / BACKUP_FOLDER)]


def cnn_trainer(name: str) -> typer.Typer:
    """The Typer app that trains the CNN family `name` and saves it with its metadata and metrics."""
    family = FAMILIES[name]
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    def other(param: str) -> bool:  # a parameter of another family: hidden, and refused when given
        return param not in family.defaults

    # no `from __future__ import annotations` in this module: the options below read `other` when defined

    @app.command(help=f"{family.summary} Trains it and saves it with its metadata, validation and test metrics.")
    def main(
        recipe: cli.RecipeOption = None,
        epochs: cli.EpochsOption = None,
        image_size: cli.ImageSizeOption = None,
        batch_size: cli.BatchSizeOption = None,
        learning_rate: cli.LearningRateOption = None,
        dropout: cli.DropoutOption = None,
        lr_schedule: cli.LrScheduleOption = None,
        augment: cli.AugmentOption = None,
        noise_augment: cli.NoiseAugmentOption = None,
        photo_augment: cli.PhotoAugmentOption = None,
        swa: cli.SwaOption = None,
        swa_learning_rate: cli.SwaRateOption = None,
        gender_label_smoothing: Annotated[float | None, typer.Option(
            min=0, max=0.5, hidden=other("gender_label_smoothing"),
            help="Label smoothing of the gender loss [0].")] = None,
        age_head_kind: Annotated[str | None, typer.Option(
            "--age-head", hidden=other("age_head"),
            help="regression, or dex (softmax over ages read as its expected value).")] = None,
        age_weight_power: Annotated[float | None, typer.Option(
            min=0, hidden=other("age_weight_power"),
            help="Up-weight rare ages: sample weight ~ age-bin frequency ** -power (0 = off).")] = None,
        age_loss_weight: Annotated[float | None, typer.Option(
            min=0, hidden=other("age_loss_weight"), help="Weight of the age loss.")] = None,
        gender_loss_weight: Annotated[float | None, typer.Option(
            min=0, hidden=other("gender_loss_weight"), help="Weight of the gender loss.")] = None,
        balance: Annotated[str | None, typer.Option(
            help="Draw training images so that every group of these labels (any of race, gender, age_band, "
                 "comma-separated) is seen equally often within each dataset.")] = None,
        dataset_weight: cli.DatasetWeightOption = None,
        limit: cli.LimitOption = None,
        seed: cli.SeedOption = None,
        params: cli.ParamsOption = None,
        data_dir: cli.DataDirOption = DATA_DIR,
        out: cli.ModelOutOption = MODELS_DIR / family.folder,
        init_from: cli.InitFromOption = None,
        patience: cli.PatienceOption = None,
        tensorboard: cli.TensorBoardOption = True,
        run_dir: cli.RunDirOption = None,
        backup: Annotated[bool, typer.Option(
            "--backup/--no-backup",
            help="Back the training state up in the run folder after every epoch, so that the same command "
                 "continues a killed run from its last finished epoch.")] = True,
        strategy: cli.StrategyOption = "auto",
        mixed_precision: cli.MixedPrecisionOption = False,
    ) -> None:
        flags = {"batch_size": batch_size, "learning_rate": learning_rate, "dropout": dropout,
                 "lr_schedule": lr_schedule, "augment": augment, "noise_augment": noise_augment,
                 "photo_augment": photo_augment, "swa_epochs": swa, "swa_learning_rate": swa_learning_rate,
                 "gender_label_smoothing": gender_label_smoothing, "age_head": age_head_kind,
                 "age_weight_power": age_weight_power, "age_loss_weight": age_loss_weight,
                 "gender_loss_weight": gender_loss_weight}
        refused = [key for key, value in flags.items() if value is not None and other(key)]
        if refused:
            flag = {"age_head": "--age-head"}.get(refused[0], "--" + refused[0].replace("_", "-"))
            raise typer.BadParameter(f"the {name} model has no {refused[0]} parameter", param_hint=flag)
        cli.check_choice(age_head_kind, AGE_HEADS, "--age-head")
        cli.check_choice(lr_schedule, LR_SCHEDULES, "--lr-schedule")
        cli.check_choice(strategy, STRATEGIES, "--strategy")
        with user_errors(), distributed(strategy, mixed_precision) as setup:
            balanced, weights = parse_balance(balance), parse_dataset_weights(dataset_weight)
            plan = plan_run(name, recipe, params, flags,
                            {"epochs": epochs, "image_size": image_size, "patience": patience, "seed": seed})
            data_dir = prepared_data(plan, data_dir)
            folder, extra_callbacks = run_folder(name, plan, limit, data_dir, out, init_from, run_dir, backup,
                                                 {"balance": balanced, "dataset_weights": weights})
            logs = folder / "tensorboard" if tensorboard and is_chief() else None
            model_out = out if is_chief() else Path(tempfile.mkdtemp(prefix="agegender-worker-")) / Path(out).name
            result = TRAINERS[family.name](plan.params, plan.settings["image_size"], plan.settings["epochs"], data_dir,
                                  limit, model_out, extra_callbacks=extra_callbacks, init_from=init_from,
                                  patience=plan.settings["patience"], seed=plan.settings["seed"],
                                  tensorboard_dir=logs, metadata_extra={**plan.metadata(), "distribution": setup},
                                  balance=balanced, dataset_weights=weights)
            report(name, result)
            if not is_chief():  # a worker's copy of the model: the chief saved the one that counts
                shutil.rmtree(model_out.parent, ignore_errors=True)
            if logs is not None:
                console.print(f"TensorBoard logs in {logs} (nox -s tensorboard).")

    return app
