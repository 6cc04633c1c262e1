"""How often each training image is drawn: per-dataset sampling weights (--dataset-weight NAME=W) and balanced
groups (--balance race,gender,age_band).

A dataset of weight w has each of its images drawn w times as often as an image of a dataset of weight 1 (0
leaves it out of training; its validation and test figures are still reported). Balancing happens inside each
dataset, over the labels it has: every combination of the chosen labels (e.g. Asian women) present in the
dataset gets the same share of its draws, split evenly among its images, so rare groups are seen as often as
common ones; an image without one of the chosen labels counts in an "unknown" group of that label. The dataset's
total share stays its size times its weight."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from agegender.cli import UserError, console
from agegender.data.datasets import UTKFACE
from agegender.data.labels import RACE_LABELS, age_band
from agegender.reporting.tables import rich_table

BALANCE_KEYS = ("race", "gender", "age_band")  # what --balance may name; age_band: AGE_BANDS


def parse_balance(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """"race,gender" (or a list) as the labels to balance over, checked; "" or None: none."""
    if not value:
        return ()
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [name.strip().replace("-", "_") for name in names if name.strip()]
    unknown = [name for name in names if name not in BALANCE_KEYS]
    if unknown:
        raise UserError(f"Cannot balance over {unknown[0]!r}; --balance takes any of {', '.join(BALANCE_KEYS)}.")
    return tuple(dict.fromkeys(names))


def parse_dataset_weights(values: list[str] | None) -> dict[str, float] | None:
    """["celeba-10k=0.5", ...] as {dataset: weight}; None when no flag was given."""
    if not values:
        return None
    weights = {}
    for value in values:
        name, sep, number = value.partition("=")
        try:
            weight = float(number)
        except ValueError:
            weight = -1.0
        if not sep or not name.strip() or not weight >= 0:
            raise UserError(f"--dataset-weight {value!r} should be NAME=WEIGHT with a weight of 0 or more.")
        weights[name.strip()] = weight
    return weights


def check_dataset_weights(weights: dict[str, Any], datasets: list[str]) -> dict[str, float]:
    """Every dataset's weight (1 unless given); a name the manifest lacks or a negative weight is an error."""
    unknown = [name for name in weights if name not in datasets]
    if unknown:
        raise UserError(f"--dataset-weight names {unknown[0]!r}, which the manifest lacks; it has "
                        f"{', '.join(datasets)}.")
    found = {name: float(weights.get(name, 1.0)) for name in datasets}
    if any(weight < 0 for weight in found.values()):
        raise UserError("A --dataset-weight cannot be negative.")
    if not any(found.values()):
        raise UserError("Every dataset has weight 0: nothing is left to train on.")
    return found


def group_keys(rows: pd.DataFrame, balance: tuple[str, ...]) -> pd.Series:
    """Each row's group: its values of the balanced labels, joined ("Asian|female|20-29")."""
    parts = []
    for name in balance:
        if name == "age_band":
            values = rows["age"].map(lambda age: "unknown" if pd.isna(age) else age_band(age))
        elif name == "race":
            values = rows["race"].map(lambda race: "unknown" if pd.isna(race) else RACE_LABELS[int(race)])
        else:
            values = rows["gender"].map(lambda gender: "unknown" if pd.isna(gender)
                                        else ("female" if int(gender) == 1 else "male"))
        parts.append(values.astype(str))
    keys = parts[0]
    for part in parts[1:]:
        keys = keys + "|" + part
    return keys


def sampling_probabilities(rows: pd.DataFrame, balance: tuple[str, ...] = (),
                           dataset_weights: dict[str, float] | None = None) -> np.ndarray | None:
    """The chance of each training row per draw, or None when every image is drawn equally often (no balance and
    every dataset at weight 1): training then shuffles as before."""
    datasets = rows["dataset"] if "dataset" in rows else pd.Series(UTKFACE, index=rows.index)
    weights = {name: float((dataset_weights or {}).get(name, 1.0)) for name in dict.fromkeys(datasets)}
    if not balance and all(weight == 1.0 for weight in weights.values()):
        return None
    mass = np.zeros(len(rows))
    for name, weight in weights.items():
        inside = (datasets == name).to_numpy()
        share = np.full(inside.sum(), 1.0)
        if balance:
            keys = group_keys(rows[inside], balance)
            counts = keys.map(keys.value_counts()).to_numpy(float)
            groups = keys.nunique()
            share = inside.sum() / (groups * counts)  # each group's images together: size / groups
        mass[inside] = weight * share
    return mass / mass.sum()


def drawn_shares(rows: pd.DataFrame, probabilities: np.ndarray | None, balance: tuple[str, ...]) -> pd.DataFrame:
    """Per dataset and group: images, their share of the rows and their share of the draws (for the console)."""
    keys = group_keys(rows, balance) if balance else pd.Series("all", index=rows.index)
    datasets = rows["dataset"] if "dataset" in rows else pd.Series(UTKFACE, index=rows.index)
    drawn = np.full(len(rows), 1 / len(rows)) if probabilities is None else probabilities
    frame = pd.DataFrame({"dataset": datasets.to_numpy(), "group": keys.to_numpy(), "drawn": drawn})
    table = frame.groupby(["dataset", "group"], sort=True).agg(images=("drawn", "size"), drawn=("drawn", "sum"))
    table["rows"] = table["images"] / len(rows)
    return table.reset_index()


def describe_sampling(rows: pd.DataFrame, probabilities: np.ndarray, balance: tuple[str, ...],
                      largest: int = 20) -> None:
    """The training draw on the console: per dataset and group, its images and its share of rows and draws (the
    `largest` groups by images)."""
    table = drawn_shares(rows, probabilities, balance).sort_values("images", ascending=False).head(largest)
    console.print(rich_table(
        f"Training draws ({', '.join(balance) or 'dataset weights'})", ["dataset", "group", "images", "rows", "draws"],
        [[r.dataset, r.group, f"{r.images:,}", f"{r.rows:.1%}", f"{r.drawn:.1%}"] for r in table.itertuples()],
        left=("dataset", "group")))
