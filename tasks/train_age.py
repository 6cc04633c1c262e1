"""Model 2: a CNN that regresses age (normalised by 120), or reads it from a DEX softmax over ages.

    python tasks/train_age.py --epochs 30
    python tasks/train_age.py --age-head dex --out results/models/age-dex
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from agegender import cli
from agegender.cli import user_errors
from agegender.data import DATA_DIR, MODELS_DIR
from agegender.models import AGE_HEADS, age_head, conv_trunk, image_input
from agegender.training import LR_SCHEDULES, TrainResult, load_params, merge_params, report, train_model

TASK = "age"
IMAGE_SIZE = 128
DEFAULT_PARAMS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "batch_size": 64,
    "dropout": 0.25,
    "width": 32,
    "weight_decay": 1e-4,
    "lr_schedule": "cosine",  # or "plateau"
    "augment": 0.5,  # full-strength augmentation slowed learning too much for a ~15-epoch CPU budget
    "noise_augment": 0.0,  # off: the committed models were trained without it
    "photo_augment": 0.0,  # off: the committed models were trained without it
    "swa_epochs": 0,  # weight averaging off
    "swa_learning_rate": None,  # None: half the learning rate
    "age_head": "regression",
    "age_weight_power": 0.0,  # >0 up-weights rare ages: weight ~ frequency ** -power
}
MONITOR = "val_loss"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def build_model(image_size: int, params: dict[str, Any]):
    """Our CNN trunk and an age head trained with MAE on age / 120."""
    import keras

    inputs = image_input(image_size)
    features = conv_trunk(inputs, width=int(params["width"]), dropout=float(params["dropout"]))
    output = age_head(features, float(params["dropout"]), kind=params["age_head"])
    model = keras.Model(inputs, {"age": output}, name=f"age_cnn_{params['age_head']}")
    model.compile(
        optimizer=keras.optimizers.AdamW(float(params["learning_rate"]), weight_decay=float(params["weight_decay"])),
        loss={"age": "mae"},
        metrics={"age": ["mae", "mse"]},
    )
    return model


def train(params: dict[str, Any] | None = None, image_size: int = IMAGE_SIZE, epochs: int = 30,
          data_dir: Path = DATA_DIR, limit: int | None = None, out_dir: Path | None = MODELS_DIR / TASK,
          **options: Any) -> TrainResult:
    """Train and evaluate; saves to out_dir unless it is None (options go to agegender.training.train_model)."""
    params = {**DEFAULT_PARAMS, **(params or {})}
    options.setdefault("monitor", MONITOR)
    return train_model(TASK, build_model, params, image_size, epochs, data_dir, limit, out_dir,
                       metadata_extra={"age_head": params["age_head"]}, **options)


@app.command()
def main(
    epochs: cli.EpochsOption = 30,
    image_size: cli.ImageSizeOption = IMAGE_SIZE,
    batch_size: cli.BatchSizeOption = None,
    learning_rate: cli.LearningRateOption = None,
    dropout: cli.DropoutOption = None,
    lr_schedule: cli.LrScheduleOption = None,
    augment: cli.AugmentOption = None,
    noise_augment: cli.NoiseAugmentOption = None,
    photo_augment: cli.PhotoAugmentOption = None,
    swa: cli.SwaOption = None,
    swa_learning_rate: cli.SwaRateOption = None,
    age_head_kind: Annotated[str | None, typer.Option(
        "--age-head", help="regression, or dex (softmax over ages read as its expected value).")] = None,
    age_weight_power: Annotated[float | None, typer.Option(
        min=0, help="Up-weight rare ages: sample weight ~ age-bin frequency ** -power (0 = off).")] = None,
    limit: cli.LimitOption = None,
    params: cli.ParamsOption = None,
    data_dir: cli.DataDirOption = DATA_DIR,
    out: cli.ModelOutOption = MODELS_DIR / TASK,
    init_from: cli.InitFromOption = None,
    patience: cli.PatienceOption = None,
) -> None:
    """Train the age CNN and save it with its metadata and test metrics."""
    cli.check_choice(age_head_kind, AGE_HEADS, "--age-head")
    cli.check_choice(lr_schedule, LR_SCHEDULES, "--lr-schedule")
    with user_errors():
        chosen = merge_params(DEFAULT_PARAMS, load_params(params),
                              {"batch_size": batch_size, "learning_rate": learning_rate, "dropout": dropout,
                               "lr_schedule": lr_schedule, "augment": augment, "noise_augment": noise_augment,
                               "photo_augment": photo_augment,
                               "swa_epochs": swa, "swa_learning_rate": swa_learning_rate,
                               "age_head": age_head_kind, "age_weight_power": age_weight_power})
        report(TASK, train(chosen, image_size, epochs, data_dir, limit, out, init_from=init_from, patience=patience))


if __name__ == "__main__":
    app()
