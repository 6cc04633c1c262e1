"""Prepare UTKFace: read the source, explore the labels, split train/val/test and cache decoded images.

    python tasks/prepare_data.py --source ../shared/data/utkface/UTKFace.tar.gz
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import typer
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.model_selection import train_test_split

from agegender.cli import UserError, console, user_errors, write_json, write_text
from agegender.data import (
    AGE_BANDS,
    DATA_DIR,
    IMAGE_SUFFIXES,
    RACE_LABELS,
    RESULTS_DIR,
    SEED,
    SPLIT_AGE_STRATA,
    age_band,
    band_name,
    build_cache,
    cache_dir,
    cache_is_current,
    file_sha256,
    manifest_path,
    parse_utkface_name,
)
from agegender.plots import plot_data
from agegender.tables import rich_table

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


def check_image(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:
        return f"unreadable image ({type(error).__name__})"
    return None


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
            val_size: float = 0.2, force: bool = False) -> dict:
    """Run the whole preparation and return the summary (also written to results/data/summary.json)."""
    image_sizes = image_sizes or DEFAULT_SIZES
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

    path = manifest_path(data_dir)
    write_text(path, manifest.to_csv(index=False))
    manifest_sha = file_sha256(path)
    write_json(data_dir / "prepare.json", {"source": str(source_path), "image_root": str(root),
                                           "manifest_sha256": manifest_sha, "limit": limit,
                                           "test_size": test_size, "val_size": val_size, "seed": SEED})

    exploration = explore(manifest, results_dir / "data")
    caches = {}
    with progress_bar() as progress:
        def factory(description, total):
            task = progress.add_task(description, total=total)
            return lambda: progress.advance(task)

        for size in image_sizes:
            rebuilt = force or not cache_is_current(size, data_dir)
            if rebuilt:
                build_cache(size, data_dir, progress_factory=factory)
            folder = cache_dir(size, data_dir)
            caches[str(size)] = {"path": str(folder), "rebuilt": rebuilt,
                                 "bytes": sum(f.stat().st_size for f in folder.glob("*.npy"))}

    splits = manifest["split"].value_counts().reindex(["train", "val", "test"]).fillna(0).astype(int)
    summary = {
        "source": str(source_path),
        "image_root": str(root),
        "images_found": len(labelled) + len(skipped),
        "images_labelled": len(labelled),
        "skipped": skipped,
        "splits": splits.to_dict(),
        "manifest": str(path),
        "manifest_sha256": manifest_sha,
        "seed": SEED,
        "limit": limit,
        "caches": caches,
        "exploration": exploration,
    }
    write_json(results_dir / "data" / "summary.json", summary)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    rows = [["images found", f"{summary['images_found']:,}"],
            ["labelled and readable", f"{summary['images_labelled']:,}"],
            ["skipped", f"{len(summary['skipped']):,}"],
            *([f"{split} split", f"{count:,}"] for split, count in summary["splits"].items()),
            *([f"cache {size}px", f"{cache['bytes'] / 1e6:,.0f} MB" + (" (rebuilt)" if cache["rebuilt"]
                                                                        else " (up to date)")]
              for size, cache in summary["caches"].items())]
    console.print(rich_table("prepare_data summary", ["item", "value"], rows))
    for item in summary["skipped"]:
        console.print(f"[yellow]skipped[/] {item['file']}: {item['reason']}")


@app.command()
def main(
    source: Annotated[str | None, typer.Option(
        help="UTKFace folder, .tar.gz/.zip archive or Hugging Face dataset id; default $UTKFACE_SOURCE, "
             f"then the Hub copy {HUB_REPO}.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Where the manifest, images and caches go.")] = DATA_DIR,
    results_dir: Annotated[Path, typer.Option(help="Where results/data (plots, summary) goes.")] = RESULTS_DIR,
    image_size: Annotated[list[int] | None, typer.Option(
        help="Cache size in pixels (repeatable); default 128 and 224.")] = None,
    limit: Annotated[int | None, typer.Option(min=20, help="Use a stratified subset of N images.")] = None,
    test_size: Annotated[float, typer.Option(help="Share of images held out for test.")] = 0.2,
    val_size: Annotated[float, typer.Option(help="Share of the remaining images used for validation.")] = 0.2,
    force: Annotated[bool, typer.Option(help="Unpack and rebuild every cache even if up to date.")] = False,
) -> None:
    """Read UTKFace, explore it, split it and cache decoded images for training."""
    with user_errors():
        prepare(source, data_dir, results_dir, image_size, limit, test_size, val_size, force)


if __name__ == "__main__":
    app()
