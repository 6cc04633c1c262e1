"""Compare every saved model on the test split: quality, cost, bias by group, robustness to image quality, how
often the calibrated 80% age interval holds the true age, and where each model looks (mean Grad-CAM heatmaps).

    python tasks/compare.py                                  # every model folder under results/models/
    python tasks/compare.py --models gender --models multitask --limit 500

Predictions go through agegender.inference.predictor.Predictor (the one inference path) and are cached per model file,
metadata and manifest hash in results/compare/cache/, so a rerun with nothing changed takes seconds.

Per gender model, "Certain or uncertain gender": calibration error before and after its calibration, a
reliability diagram beside accuracy against coverage (compare/<model>-gender_calibration.png), the certain
answers' coverage and accuracy by group and the race spreads (agegender.reporting.certainty).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer
from PIL import Image, ImageFilter
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agegender.cli import UserError, atomic_path, console, user_errors, without_nan, write_json, write_text
from agegender.data.images import grey_copy
from agegender.data.manifest import file_sha256, load_manifest, load_split, manifest_path, utkface_split_sha256
from agegender.data.paths import DATA_DIR, MODELS_DIR, RESULTS_DIR, SEED
from agegender.inference.gender_calibration import GenderCalibration
from agegender.inference.intervals import INTERVAL_KEY, band_names, interval_label, summarise
from agegender.models.folders import METADATA_FILE, MODEL_FILE, find_models, read_metadata
from agegender.reporting.certainty import certainty_markdown, certainty_reports, print_certainty
from agegender.reporting.metrics import (
    AGE_COLUMNS,
    COST_COLUMNS,
    GENDER_COLUMNS,
    GROUPINGS,
    METRIC_COLUMNS,
    THROUGHPUT_BATCH,
    group_gaps,
    group_metrics,
    labelled_metrics,
)
from agegender.reporting.plots import (
    plot_age_mae_by_age,
    plot_bias,
    plot_conditions,
    plot_robustness,
    plot_signed_age_error,
)
from agegender.reporting.tables import best_values, frame_markdown, frame_rich, markdown_table, render, rich_table

CACHE_VERSION = 2  # bump when the degradations or what the cache holds change
ROBUSTNESS_FACES = 1000  # seeded subset of the test split for the degraded copies; 0 = every test face
TIMING_REPEATS = 30  # single-image calls timed per model (median reported)
HEATMAP_FACES = 2000  # seeded subset of the test split the mean heatmaps average over; 0 = none
BATCH = THROUGHPUT_BATCH

# Image-quality conditions, applied to the uint8 crops at each model's input size (sizes relative to the side)
CONDITIONS: dict[str, str] = {
    "clean": "test images as they are",
    "grayscale": "converted to grey (ITU-R 601 luma) in all three channels, as old and scanned photos are",
    "darker": "pixel values x 0.5",
    "brighter": "pixel values x 1.6 (highlights clip)",
    "low_contrast": "contrast x 0.4 around each image's mean grey",
    "blur": "Gaussian blur, radius = side / 64 (2 px at 128 px)",
    "jpeg": "JPEG re-encoded at quality 10",
    "noise": "Gaussian noise, sigma 20 grey levels (seeded)",
    "downscale": "shrunk to a quarter of the side and enlarged back (bilinear)",
}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


# ---------------------------------------------------------------- finding models


@dataclass
class ModelResult:
    name: str
    folder: Path
    metadata: dict[str, Any]
    predictions: dict[str, np.ndarray]  # "<condition>/age", "<condition>/p_female"
    cost: dict[str, Any]
    cached: bool
    cache_file: Path
    notes: list[str] = field(default_factory=list)


def select_models(models_dir: Path, names: list[str] | None = None) -> tuple[list[tuple[str, Path]], list[str]]:
    """(name, folder) of every model folder under models_dir (named by its path below it, e.g. "gender" or
    "transfer/efficientnetb0"), or of those named; and one line per folder that cannot be used."""
    if not models_dir.is_dir():
        raise UserError(f"Models folder {models_dir} does not exist: train a model first.")
    folders, skipped = find_models(models_dir)
    found = [(folder.relative_to(models_dir).as_posix(), folder) for folder in folders]
    if names:
        known = {name for name, _ in found}
        missing = [name for name in names if name not in known]
        skipped = [line for line in skipped if line.split(":")[0] in names]
        skipped += [f"{name}: no model folder {models_dir / name}; skipped." for name in missing
                    if not any(line.startswith(f"{name}:") for line in skipped)]
        found = [(name, folder) for name, folder in found if name in names]
    return found, skipped


# ---------------------------------------------------------------- degradations


def _per_image(images: np.ndarray, change) -> np.ndarray:
    return np.stack([np.asarray(change(Image.fromarray(image)).convert("RGB"), dtype=np.uint8)
                     for image in images])


def _jpeg(image: Image.Image, quality: int = 10) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def degrade(images: np.ndarray, condition: str, seed: int = SEED) -> np.ndarray:
    """A degraded copy of uint8 crops (N x S x S x 3) under one of CONDITIONS; seeded, so repeatable."""
    if condition not in CONDITIONS:
        raise UserError(f"Unknown condition {condition!r}; expected one of {', '.join(CONDITIONS)}.")
    side = images.shape[1]
    pixels = images.astype(np.float32)
    if condition == "clean":
        return images
    if condition == "darker":
        out = pixels * 0.5
    elif condition == "brighter":
        out = pixels * 1.6
    elif condition == "grayscale":
        return grey_copy(images)
    elif condition == "low_contrast":
        grey = pixels.mean(axis=(1, 2, 3), keepdims=True)
        out = grey + (pixels - grey) * 0.4
    elif condition == "noise":
        out = pixels + np.random.default_rng(seed).normal(0.0, 20.0, size=pixels.shape)
    elif condition == "blur":
        return _per_image(images, lambda im: im.filter(ImageFilter.GaussianBlur(radius=side / 64)))
    elif condition == "jpeg":
        return _per_image(images, _jpeg)
    else:  # downscale
        small = max(4, side // 4)
        return _per_image(images, lambda im: im.resize((small, small), Image.Resampling.BILINEAR)
                          .resize((side, side), Image.Resampling.BILINEAR))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def robustness_subset(count: int, faces: int) -> np.ndarray:
    """Sorted indices of a seeded subset of `faces` test faces (all of them when faces is 0 or too big)."""
    if faces <= 0 or faces >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(SEED).choice(count, size=faces, replace=False))


# ---------------------------------------------------------------- predicting (cached)


def cache_key(folder: Path, manifest_sha: str, limit: int | None, faces: int) -> str:
    digest = hashlib.sha256()
    for part in (file_sha256(folder / MODEL_FILE), file_sha256(folder / METADATA_FILE), manifest_sha,
                 str(limit), str(faces), str(CACHE_VERSION), json.dumps(CONDITIONS)):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def measure_cost(predictor, images: np.ndarray) -> dict[str, float]:
    """Median wall time of one image through Predictor.predict_arrays, and throughput at batch 64 (CPU)."""
    one = np.ascontiguousarray(images[:1])
    predictor.predict_arrays(one)  # warm-up traces the graph
    times = []
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        predictor.predict_arrays(one)
        times.append(time.perf_counter() - start)
    batch = np.ascontiguousarray(images[np.arange(BATCH) % len(images)])
    predictor.predict_arrays(batch, batch_size=BATCH)
    batch_times = []
    for _ in range(5):
        start = time.perf_counter()
        predictor.predict_arrays(batch, batch_size=BATCH)
        batch_times.append(time.perf_counter() - start)
    return {"ms_batch1": 1000 * float(np.median(times)),
            "images_per_s": BATCH / float(np.median(batch_times))}


def predict_model(folder: Path, images: np.ndarray, subset: np.ndarray, advance) -> tuple[dict, dict]:
    """Predictions under every condition (clean on all faces, degraded on the subset) and the cost figures."""
    from agegender.inference.predictor import Predictor

    predictor = Predictor.load(folder)
    predictions = {}
    for condition in CONDITIONS:
        batch = images if condition == "clean" else degrade(images[subset], condition)
        for name, values in predictor.predict_arrays(batch, batch_size=BATCH).items():
            predictions[f"{condition}/{name}"] = values.astype(np.float32)
        advance()
    cost = measure_cost(predictor, images)
    cost["parameters"] = predictor.parameters
    cost["backend"] = predictor.backend
    return predictions, cost


def load_cache(path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            predictions = {key: stored[key] for key in stored.files if key != "cost_json"}
            cost = json.loads(str(stored["cost_json"]))
        return predictions, cost
    except Exception:  # a half-written or foreign file: predict again
        return None


def save_cache(path: Path, predictions: dict[str, np.ndarray], cost: dict) -> None:
    """Write the cache file atomically and remove this model's older ones (other hashes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.stem.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{stem}-*.npz"):
        if re.fullmatch(rf"{re.escape(stem)}-[0-9a-f]{{16}}\.npz", old.name) and old != path:
            old.unlink(missing_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a file object: savez adds no .npz to it
        np.savez(handle, cost_json=np.array(json.dumps(cost)), **predictions)


# ---------------------------------------------------------------- metrics


def condition_predictions(predictions: dict[str, np.ndarray], condition: str = "clean") -> dict[str, np.ndarray]:
    """One condition's predictions ({"clean/age": ...} -> {"age": ...})."""
    return {key.removeprefix(f"{condition}/"): values for key, values in predictions.items()
            if key.startswith(f"{condition}/")}


def without_label_counts(found: dict) -> dict:
    """A metrics record without n_gender and n_age: every test face has every label, so both equal n."""
    return {key: value for key, value in found.items() if key not in ("n_gender", "n_age")}


def flat_metrics(predictions: dict[str, np.ndarray], rows: pd.DataFrame, condition: str = "clean") -> dict:
    """Every metric of one condition in one flat dict (agegender.reporting.metrics.labelled_metrics)."""
    return without_label_counts(labelled_metrics(condition_predictions(predictions, condition), rows))


def bias_tables(results: list[ModelResult], rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every metric per group (agegender.reporting.metrics.GROUPINGS); per metric, the best and worst group and
    the gap."""
    records = []
    for result in results:
        for record in group_metrics(condition_predictions(result.predictions), rows):
            records.append({"model": result.name, **without_label_counts(record)})
    groups = pd.DataFrame(records)
    gaps = group_gaps(groups, by=("model", "grouping"))
    return groups, pd.DataFrame(gaps)


def robustness_table(results: list[ModelResult], rows: pd.DataFrame, subset: np.ndarray) -> pd.DataFrame:
    """Every metric per condition on the robustness subset, with its change from the clean images."""
    sub_rows = rows.iloc[subset].reset_index(drop=True)
    records = []
    for result in results:
        clean_subset = {key: values[subset] for key, values in result.predictions.items()
                        if key.startswith("clean/")}
        reference = flat_metrics(clean_subset, sub_rows)
        for condition in CONDITIONS:
            found = (reference if condition == "clean"
                     else flat_metrics(result.predictions, sub_rows, condition))
            record = {"model": result.name, "condition": condition, **found}
            record.update({f"change_{key}": found[key] - reference[key] for key, *_ in METRIC_COLUMNS
                           if key in found})
            records.append(record)
    return pd.DataFrame(records)


def interval_report(results: list[ModelResult], rows: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per model with an age output: its calibrated interval's coverage and mean width on the test split,
    overall and per true-age band, beside its calibration on validation (or a note that it has none)."""
    found = {}
    for result in results:
        if "clean/age" not in result.predictions:
            continue
        record = result.metadata.get(INTERVAL_KEY)
        if record is None or "clean/age_low" not in result.predictions:
            found[result.name] = {"interval": None, "note": "no age interval: not calibrated (tasks/calibrate.py)"}
            continue
        test = summarise(result.predictions["clean/age_low"], result.predictions["clean/age_high"],
                         rows["age"].to_numpy())
        found[result.name] = {"interval": interval_label(record), "target": record["target_coverage"],
                              "validation_coverage": record["validation"]["coverage"],
                              "validation_mean_width": record["validation"]["mean_width"], **test}
    return found


def interval_markdown(report: dict[str, dict[str, Any]]) -> str:
    calibrated = {name: found for name, found in report.items() if found["interval"]}
    lines = ["Each age comes with an interval in whole years, calibrated on the validation split to hold the true "
             "age 80% of the time (`tasks/calibrate.py`, `agegender.inference.intervals`); here, how often it held "
             "on the test split, and how wide it was."]
    if calibrated:
        lines.append(markdown_table(
            ["model", "interval", "validation coverage", "test coverage", "mean width (years)"],
            [[name, found["interval"], f"{found['validation_coverage']:.1%}", f"{found['coverage']:.1%}",
              f"{found['mean_width']:.1f}"] for name, found in calibrated.items()], right_after=2))
        bands = [band for band in band_names() if any(band in f["by_band"] for f in calibrated.values())]
        lines += ["By true age band (coverage, mean width in years):", markdown_table(
            ["age band", *calibrated], [[band, *(cell_of(found["by_band"].get(band)) for found in calibrated.values())]
                                        for band in bands], right_after=1)]
    lines += [f"- `{name}`: {found['note']}." for name, found in report.items() if not found["interval"]]
    return "\n\n".join(lines)


def gender_certainty(results: list[ModelResult], rows: pd.DataFrame, folder: Path) -> dict[str, dict[str, Any]]:
    """Per model with a gender output: calibration error before and after, the certain answers' coverage and
    accuracy overall and per group, the race spreads (agegender.reporting.certainty), and its figure in folder."""
    models = {}
    for result in results:
        predicted = condition_predictions(result.predictions)
        if "p_female" in predicted:
            models[result.name] = (predicted.get("p_female_model", predicted["p_female"]), predicted["p_female"],
                                   result.metadata, GenderCalibration.from_metadata(result.metadata).threshold)
    return certainty_reports(models, rows, folder)


def cell_of(found: dict[str, Any] | None) -> str:
    return "–" if not found else f"{found['coverage']:.0%}, {found['mean_width']:.1f}"


def heatmap_figures(results: list[ModelResult], data_dir: Path, folder: Path, limit: int | None, faces: int,
                    skipped: list[str]) -> dict[str, str]:
    """Per model, the figure of its mean Grad-CAM heatmaps by age band and gender over a seeded subset of test
    faces (from model.keras), cached beside the predictions; {plot name: path under the results folder}."""
    from agegender.inference.gradcam import load_gradcam, load_means, mean_heatmaps, save_means
    from agegender.reporting.plots import plot_mean_heatmaps

    plots = {}
    for result in results:
        path = result.cache_file.parent / "heatmaps" / f"{result.cache_file.stem}-{faces}.npz"
        means = load_means(path)
        if means is None:
            images, rows = load_split("test", int(result.metadata["image_size"]), data_dir, limit)
            subset = robustness_subset(len(rows), faces)
            try:
                with console.status(f"mean heatmaps of {result.name} over {len(subset):,} test faces"):
                    means = mean_heatmaps(load_gradcam(result.folder), images[subset],
                                          rows.iloc[subset].reset_index(drop=True))
            except UserError as error:
                skipped.append(f"{result.name} heatmaps: {str(error).rstrip('.')}; skipped.")
                continue
            for old in path.parent.glob("*.npz"):  # this model's earlier ones
                if re.fullmatch(rf"{re.escape(slug(result.name))}-[0-9a-f]{{16}}-\d+\.npz", old.name):
                    old.unlink()
            save_means(path, means)
        plot_mean_heatmaps(result.name, means, folder / f"{slug(result.name)}-heatmaps.png")
        plots[f"{result.name} mean heatmaps"] = f"compare/{slug(result.name)}-heatmaps.png"
    return plots


# ---------------------------------------------------------------- tables


def main_rows(results: list[ModelResult], rows: pd.DataFrame) -> list[dict[str, Any]]:
    table = []
    for result in results:
        table.append({"model": result.name, "task": result.metadata.get("task", "?"),
                      "backbone": result.metadata.get("backbone", "?"),
                      "image_size": int(result.metadata["image_size"]),
                      **flat_metrics(result.predictions, rows), **result.cost, "cached": result.cached})
    return table


SHORT = {"accuracy": "acc", "precision": "prec", "recall": "recall", "f1": "F1", "roc_auc": "AUC",
         "mae": "MAE", "mse": "MSE", "rmse": "RMSE", "cs5": "CS@5",
         "change_accuracy": "Δ acc", "change_mae": "Δ MAE"}


FORMATS = {key: fmt for key, _, fmt, _ in METRIC_COLUMNS} | {
    "best": "{:.4f}", "worst": "{:.4f}", "gap": "{:.4f}"} | {
    f"change_{key}": "{:+.4f}" if key not in ("mse",) else "{:+.1f}" for key, *_ in METRIC_COLUMNS}


# ---------------------------------------------------------------- plots


# ---------------------------------------------------------------- the comparison


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def slug(name: str) -> str:
    return name.replace("/", "-")


def same_split(metadata: dict[str, Any], manifest_sha: str, split_sha: str) -> bool:
    """Whether a model was trained on this data's UTKFace split: by the split's hash when its metadata records one
    (a model trained with extra datasets or other crops has another manifest), else by the manifest's."""
    if metadata.get("utkface_split_sha256"):
        return metadata["utkface_split_sha256"] == split_sha
    return metadata.get("manifest_sha256") in (None, manifest_sha)


def evaluate_models(found: list[tuple[str, Path]], data_dir: Path, cache_dir: Path, limit: int | None,
                    faces: int, skipped: list[str]) -> tuple[list[ModelResult], pd.DataFrame, np.ndarray]:
    """Predictions for every usable model, from the cache when nothing changed; broken ones go to skipped."""
    manifest_sha, split_sha = file_sha256(manifest_path(data_dir)), utkface_split_sha256(data_dir)
    splits: dict[int, tuple[np.ndarray, pd.DataFrame]] = {}
    rows: pd.DataFrame | None = None
    results = []
    with progress_bar() as progress:
        overall = progress.add_task("comparing", total=len(found) * len(CONDITIONS))
        for name, folder in found:
            try:
                metadata = read_metadata(folder)
                if not (folder / MODEL_FILE).exists():
                    raise UserError(f"{folder} has no {MODEL_FILE}.")
                size = int(metadata["image_size"])
                if size not in splits:
                    splits[size] = load_split("test", size, data_dir, limit)
                images, split_rows = splits[size]
                if rows is None:
                    rows = split_rows
                subset = robustness_subset(len(rows), faces)
                path = cache_dir / f"{slug(name)}-{cache_key(folder, manifest_sha, limit, faces)}.npz"
                cached = load_cache(path)
                if cached is not None:
                    predictions, cost = cached
                    progress.advance(overall, len(CONDITIONS))
                    console.print(f"{name}: cache hit, predictions read from {path}")
                else:
                    progress.update(overall, description=f"predicting {name}")
                    start = time.perf_counter()
                    predictions, cost = predict_model(folder, images, subset,
                                                      lambda: progress.advance(overall))
                    save_cache(path, predictions, cost)
                    seconds = time.perf_counter() - start
                    console.print(f"{name}: predicted {len(rows):,} clean + {len(subset):,} x "
                                  f"{len(CONDITIONS) - 1} degraded faces in {seconds:.1f} s; "
                                  f"cached in {path}")
            except Exception as error:  # one broken model must not stop the others
                reason = str(error).split("\n")[0].rstrip(".") or type(error).__name__
                if isinstance(error, KeyError):
                    reason = f"metadata.json lacks {error}"
                skipped.append(f"{name}: {reason}; skipped.")
                console.print(f"[yellow]skipped[/] {skipped[-1]}")
                progress.advance(overall, len(CONDITIONS))
                continue
            cost["size_mb"] = (folder / MODEL_FILE).stat().st_size / 1e6
            result = ModelResult(name, folder, metadata, predictions, cost, cached is not None, path)
            if not same_split(metadata, manifest_sha, split_sha):
                result.notes.append("trained on a different manifest: its test split may overlap its "
                                    "training data")
            results.append(result)
    return results, rows, robustness_subset(len(rows), faces) if rows is not None else np.arange(0)


def compare(models_dir: Path = MODELS_DIR, data_dir: Path = DATA_DIR, out: Path = RESULTS_DIR,
            names: list[str] | None = None, limit: int | None = None,
            robustness_faces: int = ROBUSTNESS_FACES, heatmap_faces: int = HEATMAP_FACES) -> dict[str, Any]:
    """Evaluate, tabulate and plot into out/comparison.{md,csv,json} and out/compare/; returns the summary."""
    load_manifest(data_dir)  # fails in one sentence when prepare_data has not run
    found, skipped = select_models(Path(models_dir), names)
    for line in skipped:
        console.print(f"[yellow]skipped[/] {line}")
    if not found:
        raise UserError(f"No usable model folder in {models_dir}: train one first "
                        "(e.g. `python tasks/train_multitask.py`).")
    folder = Path(out) / "compare"
    results, rows, subset = evaluate_models(found, data_dir, folder / "cache", limit, robustness_faces,
                                            skipped)
    if not results:
        raise UserError(f"None of the {len(found)} model folder(s) in {models_dir} could be evaluated.")
    for result in results:
        for note in result.notes:
            console.print(f"[yellow]note[/] {result.name}: {note}")

    table = main_rows(results, rows)
    groups, gaps = bias_tables(results, rows)
    robustness = robustness_table(results, rows, subset)
    robust_note = (f"robustness on a seeded subset of {len(subset):,} of the {len(rows):,} test faces "
                   "(--robustness-faces 0 for all of them)" if len(subset) < len(rows)
                   else f"robustness on all {len(rows):,} test faces")

    plots = {"conditions": "compare/conditions.png", "age_mae_by_age": "compare/age_mae_by_age.png"}
    first = max(results, key=lambda r: int(r.metadata["image_size"]))
    images, _ = load_split("test", int(first.metadata["image_size"]), data_dir, limit)
    plot_conditions({condition: degrade(images[:1], condition)[0] for condition in CONDITIONS},
                    folder / "conditions.png")
    if any("clean/age" in r.predictions for r in results):
        plot_age_mae_by_age({r.name: r.predictions["clean/age"] for r in results if "clean/age" in r.predictions},
                            rows["age"].to_numpy(), folder / "age_mae_by_age.png")
    else:
        plots.pop("age_mae_by_age")
    for result in results:
        if "clean/age" in result.predictions:
            plots[f"{result.name} age error"] = f"compare/{slug(result.name)}-age_error.png"
            plot_signed_age_error(result.name, rows["age"].to_numpy().astype(float), result.predictions["clean/age"],
                           folder / f"{slug(result.name)}-age_error.png")
        plots[f"{result.name} bias"] = f"compare/{slug(result.name)}-bias.png"
        plot_bias(result.name, groups[groups["model"] == result.name], folder / f"{slug(result.name)}-bias.png")
        plots[f"{result.name} robustness"] = f"compare/{slug(result.name)}-robustness.png"
        plot_robustness(result.name, robustness[robustness["model"] == result.name],
                        folder / f"{slug(result.name)}-robustness.png")
    if heatmap_faces:
        plots.update(heatmap_figures(results, data_dir, folder, limit, heatmap_faces, skipped))
    intervals = interval_report(results, rows)
    certainty = gender_certainty(results, rows, folder)
    plots.update({f"{name} gender calibration": f"compare/{report['plot']}" for name, report in certainty.items()})

    summary = {
        "settings": {"models_dir": str(models_dir), "data_dir": str(data_dir), "test_faces": len(rows),
                     "limit": limit, "robustness_faces": len(subset), "seed": SEED,
                     "manifest_sha256": file_sha256(manifest_path(data_dir)), "conditions": CONDITIONS,
                     "timing": "wall-clock median through Predictor.predict_arrays on this machine's CPU "
                               f"({os.cpu_count()} cores, shared), measured when a model is first evaluated"},
        "models": table,
        "best": {family: best_values(table, columns) for family, columns in
                 (("gender", GENDER_COLUMNS), ("age", AGE_COLUMNS), ("cost", COST_COLUMNS))},
        "skipped": skipped,
        "notes": {r.name: r.notes for r in results if r.notes},
        "bias": {"groups": groups.to_dict("records"), "gaps": gaps.to_dict("records")},
        "robustness": robustness.to_dict("records"),
        "robustness_note": robust_note,
        "age_interval": intervals,
        "gender_certainty": certainty,
        "plots": plots,
        "cache": {r.name: {"file": str(r.cache_file), "hit": r.cached} for r in results},
        "everyday": everyday_photos(Path(out) / EVERYDAY_EVALUATION, [r.name for r in results]),
    }
    write_outputs(summary, table, groups, gaps, robustness, Path(out))
    print_report(summary, table, groups, gaps, robustness)
    return summary


# evaluate's figures on FairFace's held-out test photos (every race and age, age groups), shown beside UTKFace's
EVERYDAY_EVALUATION = Path("evaluations") / "fairface-18k-test" / "evaluation.json"
EVERYDAY_COLUMNS = {"faces_found": "faces found", "accuracy": "gender accuracy",
                    "age_group_accuracy": "age group right", "years_outside": "years outside the group"}


def everyday_photos(path: Path, names: list[str]) -> dict[str, Any] | None:
    """The compared models' figures on the everyday photos, from `evaluate --split test` on FairFace (run by
    hand: it reads every photo through the detector), with the gender spread across its seven groups among
    faces 13 and older; None when that evaluation has not been run."""
    if not path.exists():
        return None
    evaluation = json.loads(path.read_text())
    spreads = {gap["model"]: gap for gap in evaluation.get("gaps", [])
               if gap["grouping"] == "race_fairface, age 13+" and gap["metric"] == "accuracy"}
    models = {}
    for name in names:
        if name not in evaluation["models"]:
            continue
        metrics = evaluation["models"][name]["metrics"]
        found = {key: metrics[key] for key in EVERYDAY_COLUMNS if key in metrics}
        found["faces_found"] = evaluation["faces_found"]
        if name in spreads:
            found["gender_spread_13_plus"] = spreads[name]["gap"]
            found["spread_groups"] = f"{spreads[name]['worst_group']} .. {spreads[name]['best_group']}"
        models[name] = found
    return {"source": str(path), "images": evaluation["images"], "created_by": "tasks/evaluate.py",
            "models": models}


def everyday_markdown(everyday: dict[str, Any]) -> str:
    header = ["model", *EVERYDAY_COLUMNS.values(), "gender spread, 7 groups, 13+ (points)"]
    rows = [[name, f"{found['faces_found']:,}", *(f"{found[key]:.4f}" if key in found else "–"
                                                   for key in list(EVERYDAY_COLUMNS)[1:3]),
             f"{found['years_outside']:.2f}" if "years_outside" in found else "–",
             f"{100 * found['gender_spread_13_plus']:.1f} ({found['spread_groups']})"
             if "gender_spread_13_plus" in found else "–"]
            for name, found in everyday["models"].items()]
    return (f"FairFace's held-out test part, {everyday['images']:,} everyday photos, through the photo path "
            f"(`{everyday['source']}`; every group in its evaluation.md).\n\n" + markdown_table(header, rows))


def write_outputs(summary: dict, table: list[dict], groups: pd.DataFrame, gaps: pd.DataFrame,
                  robustness: pd.DataFrame, out: Path) -> None:
    columns = ["model", "task", "backbone", "image_size", "n"]
    columns += [key for key, *_ in METRIC_COLUMNS + COST_COLUMNS]
    frame = pd.DataFrame(table).reindex(columns=columns)
    write_text(out / "comparison.csv", frame.to_csv(index=False))
    write_text(out / "compare" / "bias_groups.csv", groups.to_csv(index=False))
    write_text(out / "compare" / "bias_gaps.csv", gaps.to_csv(index=False))
    write_text(out / "compare" / "robustness.csv", robustness.to_csv(index=False))
    write_json(out / "comparison.json", without_nan(summary))
    write_text(out / "comparison.md", markdown_report(summary, table, groups, gaps, robustness))


def markdown_report(summary: dict, table: list[dict], groups: pd.DataFrame, gaps: pd.DataFrame,
                    robustness: pd.DataFrame) -> str:
    settings = summary["settings"]
    parts = [
        "# Model comparison",
        f"Test split: {settings['test_faces']:,} faces (manifest `{settings['manifest_sha256'][:12]}`), "
        f"written by `python tasks/compare.py`. Best value per column in **bold**.",
        "## Gender", render(table, GENDER_COLUMNS, "", markdown=True),
        "## Age", render(table, AGE_COLUMNS, "", markdown=True),
        "## Cost", render(table, COST_COLUMNS, "", markdown=True),
        f"Timing: {settings['timing']}.",
    ]
    if summary.get("everyday"):
        parts += ["## Everyday photos", everyday_markdown(summary["everyday"])]
    if summary["skipped"]:
        parts += ["Skipped:", "\n".join(f"- {line}" for line in summary["skipped"])]
    for name, notes in summary["notes"].items():
        parts += [f"Note on {name}: {'; '.join(notes)}."]
    if summary["age_interval"]:
        parts += ["## Age interval", interval_markdown(summary["age_interval"])]
    if summary["gender_certainty"]:
        parts += ["## Certain or uncertain gender", certainty_markdown(summary["gender_certainty"], "compare/")]
    parts += ["## Bias: best and worst group per metric",
              frame_markdown(gaps, FORMATS) if len(gaps) else "(no group has a defined metric)"]
    for grouping in GROUPINGS:
        part = groups[groups["grouping"] == grouping].drop(columns="grouping")
        parts += [f"### By {grouping}", frame_markdown(part, FORMATS)]
    parts += ["## Robustness", summary["robustness_note"] + ".",
              "\n".join(f"- `{name}`: {text}" for name, text in CONDITIONS.items()),
              frame_markdown(robustness[[c for c in robustness.columns if not c.startswith("change_")]],
                             FORMATS),
              "## Plots", "\n".join(f"- [{label}]({path})" for label, path in summary["plots"].items())]
    return "\n\n".join(parts) + "\n"


def print_report(summary: dict, table: list[dict], groups: pd.DataFrame, gaps: pd.DataFrame,
                 robustness: pd.DataFrame) -> None:
    n = summary["settings"]["test_faces"]
    for title, columns in ((f"Gender (test, {n:,} faces)", GENDER_COLUMNS),
                           (f"Age (test, {n:,} faces)", AGE_COLUMNS), ("Cost", COST_COLUMNS)):
        if any(any(key in row for key, *_ in columns) for row in table):
            console.print(render(table, columns, title))
    headline = [c for c in ("model", "group", "n", "accuracy", "f1", "roc_auc", "mae", "cs5") if c in groups]
    for grouping in GROUPINGS:
        part = groups.loc[groups["grouping"] == grouping, headline]
        console.print(frame_rich(part, f"By {grouping} (test; every metric in comparison.md)", FORMATS, SHORT))
    if len(gaps):
        named = gaps[gaps["metric"].isin(["accuracy", "f1", "mae", "cs5"])]
        named = pd.DataFrame({"model": named["model"], "grouping": named["grouping"],
                              "metric": named["metric"].map(SHORT),
                              "best group": named["best_group"] + " " + named["best"].map("{:.3f}".format),
                              "worst group": named["worst_group"] + " " + named["worst"].map("{:.3f}".format),
                              "gap": named["gap"]})
        console.print(frame_rich(named, "Bias: gap between the best and worst group", {"gap": "{:.3f}"}, SHORT))
    shown = [c for c in ("condition", "n", "accuracy", "change_accuracy", "roc_auc", "mae", "change_mae",
                         "cs5") if c in robustness]
    for name, part in robustness.groupby("model", sort=False):
        part = part[shown].dropna(axis=1, how="all")
        title = f"{name}: degraded test images ({summary['robustness_note']})"
        console.print(frame_rich(part, title, FORMATS, SHORT))
    print_intervals(summary["age_interval"])
    print_certainty(summary["gender_certainty"], "test")
    hits = sum(item["hit"] for item in summary["cache"].values())
    console.print(f"{len(table)} model(s) compared ({hits} from cache), {len(summary['skipped'])} skipped. "
                  "Wrote comparison.md, comparison.csv, comparison.json and compare/ "
                  f"({len(summary['plots'])} plots).")


def print_intervals(report: dict[str, dict[str, Any]]) -> None:
    calibrated = {name: found for name, found in report.items() if found["interval"]}
    if calibrated:
        console.print(rich_table("Age interval on the test split (calibrated to 80% on validation)",
                                 ["model", "interval", "val coverage", "test coverage", "mean width (y)"],
                                 [[name, found["interval"], f"{found['validation_coverage']:.1%}",
                                   f"{found['coverage']:.1%}", f"{found['mean_width']:.1f}"]
                                  for name, found in calibrated.items()], left=["model", "interval"]))
        bands = [band for band in band_names() if any(band in f["by_band"] for f in calibrated.values())]
        console.print(rich_table("Age interval by true age band (test coverage, mean width in years)",
                                 ["age band", *calibrated],
                                 [[band, *(cell_of(found["by_band"].get(band)) for found in calibrated.values())]
                                  for band in bands]))
    for name, found in report.items():
        if not found["interval"]:
            console.print(f"[yellow]note[/] {name}: {found['note']}.")


@app.command()
def main(
    models: Annotated[list[str] | None, typer.Option(
        "--models", help="Model folder name under --models-dir (repeatable); default every model.")] = None,
    limit: Annotated[int | None, typer.Option(
        min=10, help="Use a seeded subset of N test faces (quick look).")] = None,
    robustness_faces: Annotated[int, typer.Option(
        min=0, help="Seeded subset of test faces for the degraded copies; 0 = all.")] = ROBUSTNESS_FACES,
    heatmap_faces: Annotated[int, typer.Option(
        min=0, help="Seeded subset of test faces the mean Grad-CAM heatmaps average over; 0 = no heatmaps.")]
    = HEATMAP_FACES,
    models_dir: Annotated[Path, typer.Option(help="Folder of model folders.")] = MODELS_DIR,
    data_dir: Annotated[Path, typer.Option(help="Folder prepare_data wrote.")] = DATA_DIR,
    out: Annotated[Path, typer.Option(help="Results folder for comparison.* and compare/.")] = RESULTS_DIR,
) -> None:
    """Compare every saved model on the test split: gender, age and cost tables, bias and robustness."""
    with user_errors():
        compare(models_dir, data_dir, out, models, limit, robustness_faces, heatmap_faces)


if __name__ == "__main__":
    app()
