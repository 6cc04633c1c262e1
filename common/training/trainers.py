"""How each family trains: the family name -> its trainer (the CNN families through the shared loop,
agegender.training.loop; transfer through agegender.training.finetune; the ensemble, assembled from saved models,
through agegender.training.ensemble). The trainers' command lines, tune, train_all and the tests run a family
through TRAINERS; what a family is lives in agegender.models.registry."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from agegender.models.registry import FAMILIES, build_cnn
from agegender.training.ensemble import train_ensemble
from agegender.training.finetune import finetune
from agegender.training.loop import train_model


def train_cnn(task: str, params: dict[str, Any], image_size: int, epochs: int, data_dir: Path,
              limit: int | None = None, out_dir: Path | None = None, **options: Any):
    """Train, evaluate and save one CNN (agegender.training.loop.train_model); options go to train_model."""
    params = {**FAMILIES[task].defaults, **params}
    return train_model(task, partial(build_cnn, task), params, image_size, epochs, data_dir, limit, out_dir,
                       **options)


def train_transfer(params: dict[str, Any], image_size: int, epochs: int, data_dir: Path, limit: int | None = None,
                   out_dir: Path | None = None, *, backbone: str, weights: str = "pretrained",
                   fine_tune_epochs: int = 0, task: str = "multitask", **options: Any):
    """Both phases of fine-tuning one backbone (agegender.training.finetune.finetune); options go to finetune."""
    return finetune(backbone, task, weights, params, image_size, epochs, fine_tune_epochs, data_dir, limit, out_dir,
                    **options)


# every family of the registry. The trained ones (agegender.models.registry.TRAINABLE): (params, image_size, epochs,
# data_dir, limit, out_dir, **options) -> TrainResult. The assembled ensemble has no parameters, image size (its
# largest member's) or epochs: (data_dir, limit, out_dir, *, members, tta, plain_members, grey_weights, seed,
# metadata_extra) -> TrainResult
TRAINERS = {"gender": partial(train_cnn, "gender"), "age": partial(train_cnn, "age"),
            "multitask": partial(train_cnn, "multitask"), "transfer": train_transfer, "ensemble": train_ensemble}
