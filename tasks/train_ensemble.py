"""The ensemble family: one saved model holding several trained models (by default the multi-task CNN and the
fine-tuned face-pretrained WideResNet) that averages their ages and gender probabilities.

    python tasks/train_ensemble.py --recipe recipes/ensemble.toml     # the shipped model's members
    python tasks/train_ensemble.py --member results/models/multitask --member results/models/gender --tta off

Nothing is trained: the members are frozen, and what is chosen on the validation split (every dataset of --data-dir:
exact ages and age ranges alike) is the weight of each member per output (a grid over the simplex, fewest years
outside the true age or age range, lowest gender log loss) and whether to also
average each member with its view of the mirror image (`--tta auto` keeps it only if it improves both outputs
on validation; `--plain-member NAME` leaves a member to the plain image alone, halving its share of the time per
face). With `--grey-weights` a second set of weights is chosen on the validation faces turned grey, and the
saved model uses it for photos whose three channels are equal (old and scanned photos), since the members
lose unequally on them. The ensemble takes the largest member's input size and shrinks the image inside the
model for smaller members, so predict, compare, export and the Spaces use it like any other model folder.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from agegender import cli
from agegender.cli import UserError, check_choice, console, user_errors
from agegender.data.images import grey_copy, is_grey
from agegender.data.labels import AGE_SCALE
from agegender.data.paths import DATA_DIR, MODELS_DIR
from agegender.inference.intervals import DISTRIBUTION_LAYER, age_distribution_layer, with_age_distribution
from agegender.models.folders import load_model
from agegender.models.registry import FAMILIES
from agegender.reporting.metrics import age_metrics, gender_metrics, ranged_metrics
from agegender.reporting.tables import rich_table
from agegender.training.loop import age_range_targets, finish_run, load_data, print_metrics
from agegender.training.recipes import plan_run

FAMILY = FAMILIES["ensemble"]
WEIGHT_STEP = 0.05  # grid step of the member weights
TTA_CHOICES = ("auto", "on", "off")
OUTPUTS = ("age", "gender")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


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


def member_outputs(inputs, model, metadata: dict[str, Any], index: int, flip: bool) -> dict[str, Any]:
    """The member applied to input_size images (optionally mirrored), shrunk to its own input size first
    (box filter when the size divides, else bilinear); one nesting level, so the saved file loads."""
    from keras import layers

    from agegender.models.layers import HorizontalFlip

    member_size, input_size = int(metadata["image_size"]), int(inputs.shape[1])
    view = "mirror" if flip else "plain"
    x = HorizontalFlip(name=f"member{index}_mirror")(inputs) if flip else inputs
    if member_size != input_size:
        if input_size % member_size == 0:
            x = layers.AveragePooling2D(input_size // member_size, name=f"member{index}_{view}_shrink")(x)
        else:
            x = layers.Resizing(member_size, member_size, interpolation="bilinear",
                                name=f"member{index}_{view}_shrink")(x)
    outputs = model(x)
    outputs = outputs if isinstance(outputs, dict) else {metadata["outputs"][0]: outputs}
    if "age" in outputs:  # a regression head can go below zero; each member alone is read as at least 0
        outputs = {**outputs, "age": layers.ReLU(name=f"member{index}_{view}_age_floor")(outputs["age"])}
    return outputs


def member_branch(model, metadata: dict[str, Any], input_size: int, flip: bool, index: int = 0):
    import keras

    inputs = keras.Input((input_size, input_size, 3), name="image")
    return keras.Model(inputs, member_outputs(inputs, model, metadata, index, flip))


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


def mixes_distributions(members, *choices: dict[str, dict[str, Any]] | None) -> bool:
    """Whether every member with a say in the age (in any of the choices) has an age distribution over the same
    years (a DEX head): then the ensemble mixes the distributions, and its age is the mix's expected value."""
    choices = [chosen for chosen in choices if chosen is not None]
    if not choices or any("age" not in chosen for chosen in choices):
        return False
    heads = [age_distribution_layer(members[i][1]) for chosen in choices
             for i, weight in zip(chosen["age"]["members"], chosen["age"]["weights"], strict=True) if weight > 0]
    return all(head is not None for head in heads) and len({head.units for head in heads}) == 1


def build_ensemble(members, chosen: dict[str, dict[str, Any]], input_size: int, tta: bool,
                   plain: frozenset[int] = frozenset(), grey_chosen: dict[str, dict[str, Any]] | None = None):
    """One Keras model: every member (and, with TTA, the same member on the mirror image, averaged, except the
    members whose index is in `plain`), mixed per output with the chosen weights, or with grey_chosen's for grey
    images (a GreySwitch). When every age member has an age distribution, the distributions are mixed with the
    age weights into a layer named age_bins and the age is its expected value, so the ensemble has a
    distribution like any DEX model (the same age as mixing the members' ages)."""
    import keras
    from keras import layers

    from agegender.models.layers import AgeExpectation, GreySwitch

    distributions = mixes_distributions(members, chosen, grey_chosen)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    outputs_by_member = []
    for index, (_, model, metadata) in enumerate(members):
        model.name = f"member{index}_{model.name}"
        if distributions and index in chosen["age"]["members"]:
            model = with_age_distribution(model)
        found = member_outputs(inputs, model, metadata, index, flip=False)
        if tta and index not in plain:
            mirrored = member_outputs(inputs, model, metadata, index, flip=True)
            found = {name: layers.Average(name=f"member{index}_{name}_tta")([found[name], mirrored[name]])
                     for name in found}
        outputs_by_member.append(found)
    def weighted_sum(spec, mixed_name, prefix=""):
        terms = [layers.Rescaling(weight, name=f"{mixed_name}_{prefix}weight{i}")(outputs_by_member[i][mixed_name])
                 for i, weight in zip(spec["members"], spec["weights"], strict=True) if weight > 0]
        return terms[0] if len(terms) == 1 else layers.Add(name=f"{mixed_name}_{prefix}sum")(terms)

    outputs = {}
    for output, spec in chosen.items():
        mixed_name = DISTRIBUTION_LAYER if output == "age" and distributions else output
        mixed_output = weighted_sum(spec, mixed_name)
        if grey_chosen is not None:
            mixed_output = GreySwitch(name=f"{mixed_name}_grey_switch")(
                [inputs, mixed_output, weighted_sum(grey_chosen[output], mixed_name, "grey_")])
        if mixed_name == DISTRIBUTION_LAYER:
            bins = layers.Identity(name=DISTRIBUTION_LAYER)(mixed_output)
            outputs[output] = AgeExpectation(bins.shape[-1] - 1, AGE_SCALE, name="age")(bins)
        else:
            outputs[output] = layers.Identity(name=output)(mixed_output)
    return keras.Model(inputs, outputs, name="ensemble")


def build(member_folders: list[Path], tta: str = "auto", data_dir: Path = DATA_DIR, limit: int | None = None,
          out: Path | None = MODELS_DIR / FAMILY.folder, metadata_extra: dict[str, Any] | None = None,
          plain_members: list[str] | tuple[str, ...] = (), grey_weights: bool = False) -> dict[str, Any]:
    """Choose the weights (and TTA, which the members named in plain_members never get) on validation, and with
    grey_weights a second set on the validation faces turned grey; report validation and test, save to `out`."""
    started = time.perf_counter()
    check_choice(tta, TTA_CHOICES, "--tta")
    names = [Path(folder).name for folder in member_folders]  # each member's name, as load_members gives it
    unknown = [name for name in plain_members if name not in names]
    if unknown:  # before the members load, which takes a while
        raise UserError(f"--plain-member {unknown[0]} is not one of the members ({', '.join(names)}).")
    plain_indices = frozenset(names.index(name) for name in plain_members)
    members = load_members(member_folders)
    input_size = max(int(metadata["image_size"]) for _, _, metadata in members)
    # nothing trains (no training split); every dataset of the data folder weighs in on the choice
    data = load_data(input_size, data_dir, limit, splits=("val", "test"), datasets=None)
    val, test = data["val"], data["test"]
    plain = member_predictions(members, val.images, input_size, flip=False)
    candidates = {"off": plain}
    if tta != "off":
        candidates["on"] = mirror_averaged(members, val.images, input_size, plain, plain_indices)
    chosen = {name: choose_weights(preds, val.rows) for name, preds in candidates.items()}
    if tta == "auto" and "on" in chosen:
        better = all(chosen["on"][o]["error"] < chosen["off"][o]["error"] for o in chosen["off"])
        use_tta = better
    else:
        use_tta = tta == "on"
    weights = chosen["on" if use_tta else "off"]
    grey_chosen = None
    if grey_weights:
        grey_val = predictions_as_chosen(members, grey_copy(val.images), input_size, use_tta, plain_indices)
        grey_chosen = choose_weights(grey_val, val.rows)
    plain_names = [names[index] for index in sorted(plain_indices)] if use_tta else []
    report = {"members": [str(folder) for folder in member_folders], "tta": use_tta, "plain_members": plain_names,
              "validation": {}, "test": {}, "choice": chosen, "grey_choice": grey_chosen}
    ensemble_preds = {}
    for split_name, split in (("validation", val), ("test", test)):
        if split is val:  # the predictions the choice was made on
            preds = candidates["on" if use_tta else "off"]
        else:
            preds = predictions_as_chosen(members, split.images, input_size, use_tta, plain_indices)
        for (name, _, _), member in zip(members, preds, strict=True):
            report[split_name][name] = summary(member, split.rows)
        grey = None if grey_chosen is None else is_grey(split.images)  # the test reads every pixel: only if used
        ensemble_preds[split_name] = mixed(preds, weights, grey_chosen, grey)
        report[split_name]["ensemble"] = summary(ensemble_preds[split_name], split.rows)
    # the saved model computes this same mix (tests/test_ensemble.py), so finish_run takes the test split's
    # instead of predicting it a second time
    test_predicted = user_units(ensemble_preds["test"])
    model = build_ensemble(members, weights, input_size, use_tta, plain_indices, grey_chosen)

    def by_name(choice):
        return {o: {members[i][0]: w for i, w in zip(s["members"], s["weights"], strict=True)}
                for o, s in choice.items()}

    params = {"members": [str(folder) for folder in member_folders], "tta": use_tta, "plain_members": plain_names,
              "weights": by_name(weights)}
    if grey_chosen is not None:  # for images whose channels are equal (agegender.data.images.is_grey)
        params["grey_weights"] = by_name(grey_chosen)
    member_records = [{"folder": str(folder), "name": name, "created": meta.get("created"),
                       "backbone": meta.get("backbone"), "image_size": meta["image_size"],
                       "utkface_crops": meta.get("utkface_crops"), "extra_datasets": meta.get("extra_datasets", []),
                       "manifest_sha256": meta.get("manifest_sha256")}
                      for folder, (name, _, meta) in zip(member_folders, members, strict=True)]
    extra = {"family": FAMILY.name, "backbone": "ensemble", "weights": "members", "members": member_records,
             "selection": report, "age_head": "ensemble", **(metadata_extra or {}),
             "train_seconds": round(time.perf_counter() - started, 1)}
    result = finish_run(model, FAMILY.task, data, params, input_size, data_dir, None if out is None else Path(out),
                        limit=limit, metadata_extra=extra, test_predicted=test_predicted)
    report["model"] = model
    report["validation_metrics"] = result.val_metrics
    report["test_metrics"] = result.test_metrics
    return report


def predictions_as_chosen(members, images: np.ndarray, input_size: int, tta: bool,
                          plain: frozenset[int]) -> list[dict[str, np.ndarray]]:
    """Each member's predictions as the ensemble takes them: plain, or with TTA averaged with the mirror
    image's (except the members in `plain`)."""
    found = member_predictions(members, images, input_size, flip=False)
    return mirror_averaged(members, images, input_size, found, plain) if tta else found


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


@app.command()
def main(
    recipe: cli.RecipeOption = None,
    member: Annotated[list[Path] | None, typer.Option(
        help="A saved model folder to include (repeatable); default: the recipe's members, else "
             f"{' and '.join(FAMILY.settings['members'])}, under --models-dir.")] = None,
    tta: Annotated[str | None, typer.Option(
        help="Average each member with its view of the mirror image: auto (only if validation improves), on "
             "or off; default: the recipe's, else auto.")] = None,
    plain_member: Annotated[list[str] | None, typer.Option(
        help="A member (by folder name) that sees the plain image only, without mirror-image averaging "
             "(repeatable): its time per face halves; default: the recipe's plain_members, else none.")] = None,
    grey_weights: Annotated[bool | None, typer.Option(
        "--grey-weights/--no-grey-weights",
        help="Also choose weights on the validation faces turned grey, used for photos whose three channels "
             "are equal; default: the recipe's grey_weights, else off.")] = None,
    limit: Annotated[int | None, typer.Option(min=16, help="Choose on a subset (for quick checks).")] = None,
    data_dir: Annotated[Path, typer.Option(help="Folder prepare_data wrote.")] = DATA_DIR,
    models_dir: Annotated[Path, typer.Option(help="Where the members named by the recipe are.")] = MODELS_DIR,
    out: Annotated[Path, typer.Option(help="Model folder to write.")] = MODELS_DIR / FAMILY.folder,
) -> None:
    """Combine saved models into one ensemble model, with weights chosen on the validation split."""
    check_choice(tta, TTA_CHOICES, "--tta")
    with user_errors():
        plan = plan_run(FAMILY.name, recipe, setting_flags={"tta": tta, "plain_members": plain_member,
                                                            "grey_weights": grey_weights})
        if plan.settings["tta"] not in TTA_CHOICES:
            raise UserError(f"The recipe's tta {plan.settings['tta']!r} is not one of {', '.join(TTA_CHOICES)}.")
        folders = list(member or (Path(models_dir) / name for name in plan.settings["members"]))
        for folder in folders:
            if not Path(folder).is_dir():
                raise UserError(f"Model folder {folder} does not exist.")
        report = build(folders, plan.settings["tta"], data_dir, limit, out, plan.metadata(),
                       plan.settings["plain_members"], bool(plan.settings["grey_weights"]))
        print_report(report)
        print_metrics("ensemble: validation split", report["validation_metrics"])
        print_metrics("ensemble: test split", report["test_metrics"])
        console.print(f"Saved to {out}.")


if __name__ == "__main__":
    app()
