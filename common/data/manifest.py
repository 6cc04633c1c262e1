"""The manifest of prepared images (data/manifest.csv and prepare_data's record of where they are), and the
decoded-image cache: every image decoded once per size into one array per dataset and split."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from agegender.cli import UserError, atomic_path, write_json
from agegender.data.datasets import UTKFACE
from agegender.data.images import Face, load_aligned_face, load_face_array
from agegender.data.paths import DATA_DIR, SEED

SPLITS = ("train", "val", "test")
# UTKFace's training crops: its own aligned crops, or each face found and aligned by the inference path
UTKFACE_CROPS = ("original", "detected")


def manifest_path(data_dir: Path = DATA_DIR) -> Path:
    return data_dir / "manifest.csv"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(data_dir: Path = DATA_DIR, datasets: Sequence[str] | None = (UTKFACE,)) -> pd.DataFrame:
    """The manifest (file, age, gender, race, split, dataset) of the named datasets (None: every one); fails
    clearly when prepare_data has not run.

    UTKFace alone by default: only the tasks that train on extra datasets (--extra-source) ask for them. A
    manifest of UTKFace alone has no dataset column on disk (so its hash stays what the shipped models
    recorded); its rows get "utkface" here. A label column without a missing value is whole numbers."""
    path = manifest_path(data_dir)
    if not path.exists():
        raise UserError(f"No manifest at {path}: run `python tasks/prepare_data.py` first.")
    manifest = pd.read_csv(path)
    if "dataset" not in manifest:
        manifest["dataset"] = UTKFACE
    if datasets is not None:
        known = list(dict.fromkeys(manifest["dataset"]))
        unknown = [name for name in datasets if name not in known]
        if unknown:
            raise UserError(f"The manifest has no dataset {unknown[0]!r}; it has {', '.join(known)}.")
        manifest = manifest[manifest["dataset"].isin(datasets)].reset_index(drop=True)
    return whole_labels(manifest)


def whole_labels(rows: pd.DataFrame) -> pd.DataFrame:
    """The label columns without a missing value as int64 (pandas reads a column with gaps as floats)."""
    complete = {column: "int64" for column in ("age", "gender", "race")
                if column in rows and rows[column].notna().all() and rows[column].dtype != "int64"}
    return rows.astype(complete) if complete else rows


def manifest_datasets(data_dir: Path = DATA_DIR) -> list[str]:
    """The datasets in the manifest, UTKFace first."""
    return list(dict.fromkeys(load_manifest(data_dir, None)["dataset"]))


def data_state(data_dir: Path = DATA_DIR) -> dict:
    """What prepare_data recorded: where the images are and the manifest hash."""
    path = data_dir / "prepare.json"
    if not path.exists():
        raise UserError(f"No {path}: run `python tasks/prepare_data.py` first.")
    return json.loads(path.read_text())


def prepared_crops(data_dir: Path = DATA_DIR) -> str:
    """Which UTKFace crops a prepared folder caches (one of UTKFACE_CROPS; folders from before it was recorded
    hold the original ones)."""
    return data_state(data_dir).get("crops", "original")


def prepared_extras(data_dir: Path = DATA_DIR) -> list[str]:
    """The extra datasets (prepare_data --extra-source) a prepared folder holds besides UTKFace, by name."""
    return sorted(data_state(data_dir).get("datasets", {}))


def crops_dir(data_dir: Path, crops: str, extras: Sequence[str] = ()) -> Path:
    """Where UTKFace's `crops` (with the named extra datasets) are prepared beside a data folder:
    <data_dir>-<crops>[+<extra>...] (data -> data-detected, data-detected+celeba-10k)."""
    name = "+".join([f"{Path(data_dir).name}-{crops}", *sorted(extras)])
    return Path(data_dir).with_name(name)


def utkface_split_sha256(data_dir: Path = DATA_DIR) -> str:
    """sha256 of UTKFace's files and their splits in a prepared folder: the same for folders that split UTKFace
    alike, whatever crops or extra datasets they add (the manifest's own hash changes with those)."""
    rows = load_manifest(data_dir).sort_values("file")
    text = "\n".join(f"{file},{split}" for file, split in zip(rows["file"], rows["split"], strict=True))
    return hashlib.sha256(text.encode()).hexdigest()


def same_preparation(folder: Path, data_dir: Path, limit: int | None) -> bool:
    """Whether folder was prepared from data_dir's source with the same split settings and the given --limit (its
    UTKFace rows then have the same splits, whatever crops or extra datasets it adds)."""
    keys = ("source", "test_size", "val_size", "seed")
    mine, theirs = data_state(folder), data_state(data_dir)
    return all(mine.get(key) == theirs.get(key) for key in keys) and mine.get("limit") == limit


def image_root(data_dir: Path = DATA_DIR, dataset: str = UTKFACE) -> Path:
    """Folder that holds a dataset's image files (the manifest's file column is relative to it)."""
    return Path(dataset_state(data_dir, dataset)["image_root"])


def dataset_state(data_dir: Path, dataset: str) -> dict:
    """What prepare_data recorded about one dataset: image_root, and faces (the CSV of the face found in each
    image, which its cache is aligned on; None for UTKFace's own crops, which are aligned already)."""
    state = data_state(data_dir)
    if dataset == UTKFACE:  # faces: only when prepare_data --utkface-crops detected re-found each face
        return {"image_root": state["image_root"], "faces": state.get("faces")}
    if dataset not in state.get("datasets", {}):
        raise UserError(f"{data_dir / 'prepare.json'} records no dataset {dataset!r}: rerun prepare_data.")
    return state["datasets"][dataset]


# where each image's face was found (prepare_data's faces.csv): the box, the detector's confidence and the eyes
FACE_COLUMNS = ("x", "y", "width", "height", "confidence", "left_x", "left_y", "right_x", "right_y")


def read_faces(path: Path | str) -> dict[str, object]:
    """{file: Face} from a faces.csv (eyes None where the detector gave none)."""
    faces = {}
    for row in pd.read_csv(path).itertuples(index=False):
        eyes = (None, None) if pd.isna(row.left_x) else ((row.left_x, row.left_y), (row.right_x, row.right_y))
        faces[row.file] = Face((int(row.x), int(row.y), int(row.width), int(row.height)), float(row.confidence),
                               *eyes)
    return faces


def decode_many(paths: list[Path], image_size: int, progress=None, threads: int = 4,
                faces: list | None = None) -> np.ndarray:
    """Decode and resize many images with a thread pool (PIL releases the GIL while decoding); with `faces`
    (one agegender.data.images.Face per path), each image's face aligned instead (where its face is None, the image
    resized as it is)."""
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)

    def work(index: int) -> int:
        if faces is None or faces[index] is None:
            out[index] = load_face_array(paths[index], image_size)
        else:
            out[index] = load_aligned_face(paths[index], faces[index], image_size)
        return index

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(work, range(len(paths)), chunksize=64):
            if progress is not None:
                progress()
    return out


def cache_dir(image_size: int, data_dir: Path = DATA_DIR) -> Path:
    return data_dir / "cache" / str(image_size)


def cache_file(image_size: int, data_dir: Path, dataset: str, split: str) -> Path:
    """A dataset's cached split: <size>/<split>.npy for UTKFace (as before extra datasets existed), else
    <size>/<dataset>/<split>.npy."""
    folder = cache_dir(image_size, data_dir)
    return folder / f"{split}.npy" if dataset == UTKFACE else folder / dataset / f"{split}.npy"


def faces_signature(data_dir: Path) -> dict[str, str]:
    """{dataset: sha256 of its faces.csv} for the datasets whose crops depend on the faces found (the extra
    datasets, and UTKFace prepared with --utkface-crops detected)."""
    state = data_state(data_dir)
    datasets = {UTKFACE: {"faces": state.get("faces")}, **state.get("datasets", {})}
    return {name: file_sha256(Path(where["faces"])) for name, where in datasets.items() if where.get("faces")}


def cache_is_current(image_size: int, data_dir: Path = DATA_DIR) -> bool:
    folder = cache_dir(image_size, data_dir)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text())
    state = data_state(data_dir)
    return (
        meta.get("manifest_sha256") == state["manifest_sha256"]
        and meta.get("image_root") == state["image_root"]
        and meta.get("faces", {}) == faces_signature(data_dir)
        and all(cache_file(image_size, data_dir, dataset, split).exists()
                for dataset in manifest_datasets(data_dir) for split in SPLITS)
    )


def build_cache(image_size: int, data_dir: Path = DATA_DIR, progress_factory=None) -> Path:
    """Decode every manifest image once at image_size into one file per dataset and split (atomic); the images
    of an extra dataset (and UTKFace's with --utkface-crops detected) are aligned on the face prepare_data found
    in each; an image where none was found is resized as it is."""
    manifest = load_manifest(data_dir, None)
    state = data_state(data_dir)
    folder = cache_dir(image_size, data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for dataset in dict.fromkeys(manifest["dataset"]):
        where = dataset_state(data_dir, dataset)
        root = Path(where["image_root"])
        faces = read_faces(where["faces"]) if where.get("faces") else None
        label = "" if dataset == UTKFACE else f"{dataset} "
        for split in SPLITS:
            files = manifest.loc[(manifest["dataset"] == dataset) & (manifest["split"] == split), "file"].tolist()
            advance = progress_factory(f"cache {image_size}px {label}{split}", len(files)) if progress_factory else None
            arrays = decode_many([root / name for name in files], image_size, progress=advance,
                                 faces=None if faces is None else [faces.get(name) for name in files])
            with atomic_path(cache_file(image_size, data_dir, dataset, split)) as tmp:
                np.save(tmp, arrays)
    meta = {"manifest_sha256": state["manifest_sha256"], "image_root": state["image_root"],
            "image_size": image_size}
    if faces_signature(data_dir):  # only with extra datasets, so a UTKFace-only meta.json keeps its keys
        meta["faces"] = faces_signature(data_dir)
    write_json(folder / "meta.json", meta)
    return folder


def load_split(split: str, image_size: int, data_dir: Path = DATA_DIR, limit: int | None = None,
               datasets: Sequence[str] | None = (UTKFACE,)) -> tuple[np.ndarray, pd.DataFrame]:
    """Cached uint8 images and the manifest rows of one split of the named datasets (None: every dataset in the
    manifest; UTKFace alone by default), building the cache when needed.

    `limit` keeps a seeded random subset of at most that many images of each dataset."""
    if split not in SPLITS:
        raise UserError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
    if not cache_is_current(image_size, data_dir):
        build_cache(image_size, data_dir)
    manifest = load_manifest(data_dir, datasets)
    parts = []
    for dataset in dict.fromkeys(manifest["dataset"]):
        rows = manifest[(manifest["split"] == split) & (manifest["dataset"] == dataset)].reset_index(drop=True)
        images = np.load(cache_file(image_size, data_dir, dataset, split), mmap_mode="r")
        if len(images) != len(rows):
            raise UserError(f"The {image_size}px cache does not match the manifest: rerun prepare_data with --force.")
        if limit is not None and limit < len(rows):
            keep = np.sort(np.random.default_rng(SEED).choice(len(rows), size=limit, replace=False))
            parts.append((np.asarray(images[keep]), rows.iloc[keep].reset_index(drop=True)))
        else:
            parts.append((np.asarray(images), rows))
    if len(parts) == 1:
        return parts[0]
    return (np.concatenate([images for images, _ in parts]),
            whole_labels(pd.concat([rows for _, rows in parts], ignore_index=True)))
