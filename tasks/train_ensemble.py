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

This script is the command line of agegender.training.ensemble (choosing the weights, TRAINERS["ensemble"]) and
agegender.models.ensemble (the model, the registry's builder). It has no --strategy: nothing trains, and the
members' predictions run in a batched loop over the validation and test images that a tf.distribute strategy
would not spread without rewriting it for one; the weight search is numpy. --seed is recorded in metadata.json as
every trainer's is; nothing here draws random numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agegender import cli
from agegender.cli import UserError, check_choice, console, user_errors
from agegender.data.paths import DATA_DIR, MODELS_DIR
from agegender.models.registry import FAMILIES
from agegender.training.ensemble import TTA_CHOICES, print_report
from agegender.training.loop import print_metrics
from agegender.training.recipes import plan_run, prepared_data
from agegender.training.trainers import TRAINERS

FAMILY = FAMILIES["ensemble"]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


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
    seed: cli.SeedOption = None,
    data_dir: Annotated[Path, typer.Option(help="Folder prepare_data wrote.")] = DATA_DIR,
    models_dir: Annotated[Path, typer.Option(help="Where the members named by the recipe are.")] = MODELS_DIR,
    out: Annotated[Path, typer.Option(help="Model folder to write.")] = MODELS_DIR / FAMILY.folder,
) -> None:
    """Combine saved models into one ensemble model, with weights chosen on the validation split."""
    check_choice(tta, TTA_CHOICES, "--tta")
    with user_errors():
        plan = plan_run(FAMILY.name, recipe, setting_flags={"tta": tta, "plain_members": plain_member,
                                                            "grey_weights": grey_weights, "seed": seed})
        if plan.settings["tta"] not in TTA_CHOICES:
            raise UserError(f"The recipe's tta {plan.settings['tta']!r} is not one of {', '.join(TTA_CHOICES)}.")
        data_dir = prepared_data(plan, data_dir)
        folders = list(member or (Path(models_dir) / name for name in plan.settings["members"]))
        for folder in folders:
            if not Path(folder).is_dir():
                raise UserError(f"Model folder {folder} does not exist.")
        result = TRAINERS[FAMILY.name](data_dir, limit, out, members=folders, tta=plan.settings["tta"],
                                       plain_members=plan.settings["plain_members"],
                                       grey_weights=bool(plan.settings["grey_weights"]),
                                       seed=plan.settings["seed"], metadata_extra=plan.metadata())
        print_report(result.extra)
        print_metrics("ensemble: validation split", result.val_metrics)
        print_metrics("ensemble: test split", result.test_metrics)
        console.print(f"Saved to {out}.")


if __name__ == "__main__":
    app()
