"""The metrics every task reports, computed the same way everywhere."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from agegender.data.labels import AGE_BANDS, GENDER_LABELS, RACE_LABELS, age_band


def gender_metrics(gender_true, p_female, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1 (female = positive class), ROC AUC and the confusion matrix."""
    y_true = np.asarray(gender_true).astype(int).ravel()
    p = np.asarray(p_female, dtype=float).ravel()
    y_pred = (p >= threshold).astype(int)
    both_classes = len(np.unique(y_true)) == 2
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y_true, p)) if both_classes else float("nan"),
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist(),
        "n": int(len(y_true)),
    }


def age_metrics(age_true, age_pred) -> dict:
    """MAE, MSE, RMSE in years and CS@5 (share of faces within 5 years)."""
    true = np.asarray(age_true, dtype=float).ravel()
    pred = np.asarray(age_pred, dtype=float).ravel()
    error = pred - true
    mse = float(np.mean(error**2))
    return {
        "mae": float(np.mean(np.abs(error))),
        "mse": mse,
        "rmse": float(np.sqrt(mse)),
        "cs5": float(np.mean(np.abs(error) <= 5.0)),
        "n": int(len(true)),
    }


def range_metrics(age_min, age_max, age_pred) -> dict:
    """Against ages known only as ranges (age_max NaN: open-ended): the share of predictions whose whole-year
    age (rounded, as predict's age band) lies inside the range, and how many years the predictions lie outside it
    on average (0 inside; measured from the range's rounding edges, age_min - 0.5 and age_max + 0.5)."""
    low = np.asarray(age_min, dtype=float).ravel()
    high = np.nan_to_num(np.asarray(age_max, dtype=float).ravel(), nan=np.inf)
    pred = np.asarray(age_pred, dtype=float).ravel()
    whole = np.round(pred)
    outside = np.maximum(low - 0.5 - pred, 0.0) + np.maximum(pred - high - 0.5, 0.0)
    return {"age_group_accuracy": float(np.mean((whole >= low) & (whole <= high))),
            "years_outside": float(np.mean(outside)), "n": int(len(pred))}


def range_rows(rows) -> np.ndarray:
    """Which rows have an age range and no exact age."""
    if "age_min" not in rows:
        return np.zeros(len(rows), dtype=bool)
    exact = rows["age"].notna().to_numpy() if "age" in rows else np.zeros(len(rows), dtype=bool)
    return rows["age_min"].notna().to_numpy() & ~exact


def ranged_metrics(rows, age_pred) -> dict | None:
    """range_metrics over the rows that have an age range and no exact age (None when there are none)."""
    ranged = range_rows(rows)
    if not ranged.any():
        return None
    return range_metrics(rows["age_min"].to_numpy(float)[ranged], rows["age_max"].to_numpy(float)[ranged],
                         np.asarray(age_pred, dtype=float)[ranged])


# the comparison's columns (compare, readme): (key, header, format, better); better is "max", "min" or None
THROUGHPUT_BATCH = 64  # compare's batched timing
GENDER_COLUMNS = [("accuracy", "accuracy", "{:.4f}", "max"), ("precision", "precision", "{:.4f}", "max"),
                  ("recall", "recall", "{:.4f}", "max"), ("f1", "F1", "{:.4f}", "max"),
                  ("roc_auc", "ROC AUC", "{:.4f}", "max")]
AGE_COLUMNS = [("mae", "MAE (years)", "{:.2f}", "min"), ("mse", "MSE", "{:.1f}", "min"),
               ("rmse", "RMSE", "{:.2f}", "min"), ("cs5", "CS@5", "{:.3f}", "max")]
COST_COLUMNS = [("backend", "runs", "{}", None), ("parameters", "parameters", "{:,.0f}", "min"),
                ("size_mb", "file MB", "{:.2f}", "min"),
                ("ms_batch1", "CPU ms/image (batch 1)", "{:.2f}", "min"),
                ("images_per_s", f"images/s (batch {THROUGHPUT_BATCH})", "{:,.0f}", "max")]
METRIC_COLUMNS = GENDER_COLUMNS + AGE_COLUMNS
# against ages known only as ranges (FairFace's age groups): evaluate's and the bias tables' extra columns
RANGE_COLUMNS = [("age_group_accuracy", "age group accuracy", "{:.4f}", "max"),
                 ("years_outside", "years outside the range", "{:.2f}", "min")]


# ---------------------------------------------------------------- figures per group (evaluate; compare's bias view)

# "race, age 13+" is race over the faces 13 years and older: children's gender is hard to read at any race, and
# the races' shares of children differ, so the race gap among adults shows what the plain race gap mixes in.
ADULT_AGE = 13
RACE_ADULTS = f"race, age {ADULT_AGE}+"
GROUPINGS = ("race", RACE_ADULTS, "age band", "gender")
CLASS_METRICS = ("precision", "recall", "f1", "roc_auc")  # undefined inside a one-gender group
GROUPING_LABELS = {"race": ("race",), RACE_ADULTS: ("race", "age"), "age band": ("age",),
                   "gender": ("gender",)}  # the labels each grouping reads


def labelled_metrics(predictions: dict[str, np.ndarray], rows) -> dict:
    """Every metric in one flat dict (gender and age metrics share no names), each over the rows that have its
    label (a NaN label is missing); predictions: {"p_female": ..., "age": ...}, the keys a model has. n: rows;
    n_gender and n_age: rows the gender and age figures are over."""
    found: dict = {"n": len(rows)}
    if "p_female" in predictions and "gender" in rows:
        known = rows["gender"].notna().to_numpy()
        if known.any():
            found["n_gender"] = int(known.sum())
            gender = gender_metrics(rows["gender"].to_numpy()[known], np.asarray(predictions["p_female"])[known])
            found.update({key: gender[key] for key, *_ in GENDER_COLUMNS})
    if "age" in predictions and "age" in rows:
        known = rows["age"].notna().to_numpy()
        if known.any():
            found["n_age"] = int(known.sum())
            age = age_metrics(rows["age"].to_numpy()[known], np.asarray(predictions["age"])[known])
            found.update({key: age[key] for key, *_ in AGE_COLUMNS})
    within = ranged_metrics(rows, predictions["age"]) if "age" in predictions else None
    if within is not None:
        found["n_age_range"] = within["n"]
        found.update({key: within[key] for key, *_ in RANGE_COLUMNS})
    return found


ADULTS_SUFFIX = f", age {ADULT_AGE}+"


def known_age(rows):
    """Each row's age for grouping: its exact age, else the low end of its age range (NaN where neither)."""
    import pandas as pd

    age = rows["age"].astype(float) if "age" in rows else pd.Series(np.nan, index=rows.index)
    return age.fillna(rows["age_min"].astype(float)) if "age_min" in rows else age


def named_groupings(columns) -> list[str]:
    """The groupings of a dataset's named group columns (e.g. FairFace's race_fairface): each over all ages and
    over the faces 13 and older."""
    return [grouping for column in columns for grouping in (column, f"{column}{ADULTS_SUFFIX}")]


def group_labels(rows, grouping: str):
    """(each row's group name, NaN where its label is missing; the groups in reporting order). A face whose age
    is a range counts as 13 and older when the whole range is, and in the age band of the range's low end."""
    column = grouping.removesuffix(ADULTS_SUFFIX)
    if grouping in ("race", RACE_ADULTS):
        labels = rows["race"].map(lambda race: RACE_LABELS.get(int(race)) if race == race else None)
        if grouping == RACE_ADULTS:
            labels = labels.where(known_age(rows) >= ADULT_AGE, None)
        return labels, list(RACE_LABELS.values())
    if grouping == "age band":
        return known_age(rows).map(lambda age: age_band(age) if age == age else None), \
            [age_band(low) for low, _ in AGE_BANDS]
    if grouping == "gender":
        return rows["gender"].map(lambda gender: GENDER_LABELS[str(int(gender))] if gender == gender else None), \
            list(GENDER_LABELS.values())
    if column in rows and column not in GROUPING_LABELS:  # a named group column (agegender.data.datasets)
        labels = rows[column].where(rows[column].notna(), None)
        if grouping != column:
            labels = labels.where(known_age(rows) >= ADULT_AGE, None)
        return labels, sorted(rows[column].dropna().unique())
    raise ValueError(f"unknown grouping {grouping!r}; expected one of {GROUPINGS}")


def has_grouping(rows, grouping: str) -> bool:
    """Whether the rows have the labels a grouping reads (an age range counts as an age)."""
    needed = GROUPING_LABELS.get(grouping, (grouping.removesuffix(ADULTS_SUFFIX),))
    if any(label not in rows or rows[label].isna().all() for label in needed if label != "age"):
        return False
    return "age" not in needed or not known_age(rows).isna().all()


def group_metrics(predictions: dict[str, np.ndarray], rows, groupings=GROUPINGS) -> list[dict]:
    """One record per group present ({"grouping", "group", "n", metrics...}): every metric inside each race (all
    ages and 13 and older), age band and gender whose labels the rows have; the class metrics are NaN inside a
    one-gender group."""
    records = []
    for grouping in groupings:
        if not has_grouping(rows, grouping):
            continue
        labels, order = group_labels(rows, grouping)
        for group in order:
            mask = (labels == group).to_numpy()
            if not mask.any():
                continue
            subset = {key: np.asarray(values)[mask] for key, values in predictions.items()}
            found = labelled_metrics(subset, rows[mask])
            if rows.loc[mask, "gender"].dropna().nunique() < 2:
                found.update({key: float("nan") for key in CLASS_METRICS if key in found})
            records.append({"grouping": grouping, "group": group, **found})
    return records


def group_gaps(groups, by=("grouping",)) -> list[dict]:
    """Per metric and grouping (and any other `by` columns, e.g. the model): the best and worst group and the
    gap between them, from group_metrics' records as a data frame; metrics defined in fewer than 2 groups are
    left out."""
    gaps = []
    if len(groups) == 0:
        return gaps
    for keys, part in groups.groupby(list(by), sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        for key, _, _, better in METRIC_COLUMNS + RANGE_COLUMNS:
            if key not in part or part[key].notna().sum() < 2:
                continue
            valid = part[part[key].notna()]
            best = valid.loc[valid[key].idxmax() if better == "max" else valid[key].idxmin()]
            worst = valid.loc[valid[key].idxmin() if better == "max" else valid[key].idxmax()]
            gaps.append({**dict(zip(by, keys, strict=True)), "metric": key, "best_group": best["group"],
                         "best": float(best[key]), "worst_group": worst["group"], "worst": float(worst[key]),
                         "gap": float(abs(best[key] - worst[key]))})
    return gaps
