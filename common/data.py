"""Paths, UTKFace labels, the manifest, the decoded-image cache and the tf.data input pipeline."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from agegender.cli import UserError, atomic_path, write_json
from agegender.datasets import UTKFACE

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("AGEGENDER_DATA_DIR", REPO_ROOT / "data"))
RESULTS_DIR = Path(os.environ.get("AGEGENDER_RESULTS_DIR", REPO_ROOT / "results"))
MODELS_DIR = RESULTS_DIR / "models"
# one folder per training run (TensorBoard logs; train_all's candidates), never committed
RUNS_DIR = Path(os.environ.get("AGEGENDER_RUNS_DIR", RESULTS_DIR / "runs"))

SEED = 42
AGE_SCALE = 120.0
GENDER_LABELS = {"0": "male", "1": "female"}
RACE_LABELS = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others"}
# the age bands a prediction carries, and that the bias tables and the age interval's coverage group faces by:
# infants, children, then decades (200: open-ended)
AGE_BANDS = [(0, 2), (3, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 200)]
# the coarser age strata prepare_data draws the split within (changing them would change the split)
SPLIT_AGE_STRATA = [(0, 12), (13, 19), (20, 39), (40, 59), (60, 200)]
SPLITS = ("train", "val", "test")
# UTKFace's training crops: its own aligned crops, or each face found and aligned by the inference path
UTKFACE_CROPS = ("original", "detected")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# AGE_GENDER_RACE_DATETIME.jpg.chip.jpg; the DATETIME part varies in length (and one name lacks its dot)
UTKFACE_NAME = re.compile(r"^(\d{1,3})_([01])_([0-4])_\d+\.?jpg\.chip\.jpg$", re.IGNORECASE)


@dataclass(frozen=True)
class FaceLabel:
    age: int
    gender: int
    race: int


def parse_utkface_name(name: str) -> FaceLabel | None:
    """Labels from a UTKFace file name, or None when the name does not follow the pattern."""
    match = UTKFACE_NAME.match(Path(name).name)
    if match is None:
        return None
    age, gender, race = (int(g) for g in match.groups()[:3])
    if not 0 <= age <= 120:
        return None
    return FaceLabel(age, gender, race)


def band_name(age: float, bands: list[tuple[int, int]] = AGE_BANDS) -> str:
    """The name ("20-29", "70+") of the band holding an age in years, rounded to a whole year first (an age
    below the first band counts in it, one above the last in the last: an untrained regression head can say
    anything)."""
    years = min(max(round(float(age)), bands[0][0]), bands[-1][1])
    for low, high in bands:
        if low <= years <= high:
            return f"{low}+" if high >= 200 else f"{low}-{high}"
    return "unknown"


def age_band(age: float) -> str:
    """The AGE_BANDS band of an age in years (true or predicted)."""
    return band_name(age, AGE_BANDS)


# ---------------------------------------------------------------- manifest and cache


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
    """{file: agegender.faces.Face} from a faces.csv (eyes None where the detector gave none)."""
    from agegender.faces import Face

    faces = {}
    for row in pd.read_csv(path).itertuples(index=False):
        eyes = (None, None) if pd.isna(row.left_x) else ((row.left_x, row.left_y), (row.right_x, row.right_y))
        faces[row.file] = Face((int(row.x), int(row.y), int(row.width), int(row.height)), float(row.confidence),
                               *eyes)
    return faces


def load_face_array(path: Path | str, image_size: int) -> np.ndarray:
    """Decode one image file to an RGB uint8 array of image_size x image_size (the training resize)."""
    with Image.open(path) as image:
        return resize_face(image, image_size)


def load_aligned_face(path: Path | str, face, image_size: int) -> np.ndarray:
    """One face of a photo (as read_image reads it) aligned by agegender.faces.face_crop at image_size: the
    alignment of the training and evaluation caches. The photo path aligns the same way except for inputs of at
    most 64 px (agegender.faces.input_crop)."""
    from agegender.faces import face_crop, read_image

    return resize_face(face_crop(read_image(path), face, image_size), image_size)


def resize_face(image: Image.Image, image_size: int) -> np.ndarray:
    """The one resize used for training, evaluation and inference."""
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


def decode_many(paths: list[Path], image_size: int, progress=None, threads: int = 4,
                faces: list | None = None) -> np.ndarray:
    """Decode and resize many images with a thread pool (PIL releases the GIL while decoding); with `faces`
    (one agegender.faces.Face per path), each image's face aligned instead (where its face is None, the image
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


LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, how old and scanned photos turn grey
GREY_TOLERANCE = 0.01  # mean |R - G| + |G - B| on the [0, 1] scale under which an image counts as grey


def grey_copy(images: np.ndarray) -> np.ndarray:
    """uint8 images (N x H x W x 3) turned grey (ITU-R 601 luma) in all three channels."""
    luma = np.clip(np.rint(images.astype(np.float32) @ LUMA), 0, 255).astype(np.uint8)
    return np.repeat(luma[..., None], 3, axis=-1)


def is_grey(images: np.ndarray, scale: float = 255.0) -> np.ndarray:
    """Per image, whether its three channels are equal to within GREY_TOLERANCE (images on [0, scale]); the
    test the ensemble's GreySwitch layer makes."""
    pixels = np.asarray(images, dtype=np.float32) / scale
    spread = np.abs(pixels[..., 0] - pixels[..., 1]) + np.abs(pixels[..., 1] - pixels[..., 2])
    return spread.mean(axis=(1, 2)) < GREY_TOLERANCE


# ---------------------------------------------------------------- tf.data pipeline


@dataclass(frozen=True)
class Augment:
    """Strength of the training-time augmentations (0 turns one off)."""

    crop: float = 0.08  # largest shift, as a share of the side (random crop)
    flip: bool = True
    rotation: float = 12.0  # degrees
    zoom: float = 0.1  # +- share
    brightness: float = 0.15
    contrast: float = 0.2
    saturation: float = 0.25
    noise: float = 0.0  # largest sigma of Gaussian pixel noise on the [0, 1] scale (0.08 ~ 20 grey levels)
    photo: float = 0.0  # chance of each photo degradation (grey, blur, low-quality JPEG, down-then-up scaling)

    def scaled(self, strength: float) -> Augment:
        """Every geometric and colour strength times `strength`; noise and photo have their own flags and
        are kept."""
        return Augment(self.crop * strength, self.flip and strength > 0, self.rotation * strength,
                       self.zoom * strength, self.brightness * strength, self.contrast * strength,
                       self.saturation * strength, self.noise, self.photo)


# What --photo-augment draws, each degradation with its own chance per image (what real photos bring that
# UTKFace's studio-like crops lack: old grey prints, soft focus, heavy compression, small faces blown up)
PHOTO_BLUR_SIGMA = (0.5, 2.0)  # Gaussian blur, in pixels of a 128 px crop (scaled with the side)
PHOTO_JPEG_QUALITY = (10, 50)
PHOTO_DOWNSCALE = (0.2, 0.6)  # shrunk to this share of the side, then enlarged back


def augment_draws(batch, size, augment: Augment, seed):
    """The random part of augment_batch: per-image affine transforms [batch, 8] and colour factors [batch, 3]
    (brightness shift, contrast and saturation factors). `seed` is a shape-[2] int tensor (stateless draws)."""
    import tensorflow as tf

    draws = iter(range(1, 100))

    def uniform(low, high):
        return tf.random.stateless_uniform([batch], seed + next(draws), low, high)

    angle = uniform(-augment.rotation, augment.rotation) * (math.pi / 180.0)
    scale = 1.0 / uniform(1.0 - augment.zoom, 1.0 + augment.zoom)  # >1 zooms out
    shift_x = uniform(-augment.crop, augment.crop) * size
    shift_y = uniform(-augment.crop, augment.crop) * size
    flip = tf.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0) if augment.flip else tf.ones([batch])
    cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
    centre = (size - 1.0) / 2.0
    # output pixel (x, y) samples input at A @ (x - c, y - c) + c + shift
    a0, a1 = cos * flip, -sin
    b0, b1 = sin * flip, cos
    a2 = centre - a0 * centre - a1 * centre + shift_x
    b2 = centre - b0 * centre - b1 * centre + shift_y
    zeros, ones = tf.zeros([batch]), tf.ones([batch])
    transform = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    brightness = uniform(-augment.brightness, augment.brightness) if augment.brightness else zeros
    contrast = uniform(1 - augment.contrast, 1 + augment.contrast) if augment.contrast else ones
    saturation = uniform(1 - augment.saturation, 1 + augment.saturation) if augment.saturation else ones
    return transform, tf.stack([brightness, contrast, saturation], axis=1)


def affine_warp(images, transforms):
    """Bilinear affine warp with mirrored borders: the numbers of ImageProjectiveTransformV3 (fill_mode REFLECT)
    from four gathers, which XLA can compile (that kernel it cannot).

    `transforms` rows are [a0, a1, a2, b0, b1, b2, 0, 0]: output (x, y) samples input (a0 x + a1 y + a2,
    b0 x + b1 y + b2)."""
    import tensorflow as tf

    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    ys, xs = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
    a0, a1, a2, b0, b1, b2 = (tf.reshape(transforms[:, i], [-1, 1, 1]) for i in range(6))
    source_x, source_y = a0 * xs + a1 * ys + a2, b0 * xs + b1 * ys + b2
    x0, y0 = tf.floor(source_x), tf.floor(source_y)
    fx, fy = (source_x - x0)[..., None], (source_y - y0)[..., None]
    flat = tf.reshape(images, [-1, shape[3]])
    offset = tf.reshape(tf.range(batch) * height * width, [-1, 1, 1])

    def mirror(v, n):  # half-sample symmetric: ... c b a | a b c ... z | z y x ...
        v = tf.math.floormod(v, 2.0 * n)
        return tf.cast(tf.where(v >= n, 2.0 * n - 1.0 - v, v), tf.int32)

    def pixel(y, x):
        return tf.gather(flat, offset + mirror(y, h) * width + mirror(x, w))

    top = pixel(y0, x0) * (1.0 - fx) + pixel(y0, x0 + 1.0) * fx
    bottom = pixel(y0 + 1.0, x0) * (1.0 - fx) + pixel(y0 + 1.0, x0 + 1.0) * fx
    return top * (1.0 - fy) + bottom * fy


def colour_jitter(images, colour):
    """Per-image brightness shift, then contrast and saturation factors (columns of `colour`), clipped to [0, 1]."""
    import tensorflow as tf

    brightness, contrast, saturation = (tf.reshape(colour[:, i], [-1, 1, 1, 1]) for i in range(3))
    images = images + brightness
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    images = (images - mean) * contrast + mean
    grey = tf.reduce_mean(images, axis=3, keepdims=True)
    images = (images - grey) * saturation + grey
    return tf.clip_by_value(images, 0.0, 1.0)


_xla: dict = {}


def xla(function):
    """`function` compiled by XLA once per process (two separate functions beat one: fused into the colour
    reductions, the warp's gathers would run three times)."""
    if function not in _xla:
        import tensorflow as tf

        _xla[function] = tf.function(function, jit_compile=True)
    return _xla[function]


def add_noise(images, sigma, seed):
    """Gaussian pixel noise with a per-image sigma (shape [batch]), clipped to [0, 1]."""
    import tensorflow as tf

    noise = tf.random.stateless_normal(tf.shape(images), seed) * tf.reshape(sigma, [-1, 1, 1, 1])
    return tf.clip_by_value(images + noise, 0.0, 1.0)


def photo_degrade(images, chance: float, seed):
    """Each image independently: grey with probability `chance`, blurred, shrunk and enlarged back, and
    JPEG-compressed at a low quality, each with the same probability (strengths drawn from the PHOTO_ ranges).
    `seed` is a shape-[2] int tensor; a float batch in [0, 1] comes out."""
    import tensorflow as tf

    shape = tf.shape(images)
    batch, side = shape[0], tf.cast(shape[1], tf.float32)

    def picked(offset):
        return tf.reshape(tf.random.stateless_uniform([batch], seed + offset) < chance, [-1, 1, 1, 1])

    def uniform(offset, low, high, count=None):
        return tf.random.stateless_uniform([batch] if count is None else count, seed + offset, low, high)

    grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(images))
    images = tf.where(picked(201), grey, images)
    # blur: every image with one kernel at the largest sigma, each picked image blended towards it by its own
    # share, which reads as a blur of its own strength
    sigma = PHOTO_BLUR_SIGMA[1] * side / 128.0
    radius = tf.cast(tf.math.ceil(2.0 * sigma), tf.int32)
    taps = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernel = tf.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / tf.reduce_sum(kernel)
    rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])
    blurred = tf.nn.depthwise_conv2d(images, rows, [1, 1, 1, 1], "SAME")
    blurred = tf.nn.depthwise_conv2d(blurred, tf.transpose(rows, [1, 0, 2, 3]), [1, 1, 1, 1], "SAME")
    share = tf.reshape(uniform(202, PHOTO_BLUR_SIGMA[0] / PHOTO_BLUR_SIGMA[1], 1.0), [-1, 1, 1, 1])
    images = tf.where(picked(203), images + share * (blurred - images), images)
    # down then up: one scale per batch (a resize takes one output size)
    small = tf.cast(tf.round(side * uniform(204, PHOTO_DOWNSCALE[0], PHOTO_DOWNSCALE[1], count=[])), tf.int32)
    resized = tf.image.resize(tf.image.resize(images, [small, small], method="area"), shape[1:3], "bilinear")
    images = tf.where(picked(205), resized, images)
    # JPEG: one image at a time (the codec takes single images)
    quality = tf.cast(uniform(206, PHOTO_JPEG_QUALITY[0], PHOTO_JPEG_QUALITY[1] + 1), tf.int32)
    compress = tf.reshape(picked(207), [-1])

    def jpeg(item):
        image, level, chosen = item
        return tf.cond(chosen, lambda: tf.image.adjust_jpeg_quality(image, level), lambda: image)

    images = tf.map_fn(jpeg, (images, quality, compress), fn_output_signature=tf.float32)
    return tf.clip_by_value(images, 0.0, 1.0)


def augment_batch(images, augment: Augment, seed):
    """Random crop, flip, rotation and zoom as one affine warp, then colour jitter, then (when augment.photo
    is set) photo degradations, then (when augment.noise is set) Gaussian noise of a random strength per
    image; a float batch in [0, 1].

    `seed` is a shape-[2] int tensor; the draws are stateless, so parallel calls are safe and repeatable.
    The pixel work runs as two XLA functions: ~1/4 of the CPU time of ImageProjectiveTransformV3 + plain ops."""
    import tensorflow as tf

    batch = tf.shape(images)[0]
    transform, colour = augment_draws(batch, tf.cast(tf.shape(images)[1], tf.float32), augment, seed)
    images = xla(colour_jitter)(xla(affine_warp)(images, transform), colour)
    if augment.photo > 0:
        images = photo_degrade(images, augment.photo, seed)
    if augment.noise > 0:
        sigma = tf.random.stateless_uniform([batch], seed + 100, 0.0, augment.noise)
        images = add_noise(images, sigma, seed + 101)
    return images


def make_dataset(images: np.ndarray, targets: dict[str, np.ndarray], batch_size: int, training: bool,
                 augment: Augment | None = None, seed: int = SEED, sample_weight: np.ndarray | None = None,
                 sampling: np.ndarray | None = None):
    """Batches of (float images in [0, 1], {output name: target}[, weights]) from cached uint8 arrays; a missing
    label is a NaN target, which the losses and metrics of agegender.models leave out.

    Shuffling and augmentation happen only when training; whole batches are gathered and augmented at
    once, which keeps the per-image overhead of tf.data out of the loop. With `sampling` (a chance per image,
    agegender.sampling), a training epoch is as many draws with replacement by those chances as there are images
    of non-zero chance (fresh draws each epoch, reproducible from `seed`) instead of a shuffle."""
    import tensorflow as tf

    image_tensor = tf.convert_to_tensor(images)
    target_tensors = {name: tf.convert_to_tensor(np.asarray(v, dtype=np.float32).reshape(len(v), -1))
                      for name, v in targets.items()}
    weight_tensor = None if sample_weight is None else tf.convert_to_tensor(sample_weight, tf.float32)
    count = len(images)
    if training and sampling is not None:
        indices = sampled_indices(sampling, seed)
    else:
        indices = tf.data.Dataset.range(count)
        if training:
            indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    indices = indices.batch(batch_size)
    # a fresh pair of seeds per batch, different every epoch, reproducible from `seed`
    batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    do_augment = training and augment is not None

    def gather(index, batch_seed):
        batch = tf.cast(tf.gather(image_tensor, index), tf.float32) / 255.0
        if do_augment:
            batch = augment_batch(batch, augment, batch_seed)
        labels = {name: tf.gather(t, index) for name, t in target_tensors.items()}
        if weight_tensor is not None:
            return batch, labels, tf.gather(weight_tensor, index)
        return batch, labels

    dataset = tf.data.Dataset.zip(indices, batch_seeds)
    return dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def sampled_indices(probabilities: np.ndarray, seed: int):
    """A tf.data stream of image indices drawn with replacement by those probabilities (inverse-CDF sampling), as
    many as there are images of non-zero probability, new draws each time it is iterated (each epoch),
    reproducible from `seed`."""
    import tensorflow as tf

    count = len(probabilities)
    draws = int(np.count_nonzero(probabilities))
    cdf = np.cumsum(np.asarray(probabilities, dtype=np.float64) / np.sum(probabilities))
    cdf[-1] = 1.0
    cdf_tensor = tf.constant(cdf, tf.float64)

    def draw(epoch_seed):
        uniform = tf.random.stateless_uniform([draws], epoch_seed, dtype=tf.float64)
        picked = tf.searchsorted(cdf_tensor, uniform, side="right")
        return tf.data.Dataset.from_tensor_slices(tf.minimum(picked, count - 1))

    epoch_seeds = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True).batch(2).take(1)
    # a known length, so Keras counts the steps of an epoch instead of running the stream dry
    return epoch_seeds.flat_map(draw).apply(tf.data.experimental.assert_cardinality(draws))
