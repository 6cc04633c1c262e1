"""Model 1: a CNN that classifies gender (sigmoid output = probability of female).

    python tasks/train_gender.py --epochs 30
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from agegender import cli
from agegender.cli import user_errors
from agegender.data import DATA_DIR, MODELS_DIR
from agegender.models import conv_trunk, gender_head, image_input
from agegender.training import LR_SCHEDULES, TrainResult, load_params, merge_params, report, train_model

TASK = "gender"
IMAGE_SIZE = 128
DEFAULT_PARAMS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "batch_size": 64,
    "dropout": 0.3,
    "width": 32,
    "weight_decay": 1e-4,
    "lr_schedule": "cosine",  # or "plateau"
    "augment": 0.5,  # full-strength augmentation slowed learning too much for a ~15-epoch CPU budget
    "noise_augment": 0.0,  # off: the committed models were trained without it
    "photo_augment": 0.0,  # off: the committed models were trained without it
    "swa_epochs": 0,  # weight averaging off
    "swa_learning_rate": None,  # None: half the learning rate
    "gender_label_smoothing": 0.0,  # 0.1 pulls targets to 0.05/0.95, against an overconfident gender head
}
MONITOR = "val_loss"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def build_model(image_size: int, params: dict[str, Any]):
    """Our CNN trunk and a sigmoid gender head, with binary cross-entropy, accuracy and AUC."""
    import keras

    inputs = image_input(image_size)
    features = conv_trunk(inputs, width=int(params["width"]), dropout=float(params["dropout"]))
    model = keras.Model(inputs, {"gender": gender_head(features, float(params["dropout"]))}, name="gender_cnn")
    model.compile(
        optimizer=keras.optimizers.AdamW(float(params["learning_rate"]), weight_decay=float(params["weight_decay"])),
        loss={"gender": keras.losses.BinaryCrossentropy(
            label_smoothing=float(params["gender_label_smoothing"]))},
        metrics={"gender": ["binary_accuracy", keras.metrics.AUC(name="auc")]},
    )
    return model


def train(params: dict[str, Any] | None = None, image_size: int = IMAGE_SIZE, epochs: int = 30,
          data_dir: Path = DATA_DIR, limit: int | None = None, out_dir: Path | None = MODELS_DIR / TASK,
          **options: Any) -> TrainResult:
    """Train and evaluate; saves to out_dir unless it is None (options go to agegender.training.train_model)."""
    params = {**DEFAULT_PARAMS, **(params or {})}
    options.setdefault("monitor", MONITOR)
    return train_model(TASK, build_model, params, image_size, epochs, data_dir, limit, out_dir, **options)


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
    gender_label_smoothing: cli.LabelSmoothingOption = None,
    limit: cli.LimitOption = None,
    params: cli.ParamsOption = None,
    data_dir: cli.DataDirOption = DATA_DIR,
    out: cli.ModelOutOption = MODELS_DIR / TASK,
    init_from: cli.InitFromOption = None,
    patience: cli.PatienceOption = None,
) -> None:
    """Train the gender CNN and save it with its metadata and test metrics."""
    cli.check_choice(lr_schedule, LR_SCHEDULES, "--lr-schedule")
    with user_errors():
        chosen = merge_params(DEFAULT_PARAMS, load_params(params),
                              {"batch_size": batch_size, "learning_rate": learning_rate, "dropout": dropout,
                               "lr_schedule": lr_schedule, "augment": augment, "noise_augment": noise_augment,
                               "photo_augment": photo_augment,
                               "swa_epochs": swa, "swa_learning_rate": swa_learning_rate,
                               "gender_label_smoothing": gender_label_smoothing})
        report(TASK, train(chosen, image_size, epochs, data_dir, limit, out, init_from=init_from, patience=patience))


if __name__ == "__main__":
    app()
