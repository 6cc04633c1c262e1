"""Model 1: a CNN that classifies gender (sigmoid output = probability of female).

    python tasks/train_gender.py --epochs 30
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import typer

from common.cli import user_errors
from common.data import DATA_DIR, MODELS_DIR
from common.models import conv_trunk, gender_head, image_input
from common.training import LR_SCHEDULES, TrainResult, load_params, merge_params, report, train_model

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
        loss={"gender": "binary_crossentropy"},
        metrics={"gender": ["binary_accuracy", keras.metrics.AUC(name="auc")]},
    )
    return model


def train(params: dict[str, Any] | None = None, image_size: int = IMAGE_SIZE, epochs: int = 30,
          data_dir: Path = DATA_DIR, limit: int | None = None, out_dir: Path | None = MODELS_DIR / TASK,
          **options: Any) -> TrainResult:
    """Train and evaluate; saves to out_dir unless it is None (options go to common.training.train_model)."""
    params = {**DEFAULT_PARAMS, **(params or {})}
    options.setdefault("monitor", MONITOR)
    return train_model(TASK, build_model, params, image_size, epochs, data_dir, limit, out_dir, **options)


@app.command()
def main(
    epochs: Annotated[int, typer.Option(min=1, help="Most epochs (early stopping may end sooner).")] = 30,
    image_size: Annotated[int, typer.Option(min=32, max=512, help="Input side in pixels.")] = IMAGE_SIZE,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch size.")] = None,
    learning_rate: Annotated[float | None, typer.Option(min=0, help="AdamW learning rate.")] = None,
    dropout: Annotated[float | None, typer.Option(min=0, max=0.9, help="Dropout rate.")] = None,
    lr_schedule: Annotated[str | None, typer.Option(
        help="cosine (anneal over --epochs) or plateau (halve when validation stalls).")] = None,
    limit: Annotated[int | None, typer.Option(min=16, help="Train on a subset of N images.")] = None,
    params: Annotated[Path | None, typer.Option(help="JSON of parameters, e.g. results/tuning/gender.json.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Folder prepare_data wrote.")] = DATA_DIR,
    out: Annotated[Path, typer.Option(help="Model folder to write.")] = MODELS_DIR / TASK,
) -> None:
    """Train the gender CNN and save it with its metadata and test metrics."""
    if lr_schedule is not None and lr_schedule not in LR_SCHEDULES:
        raise typer.BadParameter(f"must be one of {', '.join(LR_SCHEDULES)}", param_hint="--lr-schedule")
    with user_errors():
        chosen = merge_params(DEFAULT_PARAMS, load_params(params),
                              {"batch_size": batch_size, "learning_rate": learning_rate, "dropout": dropout,
                               "lr_schedule": lr_schedule})
        report(TASK, train(chosen, image_size, epochs, data_dir, limit, out))


if __name__ == "__main__":
    app()
