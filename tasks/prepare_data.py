"""Prepare UTKFace (and any extra labelled datasets): read the sources, explore the labels, split train/val/test
and cache decoded images.

    python tasks/prepare_data.py --source ../shared/data/utkface/UTKFace.tar.gz
    python tasks/prepare_data.py --data-dir data-celeba --extra-source ../shared/data/celeba/celeba-10k.tar.gz
    python tasks/prepare_data.py --data-dir data-detected --utkface-crops detected

UTKFace's crops are cached as they are by default; with --utkface-crops detected, each UTKFace image goes through
the inference path instead (the detector finds the face, the eyes align it, as predict does), so the models train
on what they will see in photos. The manifest and its split stay the same; an image where no face is found keeps
its UTKFace crop and is listed in the summary.

An extra dataset (agegender.data.datasets: images + labels.csv) gets its rows in the manifest tagged with its name, its
own split (same seed, stratified by the labels it has), the face found in each image (the cache holds the crops
aligned as the inference path aligns them), and its own summary and plot. Its unusable rows are listed with a
reason, never fatal. With extra datasets the manifest gains a dataset column, so its hash changes: prepare them
into their own --data-dir to keep the UTKFace-only one that the shipped models recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.model_selection import train_test_split

from agegender.cli import UserError, check_choice, console, user_errors, write_json, write_text
from agegender.data.datasets import (
    AGE_RANGE_COLUMNS,
    UTKFACE,
    LabelledDataset,
    age_range_name,
    check_image,
    dataset_name,
    open_dataset,
    source_signature,
)
from agegender.data.images import IMAGE_SUFFIXES, read_image
from agegender.data.labels import AGE_BANDS, RACE_LABELS, SPLIT_AGE_STRATA, age_band, band_name, parse_utkface_name
from agegender.data.manifest import (
    FACE_COLUMNS,
    UTKFACE_CROPS,
    build_cache,
    cache_dir,
    cache_is_current,
    file_sha256,
    manifest_path,
)
from agegender.data.paths import DATA_DIR, RESULTS_DIR, SEED
from agegender.inference.detectors import DEFAULT_DETECTOR, DETECTORS, detect_faces
from agegender.reporting.plots import plot_data, pyplot, save
from agegender.reporting.tables import rich_table

HUB_REPO = os.environ.get("UTKFACE_HUB_REPO", "py97/UTKFace-Cropped")
HUB_FILENAME = os.environ.get("UTKFACE_HUB_FILENAME", "UTKFace.tar.gz")
DEFAULT_SIZES = [128, 224]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


# ---------------------------------------------------------------- source


def fetch_from_hub(repo_id: str, filename: str = HUB_FILENAME) -> Path:
    """Download the archive from a Hugging Face dataset repo into the Hub cache (fails fast offline)."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset"))
    except Exception as error:
        raise UserError(
            f"Could not fetch UTKFace from the Hugging Face Hub ({repo_id}: {type(error).__name__}); "
            "pass --source with a local folder or archive, or set UTKFACE_SOURCE."
        ) from error


def resolve_source(source: str | None) -> Path:
    """Local folder or archive; a Hub dataset id is downloaded first."""
    source = source or os.environ.get("UTKFACE_SOURCE") or HUB_REPO
    path = Path(source).expanduser()
    if path.exists():
        return path
    looks_like_repo_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if looks_like_repo_id and not path.suffix:
        return fetch_from_hub(source)
    raise UserError(f"UTKFace source {source} does not exist.")


def extract_archive(archive: Path, target: Path) -> None:
    """Unpack the image files of a .tar.gz/.tgz/.tar or .zip into target (flat, names kept)."""
    target.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    try:
        if name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(archive) as tar:
                for member in tar:
                    if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                        data = tar.extractfile(member).read()
                        (target / Path(member.name).name).write_bytes(data)
        elif name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zipped:
                for info in zipped.infolist():
                    if not info.is_dir() and info.filename.lower().endswith(IMAGE_SUFFIXES):
                        (target / Path(info.filename).name).write_bytes(zipped.read(info))
        else:
            raise UserError(f"{archive} is not a folder, .tar.gz or .zip.")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise UserError(f"Could not read the archive {archive}: {error}.") from error


def stage_images(source: Path, data_dir: Path, force: bool) -> Path:
    """The folder holding the images: the source folder itself, or the archive unpacked into data/images."""
    if source.is_dir():
        return source.resolve()
    images = data_dir / "images"
    stamp = images / ".source"
    signature = f"{source.resolve()} {source.stat().st_size} {source.stat().st_mtime_ns}"
    if not force and stamp.exists() and stamp.read_text() == signature:
        return images.resolve()
    shutil.rmtree(images, ignore_errors=True)
    with console.status(f"Unpacking {source.name} ..."):
        extract_archive(source, images)
    stamp.write_text(signature)
    return images.resolve()


# ---------------------------------------------------------------- labels, checks and split


def scan_images(root: Path, limit: int | None) -> tuple[pd.DataFrame, list[dict]]:
    """Label every image from its name and check it decodes; returns (labelled rows, skipped files)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise UserError(f"No images found in {root}.")
    rows, skipped = [], []
    for path in files:
        label = parse_utkface_name(path.name)
        if label is None:
            skipped.append({"file": str(path.relative_to(root)), "reason": "malformed file name"})
            continue
        rows.append({"file": str(path.relative_to(root)), "age": label.age, "gender": label.gender,
                     "race": label.race})
    labelled = pd.DataFrame(rows, columns=["file", "age", "gender", "race"])
    if limit is not None and limit < len(labelled):
        labelled = stratified_subset(labelled, limit)
    good = []
    with progress_bar() as progress:
        task = progress.add_task("checking images", total=len(labelled))
        for name in labelled["file"]:
            reason = check_image(root / name)
            if reason:
                skipped.append({"file": name, "reason": reason})
            good.append(reason is None)
            progress.advance(task)
    return labelled[np.array(good, dtype=bool)].reset_index(drop=True), skipped


def strata(frame: pd.DataFrame, minimum: int = 4) -> pd.Series:
    """Age stratum x gender; groups too small to split (small subsets) fall back to gender, then the largest group."""
    labels = frame["age"].map(lambda age: band_name(age, SPLIT_AGE_STRATA)) + "_" + frame["gender"].astype(str)
    labels = labels.where(labels.map(labels.value_counts()) >= minimum, frame["gender"].astype(str))
    return labels.where(labels.map(labels.value_counts()) >= minimum, labels.value_counts().idxmax())


def stratified_subset(frame: pd.DataFrame, size: int) -> pd.DataFrame:
    subset, _ = train_test_split(frame, train_size=size, random_state=SEED, stratify=strata(frame))
    return subset.sort_values("file").reset_index(drop=True)


def split_manifest(frame: pd.DataFrame, test_size: float, val_size: float) -> pd.DataFrame:
    """Seeded split stratified by age stratum and gender: test first, then val out of what is left."""
    rest, test = train_test_split(frame, test_size=test_size, random_state=SEED, stratify=strata(frame))
    train, val = train_test_split(rest, test_size=val_size, random_state=SEED, stratify=strata(rest))
    parts = [part.assign(split=name) for name, part in (("train", train), ("val", val), ("test", test))]
    return pd.concat(parts).sort_values(["split", "file"]).reset_index(drop=True)


# ---------------------------------------------------------------- extra datasets

MIN_EXTRA_IMAGES = 10  # fewer usable images than this cannot be split three ways


def extra_strata(frame: pd.DataFrame, minimum: int = 4) -> pd.Series | None:
    """The split's strata for an extra dataset: age stratum (or age group, where ages are ranges) x gender where
    every row has both, else the one of them every row has; None (a plain random split) when neither is complete
    or the groups are too small."""
    parts = []
    if frame["age"].notna().all():
        parts.append(frame["age"].map(lambda age: band_name(age, SPLIT_AGE_STRATA)))
    elif "age_min" in frame and frame["age_min"].notna().all():  # ranges: the age group itself
        parts.append(frame["age_min"].astype(int).astype(str) + "-" + frame["age_max"].astype(str))
    if frame["gender"].notna().all():
        parts.append(frame["gender"].astype(int).astype(str))
    if not parts:
        return None
    labels = parts[0] if len(parts) == 1 else parts[0] + "_" + parts[1]
    if len(parts) == 2:
        labels = labels.where(labels.map(labels.value_counts()) >= minimum, parts[1])
    labels = labels.where(labels.map(labels.value_counts()) >= minimum, labels.value_counts().idxmax())
    return labels if labels.nunique() > 1 and labels.value_counts().min() >= minimum else None


def split_extra(frame: pd.DataFrame, test_size: float, val_size: float) -> pd.DataFrame:
    """An extra dataset's seeded split (test first, then val out of the rest), stratified where its labels allow."""
    rest, test = train_test_split(frame, test_size=test_size, random_state=SEED, stratify=extra_strata(frame))
    train, val = train_test_split(rest, test_size=val_size, random_state=SEED, stratify=extra_strata(rest))
    parts = [part.assign(split=name) for name, part in (("train", train), ("val", val), ("test", test))]
    return pd.concat(parts).sort_values(["split", "file"]).reset_index(drop=True)


def find_faces(dataset: LabelledDataset, faces_path: Path, detector: str, force: bool,
               progress_factory) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """The largest face in each image (faces.csv: file + FACE_COLUMNS), reused while the source, its usable
    rows and the detector are unchanged; images without a face as problems."""
    stamp = {"source": source_signature(dataset.source), "detector": detector, "files": len(dataset.rows)}
    stamp_path = faces_path.with_suffix(".json")
    if not force and faces_path.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        found = pd.read_csv(faces_path)
    else:
        records = []
        advance = progress_factory(f"finding faces in {dataset.name} ({detector})", len(dataset.rows))
        for name in dataset.rows["file"]:
            faces = detect_faces(read_image(dataset.root / name), detector)
            if faces:
                face = faces[0]
                eyes = (*face.left_eye, *face.right_eye) if face.left_eye and face.right_eye else (None,) * 4
                records.append({"file": name, **dict(zip(FACE_COLUMNS, (*face.box, face.confidence, *eyes),
                                                         strict=True))})
            advance()
        found = pd.DataFrame(records, columns=["file", *FACE_COLUMNS])
        write_text(faces_path, found.to_csv(index=False))
        write_json(stamp_path, stamp)
    missing = sorted(set(dataset.rows["file"]) - set(found["file"]))
    return found, [{"file": name, "reason": "no face found"} for name in missing]


def prepare_extra(source: str, data_dir: Path, results_dir: Path, test_size: float, val_size: float, force: bool,
                  detector: str, progress_factory, limit: int | None = None) -> tuple[pd.DataFrame, dict, dict]:
    """One extra dataset: (its manifest rows, what prepare.json records about it, its summary); with `limit`, a
    seeded subset of that many of its usable rows (the rest are left out, not listed as unusable)."""
    name = dataset_name(source)
    folder = data_dir / "datasets" / name
    with console.status(f"Reading {source} ..."):
        dataset = open_dataset(source, folder / "files", force, name, progress_factory)
    if limit is not None and limit < len(dataset.rows):
        subset = dataset.rows.sample(n=limit, random_state=SEED).sort_values("file").reset_index(drop=True)
        dataset = replace(dataset, rows=subset)
    faces, no_face = find_faces(dataset, folder / "faces.csv", detector, force, progress_factory)
    rows = dataset.rows[dataset.rows["file"].isin(set(faces["file"]))].reset_index(drop=True)
    problems = dataset.problems + no_face
    if len(rows) < MIN_EXTRA_IMAGES:
        raise UserError(f"Only {len(rows)} usable images in {source} ({len(problems)} listed as unusable); an "
                        f"extra dataset needs at least {MIN_EXTRA_IMAGES}.")
    rows = rows.drop(columns=dataset.groups)  # named groups stay in labels.csv (evaluate reads them there)
    if not dataset.has_age_ranges:
        rows = rows.drop(columns=list(AGE_RANGE_COLUMNS))
    manifest = split_extra(rows, test_size, val_size).assign(dataset=name)
    state = {"source": str(Path(source).expanduser()), "image_root": str(dataset.root),
             "faces": str((folder / "faces.csv").resolve()), "detector": detector}
    splits = manifest["split"].value_counts().reindex(["train", "val", "test"]).fillna(0).astype(int)
    summary = {"source": state["source"], "image_root": state["image_root"], "detector": detector,
               "rows_listed": dataset.listed, "images_usable": len(rows), "skipped": problems,
               "labels": dataset.labels, "splits": splits.to_dict(),
               "exploration": explore_extra(manifest, name, results_dir / "data" / name)}
    return manifest, state, summary


def explore_extra(manifest: pd.DataFrame, name: str, out_dir: Path) -> dict:
    """Counts of each label an extra dataset has (a table and one bar chart per label), and how many lack it."""
    named = {"gender": manifest["gender"].map({0: "male", 1: "female"}),
             "race": manifest["race"].map(RACE_LABELS),
             "age band": manifest["age"].map(lambda age: None if pd.isna(age) else age_band(age))}
    if "age_min" in manifest and manifest["age_min"].notna().any():
        named["age range"] = pd.Series([None if pd.isna(low) else age_range_name(low, high)
                                        for low, high in zip(manifest["age_min"], manifest["age_max"], strict=True)],
                                       index=manifest.index, dtype=object)
    band_order = [age_band(low) for low, _ in AGE_BANDS]
    counts, rows = {}, []
    for label, values in named.items():
        if values.notna().any():
            found = values.value_counts()
            order = ([band for band in band_order if band in found] if label == "age band" else
                     sorted(found.index, key=lambda name: int(name.split("-")[0].rstrip("+")))
                     if label == "age range" else found.index)
            counts[label] = {str(value): int(found[value]) for value in order}
        counts.setdefault(label, {})
        missing = int(values.isna().sum())
        for value, count in counts[label].items():
            rows.append([label, value, f"{count:,}", f"{count / len(manifest):.1%}"])
        if missing:
            rows.append([label, "unknown", f"{missing:,}", f"{missing / len(manifest):.1%}"])
    console.print(rich_table(f"{name}: {len(manifest):,} labelled faces", ["label", "value", "count", "share"],
                             rows, left=("label", "value")))
    present = {label: found for label, found in counts.items() if found}
    plots = {}
    if present:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.5), squeeze=False)
        for ax, (label, found) in zip(axes[0], present.items(), strict=True):
            ax.bar(list(found), list(found.values()), color="#4c72b0")
            ax.set(title=f"{name}: {label}", ylabel="faces")
            ax.tick_params(axis="x", labelrotation=45)
        save(fig, out_dir / "labels.png", dpi=110)
        plots["labels"] = str(out_dir / "labels.png")
    return {**counts, "plots": plots}


# ---------------------------------------------------------------- exploration


def explore(manifest: pd.DataFrame, out_dir: Path) -> dict:
    """Rich tables and PNG plots of the age, gender and race distributions."""
    gender_names = manifest["gender"].map({0: "male", 1: "female"})
    race_names = manifest["race"].map(RACE_LABELS)
    bands = manifest["age"].map(age_band)
    band_order = [age_band(low) for low, _ in AGE_BANDS]

    rows = []
    for group, values in (("gender", gender_names), ("race", race_names), ("age band", bands)):
        counts = values.value_counts()
        order = band_order if group == "age band" else counts.index
        for value in order:
            count = int(counts.get(value, 0))
            rows.append([group, str(value), f"{count:,}", f"{count / len(manifest):.1%}"])
    console.print(rich_table(f"UTKFace: {len(manifest):,} labelled faces", ["group", "value", "count", "share"],
                             rows, left=("group", "value")))

    cross = pd.crosstab(bands, gender_names).reindex(band_order).fillna(0).astype(int)
    console.print(rich_table("age band x gender", ["age band", *cross.columns],
                             [[band, *(f"{v:,}" for v in row)] for band, row in cross.iterrows()]))
    plots = plot_data(manifest["age"], gender_names, race_names, out_dir)

    return {
        "gender": gender_names.value_counts().to_dict(),
        "race": race_names.value_counts().to_dict(),
        "age_band": bands.value_counts().reindex(band_order).fillna(0).astype(int).to_dict(),
        "age_band_x_gender": {band: row.to_dict() for band, row in cross.iterrows()},
        "age": {"min": int(manifest["age"].min()), "max": int(manifest["age"].max()),
                "mean": float(manifest["age"].mean()), "median": float(manifest["age"].median())},
        "plots": plots,
    }


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


# ---------------------------------------------------------------- main


def prepare(source: str | None = None, data_dir: Path = DATA_DIR, results_dir: Path = RESULTS_DIR,
            image_sizes: list[int] | None = None, limit: int | None = None, test_size: float = 0.2,
            val_size: float = 0.2, force: bool = False, extra_sources: list[str] | None = None,
            detector: str = DEFAULT_DETECTOR, utkface_crops: str = "original") -> dict:
    """Run the whole preparation and return the summary (also written to results/data/summary.json)."""
    image_sizes = image_sizes or DEFAULT_SIZES
    extra_sources = extra_sources or []
    names = [dataset_name(extra) for extra in extra_sources]
    clash = next((name for name in names if name == UTKFACE or names.count(name) > 1), None)
    if clash:
        raise UserError(f"Two datasets would both be named {clash!r} (a dataset is named after its folder or "
                        "archive); rename one.")
    if not (0 < test_size < 1 and 0 < val_size < 1):
        raise UserError("--test-size and --val-size must be between 0 and 1.")
    if any(size < 16 or size > 1024 for size in image_sizes):
        raise UserError("--image-size must be between 16 and 1024 pixels.")
    source_path = resolve_source(source)
    data_dir.mkdir(parents=True, exist_ok=True)
    root = stage_images(source_path, data_dir, force)
    labelled, skipped = scan_images(root, limit)
    if len(labelled) < 20:
        raise UserError(f"Only {len(labelled)} usable images in {source_path}; at least 20 are needed to split.")
    manifest = split_manifest(labelled, test_size, val_size)

    extras, extra_states, extra_summaries = [], {}, {}
    utkface_state, no_face = {"crops": utkface_crops}, []
    with progress_bar() as progress:
        def factory(description, total):
            task = progress.add_task(description, total=total)
            return lambda: progress.advance(task)

        if utkface_crops == "detected":
            faces_path = data_dir / "datasets" / UTKFACE / "faces.csv"
            utkface = LabelledDataset(UTKFACE, source_path, root, manifest[["file", "age", "gender", "race"]])
            _, missing = find_faces(utkface, faces_path, detector, force, factory)
            no_face = [{**item, "reason": "no face found: its UTKFace crop is used as it is"} for item in missing]
            utkface_state.update(faces=str(faces_path.resolve()), detector=detector)
        for extra, name in zip(extra_sources, names, strict=True):
            rows, extra_states[name], extra_summaries[name] = prepare_extra(
                extra, data_dir, results_dir, test_size, val_size, force, detector, factory, limit)
            extras.append(rows)
    if extras:  # a dataset column only with extra datasets: a UTKFace-only manifest keeps its format and hash
        manifest = pd.concat([manifest.assign(dataset=UTKFACE), *extras], ignore_index=True)
        labels = [column for column in ("age", "gender", "race", *AGE_RANGE_COLUMNS) if column in manifest]
        manifest = manifest.astype({column: "Int64" for column in labels})

    path = manifest_path(data_dir)
    write_text(path, manifest.to_csv(index=False))
    manifest_sha = file_sha256(path)
    write_json(data_dir / "prepare.json", {"source": str(source_path), "image_root": str(root),
                                           "manifest_sha256": manifest_sha, "limit": limit,
                                           "test_size": test_size, "val_size": val_size, "seed": SEED,
                                           **utkface_state,
                                           **({"datasets": extra_states} if extra_states else {})})

    utkface = manifest[manifest["dataset"] == UTKFACE] if extras else manifest
    exploration = explore(utkface.astype({column: int for column in ("age", "gender", "race")}),
                          results_dir / "data")
    caches = {}
    with progress_bar() as progress:
        for size in image_sizes:
            rebuilt = force or not cache_is_current(size, data_dir)
            if rebuilt:
                build_cache(size, data_dir, progress_factory=factory)
            folder = cache_dir(size, data_dir)
            caches[str(size)] = {"path": str(folder), "rebuilt": rebuilt,
                                 "bytes": sum(f.stat().st_size for f in folder.rglob("*.npy"))}

    splits = utkface["split"].value_counts().reindex(["train", "val", "test"]).fillna(0).astype(int)
    summary = {
        "source": str(source_path),
        "image_root": str(root),
        "images_found": len(labelled) + len(skipped),
        "images_labelled": len(labelled),
        "skipped": skipped,
        **utkface_state,
        "no_face": no_face,
        "splits": splits.to_dict(),
        "manifest": str(path),
        "manifest_sha256": manifest_sha,
        "seed": SEED,
        "limit": limit,
        "caches": caches,
        "exploration": exploration,
        **({"datasets": extra_summaries} if extra_summaries else {}),
    }
    write_json(results_dir / "data" / "summary.json", summary)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    rows = [["images found", f"{summary['images_found']:,}"],
            ["labelled and readable", f"{summary['images_labelled']:,}"],
            ["skipped", f"{len(summary['skipped']):,}"],
            ["training crops", summary.get("crops", "original") + (f" ({summary['detector']})"
                                                                   if "detector" in summary else "")],
            *([["no face found (UTKFace crop kept)", f"{len(summary['no_face']):,}"]] if summary.get("no_face")
              else []),
            *([f"{split} split", f"{count:,}"] for split, count in summary["splits"].items()),
            *([f"cache {size}px", f"{cache['bytes'] / 1e6:,.0f} MB" + (" (rebuilt)" if cache["rebuilt"]
                                                                        else " (up to date)")]
              for size, cache in summary["caches"].items())]
    console.print(rich_table("prepare_data summary", ["item", "value"], rows))
    for item in summary["skipped"]:
        console.print(f"[yellow]skipped[/] {item['file']}: {item['reason']}")
    for item in summary.get("no_face", []):
        console.print(f"[yellow]no face[/] {item['file']}: {item['reason']}")
    for name, extra in summary.get("datasets", {}).items():
        rows = [["source", extra["source"]], ["rows in labels.csv", f"{extra['rows_listed']:,}"],
                ["usable (face found)", f"{extra['images_usable']:,}"], ["skipped", f"{len(extra['skipped']):,}"],
                ["labels", ", ".join(extra["labels"])],
                *([f"{split} split", f"{count:,}"] for split, count in extra["splits"].items())]
        console.print(rich_table(f"dataset {name}", ["item", "value"], rows))
        for item in extra["skipped"]:
            console.print(f"[yellow]skipped[/] {name}: {item['file']}: {item['reason']}")


@app.command()
def main(
    source: Annotated[str | None, typer.Option(
        help="UTKFace folder, .tar.gz/.zip archive or Hugging Face dataset id; default $UTKFACE_SOURCE, "
             f"then the Hub copy {HUB_REPO}.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Where the manifest, images and caches go.")] = DATA_DIR,
    results_dir: Annotated[Path, typer.Option(help="Where results/data (plots, summary) goes.")] = RESULTS_DIR,
    image_size: Annotated[list[int] | None, typer.Option(
        help="Cache size in pixels (repeatable); default 128 and 224.")] = None,
    limit: Annotated[int | None, typer.Option(
        min=20, help="Use a stratified subset of N UTKFace images (and a seeded subset of N of each extra "
                     "dataset's).")] = None,
    test_size: Annotated[float, typer.Option(help="Share of images held out for test.")] = 0.2,
    val_size: Annotated[float, typer.Option(help="Share of the remaining images used for validation.")] = 0.2,
    force: Annotated[bool, typer.Option(help="Unpack and rebuild every cache even if up to date.")] = False,
    extra_source: Annotated[list[str] | None, typer.Option(
        help="An extra labelled dataset (repeatable): a folder, .tar.gz or .zip of images with labels.csv "
             "(file and any of age, gender with 1 = female, race; empty where unknown).")] = None,
    detector: Annotated[str, typer.Option(
        help=f"Face detector for the extra datasets' images (and UTKFace's with --utkface-crops detected): "
             f"{', '.join(DETECTORS)}.")] = DEFAULT_DETECTOR,
    utkface_crops: Annotated[str, typer.Option(
        help="original (UTKFace's own aligned crops) or detected (each face found and aligned by the inference "
             "path, as predict sees photos).")] = "original",
) -> None:
    """Read UTKFace (and any extra datasets), explore them, split them and cache decoded images for training."""
    check_choice(detector, tuple(DETECTORS), "--detector")
    check_choice(utkface_crops, UTKFACE_CROPS, "--utkface-crops")
    with user_errors():
        prepare(source, data_dir, results_dir, image_size, limit, test_size, val_size, force, extra_source,
                detector, utkface_crops)


if __name__ == "__main__":
    app()
