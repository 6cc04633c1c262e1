"""Score saved models on any labelled dataset through the full photo path: find the face in each image, align it,
predict (agegender.inference.predictor, as predict does), and compare with the labels.

    python tasks/evaluate.py results/models/multitask --dataset ../shared/data/celeba/celeba-10k.tar.gz
    python tasks/evaluate.py results/models/age --dataset my_faces/ --no-detect --limit 500
    python tasks/evaluate.py results/models/ensemble --dataset celeba-10k.tar.gz --split test --data-dir data

A dataset is a folder, .tar.gz or .zip of images with labels.csv (file, and any of age or an age range, gender with
1 = female, race; empty where unknown; named group columns such as FairFace's race_fairface; agegender.data.datasets).
Against age ranges: the age-group accuracy (the predicted age, rounded, inside the range) and the years outside the
range; every figure also per named group, over all ages and 13 and older. Each image's largest face is scored; an
image where the detector finds none counts in the faces-not-found rate and in no other figure. Metrics are given
for the labels the dataset has, and per race (all ages, and 13 and older), age band and gender where it has those
(with each metric's best and worst group). A model that learned from the dataset (its training split, through
prepare_data --extra-source; an ensemble through its members) is scored with a warning that its figures include
faces it saw.
--split val or test scores only the faces prepare_data put in that split of the dataset (the manifest in
--data-dir): faces such a model never trained on, when it trained on that manifest (no warning then).
Writes results/evaluations/<dataset>/: evaluation.md, evaluation.json, predictions.csv and, for a model with an
age output on a dataset with ages, <model>-age_error.png. On a dataset with genders, each gender model's
calibration error before and after its calibration, its certain answers' coverage and accuracy overall and per
group, and the race spreads (agegender.reporting.certainty), with <model>-gender_calibration.png (reliability diagram,
accuracy against coverage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agegender.cli import (
    UserError,
    check_choice,
    console,
    err_console,
    user_errors,
    without_nan,
    write_json,
    write_text,
)
from agegender.data.datasets import AGE_RANGE_COLUMNS, dataset_name, open_dataset
from agegender.data.images import input_crop, read_image
from agegender.data.manifest import SPLITS, file_sha256, load_manifest, manifest_path
from agegender.data.paths import DATA_DIR, RESULTS_DIR, SEED
from agegender.inference.detectors import DEFAULT_DETECTOR, DETECTORS, detect_faces
from agegender.inference.predictor import Predictor
from agegender.inference.runtime import BACKENDS
from agegender.models.folders import learned_manifests, training_datasets
from agegender.reporting.certainty import certainty_markdown, certainty_reports, print_certainty
from agegender.reporting.metrics import (
    AGE_COLUMNS,
    GENDER_COLUMNS,
    GROUPINGS,
    RANGE_COLUMNS,
    group_gaps,
    group_metrics,
    labelled_metrics,
    named_groupings,
)
from agegender.reporting.plots import plot_age_error
from agegender.reporting.tables import frame_markdown, frame_rich, markdown_table, rich_table

EVALUATIONS_DIR = RESULTS_DIR / "evaluations"
FORMATS = {key: fmt for key, _, fmt, _ in GENDER_COLUMNS + AGE_COLUMNS + RANGE_COLUMNS} | {
    "n": "{:,.0f}", "n_gender": "{:,.0f}", "n_age": "{:,.0f}", "n_age_range": "{:,.0f}", "faces_found": "{:,.0f}",
    "not_found_rate": "{:.1%}", "best": "{:.3f}", "worst": "{:.3f}", "gap": "{:.3f}"}
SHORT = {"accuracy": "acc", "precision": "prec", "roc_auc": "AUC", "n_gender": "n gender", "n_age": "n age",
         "not_found_rate": "no face", "faces_found": "found", "n_age_range": "n age range",
         "age_group_accuracy": "age group acc", "years_outside": "y outside"}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True)


def find_faces(root: Path, files: list[str], detector: str, progress: Progress) -> dict[str, Any]:
    """{file: its largest face, or None where the detector found none}: found once, shared by every model."""
    task = progress.add_task(f"finding faces ({detector})", total=len(files))
    faces = {}
    for name in files:
        found = detect_faces(read_image(root / name), detector)
        faces[name] = found[0] if found else None
        progress.advance(task)
    return faces


def predict_dataset(predictor: Predictor, root: Path, faces: dict[str, Any], detect: bool, batch_size: int,
                    progress: Progress, label: str) -> dict[str, np.ndarray]:
    """Predictions for the files with a face (in faces' order), each crop made as Predictor.predict_image makes
    it: the face aligned for the model's input size (agegender.data.images.input_crop), or with --no-detect the whole
    image resized."""
    files = [name for name, face in faces.items() if face is not None or not detect]
    task = progress.add_task(f"predicting {label}", total=len(files))
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(files), batch_size):
        crops = []
        for name in files[start:start + batch_size]:
            image = read_image(root / name)
            crop = input_crop(image, faces[name], predictor.image_size) if detect else image
            crops.append(predictor.prepare_crop(crop))
            progress.advance(task)
        for key, value in predictor.predict_arrays(np.stack(crops), batch_size).items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()
            if key in ("age", "p_female", "p_female_model", "gender_certain")}


def model_names(model_dirs: list[Path]) -> list[str]:
    """Each model's folder name, numbered where two share one."""
    names: list[str] = []
    for folder in model_dirs:
        name, count = folder.resolve().name, 2
        while name in names:
            name, count = f"{folder.resolve().name}-{count}", count + 1
        names.append(name)
    return names


def split_files(data_dir: Path, dataset: str | Path, split: str) -> tuple[list[str], str]:
    """The files prepare_data put in `split` of the dataset (<data_dir>/manifest.csv), and that manifest's sha256."""
    manifest = load_manifest(data_dir, None)
    chosen = manifest[(manifest["dataset"] == dataset_name(dataset)) & (manifest["split"] == split)]
    if chosen.empty:
        raise UserError(f"{manifest_path(data_dir)} has no {split} split of {dataset_name(dataset)}: prepare it "
                        f"with `python tasks/prepare_data.py --extra-source {dataset} --data-dir {data_dir}`, or "
                        "leave out --split.")
    return chosen["file"].tolist(), file_sha256(manifest_path(data_dir))


def saw_faces(metadata: dict[str, Any], folder: Path, known_as: set[str], split: str | None,
              manifest_sha256: str | None) -> bool:
    """Whether a model's figures may include faces it trained on: it learned from the dataset, and the faces
    scored are not a held-out split of the very manifest it (or each member that learned from it) trained on."""
    if not known_as & set(training_datasets(metadata)):
        return False
    hashes = learned_manifests(metadata, folder, known_as)
    return split not in ("val", "test") or any(found != manifest_sha256 for found in hashes)


def evaluate(model_dirs: list[Path], dataset: str | Path, detect: bool = True, limit: int | None = None,
             out_dir: Path = EVALUATIONS_DIR, data_dir: Path = DATA_DIR, detector: str = DEFAULT_DETECTOR,
             backend: str = "auto", batch_size: int = 64, name: str | None = None,
             split: str | None = None) -> dict[str, Any]:
    """Score every model on the dataset (or on one split of it as prepare_data made it in data_dir); returns the
    summary written to <out_dir>/<dataset>/evaluation.json."""
    source_name = dataset_name(dataset)  # what prepare_data calls it (by its path)
    name = name or (f"{source_name}-{split}" if split else source_name)
    only, manifest_sha256 = split_files(data_dir, dataset, split) if split else (None, None)
    predictors = [Predictor.load(folder, backend) for folder in model_dirs]
    names = model_names(model_dirs)
    with progress_bar() as progress:
        def factory(description, total):
            task = progress.add_task(description, total=total)
            return lambda: progress.advance(task)

        with console.status(f"Reading {dataset} ..."):
            labelled = open_dataset(dataset, data_dir / "datasets" / source_name / "files", name=name,
                                    progress_factory=factory, limit=limit, seed=SEED, only=only)
        if labelled.rows.empty:
            raise UserError(f"{dataset} has no usable labelled image ({len(labelled.problems)} listed as unusable).")
        files = labelled.rows["file"].tolist()
        faces = find_faces(labelled.root, files, detector, progress) if detect else dict.fromkeys(files)
        found = np.array([faces[file] is not None or not detect for file in files])
        rows = labelled.rows[found].reset_index(drop=True)
        rows = rows.astype({column: "float64" for column in ("age", "gender", "race", *AGE_RANGE_COLUMNS)})
        predictions = {model: predict_dataset(predictor, labelled.root, faces, detect, batch_size, progress, model)
                       for model, predictor in zip(names, predictors, strict=True)}

    folder = Path(out_dir) / name
    models, groups, predicted_rows = {}, [], []
    groupings = (*GROUPINGS, *named_groupings(labelled.groups))
    known_as = {name, source_name}  # --name renames it in the results
    for model, predictor, model_dir in zip(names, predictors, model_dirs, strict=True):
        predicted = predictions[model]
        overall = labelled_metrics(predicted, rows)
        model_groups = group_metrics(predicted, rows, groupings)
        groups += [{"model": model, **record} for record in model_groups]
        plots = {}
        if "age" in predicted and rows["age"].notna().any():
            known = rows["age"].notna().to_numpy()
            plot = folder / f"{model}-age_error.png"
            plot_age_error(rows["age"].to_numpy()[known], predicted["age"][known], plot)
            plots["age_error"] = plot.name
        models[model] = {"folder": str(model_dir), "task": predictor.metadata.get("task"), "backend": predictor.backend,
                         "trained_on_dataset": saw_faces(predictor.metadata, model_dir, known_as, split,
                                                         manifest_sha256),
                         "metrics": overall, "plots": plots}
        predicted_rows.append(pd.DataFrame({"model": model, "file": rows["file"],
                                            **{key: value for key, value in predicted.items()}}))
    group_frame = pd.DataFrame(groups)
    gaps = pd.DataFrame(group_gaps(group_frame, by=("model", "grouping")))
    images = len(files)
    summary = {
        "dataset": name, "source": str(dataset), "labels": labelled.labels, "rows_listed": labelled.listed,
        "limit": limit, "split": split, "manifest_sha256": manifest_sha256,
        "detect": detect, "detector": detector if detect else None,
        "images": images, "faces_found": int(found.sum()),
        "not_found_rate": float(1 - found.mean()) if images else 0.0,
        "not_found": [file for file, hit in zip(files, found, strict=True) if not hit],
        "skipped": labelled.problems, "models": models,
        "groups": group_frame.to_dict("records"), "gaps": gaps.to_dict("records"),
    }
    summary["gender_certainty"] = certainty_reports(
        {model: (predictions[model]["p_female_model"], predictions[model]["p_female"], predictor.metadata,
                 predictor.gender_threshold)
         for model, predictor in zip(names, predictors, strict=True) if "p_female" in predictions[model]},
        rows, folder, groupings=groupings)
    write_json(folder / "evaluation.json", without_nan(summary))
    write_text(folder / "evaluation.md", markdown_report(summary, group_frame, gaps))
    write_text(folder / "predictions.csv", pd.concat(predicted_rows).to_csv(index=False, float_format="%.4f"))
    print_report(summary, group_frame, gaps, folder)
    return summary


def overall_frame(summary: dict[str, Any]) -> pd.DataFrame:
    """One row per model: faces found, the not-found rate and every metric the dataset's labels allow."""
    records = [{"model": model, "backend": found["backend"], "faces_found": summary["faces_found"],
                "not_found_rate": summary["not_found_rate"], **found["metrics"]}
               for model, found in summary["models"].items()]
    frame = pd.DataFrame(records)
    return frame.drop(columns=[column for column in ("n",) if column in frame])


def trained_on_dataset(summary: dict[str, Any]) -> str:
    """A warning naming the models that learned from this dataset (its training split, through prepare_data
    --extra-source), whose figures here include faces they were trained on; empty when there are none."""
    models = [model for model, found in summary["models"].items() if found.get("trained_on_dataset")]
    if not models:
        return ""
    who, was, does = ("it", "was", "does") if len(models) == 1 else ("they", "were", "do")
    if summary.get("split") in ("val", "test"):
        return (f"{' and '.join(models)} learned from {dataset_name(summary['source'])} as another manifest "
                f"split it: the faces here may include faces {who} {was} trained on.")
    return (f"{' and '.join(models)} learned from {summary['dataset']} (its training split): the figures here "
            f"include faces {who} {was} trained on, and overstate how {who} {does} on new faces.")


def markdown_report(summary: dict[str, Any], groups: pd.DataFrame, gaps: pd.DataFrame) -> str:
    how = (f"faces found with {summary['detector']} and aligned as predict aligns them" if summary["detect"]
           else "each image taken as an aligned face crop (--no-detect)")
    parts = [f"# Evaluation on {summary['dataset']}",
             f"`python tasks/evaluate.py` on {summary['source']}: {summary['images']:,} labelled images"
             + (f" (a seeded subset of {summary['limit']:,})" if summary["limit"] else "")
             + (f", the {summary['split']} split as prepare_data made it (manifest sha256 "
                f"{summary['manifest_sha256'][:12]})" if summary.get("split") else "")
             + f", labels: {', '.join(summary['labels'])}; {how}. An image without a face counts only in the "
               "not-found rate.",
             "## Overall", frame_markdown(overall_frame(summary), FORMATS)]
    if seen := trained_on_dataset(summary):
        parts.append(f"**{seen}**")
    if len(gaps):
        parts += ["## Bias: best and worst group per metric", frame_markdown(gaps, FORMATS)]
    for grouping in dict.fromkeys(groups["grouping"]) if len(groups) else []:
        part = groups[groups["grouping"] == grouping].drop(columns="grouping")
        parts += [f"### By {grouping}", frame_markdown(part.dropna(axis=1, how="all"), FORMATS)]
    if summary.get("gender_certainty"):
        parts += ["## Certain or uncertain gender", certainty_markdown(summary["gender_certainty"])]
    plots = [(model, found["plots"]["age_error"]) for model, found in summary["models"].items()
             if "age_error" in found["plots"]]
    if plots:
        parts += ["## Age error by true age", "\n".join(f"- [{model}]({path})" for model, path in plots)]
    if summary["skipped"]:
        parts += [f"## Unusable rows ({len(summary['skipped']):,})",
                  markdown_table(["file", "reason"], [[item["file"], item["reason"]]
                                                      for item in summary["skipped"][:200]])]
    return "\n\n".join(parts) + "\n"


def print_report(summary: dict[str, Any], groups: pd.DataFrame, gaps: pd.DataFrame, folder: Path) -> None:
    title = (f"{summary['dataset']}: {summary['images']:,} images, {summary['faces_found']:,} with a face "
             f"({summary['not_found_rate']:.1%} not found)")
    shown = [c for c in ("model", "backend", "n_gender", "accuracy", "f1", "roc_auc", "n_age", "mae", "cs5",
                         "n_age_range", "age_group_accuracy", "years_outside")
             if c in overall_frame(summary)]
    console.print(frame_rich(overall_frame(summary)[shown], title, FORMATS, SHORT))
    headline = [c for c in ("model", "group", "n", "accuracy", "f1", "mae", "cs5", "age_group_accuracy",
                            "years_outside") if c in groups]
    for grouping in dict.fromkeys(groups["grouping"]) if len(groups) else []:
        part = groups.loc[groups["grouping"] == grouping, headline].dropna(axis=1, how="all")
        console.print(frame_rich(part, f"By {grouping}", FORMATS, SHORT))
    if len(gaps):
        named = gaps[gaps["metric"].isin(["accuracy", "mae", "age_group_accuracy"])]
        console.print(rich_table("Gap between the best and worst group", ["model", "grouping", "metric", "best group",
                                                                         "worst group", "gap"],
                                 [[r.model, r.grouping, r.metric, f"{r.best_group} {r.best:.3f}",
                                   f"{r.worst_group} {r.worst:.3f}", f"{r.gap:.3f}"] for r in named.itertuples()],
                                 left=("model", "grouping", "metric", "best group", "worst group")))
    print_certainty(summary.get("gender_certainty") or {}, summary["dataset"])
    if seen := trained_on_dataset(summary):
        err_console.print(f"[yellow]{seen}[/]")
    for item in summary["skipped"][:20]:
        err_console.print(f"[yellow]skipped[/] {item['file']}: {item['reason']}")
    if len(summary["skipped"]) > 20:
        err_console.print(f"[yellow]... and {len(summary['skipped']) - 20} more unusable rows[/] (evaluation.md)")
    console.print(f"Wrote {folder / 'evaluation.md'}, evaluation.json and predictions.csv.")


@app.command()
def main(
    model_dirs: Annotated[list[Path], typer.Argument(help="Saved model folders, e.g. results/models/multitask.")],
    dataset: Annotated[Path, typer.Option(
        help="A labelled dataset: folder, .tar.gz or .zip of images with labels.csv (file; any of age, gender "
             "with 1 = female, race).")],
    detect: Annotated[bool, typer.Option(
        "--detect/--no-detect", help="Find and align each image's face (default), or take each image as an "
                                     "aligned face crop.")] = True,
    limit: Annotated[int | None, typer.Option(min=1, help="Score a seeded random subset of N labelled images.")]
    = None,
    out: Annotated[Path, typer.Option(help="Where <dataset>/evaluation.md and .json go.")] = EVALUATIONS_DIR,
    name: Annotated[str | None, typer.Option(help="The dataset's name in the results (default: from its path).")]
    = None,
    detector: Annotated[str, typer.Option(help=f"Face detector: {', '.join(DETECTORS)}.")] = DEFAULT_DETECTOR,
    backend: Annotated[str, typer.Option(help="auto, keras, tflite or tflite-int8 (as predict).")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Faces per model call.")] = 64,
    data_dir: Annotated[Path, typer.Option(help="Where an archive is unpacked (<data-dir>/datasets/<name>), and "
                                                "whose manifest --split reads.")]
    = DATA_DIR,
    split: Annotated[str | None, typer.Option(
        help="Score only the faces prepare_data put in this split (train, val, test) of the dataset, as "
             "<data-dir>/manifest.csv records it; results under <dataset>-<split>.")] = None,
) -> None:
    """Score saved models on a labelled dataset: metrics, faces-not-found rate, bias tables, age error by age."""
    check_choice(backend, BACKENDS, "--backend")
    check_choice(detector, tuple(DETECTORS), "--detector")
    check_choice(split, SPLITS, "--split")
    with user_errors():
        evaluate(model_dirs, dataset, detect, limit, out, data_dir, detector, backend, batch_size, name, split)


if __name__ == "__main__":
    app()
