"""How the ensemble family is assembled (tasks/train_ensemble.py is its command line; TRAINERS["ensemble"]):
several saved models, frozen, mixed per output with weights chosen on the validation split.

Nothing trains. Each member predicts the validation images (and, for mirror-image averaging, their mirror
images; with grey weights, the validation faces turned grey) once; the weights are then a grid search over the
simplex on those predictions, held in memory: per output, the fewest years outside the true age or age range,
the lowest gender log loss. The model itself is the registry's builder (agegender.models.ensemble); it is scored
and saved like every model (agegender.training.loop.finish_run).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np

from agegender.cli import UserError, check_choice, console
from agegender.data.images import grey_copy, is_grey
from agegender.data.labels import AGE_SCALE
from agegender.data.paths import SEED
from agegender.models.ensemble import member_branch
from agegender.models.folders import load_model
from agegender.models.registry import FAMILIES
from agegender.reporting.metrics import age_metrics, gender_metrics, ranged_metrics
from agegender.reporting.tables import rich_table
from agegender.training.loop import TrainResult, age_range_targets, finish_run, load_data

FAMILY = FAMILIES["ensemble"]
WEIGHT_STEP = 0.05  # grid step of the member weights
TTA_CHOICES = ("auto", "on", "off")
OUTPUTS = ("age", "gender")


# ---------------------------------------------------------------- the members and their predictions


def load_members(folders: list[Path]) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, Keras model, metadata) per member folder; members must predict in the same units."""
    if len(folders) < 2:
        raise UserError("An ensemble needs at least two --member model folders.")
    members = []
    for folder in folders:
        model, metadata = load_model(folder)
        if metadata.get("backbone") == "ensemble":
            raise UserError(f"{folder} is an ensemble itself; give its members instead.")
        if metadata.get("pixel_scaling") != "divide_by_255" or float(metadata.get("age_scale", 120)) != 120.0:
            raise UserError(f"{folder} takes other inputs or age units than this project's models.")
        members.append((Path(folder).name, model, metadata))
    names = [name for name, _, _ in members]
    if len(set(names)) != len(names):
        raise UserError(f"The same member is given twice: {', '.join(names)}.")
    return members


def member_predictions(members, images: np.ndarray, input_size: int, flip: bool,
                       batch_size: int = 128) -> list[dict[str, np.ndarray]]:
    """Each member's outputs on the images (scaled ages, p_female), through its ensemble branch."""
    import tensorflow as tf

    found = []
    for _, model, metadata in members:
        branch = member_branch(model, metadata, input_size, flip)
        forward = tf.function(lambda x, branch=branch: branch(x, training=False))
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start:start + batch_size], dtype=np.float32) / 255.0
            for name, value in forward(batch).items():
                parts.setdefault(name, []).append(np.asarray(value).reshape(-1))
        found.append({name: np.concatenate(values) for name, values in parts.items()})
    return found


def mirror_averaged(members, images: np.ndarray, input_size: int, plain_predictions: list[dict[str, np.ndarray]],
                    plain: frozenset[int]) -> list[dict[str, np.ndarray]]:
    """Each member's plain predictions averaged with its predictions on the mirror images, except the members
    whose index is in `plain`, which keep their plain predictions."""
    flipped = [index for index in range(len(members)) if index not in plain]
    found = member_predictions([members[index] for index in flipped], images, input_size, flip=True)
    mirrored = dict(zip(flipped, found, strict=True))
    return [predictions if index in plain else
            {name: (value + mirrored[index][name]) / 2 for name, value in predictions.items()}
            for index, predictions in enumerate(plain_predictions)]


def predictions_as_chosen(members, images: np.ndarray, input_size: int, tta: bool,
                          plain: frozenset[int]) -> list[dict[str, np.ndarray]]:
    """Each member's predictions as the ensemble takes them: plain, or with TTA averaged with the mirror
    image's (except the members in `plain`)."""
    found = member_predictions(members, images, input_size, flip=False)
    return mirror_averaged(members, images, input_size, found, plain) if tta else found


# ---------------------------------------------------------------- the weights


def simplex(count: int, step: float = WEIGHT_STEP) -> list[tuple[float, ...]]:
    """Every weight vector of `count` non-negative multiples of `step` that sum to 1."""
    units = round(1 / step)
    return [tuple(c / units for c in combo) + ((units - sum(combo)) / units,)
            for combo in itertools.product(range(units + 1), repeat=count - 1) if sum(combo) <= units]


def log_loss(labels: np.ndarray, p_female: np.ndarray) -> float:
    p = np.clip(p_female, 1e-6, 1 - 1e-6)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def choose_weights(predictions: list[dict[str, np.ndarray]], rows) -> dict[str, dict[str, Any]]:
    """Per output, the member weights with the lowest validation error among the members that have the output,
    and that error: for age, the mean years outside each face's age (its exact age, or its age range: the
    absolute error for an exact age), for gender the log loss, each over the faces of every dataset that have
    the label."""
    chosen = {}
    age_range = age_range_targets(rows)
    aged = ~np.isnan(age_range[:, 0])
    gendered = rows["gender"].notna().to_numpy()
    for output in OUTPUTS:
        having = [i for i, p in enumerate(predictions) if output in p]
        if not having:
            continue
        stacked = np.stack([predictions[i][output] for i in having])
        best = None
        for weights in simplex(len(having)):
            mixed = np.tensordot(np.array(weights), stacked, axes=1)
            if output == "age":
                low, high, age = age_range[aged, 0], age_range[aged, 1], mixed[aged]
                error = float(np.mean(np.maximum(low - age, 0) + np.maximum(age - high, 0))) * AGE_SCALE
            else:
                error = log_loss(rows["gender"].to_numpy(dtype=float)[gendered], mixed[gendered])
            if best is None or error < best[1] - 1e-12:
                best = (weights, error)
        chosen[output] = {"members": having, "weights": list(best[0]), "error": best[1]}
    return chosen


def mixed(predictions: list[dict[str, np.ndarray]], chosen: dict[str, dict[str, Any]],
          grey_chosen: dict[str, dict[str, Any]] | None = None, grey: np.ndarray | None = None
          ) -> dict[str, np.ndarray]:
    """The members' outputs mixed with the chosen weights; with grey_chosen, the images flagged in `grey` (one
    bool per image) mixed with those instead, as the saved model's GreySwitch does."""
    found = {output: np.tensordot(np.array(spec["weights"]), np.stack([predictions[i][output]
                                                                        for i in spec["members"]]), axes=1)
             for output, spec in chosen.items()}
    if grey_chosen is None or grey is None or not grey.any():
        return found
    return {output: np.where(grey, mixed(predictions, grey_chosen)[output], value) for output, value in found.items()}


# ---------------------------------------------------------------- the figures of members and ensemble


def user_units(predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mixed outputs (scaled age, gender) as a model's predictions come from Predictor: age in years,
    p_female."""
    found = {}
    if "age" in predictions:
        found["age"] = np.clip(predictions["age"] * AGE_SCALE, 0.0, None)
    if "gender" in predictions:
        found["p_female"] = np.clip(predictions["gender"], 0.0, 1.0)
    return found


def summary(predictions: dict[str, np.ndarray], rows) -> dict[str, float]:
    """Age MAE (faces with an exact age), age-group accuracy (faces with an age range) and gender accuracy of
    mixed outputs, read in the units a user gets (user_units)."""
    units, found = user_units(predictions), {}
    exact, gendered = rows["age"].notna().to_numpy(), rows["gender"].notna().to_numpy()
    if "age" in units and exact.any():
        found["age_mae"] = age_metrics(rows["age"].to_numpy(dtype=float)[exact], units["age"][exact])["mae"]
    within = ranged_metrics(rows, units["age"]) if "age" in units else None
    if within is not None:
        found["age_group_accuracy"] = within["age_group_accuracy"]
    if "p_female" in units and gendered.any():
        found["gender_accuracy"] = gender_metrics(rows["gender"].to_numpy(dtype=float)[gendered],
                                                  units["p_female"][gendered])["accuracy"]
    return found


def print_report(report: dict[str, Any]) -> None:
    """The members' and the ensemble's figures on validation and test, and the chosen weights."""
    mirror = "on" if report["tta"] else "off"
    if report["tta"] and report["plain_members"]:
        mirror += f", not for {', '.join(report['plain_members'])}"
    keys = ("age_mae", "age_group_accuracy", "gender_accuracy")
    rows = [[name, *(f"{d[k]:.3f}" if k in d else "-" for d in (report["validation"][name], report["test"][name])
                     for k in keys)] for name in report["validation"]]
    console.print(rich_table(f"Ensemble members and the ensemble (mirror-image averaging {mirror})",
                             ["model", *(f"{split} {what}" for split in ("val", "test")
                                         for what in ("age MAE", "age group acc", "gender acc"))], rows))
    choices = [("", report["choice"]["on" if report["tta"] else "off"]),
               ("grey photos, ", report["grey_choice"] or {})]
    for label, choice in choices:
        for output, spec in choice.items():
            names = [Path(report["members"][i]).name for i in spec["members"]]
            console.print(f"{label}{output}: " + ", ".join(f"{n} {w:.2f}"
                                                          for n, w in zip(names, spec["weights"], strict=True)))


# ---------------------------------------------------------------- the trainer


def train_ensemble(data_dir: Path, limit: int | None = None, out_dir: Path | None = None, *,
                   members: list[Path], tta: str = "auto", plain_members: list[str] | tuple[str, ...] = (),
                   grey_weights: bool = False, seed: int = SEED,
                   metadata_extra: dict[str, Any] | None = None) -> TrainResult:
    """Choose the weights (and TTA, which the members named in plain_members never get) on validation, and with
    grey_weights a second set on the validation faces turned grey; build the ensemble with the registry's
    builder, score it on validation and test, and save it to out_dir (unless None). The trainers' call shape
    less what an ensemble has none of (parameters, an image size: the largest member's, epochs): (data_dir,
    limit, out_dir, **settings), the settings being the registry's (members as model folders, tta,
    plain_members, grey_weights, seed). The result's `extra` is the selection report (print_report)."""
    import keras

    started = time.perf_counter()
    check_choice(tta, TTA_CHOICES, "--tta")
    member_folders = list(members)
    names = [Path(folder).name for folder in member_folders]  # each member's name, as load_members gives it
    unknown = [name for name in plain_members if name not in names]
    if unknown:  # before the members load, which takes a while
        raise UserError(f"--plain-member {unknown[0]} is not one of the members ({', '.join(names)}).")
    plain_indices = frozenset(names.index(name) for name in plain_members)
    keras.utils.set_random_seed(seed)  # nothing here draws random numbers; seeded like every trainer all the same
    loaded = load_members(member_folders)
    input_size = max(int(metadata["image_size"]) for _, _, metadata in loaded)
    # nothing trains (no training split); every dataset of the data folder weighs in on the choice
    data = load_data(input_size, data_dir, limit, splits=("val", "test"), datasets=None)
    val, test = data["val"], data["test"]
    plain = member_predictions(loaded, val.images, input_size, flip=False)
    candidates = {"off": plain}
    if tta != "off":
        candidates["on"] = mirror_averaged(loaded, val.images, input_size, plain, plain_indices)
    chosen = {name: choose_weights(preds, val.rows) for name, preds in candidates.items()}
    if tta == "auto" and "on" in chosen:
        use_tta = all(chosen["on"][o]["error"] < chosen["off"][o]["error"] for o in chosen["off"])
    else:
        use_tta = tta == "on"
    weights = chosen["on" if use_tta else "off"]
    grey_chosen = None
    if grey_weights:
        grey_val = predictions_as_chosen(loaded, grey_copy(val.images), input_size, use_tta, plain_indices)
        grey_chosen = choose_weights(grey_val, val.rows)
    plain_names = [names[index] for index in sorted(plain_indices)] if use_tta else []
    report = {"members": [str(folder) for folder in member_folders], "tta": use_tta, "plain_members": plain_names,
              "validation": {}, "test": {}, "choice": chosen, "grey_choice": grey_chosen}
    ensemble_preds = {}
    for split_name, split in (("validation", val), ("test", test)):
        if split is val:  # the predictions the choice was made on
            preds = candidates["on" if use_tta else "off"]
        else:
            preds = predictions_as_chosen(loaded, split.images, input_size, use_tta, plain_indices)
        for (name, _, _), member in zip(loaded, preds, strict=True):
            report[split_name][name] = summary(member, split.rows)
        grey = None if grey_chosen is None else is_grey(split.images)  # the test reads every pixel: only if used
        ensemble_preds[split_name] = mixed(preds, weights, grey_chosen, grey)
        report[split_name]["ensemble"] = summary(ensemble_preds[split_name], split.rows)
    # the saved model computes this same mix (tests/test_ensemble.py), so finish_run takes the test split's
    # instead of predicting it a second time
    test_predicted = user_units(ensemble_preds["test"])
    model = FAMILY.build(loaded, weights, input_size, use_tta, plain_indices, grey_chosen)

    def by_name(choice):
        return {o: {loaded[i][0]: w for i, w in zip(s["members"], s["weights"], strict=True)}
                for o, s in choice.items()}

    params = {"members": [str(folder) for folder in member_folders], "tta": use_tta, "plain_members": plain_names,
              "weights": by_name(weights)}
    if grey_chosen is not None:  # for images whose channels are equal (agegender.data.images.is_grey)
        params["grey_weights"] = by_name(grey_chosen)
    member_records = [{"folder": str(folder), "name": name, "created": meta.get("created"),
                       "backbone": meta.get("backbone"), "image_size": meta["image_size"],
                       "utkface_crops": meta.get("utkface_crops"), "extra_datasets": meta.get("extra_datasets", []),
                       "manifest_sha256": meta.get("manifest_sha256")}
                      for folder, (name, _, meta) in zip(member_folders, loaded, strict=True)]
    extra = {"family": FAMILY.name, "backbone": "ensemble", "weights": "members", "members": member_records,
             "selection": report, "age_head": "ensemble", "seed": seed, **(metadata_extra or {}),
             "train_seconds": round(time.perf_counter() - started, 1)}
    result = finish_run(model, FAMILY.task, data, params, input_size, data_dir,
                        None if out_dir is None else Path(out_dir), limit=limit, metadata_extra=extra,
                        test_predicted=test_predicted)
    result.extra = report
    return result
