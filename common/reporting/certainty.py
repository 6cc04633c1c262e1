"""Certain or uncertain gender, as evaluate and compare report it on labelled faces: calibration error before and
after calibration (agegender.inference.gender_calibration), coverage and accuracy at the model's certainty
threshold overall and per group, and the spread between races; as tables, markdown and figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agegender.cli import console
from agegender.inference.gender_calibration import (
    CALIBRATION_KEY,
    ECE_BINS,
    TARGET_ACCURACY,
    accuracy_coverage_curve,
    calibration_label,
    coverage_and_accuracy,
    expected_calibration_error,
    reliability_bins,
)
from agegender.reporting.metrics import ADULTS_SUFFIX, GROUPINGS, RACE_ADULTS, group_labels, has_grouping
from agegender.reporting.plots import plot_gender_calibration
from agegender.reporting.tables import markdown_table, rich_table

# ---------------------------------------------------------------- per group (evaluate, compare)


def certainty_by_group(p_female: np.ndarray, rows: pd.DataFrame, threshold: float,
                       groupings: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Per race (all ages and 13+), age band and gender whose labels the rows have (and per named group, such as
    FairFace's race_fairface, among `groupings`): faces, coverage, accuracy of the certain answers and accuracy
    of all answers (agegender.reporting.metrics' groups)."""
    p_female = np.asarray(p_female, dtype=float)
    records = []
    if "gender" not in rows:
        return records
    gendered = rows["gender"].notna().to_numpy()
    for grouping in groupings or GROUPINGS:
        if not has_grouping(rows, grouping):
            continue
        labels, order = group_labels(rows, grouping)
        for group in order:
            mask = (labels == group).to_numpy() & gendered
            if mask.any():
                records.append({"grouping": grouping, "group": group, **coverage_and_accuracy(
                    p_female[mask], rows["gender"].to_numpy()[mask], threshold)})
    return records


SPREAD_FIGURES = ("accuracy", "coverage", "certain_accuracy")


def spread_over(grouping: str) -> str:
    """Which faces and which race labels a spread is over, as its table says: "all ages", "13 and older", and
    a dataset's own races named after it, e.g. "13 and older (race_fairface)"."""
    over = "13 and older" if grouping.endswith(ADULTS_SUFFIX) else "all ages"
    scheme = grouping.removesuffix(ADULTS_SUFFIX)
    return over if scheme == "race" else f"{over} ({scheme})"


def race_spreads(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per race grouping (all ages, 13+; a named race_<name> grouping too) and figure: the best and worst race
    and the spread between them."""
    found = []
    named = [grouping for grouping in dict.fromkeys(record["grouping"] for record in groups)
             if grouping.startswith("race_")]
    for grouping in ("race", RACE_ADULTS, *named):
        part = [record for record in groups if record["grouping"] == grouping]
        for figure in SPREAD_FIGURES:
            valid = [record for record in part if record[figure] == record[figure]]
            if len(valid) < 2:
                continue
            best, worst = max(valid, key=lambda r: r[figure]), min(valid, key=lambda r: r[figure])
            found.append({"grouping": grouping, "figure": figure, "best_group": best["group"],
                          "best": best[figure], "worst_group": worst["group"], "worst": worst[figure],
                          "spread": best[figure] - worst[figure]})
    return found


def certainty_report(p_model: np.ndarray, p_female: np.ndarray, rows: pd.DataFrame,
                     metadata: dict[str, Any], threshold: float,
                     groupings: tuple[str, ...] | None = None) -> dict[str, Any]:
    """What evaluate and compare show per model on labelled faces: ECE before and after calibration, the
    reliability bins, accuracy against coverage, coverage and accuracy at the threshold overall, per group,
    and the per-race spreads."""
    known = rows["gender"].notna().to_numpy()
    truth = rows["gender"].to_numpy()[known]
    p_model, p_female = np.asarray(p_model, dtype=float)[known], np.asarray(p_female, dtype=float)[known]
    groups = certainty_by_group(p_female, rows[known].reset_index(drop=True), threshold, groupings)
    record = metadata.get(CALIBRATION_KEY) or {}
    return {"calibration": calibration_label(record) if record else "none (not calibrated: tasks/calibrate.py)",
            "threshold": threshold, "ece_before": expected_calibration_error(p_model, truth),
            "ece_after": expected_calibration_error(p_female, truth),
            **coverage_and_accuracy(p_female, truth, threshold),
            "reliability_before": reliability_bins(p_model, truth),
            "reliability_after": reliability_bins(p_female, truth),
            "accuracy_coverage": accuracy_coverage_curve(p_female, truth),
            "groups": groups, "race_spreads": race_spreads(groups)}


# ---------------------------------------------------------------- views (evaluate, compare)


AGE_MIX_NOTE = ("The race spread over all ages mixes in each race's share of young children, whose gender is read "
                "near chance by every model; the spread over faces 13 and older shows the gap between races "
                "among adults.")
CERTAINTY_RULE = ("A gender is given as certain when its calibrated probability max(p, 1 - p) is at or above the "
                  "model's threshold: the smallest confidence whose answers on the validation split are at least "
                  f"{TARGET_ACCURACY:.0%} right (`tasks/calibrate.py`); the others read \"uncertain (52% female)\". "
                  "Coverage is the share of faces answered with certainty; certain accuracy, how many of those are "
                  "right.")


def certainty_reports(models: dict[str, tuple[np.ndarray, np.ndarray, dict[str, Any], float]], rows: pd.DataFrame,
                      folder: Path, prefix: str = "",
                      groupings: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """Per model name: (model's p_female, calibrated p_female, metadata, threshold) -> its certainty_report,
    with its figure written to folder/<prefix><model>-gender_calibration.png (the report's "plot")."""
    reports = {}
    if "gender" not in rows or not rows["gender"].notna().any():
        return reports
    for name, (p_model, p_female, metadata, threshold) in models.items():
        report = certainty_report(p_model, p_female, rows, metadata, threshold, groupings)
        plot = Path(folder) / f"{prefix}{name.replace('/', '-')}-gender_calibration.png"
        plot_gender_calibration(name, report, plot)
        reports[name] = {**report, "plot": plot.name}
    return reports


def percent(value: float | None) -> str:
    """A share as a percentage; n/a for NaN or None (no face to take it over)."""
    return "n/a" if value is None or value != value else f"{value:.1%}"


def certainty_rows(reports: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "calibration", "threshold", "ECE before", "ECE after", "accuracy (all)", "coverage",
               "certain accuracy"]
    return headers, [[name, r["calibration"], f"{r['threshold']:.3f}", f"{r['ece_before']:.3f}",
                      f"{r['ece_after']:.3f}", percent(r["accuracy"]), percent(r["coverage"]),
                      percent(r["certain_accuracy"])] for name, r in reports.items()]


def group_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    return (["grouping", "group", "faces", "coverage", "certain accuracy", "accuracy (all)"],
            [[g["grouping"], g["group"], f"{g['faces']:,}", percent(g["coverage"]), percent(g["certain_accuracy"]),
              percent(g["accuracy"])] for g in report["groups"]])


def spread_rows(reports: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    return (["model", "over", "figure", "best race", "worst race", "spread"],
            [[name, spread_over(s["grouping"]), s["figure"].replace("_", " "),
              f"{s['best_group']} {percent(s['best'])}", f"{s['worst_group']} {percent(s['worst'])}",
              f"{s['spread'] * 100:.1f} points"] for name, r in reports.items() for s in r["race_spreads"]])


def certainty_markdown(reports: dict[str, dict[str, Any]], plots_under: str = "") -> str:
    parts = [CERTAINTY_RULE + " ECE: expected calibration error over "
             f"{ECE_BINS} confidence bins, before (the model's own p_female) and after calibration.",
             markdown_table(*certainty_rows(reports), right_after=2)]
    for name, report in reports.items():
        parts += [f"**{name}** by group (reliability diagram and accuracy against coverage: "
                  f"[{report['plot']}]({plots_under}{report['plot']})):", markdown_table(*group_rows(report),
                                                                                      right_after=2)]
    if any(r["race_spreads"] for r in reports.values()):
        parts += ["Spread between races (best minus worst):", markdown_table(*spread_rows(reports), right_after=5),
                  AGE_MIX_NOTE]
    return "\n\n".join(parts)


def print_certainty(reports: dict[str, dict[str, Any]], split: str) -> None:
    if not reports:
        return
    console.print(rich_table(f"Certain or uncertain gender ({split})", *certainty_rows(reports),
                             left=["model", "calibration"]))
    for name, report in reports.items():
        console.print(rich_table(f"{name}: certain answers by group ({split})", *group_rows(report),
                                 left=["grouping", "group"]))
    if any(r["race_spreads"] for r in reports.values()):
        console.print(rich_table("Spread between races", *spread_rows(reports),
                                 left=["model", "over", "figure", "best race", "worst race"]))
        console.print(AGE_MIX_NOTE)
