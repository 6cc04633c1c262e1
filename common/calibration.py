"""Gender you can trust: a calibrated p_female, and a per-model confidence above which a gender is given as certain.

Calibration maps the model's own p_female to a probability that matches how often the face is female. Two
candidates are fitted on the validation split (every dataset in it, pooled) and the one with the lower
out-of-fold log loss (FOLDS-fold cross-fitting on the validation faces) is kept, refitted on all of them:

- "temperature": p = sigmoid(logit(p_model) / T), one number, never changes which gender is called;
- "isotonic": a monotone step function of p_model (scikit-learn's isotonic regression), stored as its
  breakpoints and applied by linear interpolation between them.

The certainty threshold is then chosen on the calibrated validation probabilities: the smallest confidence
max(p, 1 - p) such that the answers at or above it are at least TARGET_ACCURACY right. A face whose confidence
is below it is answered "uncertain (52% female)"; its gender and p_female are still given.

ECE (expected calibration error) bins the confidence of the called gender into ECE_BINS equal-width bins over
[0.5, 1] and averages |accuracy - mean confidence| over the bins, weighted by their share of faces.

Both live in metadata.json under "gender_calibration"; agegender.faces.Predictor applies them to every
prediction. A model without one predicts as before: identity calibration, threshold 0.5 (every answer certain).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CALIBRATION_KEY = "gender_calibration"
IDENTITY, TEMPERATURE, ISOTONIC = "identity", "temperature", "isotonic"
TARGET_ACCURACY = 0.97
ECE_BINS = 10
FOLDS = 5
EPSILON = 1e-6  # probabilities are kept this far from 0 and 1, so logits and log losses stay finite
MIN_CONFIDENCE, MAX_CONFIDENCE = 0.5, 1.0


# ---------------------------------------------------------------- figures


def confidence_of(p_female: np.ndarray) -> np.ndarray:
    """The probability of the gender called: max(p, 1 - p)."""
    p = np.asarray(p_female, dtype=float)
    return np.maximum(p, 1.0 - p)


def correct_calls(p_female: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return (np.asarray(p_female, dtype=float) >= 0.5) == (np.asarray(truth, dtype=float) == 1)


def log_loss(p_female: np.ndarray, truth: np.ndarray) -> float:
    p = np.clip(np.asarray(p_female, dtype=float), EPSILON, 1 - EPSILON)
    y = np.asarray(truth, dtype=float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def reliability_bins(p_female: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty confidence bin over [0.5, 1]: its bounds, faces, mean confidence and accuracy."""
    confidence = confidence_of(p_female)
    correct = correct_calls(p_female, truth)
    edges = np.linspace(MIN_CONFIDENCE, MAX_CONFIDENCE, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    found = []
    for number in range(bins):
        mask = index == number
        if mask.any():
            found.append({"low": float(edges[number]), "high": float(edges[number + 1]), "faces": int(mask.sum()),
                          "confidence": float(confidence[mask].mean()), "accuracy": float(correct[mask].mean())})
    return found


def expected_calibration_error(p_female: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> float:
    found = reliability_bins(p_female, truth, bins)
    total = sum(item["faces"] for item in found)
    if not total:
        return float("nan")
    return float(sum(item["faces"] * abs(item["accuracy"] - item["confidence"]) for item in found) / total)


def certainty_threshold(p_female: np.ndarray, truth: np.ndarray, target: float = TARGET_ACCURACY) -> float:
    """The smallest confidence whose answers at or above it are at least `target` right: 0.5 when every answer
    is, 1.0 (nothing certain short of a probability of 1) when no confidence reaches it."""
    confidence = confidence_of(p_female)
    correct = correct_calls(p_female, truth)
    if not len(confidence) or correct.mean() >= target:
        return MIN_CONFIDENCE
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    accuracy = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    # a face ties with every face of the same confidence: the set "at or above" a value ends at its last tie
    last_of_value = np.append(confidence[1:] != confidence[:-1], True)
    reaching = np.flatnonzero(last_of_value & (accuracy >= target))
    return float(confidence[reaching[-1]]) if reaching.size else MAX_CONFIDENCE


def coverage_and_accuracy(p_female: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, float]:
    """faces; coverage (share answered with certainty); certain_accuracy (accuracy of those); accuracy (of all)."""
    correct = correct_calls(p_female, truth)
    certain = confidence_of(p_female) >= threshold
    return {"faces": int(len(correct)), "coverage": float(certain.mean()) if len(correct) else float("nan"),
            "certain_accuracy": float(correct[certain].mean()) if certain.any() else float("nan"),
            "accuracy": float(correct.mean()) if len(correct) else float("nan")}


def accuracy_coverage_curve(p_female: np.ndarray, truth: np.ndarray, points: int = 101) -> dict[str, list[float]]:
    """Accuracy of the most confident answers against their share of faces (coverage), at `points` coverages."""
    confidence, correct = confidence_of(p_female), correct_calls(p_female, truth)
    order = np.argsort(-confidence, kind="stable")
    accuracy = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    coverages = np.linspace(1 / len(order), 1.0, min(points, len(order)))
    index = np.clip(np.ceil(coverages * len(order)).astype(int) - 1, 0, len(order) - 1)
    return {"coverage": [float(c) for c in coverages], "accuracy": [float(a) for a in accuracy[index]]}


# ---------------------------------------------------------------- the calibration


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), EPSILON, 1 - EPSILON)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass(frozen=True)
class GenderCalibration:
    """How a model's p_female is calibrated and the confidence its answers are certain at."""

    method: str = IDENTITY
    temperature: float = 1.0  # TEMPERATURE
    breakpoints: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # ISOTONIC: (model p, calibrated p)
    threshold: float = MIN_CONFIDENCE

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> GenderCalibration:
        record = metadata.get(CALIBRATION_KEY)
        if not record:
            return cls()
        breakpoints = record.get("breakpoints")
        return cls(record["method"], float(record.get("temperature", 1.0)),
                   (tuple(breakpoints["p_model"]), tuple(breakpoints["p_calibrated"])) if breakpoints else None,
                   float(record.get("threshold", MIN_CONFIDENCE)))

    def apply(self, p_model: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(p_model, dtype=float), 0.0, 1.0)
        if self.method == TEMPERATURE:
            p = sigmoid(logit(p) / self.temperature)
        elif self.method == ISOTONIC:
            p = np.interp(p, self.breakpoints[0], self.breakpoints[1])
        elif self.method != IDENTITY:
            raise ValueError(f"unknown gender calibration {self.method!r}")
        return p if self.method == IDENTITY else np.clip(p, EPSILON, 1 - EPSILON)

    def record(self) -> dict[str, Any]:
        found: dict[str, Any] = {"method": self.method, "threshold": self.threshold}
        if self.method == TEMPERATURE:
            found["temperature"] = self.temperature
        if self.method == ISOTONIC:
            found["breakpoints"] = {"p_model": list(self.breakpoints[0]), "p_calibrated": list(self.breakpoints[1])}
        return found


def fit_temperature(p_model: np.ndarray, truth: np.ndarray) -> GenderCalibration:
    """The temperature that minimises the log loss (searched over log T in [-3, 3])."""
    from scipy.optimize import minimize_scalar

    z, y = logit(p_model), np.asarray(truth, dtype=float)

    def loss(log_t: float) -> float:
        return log_loss(sigmoid(z / np.exp(log_t)), y)

    found = minimize_scalar(loss, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-6})
    return GenderCalibration(TEMPERATURE, float(np.exp(found.x)))


def fit_isotonic(p_model: np.ndarray, truth: np.ndarray) -> GenderCalibration:
    from sklearn.isotonic import IsotonicRegression

    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
        np.asarray(p_model, dtype=float), np.asarray(truth, dtype=float))
    return GenderCalibration(ISOTONIC, breakpoints=(tuple(float(x) for x in fitted.X_thresholds_),
                                                    tuple(float(y) for y in fitted.y_thresholds_)))


FITTERS = {TEMPERATURE: fit_temperature, ISOTONIC: fit_isotonic}


def out_of_fold(p_model: np.ndarray, truth: np.ndarray, fit, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Each face's calibrated p_female from a calibration fitted on the other folds."""
    fold = np.random.default_rng(seed).permutation(len(p_model)) % folds
    found = np.empty(len(p_model))
    for number in range(folds):
        held = fold == number
        found[held] = fit(p_model[~held], truth[~held]).apply(p_model[held])
    return found


def can_fit_calibration(truth: np.ndarray) -> bool:
    """Whether there are enough labelled faces, of both genders, to fit and cross-check a calibration."""
    truth = np.asarray(truth, dtype=float)
    return len(truth) >= 2 * FOLDS and len(np.unique(truth)) == 2


def fit_calibration(p_model: np.ndarray, truth: np.ndarray, target: float = TARGET_ACCURACY,
                    methods: tuple[str, ...] = (TEMPERATURE, ISOTONIC), rows: pd.DataFrame | None = None
                    ) -> dict[str, Any]:
    """The metadata.json record fitted on validation predictions: the method with the lower out-of-fold log
    loss, refitted on every face, its certainty threshold, and the validation figures before and after (with
    `rows`, the faces' labels, also per group and the race spreads)."""
    p_model, truth = np.asarray(p_model, dtype=float), np.asarray(truth, dtype=float)
    if not can_fit_calibration(truth):
        raise ValueError("the gender calibration needs faces of both genders, at least "
                         f"{2 * FOLDS} of them")
    candidates = {}
    for method in methods:
        held_out = out_of_fold(p_model, truth, FITTERS[method])
        candidates[method] = {"log_loss_out_of_fold": log_loss(held_out, truth),
                              "ece_out_of_fold": expected_calibration_error(held_out, truth)}
    method = min(candidates, key=lambda name: candidates[name]["log_loss_out_of_fold"])
    calibration = FITTERS[method](p_model, truth)
    calibrated = calibration.apply(p_model)
    threshold = certainty_threshold(calibrated, truth, target)
    calibration = GenderCalibration(calibration.method, calibration.temperature, calibration.breakpoints, threshold)
    validation = {"ece_before": expected_calibration_error(p_model, truth),
                  "ece_after": expected_calibration_error(calibrated, truth),
                  "ece_after_out_of_fold": candidates[method]["ece_out_of_fold"],
                  "log_loss_before": log_loss(p_model, truth), "log_loss_after": log_loss(calibrated, truth),
                  **coverage_and_accuracy(calibrated, truth, threshold)}
    if rows is not None:
        validation["groups"] = certainty_by_group(calibrated, rows.reset_index(drop=True), threshold)
        validation["race_spreads"] = race_spreads(validation["groups"])
    from agegender.cli import without_nan

    return without_nan({**calibration.record(), "target_accuracy": target, "ece_bins": ECE_BINS, "split": "val",
                        "validation": validation, "candidates": candidates,
                        "created": datetime.now(UTC).isoformat(timespec="seconds")})


def calibration_label(record: dict[str, Any]) -> str:
    """The stored calibration in a few words, e.g. "temperature 1.31" or "isotonic"."""
    if record.get("method") == TEMPERATURE:
        return f"temperature {record['temperature']:.2f}"
    return record.get("method", IDENTITY)


def check_min_confidence(value: float | None, option: str = "--min-gender-confidence") -> float | None:
    """The override of a model's certainty threshold, or a one-sentence error when it is out of range."""
    from agegender.cli import UserError

    if value is not None and not MIN_CONFIDENCE <= value <= MAX_CONFIDENCE:
        raise UserError(f"{option} takes a confidence from 0.5 to 1 (e.g. 0.9); got {value:g}.")
    return value


# ---------------------------------------------------------------- per group (evaluate, compare)


def certainty_by_group(p_female: np.ndarray, rows: pd.DataFrame, threshold: float,
                       groupings: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Per race (all ages and 13+), age band and gender whose labels the rows have (and per named group, such as
    FairFace's race_fairface, among `groupings`): faces, coverage, accuracy of the certain answers and accuracy
    of all answers (agegender.metrics' groups)."""
    from agegender.metrics import GROUPINGS, group_labels, has_grouping

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


def race_spreads(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per race grouping (all ages, 13+; a named race_<name> grouping too) and figure: the best and worst race
    and the spread between them."""
    from agegender.metrics import RACE_ADULTS

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


# ---------------------------------------------------------------- fitting a saved model


def calibrate_gender_folder(folder: Path, data_dir: Path, limit: int | None = None,
                            predictor=None, split=None) -> dict[str, Any]:
    """Fit the gender calibration of a saved model on the validation split (every dataset in it, pooled) and
    store it in its metadata.json. `predictor` and `split` (images, rows) skip loading them again."""
    from agegender.cli import UserError, write_json
    from agegender.data import load_split
    from agegender.faces import Predictor
    from agegender.modelio import METADATA_FILE, read_metadata

    predictor = predictor or Predictor.load(folder, backend="keras")
    if "gender" not in predictor.outputs:
        raise UserError(f"{folder} predicts no gender, so it has no gender calibration to fit.")
    images, rows = split if split is not None else load_split("val", predictor.image_size, data_dir, limit,
                                                                         datasets=None)
    known = rows["gender"].notna().to_numpy()
    if not can_fit_calibration(rows["gender"].to_numpy()[known]):
        raise UserError(f"The validation split in {data_dir} has too few faces with a known gender (at least "
                        f"{2 * FOLDS}, of both genders) to calibrate {folder}.")
    predicted = predictor.predict_arrays(images[known], batch_size=128)
    record = fit_calibration(predicted["p_female_model"], rows["gender"].to_numpy()[known], rows=rows[known])
    datasets = rows.loc[known, "dataset"] if "dataset" in rows else pd.Series(["utkface"] * int(known.sum()))
    record["datasets"] = {str(name): int(count) for name, count in datasets.value_counts(sort=False).items()}
    write_json(Path(folder) / METADATA_FILE, {**read_metadata(folder), CALIBRATION_KEY: record})
    return record


# ---------------------------------------------------------------- views (evaluate, compare)


AGE_MIX_NOTE = ("The race spread over all ages mixes in each race's share of young children, whose gender is read "
                "near chance by every model; the spread over faces 13 and older shows the gap between races "
                "among adults.")
CERTAINTY_RULE = ("A gender is given as certain when its calibrated probability max(p, 1 - p) is at or above the "
                  "model's threshold: the smallest confidence whose answers on the validation split are at least "
                  f"{TARGET_ACCURACY:.0%} right (`tasks/calibrate.py`); the others read \"uncertain (52% female)\". "
                  "Coverage is the share of faces answered with certainty; certain accuracy, how many of those are "
                  "right.")


def plot_gender_calibration(name: str, report: dict[str, Any], path: Path) -> None:
    """Reliability diagram (accuracy against confidence per bin, before and after calibration) beside accuracy
    against coverage, the model's threshold marked."""
    from agegender.plots import pyplot, save

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot([0.5, 1], [0.5, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for key, label, marker in (("reliability_before", f"model's own (ECE {report['ece_before']:.3f})", "o"),
                               ("reliability_after", f"calibrated (ECE {report['ece_after']:.3f})", "s")):
        bins = report[key]
        left.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker=marker, label=label)
    left.set(xlabel="confidence of the gender called", ylabel="share right", xlim=(0.5, 1.0), ylim=(0.0, 1.02),
             title=f"{name}: reliability")
    left.legend(loc="lower right", fontsize=8)
    curve = report["accuracy_coverage"]
    right.plot(curve["coverage"], curve["accuracy"])
    right.scatter([report["coverage"]], [report["certain_accuracy"]], color="C3", zorder=3,
                  label=f"threshold {report['threshold']:.3f}: {report['coverage']:.1%} covered, "
                        f"{report['certain_accuracy']:.1%} right")
    right.axhline(TARGET_ACCURACY, color="grey", linestyle=":")
    right.set(xlabel="coverage (share of faces answered, most confident first)", ylabel="accuracy of those",
              xlim=(0, 1.0), title=f"{name}: accuracy against coverage")
    right.legend(loc="lower left", fontsize=8)
    save(fig, path)


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
            [[name, "all ages" if s["grouping"] == "race" else "13 and older", s["figure"].replace("_", " "),
              f"{s['best_group']} {percent(s['best'])}", f"{s['worst_group']} {percent(s['worst'])}",
              f"{s['spread'] * 100:.1f} points"] for name, r in reports.items() for s in r["race_spreads"]])


def certainty_markdown(reports: dict[str, dict[str, Any]], plots_under: str = "") -> str:
    from agegender.tables import markdown_table

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
    from agegender.cli import console
    from agegender.tables import rich_table

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
