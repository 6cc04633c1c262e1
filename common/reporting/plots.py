"""Every figure the project draws: the data's distributions, learning curves and test errors of a trained
model, the comparison's plots (Grad-CAM's mean heatmaps among them) and a tuning study's. Each is written
atomically (a temporary name, then a rename), so two processes finishing at once never leave half a PNG.
Matplotlib loads on the first plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from agegender.cli import atomic_path
from agegender.data.labels import AGE_BANDS, GENDER_LABELS, age_band
from agegender.inference.gender_calibration import TARGET_ACCURACY
from agegender.inference.gradcam import MIN_CELL_FACES, overlay


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int = 100) -> None:
    """tight_layout, write the PNG atomically, close the figure."""
    plt = pyplot()
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


def age_bins(true: np.ndarray, error: np.ndarray, width: int, least: int = 1) -> tuple[list[float], np.ndarray]:
    """(bin centres, mean of `error` per bin) over `width`-year bins of the true age holding >= least faces."""
    centres, means = [], []
    for low in range(0, 120, width):
        mask = (true >= low) & (true < low + width)
        if mask.sum() >= least:
            centres.append(low + width / 2)
            means.append(error[mask].mean())
    return centres, np.array(means)


# ---------------------------------------------------------------- the data (prepare_data)


def plot_data(ages: pd.Series, genders: pd.Series, races: pd.Series, out_dir: Path) -> dict[str, str]:
    """Age histogram, gender and race shares, age by gender; returns {plot name: path}."""
    plt = pyplot()
    plots = {}

    def keep(fig, name):
        save(fig, out_dir / name, dpi=110)
        plots[name.removesuffix(".png")] = str(out_dir / name)

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(ages, bins=range(0, 118), color="#4c72b0")
    ax.set(xlabel="age (years)", ylabel="faces", title="Age distribution")
    keep(fig, "age_histogram.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    gender_counts = genders.value_counts()
    axes[0].pie(gender_counts, labels=gender_counts.index, autopct="%1.1f%%", colors=["#4c72b0", "#dd8452"])
    axes[0].set_title("Gender share")
    race_counts = races.value_counts()
    axes[1].pie(race_counts, labels=race_counts.index, autopct="%1.1f%%")
    axes[1].set_title("Race share")
    keep(fig, "gender_race_share.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    for value, colour in (("male", "#4c72b0"), ("female", "#dd8452")):
        ax.hist(ages[genders == value], bins=range(0, 118), alpha=0.6, label=value, color=colour)
    ax.set(xlabel="age (years)", ylabel="faces", title="Age by gender")
    ax.legend()
    keep(fig, "age_by_gender.png")
    return plots


# ---------------------------------------------------------------- a trained model (the trainers)


def plot_history(history: pd.DataFrame, path: Path) -> None:
    """One panel per logged metric: training and validation by epoch."""
    plt = pyplot()
    curves = [c for c in history.columns if not c.startswith("val_") and c not in ("epoch", "seconds",
                                                                                  "learning_rate")]
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.5), squeeze=False)
    for ax, name in zip(axes[0], curves, strict=True):
        ax.plot(history["epoch"], history[name], label="train")
        if f"val_{name}" in history:
            ax.plot(history["epoch"], history[f"val_{name}"], label="validation")
        ax.set(title=name, xlabel="epoch")
        ax.legend()
    save(fig, path)


def plot_confusion(matrix: np.ndarray, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:,}", ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["male", "female"], yticklabels=["male", "female"],
           xlabel="predicted", ylabel="true", title="Gender confusion (test)")
    save(fig, path)


def plot_age_error(age_true: np.ndarray, age_pred: np.ndarray, path: Path) -> None:
    """Predicted against true age, and the MAE per 10-year bin."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].scatter(age_true, age_pred, s=3, alpha=0.3)
    axes[0].plot([0, 116], [0, 116], color="red", linewidth=1)
    axes[0].set(xlabel="true age", ylabel="predicted age", title="Predicted vs true age (test)")
    centres, maes = age_bins(np.asarray(age_true), np.abs(np.asarray(age_pred) - np.asarray(age_true)), 10)
    axes[1].bar(centres, maes, width=8)
    axes[1].set(xlabel="true age (10-year bins)", ylabel="MAE (years)", title="Age error by true age")
    save(fig, path)


# ---------------------------------------------------------------- the comparison (compare)


def plot_signed_age_error(name: str, age_true: np.ndarray, age_pred: np.ndarray, path: Path) -> None:
    """Signed error against true age, with the mean error and the MAE per 5-year bin."""
    plt = pyplot()
    error = age_pred - age_true
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter(age_true, error, s=3, alpha=0.25, label="one test face")
    centres, bias = age_bins(age_true, error, 5, least=5)
    _, mae = age_bins(age_true, np.abs(error), 5, least=5)
    ax.plot(centres, bias, color="tab:red", label="mean error (bias)")
    ax.plot(centres, mae, color="black", label="mean absolute error")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(xlabel="true age (years)", ylabel="predicted - true (years)",
           title=f"{name}: age error against true age (test, MAE {np.abs(error).mean():.2f})")
    ax.legend(loc="upper right", fontsize=8)
    save(fig, path)


def plot_robustness(name: str, part: pd.DataFrame, path: Path) -> None:
    """Change of each headline metric from the clean images, one bar per degradation."""
    plt = pyplot()
    metrics = [(key, label) for key, label in (("accuracy", "gender accuracy"), ("roc_auc", "gender ROC AUC"),
                                                ("mae", "age MAE (years)"), ("cs5", "age CS@5"))
               if key in part and part[key].notna().any()]
    degraded = part[part["condition"] != "clean"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        clean = float(part.loc[part["condition"] == "clean", key].iloc[0])
        change = degraded[f"change_{key}"].to_numpy()
        worse = change > 0 if key == "mae" else change < 0
        ax.bar(degraded["condition"], change, color=np.where(worse, "tab:red", "tab:green"))
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(title=f"{label}: clean {clean:.3f}", ylabel="change from clean")
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle(f"{name}: metrics on degraded test images (red = worse)")
    save(fig, path)


def panel_reference(part: pd.DataFrame, key: str) -> float:
    """A bias panel's reference line: the metric over every face of its groups (accuracy and MAE are means, so
    the faces-weighted mean of the groups'), which for a grouping that covers every face is the overall figure
    and for race among the faces 13 and older is the figure over those faces."""
    return float(np.average(part[key].to_numpy(dtype=float), weights=part["n"].to_numpy(dtype=float)))


def plot_bias(name: str, groups: pd.DataFrame, path: Path) -> None:
    """One model's bias figure: per headline metric (rows) and grouping (columns,
    agegender.reporting.metrics.GROUPINGS), a bar per group with the metric over the panel's faces as a dashed
    line; bars worse than it in red. `groups` holds the model's records (grouping, group, n, metrics)."""
    plt = pyplot()
    metrics = [(key, label, better) for key, label, better in (("accuracy", "gender accuracy", "max"),
                                                               ("mae", "age MAE (years)", "min"))
               if key in groups and groups[key].notna().any()]
    groupings = list(dict.fromkeys(groups["grouping"]))
    fig, axes = plt.subplots(len(metrics), len(groupings), squeeze=False,
                             figsize=(3.6 * len(groupings), 3.2 * len(metrics)))
    for row, (key, label, better) in enumerate(metrics):
        for column, grouping in enumerate(groupings):
            ax = axes[row][column]
            part = groups[(groups["grouping"] == grouping) & groups[key].notna()]
            if not len(part):
                ax.axis("off")
                continue
            values = part[key].to_numpy(dtype=float)
            reference = panel_reference(part, key)
            worse = values < reference if better == "max" else values > reference
            ax.bar(part["group"].astype(str), values, color=np.where(worse, "tab:red", "tab:blue"))
            ax.axhline(reference, color="black", linestyle="--", linewidth=1)
            if key == "accuracy":
                ax.set_ylim(max(0.0, min(values.min(), reference) - 0.05), 1.0)
            every = f"{reference:.3f}" if key == "accuracy" else f"{reference:.2f}"
            ax.set_title(f"{label} by {grouping}\n(over its faces: {every})", fontsize=10)
            ax.set(ylabel=label if column == 0 else None)
            ax.tick_params(axis="x", rotation=45 if len(part) > 4 else 0, labelsize=8)
    fig.suptitle(f"{name}: test metrics by group (dashed: every face of the panel; red: worse than that)")
    save(fig, path)


def plot_conditions(images: dict[str, np.ndarray], path: Path) -> None:
    """One face under every condition ({condition: image}), so a reader sees how hard each one is."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(images), figsize=(1.7 * len(images), 2.1))
    for ax, (condition, image) in zip(axes, images.items(), strict=True):
        ax.imshow(image)
        ax.set_title(condition, fontsize=8)
        ax.axis("off")
    save(fig, path)


def plot_age_mae_by_age(ages: dict[str, np.ndarray], true: np.ndarray, path: Path) -> None:
    """One line per model ({name: predicted ages}): MAE per 10-year bin of the true age."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, predicted in ages.items():
        centres, maes = age_bins(true, np.abs(predicted - true), 10, least=5)
        ax.plot(centres, maes, marker="o", label=name)
    ax.set(xlabel="true age (10-year bins)", ylabel="MAE (years)", title="Age MAE by true age (test)")
    ax.legend(fontsize=8)
    save(fig, path)


# ---------------------------------------------------------------- a tuning study (tune)


def plot_study_history(study, path: Path) -> None:
    """Every trial's value (pruned trials at their last reported value) and the best so far."""
    from optuna.trial import TrialState

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    ax.scatter([t.number for t in done], [t.value for t in done], label="complete", zorder=3)
    best, line = None, []
    better = min if study.direction.name == "MINIMIZE" else max
    for t in sorted(done, key=lambda t: t.number):
        best = t.value if best is None else better(best, t.value)
        line.append((t.number, best))
    if line:
        ax.step(*zip(*line, strict=True), where="post", color="red", label="best so far")
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        ax.scatter([t.number for t in pruned], last, marker="x", color="grey",
                   label="pruned (last epoch reported)")
    for t in failed:
        ax.axvline(t.number, color="orange", alpha=0.4, linewidth=1)
    if failed:
        ax.plot([], [], color="orange", alpha=0.4, label="failed")
    defaults = [t for t in done if t.user_attrs.get("defaults")]
    if defaults:
        ax.scatter([defaults[-1].number], [defaults[-1].value], s=120, facecolors="none", edgecolors="black",
                   label="trainer defaults", zorder=4)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="trial", ylabel=study.user_attrs.get("metric", "value"),
           title=f"Optimisation history: {study.study_name} ({study.direction.name.lower()})")
    ax.legend(fontsize=8)
    save(fig, path)


def plot_importances(importances: dict[str, float], title: str, path: Path) -> None:
    """Parameter importances as horizontal bars, the most important on top."""
    plt = pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (fANOVA share of variance)", title=title)
    save(fig, path)


def plot_mean_heatmaps(name: str, means: dict[str, Any], path: Path) -> None:
    """One figure: a row per age band, a column per output and gender, each the mean heatmap over the mean
    face (cells with under MIN_CELL_FACES faces left empty)."""
    plt = pyplot()
    outputs = sorted({output for output, _, _ in means["maps"]}, key=["age", "gender"].index)
    bands = [age_band(low) for low, _ in AGE_BANDS]
    columns = [(output, gender) for output in outputs for gender in GENDER_LABELS.values()]
    grey = np.repeat(np.asarray(Image.fromarray(means["mean_face"].astype(np.uint8)).convert("L"))[..., None], 3, -1)
    face = Image.fromarray(grey)
    fig, axes = plt.subplots(len(bands), len(columns), figsize=(1.9 * len(columns), 1.9 * len(bands)),
                             squeeze=False)
    for r, band in enumerate(bands):
        for c, (output, gender) in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            count = means["counts"].get((output, band, gender), 0)
            if count >= MIN_CELL_FACES:
                ax.imshow(overlay(face, means["maps"][(output, band, gender)]))
                ax.set_xlabel(f"{count} faces", fontsize=7)
            else:
                ax.text(0.5, 0.5, f"{count} faces:\ntoo few", ha="center", va="center", fontsize=7,
                        transform=ax.transAxes)
            if r == 0:
                ax.set_title(f"{output} map, {gender}", fontsize=9)
            if c == 0:
                ax.set_ylabel(band, fontsize=9)
    fig.suptitle(f"{name}: mean Grad-CAM over {means['faces']:,} test faces by age band and gender\n"
                 f"(layer {', '.join(means['layers'])}; over the mean face)", fontsize=9)
    save(fig, path, dpi=90)


def plot_gender_calibration(name: str, report: dict[str, Any], path: Path) -> None:
    """Reliability diagram (accuracy against confidence per bin, before and after calibration) beside accuracy
    against coverage, the model's threshold marked."""
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
