"""Every model family in one place: what it predicts, its default parameters, how it is built, the validation
score it is judged on, its model folder, trainer script, recipe and Space title. The trainers, tune (each
family's search space), bench, compare, export, publish, train_all, the Spaces and noxfile read this registry;
nothing else lists the families. How a family trains is the training layer's (agegender.training.trainers), so
reading the registry never reaches training code.

Importing it loads neither TensorFlow nor Keras: the builders import them when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from agegender.cli import UserError
from agegender.data.labels import AGE_SCALE, TASK_OUTPUTS  # Keras logs ages divided by AGE_SCALE
from agegender.data.paths import REPO_ROOT, SEED
from agegender.models.backbones import resolve_backbone

RECIPES_DIR = REPO_ROOT / "recipes"
GENDER_ERROR_YEARS = 50.0  # multitask score: one point of gender accuracy is worth half a year of age MAE


# ---------------------------------------------------------------- what a model is judged on


@dataclass(frozen=True)
class Goal:
    """The validation score a family is judged on (by tune and by train_all's promotion), and the per-epoch Keras
    logs on the same footing that tune's pruner watches."""

    metric: str
    direction: str  # "minimize" or "maximize"
    monitors: tuple[str, ...]  # Keras 3 log names read by `intermediate`
    score: Callable[[dict[str, Any]], float]  # {"gender": {...}, "age": {...}} validation metrics -> the value
    intermediate: Callable[[dict[str, float]], float]  # epoch logs -> a value on the same footing

    def better(self, new: float, old: float) -> bool:
        """Strictly better: a tie keeps what is there."""
        return new < old if self.direction == "minimize" else new > old


def gender_score(metrics: dict[str, Any]) -> float:
    return float(metrics["gender"]["accuracy"])


def age_score(metrics: dict[str, Any]) -> float:
    return float(metrics["age"]["mae"])


def multitask_score(metrics: dict[str, Any]) -> float:
    return float(metrics["age"]["mae"]) + GENDER_ERROR_YEARS * (1.0 - float(metrics["gender"]["accuracy"]))


GOALS = {
    "gender": Goal("val gender accuracy", "maximize", ("val_binary_accuracy",), gender_score,
                   lambda logs: logs["val_binary_accuracy"]),
    "age": Goal("val age MAE (years)", "minimize", ("val_mae",), age_score,
                lambda logs: AGE_SCALE * logs["val_mae"]),
    "multitask": Goal(f"val age MAE (years) + {GENDER_ERROR_YEARS:g} x val gender error rate", "minimize",
                      ("val_age_mae", "val_gender_binary_accuracy"), multitask_score,
                      lambda logs: AGE_SCALE * logs["val_age_mae"]
                      + GENDER_ERROR_YEARS * (1.0 - logs["val_gender_binary_accuracy"])),
}


# ---------------------------------------------------------------- builders (Keras imported when called)


def build_cnn(task: str, image_size: int, params: dict[str, Any], **_settings: Any):
    """Our CNN trunk with the task's heads, compiled (agegender.models.cnn.build_cnn)."""
    from agegender.models.cnn import build_cnn as build

    return build(task, image_size, params)


def build_transfer(image_size: int, params: dict[str, Any], backbone: str, weights: str = "none",
                   task: str = "multitask", **_settings: Any):
    """A pretrained backbone with age and gender heads (agegender.models.transfer.build_model)."""
    from agegender.models.transfer import build_model

    return build_model(resolve_backbone(backbone), image_size, {**FAMILIES["transfer"].defaults, **params}, task,
                       weights)


def build_ensemble(members, chosen: dict[str, dict[str, Any]], input_size: int, tta: bool = False,
                   plain: frozenset[int] = frozenset(), grey_chosen: dict[str, dict[str, Any]] | None = None,
                   **_settings: Any):
    """Saved models (their (name, model, metadata)) mixed per output with the chosen weights, in one Keras model
    (agegender.models.ensemble.build_ensemble; the training layer's agegender.training.ensemble chooses them)."""
    from agegender.models.ensemble import build_ensemble as build

    return build(members, chosen, input_size, tta, plain, grey_chosen)


# ---------------------------------------------------------------- what tune searches (tasks/tune.py)


@dataclass(frozen=True)
class FloatRange:
    """A parameter tune draws from [low, high], on a log scale when `log`."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Choice:
    """A parameter tune picks from a few values."""

    values: tuple[Any, ...]


SearchSpace = dict[str, FloatRange | Choice]  # parameter name (a key of the family's defaults) -> its range

CNN_SEARCH: SearchSpace = {
    "learning_rate": FloatRange(3e-4, 1e-2, log=True),
    "batch_size": Choice((32, 64, 128)),
    "dropout": FloatRange(0.0, 0.5),
    "width": Choice((16, 32, 48)),
    "weight_decay": FloatRange(1e-5, 1e-2, log=True),
    "augment": FloatRange(0.0, 1.5),
}
AGE_HEAD_SEARCH: SearchSpace = {"age_head": Choice(("regression", "dex"))}
AGE_LOSS_WEIGHT_SEARCH: SearchSpace = {"age_loss_weight": FloatRange(1.0, 16.0, log=True)}
# the backbone is fixed: tune the head and the two training phases instead of the trunk's width
TRANSFER_SEARCH: SearchSpace = {
    **{name: value for name, value in CNN_SEARCH.items() if name != "width"}, **AGE_LOSS_WEIGHT_SEARCH,
    "fine_tune_learning_rate": FloatRange(1e-5, 1e-3, log=True),
    "unfreeze": FloatRange(0.1, 0.6),
    "head_units": Choice((64, 128, 256)),
}
TUNING_BACKBONE = "mobilenetv2"  # the cheapest keras.applications backbone on a CPU


def transfer_tuning_settings(backbone: str | None, weights: str, epochs: int) -> dict[str, Any]:
    """A tuning trial fine-tunes one backbone (TUNING_BACKBONE unless named): half its epochs with the backbone
    frozen, half fine-tuning."""
    return {"backbone": resolve_backbone(backbone or TUNING_BACKBONE).name, "weights": weights,
            "fine_tune_epochs": epochs // 2}


# ---------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Family:
    name: str
    task: str  # what its saved models predict: gender, age or multitask (metadata.json's task)
    summary: str  # one line: what the model is
    defaults: dict[str, Any]  # its parameters (metadata.json's params), as a recipe's [params] may set them
    settings: dict[str, Any]  # what else a recipe may set: epochs, image size, seed, ... (None: see the trainer)
    goal: Goal
    script: str  # its trainer, relative to the repository
    folder: str  # its model folder under results/models/ (and its recipe: recipes/<folder>.toml)
    title: str  # the title of its Space
    # a trained family: (image_size, params, **settings) -> a compiled Keras model; an assembled one (the
    # ensemble): (members, chosen weights, input_size, tta, plain, grey_chosen) -> its Keras model
    build: Callable[..., Any] | None = None
    folder_prefix: str | None = None  # its other model folders are named <prefix><something>
    quick: tuple[str, ...] = ()  # trainer flags for a smoke run (train_all --quick)
    out_flag: str = "--out"  # the trainer's flag naming the one model folder it writes
    search_space: SearchSpace = field(default_factory=dict)  # what tune searches (empty: not tuned)
    # (--backbone, --weights, epochs) -> the trainer settings of a tuning trial (None: a trial needs none)
    tuning_settings: Callable[[str | None, str, int], dict[str, Any]] | None = None
    assembled: bool = False  # built from saved models, nothing trained (the ensemble): not tuned nor benched

    @property
    def outputs(self) -> tuple[str, ...]:
        return TASK_OUTPUTS[self.task]

    @property
    def image_size(self) -> int | None:
        return self.settings.get("image_size")

    @property
    def recipe(self) -> Path:
        return RECIPES_DIR / f"{self.folder}.toml"

    def owns(self, folder_name: str) -> bool:
        """Whether a model folder of this name belongs to this family."""
        return folder_name == self.folder or (self.folder_prefix is not None
                                               and folder_name.startswith(self.folder_prefix))


CNN_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "batch_size": 64,
    "dropout": 0.25,
    "width": 32,
    "weight_decay": 1e-4,
    "lr_schedule": "cosine",  # or "plateau"
    "augment": 0.5,  # full-strength augmentation slowed learning too much for a ~15-epoch CPU budget
    "noise_augment": 0.0,  # Gaussian pixel noise in training (largest sigma; off)
    "photo_augment": 0.0,  # chance of each photo degradation in training (off)
    "swa_epochs": 0,  # weight averaging off
    "swa_learning_rate": None,  # None: half the learning rate
}
AGE_DEFAULTS: dict[str, Any] = {
    "age_head": "regression",  # or "dex": a softmax over ages read as its expected value
    "age_weight_power": 0.0,  # >0 up-weights rare ages: weight ~ frequency ** -power
}
SMOOTHING_DEFAULT: dict[str, Any] = {
    "gender_label_smoothing": 0.0,  # 0.1 pulls targets to 0.05/0.95, against an overconfident gender head
}
CNN_SETTINGS: dict[str, Any] = {"epochs": 30, "image_size": 128, "seed": SEED, "patience": None}
CNN_QUICK = ("--epochs", "1", "--image-size", "32", "--limit", "256", "--batch-size", "32")

FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("gender", "gender", "Model 1: a CNN that classifies gender (sigmoid output = probability of female).",
           {**CNN_DEFAULTS, "dropout": 0.3, **SMOOTHING_DEFAULT}, CNN_SETTINGS, GOALS["gender"],
           "tasks/train_gender.py", "gender", "Gender from a face photo",
           partial(build_cnn, "gender"), quick=CNN_QUICK, search_space=CNN_SEARCH),
    Family("age", "age", "Model 2: a CNN that regresses age (normalised by 120), or reads it from a DEX softmax.",
           {**CNN_DEFAULTS, **AGE_DEFAULTS}, CNN_SETTINGS, GOALS["age"],
           "tasks/train_age.py", "age", "Age from a face photo",
           partial(build_cnn, "age"), quick=CNN_QUICK,
           search_space={**CNN_SEARCH, **AGE_HEAD_SEARCH}),
    Family("multitask", "multitask", "Model 3: one CNN trunk with an age head and a gender head, trained together.",
           {**CNN_DEFAULTS, "age_head": "regression",
            "age_loss_weight": 4.0,  # age MAE on the /120 scale is ~0.05; this balances it against gender's BCE
            "gender_loss_weight": 1.0, **SMOOTHING_DEFAULT, "age_weight_power": 0.0},
           CNN_SETTINGS, GOALS["multitask"], "tasks/train_multitask.py", "multitask",
           "Age and gender from a face photo", partial(build_cnn, "multitask"),
           quick=CNN_QUICK, search_space={**CNN_SEARCH, **AGE_HEAD_SEARCH, **AGE_LOSS_WEIGHT_SEARCH}),
    Family("transfer", "multitask", "Model 4: a pretrained backbone fine-tuned with age and gender heads.",
           {"learning_rate": 1e-3,  # phase 1: new head (and, with weights none, the whole backbone)
            "fine_tune_learning_rate": 1e-4,  # phase 2: head + top of the backbone
            "unfreeze": 0.3,  # share of the backbone's layers (from the top) trained in phase 2
            "batch_size": 32, "dropout": 0.3, "head_units": 128, "weight_decay": 1e-4, "augment": 1.0,
            "age_head": "regression", "age_loss_weight": 4.0, "gender_loss_weight": 1.0, "age_weight_power": 0.0,
            # backbones with known residual blocks (the WideResNet): phase 2 trains the top `unfreeze_blocks`
            # blocks on activations of the blocks below, computed once per image and view (0: the `unfreeze`
            # share instead)
            "unfreeze_blocks": 1,
            "views": 2,  # cached views per training image: clean, mirrored, then augmented ones
            "photo_augment": 0.0,  # chance of each photo degradation in augmented views and batches (off)
            "patience": 10},  # phase 2 epochs without a better validation loss before stopping
           {"epochs": 5, "fine_tune_epochs": 5, "image_size": 224, "backbone": None, "weights": "pretrained",
            "seed": SEED},
           GOALS["multitask"], "tasks/finetune_transfer.py", "transfer-wrn16-8-imdbwiki",
           "Age and gender from a face photo (fine-tuned pretrained backbone)", build_transfer,
           folder_prefix="transfer-", out_flag="--model-out",
           quick=("--epochs", "1", "--fine-tune-epochs", "0", "--image-size", "32", "--limit", "128",
                  "--batch-size", "32", "--weights", "none"),
           search_space=TRANSFER_SEARCH, tuning_settings=transfer_tuning_settings),
    Family("ensemble", "multitask", "Several saved models in one, averaging their ages and gender probabilities "
                                    "with weights chosen on validation.",
           {}, {"members": ["multitask", "transfer-wrn16-8-imdbwiki"], "tta": "auto", "plain_members": [],
            "grey_weights": False, "seed": SEED},
           GOALS["multitask"], "tasks/train_ensemble.py", "ensemble",
           "Age and gender from a face photo (an ensemble of models)", build_ensemble, quick=("--limit", "256"),
           assembled=True),
)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"Unknown model family {name!r}; expected one of {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_of(metadata: dict[str, Any]) -> Family:
    """The family a saved model belongs to, from its metadata.json (models saved before metadata named the
    family: an ensemble by its backbone, our CNN by its task, any other backbone is a transfer model)."""
    if metadata.get("family") in FAMILIES:
        return FAMILIES[metadata["family"]]
    backbone = metadata.get("backbone", "cnn")
    if backbone == "ensemble":
        return FAMILIES["ensemble"]
    return FAMILIES[metadata.get("task", "multitask")] if backbone == "cnn" else FAMILIES["transfer"]


def family_of_folder(folder_name: str) -> Family | None:
    """The family whose model folder (or folder prefix) the name is, if any."""
    return next((family for family in FAMILIES.values() if family.owns(folder_name)), None)


# the families whose models are trained (the ensemble is assembled from saved ones): tune's and bench's choices
TRAINABLE = tuple(name for name, family in FAMILIES.items() if not family.assembled)
