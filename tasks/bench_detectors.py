"""Face detectors compared on photo-like canvases: faces found, time per photo and the error of the whole path.

    python tasks/bench_detectors.py                                  # every detector, 300 canvases per condition
    python tasks/bench_detectors.py --count 20 --detector blazeface-full --detector mtcnn

Each canvas (250-600 px, built in memory, never written) holds one held-out UTKFace face (a seeded sample of
the test split; --split val for choosing detector settings) or one CelebA face, pasted with a soft edge onto a
photo-like background at a given scale, grey or turned; some canvases hold no face at all. Every canvas is
JPEG-encoded once, and each detector then runs the one inference path on it as predict does: decode + detect +
align + model (agegender.inference.predictor.Predictor). A face is found when a returned box holds the pasted face's eye
midpoint and is 1-4.5 eye distances wide; other boxes count as false faces. Writes
results/bench/detectors.{json,md}.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer
from PIL import Image, ImageDraw, ImageFilter
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agegender.cli import UserError, console, err_console, user_errors, write_json, write_text
from agegender.data.images import CROP_SIDE, EYE_CENTRE, EYE_DISTANCE
from agegender.data.manifest import image_root, load_manifest
from agegender.data.paths import DATA_DIR, MODELS_DIR, REPO_ROOT, RESULTS_DIR, SEED
from agegender.inference.detectors import DETECTORS

OUT_DIR = RESULTS_DIR / "bench"
CELEBA = REPO_ROOT.parent / "shared" / "data" / "celeba" / "celeba-10k.tar.gz"
LANDSCAPE = REPO_ROOT / "spaces" / "examples" / "landscape.jpg"  # public domain, no face: a background source
# Where CelebA's 89x109 aligned faces put the eyes (MTCNN on 100 of them, enlarged 2x): image-left eye first
CELEBA_EYES = ((34.7, 55.6), (53.9, 55.6))
CANVAS_SIDES = (250, 600)
BIG_SIDES = (1200, 2400)  # photos straight from a camera or a phone, 1.4-5.8 megapixels
JPEG_QUALITY = 90
TARGET_MS = 25.0  # issue 16: end to end per 250-600 px photo with one face, on this 2-core CPU
MATCH_WIDTH = (1.0, 4.5)  # a found face's box width, in true eye distances

# condition -> (what it is, face source, share of the canvas's shorter side the face's crop spans, canvas sides);
# new conditions go last, so the canvases of the others stay the same for a seed
CONDITIONS: dict[str, tuple[str, str, tuple[float, float], tuple[int, int]]] = {
    "small": ("UTKFace face over 15-30% of the canvas's shorter side", "utkface", (0.15, 0.30), CANVAS_SIDES),
    "medium": ("UTKFace face over 30-55%", "utkface", (0.30, 0.55), CANVAS_SIDES),
    "large": ("UTKFace face over 55-95%", "utkface", (0.55, 0.95), CANVAS_SIDES),
    "grey": ("UTKFace face over 20-80%, the whole canvas grey", "utkface", (0.20, 0.80), CANVAS_SIDES),
    "turned": ("UTKFace face over 20-80%, turned 20 degrees left or right", "utkface", (0.20, 0.80), CANVAS_SIDES),
    "celeba": ("CelebA face (89x109 aligned crop) over 20-60% (gender only)", "celeba", (0.20, 0.60), CANVAS_SIDES),
    "crop": ("the UTKFace 200 px crop itself, no canvas (what predict got before)", "utkface", (1.0, 1.0),
             CANVAS_SIDES),
    "no_face": ("background only: every box is a false face", "none", (0.0, 0.0), CANVAS_SIDES),
    "big": ("UTKFace face over 15-30% of a 1200-2400 px photo", "utkface", (0.15, 0.30), BIG_SIDES),
    "big_distant": ("UTKFace face over 8-15% of a 1200-2400 px photo", "utkface", (0.08, 0.15), BIG_SIDES),
}
ONE_FACE_CANVASES = ("small", "medium", "large", "grey", "turned", "celeba")  # the 250-600 px target set

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


# ---------------------------------------------------------------- faces to paste


@dataclass
class Source:
    image: Image.Image
    eyes: tuple[tuple[float, float], tuple[float, float]]  # image-left eye first, in the image's pixels
    age: float | None
    gender: int


def utkface_faces(data_dir: Path, split: str, count: int, rng: np.random.Generator) -> list[Source]:
    """A seeded sample of a split, with the eyes where face_crop's alignment puts them."""
    manifest = load_manifest(data_dir)
    faces = manifest[manifest["split"] == split].reset_index(drop=True)
    if faces.empty:
        raise UserError(f"The {split} split of {data_dir} is empty.")
    root = image_root(data_dir)
    rows = faces.iloc[rng.choice(len(faces), size=count, replace=count > len(faces))]
    half = EYE_DISTANCE * CROP_SIDE / 2
    faces = []
    for row in rows.itertuples():
        with Image.open(root / row.file) as image:
            image = image.convert("RGB")
        sx, sy = image.width / CROP_SIDE, image.height / CROP_SIDE
        cx, cy = EYE_CENTRE[0] * CROP_SIDE, EYE_CENTRE[1] * CROP_SIDE
        faces.append(Source(image, (((cx - half) * sx, cy * sy), ((cx + half) * sx, cy * sy)),
                            float(row.age), int(row.gender)))
    return faces


def read_labelled(source: Path) -> tuple[pd.DataFrame, dict[str, bytes]]:
    """labels.csv and the image bytes of a labelled dataset: a folder, or a .tar.gz holding one."""
    if source.is_dir():
        labels = pd.read_csv(source / "labels.csv")
        return labels, {name: (source / name).read_bytes() for name in labels["file"]}
    try:
        with tarfile.open(source) as tar:  # one pass: going back in a gzip stream decompresses it again
            contents = {member.name: tar.extractfile(member).read() for member in tar if member.isfile()}
        [labels_name] = [name for name in contents if name.endswith("labels.csv")]
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        raise UserError(f"{source} is not a labelled dataset (a folder or .tar.gz with labels.csv).") from error
    prefix = labels_name[: -len("labels.csv")]
    labels = pd.read_csv(io.BytesIO(contents[labels_name]))
    return labels, {name: contents[prefix + name] for name in labels["file"] if prefix + name in contents}


def celeba_faces(source: Path, count: int, rng: np.random.Generator) -> list[Source]:
    labels, files = read_labelled(source)
    labels = labels[labels["file"].isin(files) & labels["gender"].notna()].reset_index(drop=True)
    if labels.empty:
        raise UserError(f"{source} has no images with a gender label.")
    faces = []
    for row in labels.iloc[rng.choice(len(labels), size=count, replace=count > len(labels))].itertuples():
        with Image.open(io.BytesIO(files[row.file])) as image:
            image = image.convert("RGB")
        sx, sy = image.width / 89, image.height / 109
        eyes = tuple((x * sx, y * sy) for x, y in CELEBA_EYES)
        faces.append(Source(image, eyes, None, int(row.gender)))
    return faces


# ---------------------------------------------------------------- canvases


def background(width: int, height: int, rng: np.random.Generator, landscape: Image.Image) -> Image.Image:
    """A photo-like background: a blurred piece of a landscape photo, a lit gradient, or blurred clutter;
    always with a little sensor noise."""
    kind = rng.integers(3)
    if kind == 0:
        scale = rng.uniform(1.0, 2.5)
        w, h = min(landscape.width, round(width / scale)), min(landscape.height, round(height / scale))
        x, y = rng.integers(0, landscape.width - w + 1), rng.integers(0, landscape.height - h + 1)
        image = landscape.crop((x, y, x + w, y + h)).resize((width, height), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif kind == 1:
        start, end = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        image = Image.fromarray((start + ramp[..., None] * (end - start)).astype(np.uint8))
    else:
        image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(8, 30)):
            x0, y0 = rng.integers(-width // 4, width), rng.integers(-height // 4, height)
            x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            [draw.rectangle, draw.ellipse, draw.line][rng.integers(3)]((x0, y0, x1, y1), fill=colour)
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 6.0)))
    noise = rng.normal(0, rng.uniform(2, 8), (height, width, 1))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


def soft_mask(size: tuple[int, int]) -> Image.Image:
    """An ellipse filling the face's crop with a blurred edge, so no square seam shows."""
    width, height = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((width * 0.06, height * 0.03, width * 0.94, height * 0.99), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(max(1.0, width / 25)))


@dataclass
class Canvas:
    condition: str
    jpeg: bytes
    size: tuple[int, int]
    eyes: tuple[tuple[float, float], tuple[float, float]] | None  # where the face's eyes are; None: no face
    age: float | None
    gender: int | None
    crop: np.ndarray | None = None  # the face as the dataset has it, for the model-only reference


def make_canvas(condition: str, face: Source | None, rng: np.random.Generator, landscape: Image.Image) -> Canvas:
    """One JPEG-encoded photo of the condition, with where its face's eyes landed."""
    if condition == "crop":
        image, eyes = face.image, face.eyes
    else:
        sides = CONDITIONS[condition][3]
        width, height = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        image = background(width, height, rng, landscape)
        eyes = None
        if face is not None:
            share = rng.uniform(*CONDITIONS[condition][2])
            scale = share * min(width, height) / max(face.image.size)
            pasted = face.image.resize((max(8, round(face.image.width * scale)),
                                        max(8, round(face.image.height * scale))), Image.Resampling.BILINEAR)
            mask = soft_mask(pasted.size)
            points = np.array(face.eyes) * (pasted.width / face.image.width, pasted.height / face.image.height)
            if condition == "turned":
                degrees = 20.0 * rng.choice((-1.0, 1.0))
                centre = np.array(pasted.size) / 2
                pasted = pasted.rotate(degrees, Image.Resampling.BILINEAR, expand=True)
                mask = mask.rotate(degrees, Image.Resampling.BILINEAR, expand=True)
                turn = math.radians(degrees)  # PIL turns anticlockwise on screen: y grows downwards
                rotation = np.array([[math.cos(turn), math.sin(turn)], [-math.sin(turn), math.cos(turn)]])
                points = (points - centre) @ rotation.T + np.array(pasted.size) / 2
            x = int(rng.integers(0, max(1, width - pasted.width + 1)))
            y = int(rng.integers(0, max(1, height - pasted.height + 1)))
            image.paste(pasted, (x, y), mask)
            eyes = tuple(tuple(p) for p in points + (x, y))
        if condition == "grey":
            image = image.convert("L").convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return Canvas(condition, buffer.getvalue(), image.size, eyes, face.age if face else None,
                  face.gender if face else None)


def build_canvases(conditions: list[str], count: int, data_dir: Path, celeba: Path | None, seed: int,
                   split: str = "test") -> list[Canvas]:
    rng = np.random.default_rng(seed)
    with Image.open(LANDSCAPE) as opened:
        landscape = opened.convert("RGB")
    sources = {"none": [None] * count}
    if any(CONDITIONS[c][1] == "utkface" for c in conditions):
        sources["utkface"] = utkface_faces(data_dir, split, count, rng)
    if "celeba" in conditions:
        sources["celeba"] = celeba_faces(celeba, count, rng)
    canvases = []
    for condition in conditions:
        for face in sources[CONDITIONS[condition][1]]:  # the same faces in every UTKFace condition
            canvas = make_canvas(condition, face, rng, landscape)
            if face is not None:
                canvas.crop = np.asarray(face.image)
            canvases.append(canvas)
    return canvases


# ---------------------------------------------------------------- running the path


def eye_frame(eyes) -> tuple[np.ndarray, np.ndarray, float]:
    """(eye midpoint, unit vector along the eye line, eye distance)."""
    left, right = np.asarray(eyes[0], float), np.asarray(eyes[1], float)
    distance = max(float(np.linalg.norm(right - left)), 1e-6)
    return (left + right) / 2, (right - left) / distance, distance


def match(rows: list[dict[str, Any]], eyes) -> tuple[dict[str, Any] | None, int]:
    """The row that found the pasted face (its box holds the eye midpoint at a plausible size), and how many
    other boxes there were."""
    boxes = [row for row in rows if row.get("box")]
    if eyes is None:
        return None, len(boxes)
    middle, _, distance = eye_frame(eyes)
    for row in boxes:
        x, y, w, h = row["box"]
        if x <= middle[0] <= x + w and y <= middle[1] <= y + h and \
                MATCH_WIDTH[0] <= w / distance <= MATCH_WIDTH[1]:
            return row, len(boxes) - 1
    return None, len(boxes)


def eye_error(found_eyes, true_eyes) -> tuple[float, float, float]:
    """The found eye midpoint's offset from the true one along the eye line and across it (towards the chin),
    in true eye distances, and the ratio of the eye distances."""
    true_middle, along, distance = eye_frame(true_eyes)
    found_middle, _, found_distance = eye_frame(found_eyes)
    offset = (found_middle - true_middle) / distance
    down = np.array([-along[1], along[0]])
    return float(offset @ along), float(offset @ down), found_distance / distance


def run_detector(predictor, detector: str, canvases: list[Canvas], advance) -> pd.DataFrame:
    """One record per canvas: found, false faces, milliseconds end to end, the prediction and the eye error."""
    from agegender.data.images import read_image

    warm = read_image(io.BytesIO(canvases[0].jpeg))
    predictor.predict_image(warm, detector=detector)  # builds the detector and traces what needs tracing
    records = []
    for canvas in canvases:
        start = time.perf_counter()
        image = read_image(io.BytesIO(canvas.jpeg))
        rows = predictor.predict_image(image, detector=detector)
        elapsed = time.perf_counter() - start
        found, false_faces = match(rows, canvas.eyes)
        record = {"detector": detector, "condition": canvas.condition, "ms": 1000 * elapsed,
                  "side": max(canvas.size), "found": found is not None, "false_faces": false_faces,
                  "age": canvas.age, "gender": canvas.gender}
        if found is not None:
            record.update(predicted_age=found.get("age"), p_female=found.get("p_female"))
            if found.get("eyes") and canvas.condition != "celeba":
                record.update(zip(("eye_along", "eye_down", "eye_scale"), eye_error(found["eyes"], canvas.eyes),
                                  strict=True))
        records.append(record)
        advance()
    return pd.DataFrame(records)


def reference(predictor, canvases: list[Canvas]) -> dict[str, dict[str, float]]:
    """The model alone on the faces as their dataset crops them (no detector), per face source."""
    out = {}
    for name, condition in (("utkface", "medium"), ("celeba", "celeba")):
        faces = [c for c in canvases if c.condition == condition]
        if not faces:
            continue
        crops = np.stack([predictor.prepare_crop(Image.fromarray(c.crop)) for c in faces])
        predicted = predictor.predict_arrays(crops)
        truth = pd.DataFrame({"age": [c.age for c in faces], "gender": [c.gender for c in faces],
                              "predicted_age": predicted.get("age"), "p_female": predicted.get("p_female")})
        out[name] = {"faces": len(faces), **errors(truth)}
    return out


# ---------------------------------------------------------------- figures


def errors(frame: pd.DataFrame) -> dict[str, float | None]:
    """Age MAE and gender accuracy over the rows with a prediction (None where nothing to measure)."""
    out: dict[str, float | None] = {"age_mae": None, "gender_accuracy": None}
    if "predicted_age" in frame:
        aged = frame.dropna(subset=["age", "predicted_age"])
        if len(aged):
            out["age_mae"] = float((aged["predicted_age"] - aged["age"]).abs().mean())
    if "p_female" in frame:
        gendered = frame.dropna(subset=["gender", "p_female"])
        if len(gendered):
            out["gender_accuracy"] = float(((gendered["p_female"] >= 0.5) == (gendered["gender"] == 1)).mean())
    return out


def summarise(frame: pd.DataFrame) -> dict[str, Any]:
    faces = frame[frame["condition"] != "no_face"]
    found = faces[faces["found"]]
    out = {"photos": len(frame), "found_rate": float(faces["found"].mean()) if len(faces) else None,
           "false_faces_per_photo": float(frame["false_faces"].mean()),
           "ms_median": float(frame["ms"].median()), "ms_p90": float(frame["ms"].quantile(0.9)),
           "ms_mean": float(frame["ms"].mean()), **errors(found)}
    for key in ("eye_along", "eye_down", "eye_scale"):
        values = found[key].dropna() if key in found else pd.Series(dtype=float)
        out[key] = float(values.mean()) if len(values) else None
    return out


def tabulate(records: pd.DataFrame, detectors: list[str], conditions: list[str]) -> dict[str, Any]:
    by_condition = [{"detector": d, "condition": c, **summarise(part)}
                    for d in detectors for c in conditions
                    if len(part := records[(records["detector"] == d) & (records["condition"] == c)])]
    one_face = [c for c in ONE_FACE_CANVASES if c in conditions]
    overall = []
    for detector in detectors:
        mine = records[records["detector"] == detector]
        row = {"detector": detector, **summarise(mine[mine["condition"].isin(one_face)])}
        row["false_faces_no_face"] = (float(mine.loc[mine["condition"] == "no_face", "false_faces"].mean())
                                      if "no_face" in conditions else None)
        overall.append(row)
    baseline = next((row["found_rate"] for row in overall if row["detector"] == "mtcnn"), None)
    for row in overall:
        row["meets_time_target"] = row["ms_median"] <= TARGET_MS
        row["finds_as_often_as_mtcnn"] = (None if baseline is None or row["found_rate"] is None
                                          else row["found_rate"] >= baseline)
    return {"by_condition": by_condition, "overall": overall}


COLUMNS = [  # key, header, format
    ("found_rate", "found", "{:.1%}"), ("false_faces_per_photo", "false/photo", "{:.3f}"),
    ("ms_median", "ms median", "{:.1f}"), ("ms_p90", "ms p90", "{:.1f}"),
    ("age_mae", "age MAE", "{:.2f}"), ("gender_accuracy", "gender acc", "{:.1%}"),
]
EYE_COLUMNS = [("eye_along", "eye along", "{:+.3f}"), ("eye_down", "eye down", "{:+.3f}"),
               ("eye_scale", "eye scale", "{:.3f}")]


def cells(row: dict[str, Any], columns) -> list[str]:
    return ["–" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in columns]


def tables(report: dict[str, Any]) -> list[tuple[str, list[str], int, list[list[str]]]]:
    """(title, headers, how many leading text columns, rows) of the overall and the per-condition table."""
    overall_columns = COLUMNS + [("false_faces_no_face", "false/no-face photo", "{:.3f}")] + EYE_COLUMNS
    overall = [[row["detector"], *cells(row, overall_columns)] for row in report["overall"]]
    by_condition = [[row["condition"], row["detector"], str(row["photos"]), *cells(row, COLUMNS)]
                    for row in sorted(report["by_condition"], key=lambda r: list(CONDITIONS).index(r["condition"]))]
    return [("One-face canvases (250-600 px), per detector", ["detector"] + [h for _, h, _ in overall_columns], 1,
             overall),
            ("Per condition", ["condition", "detector", "photos"] + [h for _, h, _ in COLUMNS], 2, by_condition)]


def print_tables(report: dict[str, Any]) -> None:
    for title, headers, text_columns, rows in tables(report):
        table = Table(title=title)
        for index, header in enumerate(headers):
            table.add_column(header, justify="left" if index < text_columns else "right", no_wrap=index < text_columns)
        for row in rows:
            table.add_row(*row)
        console.print(table)


def markdown(report: dict[str, Any]) -> str:
    settings, machine = report["settings"], report["machine"]
    split = "" if settings["split"] == "test" else f" --split {settings['split']}"
    lines = ["# Face detectors on photo-like canvases", "",
             f"`python tasks/bench_detectors.py --count {settings['count']}{split}` on {machine['date'][:10]}: "
             f"{machine['cores']} cores ({machine['cpu_model']}), model `{settings['model']}` "
             f"({settings['backend']}), seed {settings['seed']}; load average {machine['load_average_start'][0]:.1f} "
             f"at the start, {machine['load_average_end'][0]:.1f} at the end. ms: one photo end to end (JPEG decode "
             "+ detect + align + model), median and 90th percentile. Age MAE and gender accuracy over the faces found. "
             "eye along/down: mean offset of the detector's eye midpoint from the pasted face's, in eye "
             "distances (along the eye line; towards the chin); eye scale: mean ratio of the eye distances "
             "(MTCNN's eyes define the alignment's targets).", "", "Conditions:", ""]
    lines += [f"- `{name}`: {CONDITIONS[name][0]}" for name in settings["conditions"]]
    for title, headers, _, rows in tables(report):
        lines += ["", f"## {title}", "", "| " + " | ".join(headers) + " |",
                  "|" + "|".join(["---"] * len(headers)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    if report["reference"]:
        lines += ["", "## The model alone on each dataset's own crops, resized to its input (no detector)", "",
                  "| faces | count | age MAE | gender acc |", "|---|---|---|---|"]
        for name, row in report["reference"].items():
            lines.append(f"| {name} | {row['faces']} | " + " | ".join(cells(row, COLUMNS[4:])) + " |")
    lines += ["", f"Target (issue 16): at most {TARGET_MS:.0f} ms per photo, finding faces no less often than "
              "MTCNN. " + "; ".join(
                  f"{row['detector']}: {'meets' if row['meets_time_target'] else 'misses'} the time"
                  + ("" if row["finds_as_often_as_mtcnn"] is None else
                     f", {'finds as often' if row['finds_as_often_as_mtcnn'] else 'finds less often'}")
                  for row in report["overall"]) + ".", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def shown_path(path: Path) -> str:
    """The path relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


@app.command()
def main(
    count: Annotated[int, typer.Option(min=1, help="Canvases per condition.")] = 300,
    detector: Annotated[list[str] | None, typer.Option(
        help=f"A detector to measure (repeatable): {', '.join(DETECTORS)} [all].")] = None,
    condition: Annotated[list[str] | None, typer.Option(
        help=f"A condition to build (repeatable): {', '.join(CONDITIONS)} [all].")] = None,
    model: Annotated[Path, typer.Option(help="Model folder the path ends in.")] = MODELS_DIR / "multitask",
    backend: Annotated[str, typer.Option(help="auto, keras, tflite or tflite-int8.")] = "auto",
    data_dir: Annotated[Path, typer.Option(help="Folder prepare_data wrote.")] = DATA_DIR,
    split: Annotated[str, typer.Option(
        help="UTKFace split the faces come from: test, or val for choosing detector settings.")] = "test",
    celeba: Annotated[Path | None, typer.Option(
        help="CelebA as a labelled dataset (folder or .tar.gz with labels.csv) [../shared/data/celeba].")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the faces and canvases.")] = SEED,
    out: Annotated[Path, typer.Option(help="Folder for detectors.json and detectors.md.")] = OUT_DIR,
) -> None:
    """Measure every face detector on the same photo-like canvases through the whole inference path."""
    detectors = detector or list(DETECTORS)
    conditions = condition or list(CONDITIONS)
    for name, known, flag in ((detectors, DETECTORS, "--detector"), (conditions, CONDITIONS, "--condition"),
                              ([split], ("test", "val"), "--split")):
        unknown = [value for value in name if value not in known]
        if unknown:
            raise typer.BadParameter(f"{', '.join(unknown)} is not one of {', '.join(known)}", param_hint=flag)
    with user_errors():
        if celeba is not None and not celeba.exists():
            raise UserError(f"{celeba} does not exist.")
        if "celeba" in conditions and celeba is None:
            if CELEBA.exists():
                celeba = CELEBA
            else:
                err_console.print(f"[yellow]No CelebA at {CELEBA}; the celeba condition is left out.[/]")
                conditions.remove("celeba")
        from agegender.inference.predictor import Predictor
        from agegender.reporting.machine import machine_info

        machine = machine_info()
        predictor = Predictor.load(model, backend)
        canvases = build_canvases(conditions, count, data_dir, celeba, seed, split)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True) as progress:
            frames = []
            for name in detectors:
                task = progress.add_task(name, total=len(canvases))
                frames.append(run_detector(predictor, name, canvases, lambda t=task: progress.advance(t)))
        records = pd.concat(frames, ignore_index=True)
        report = {"machine": {**machine, "load_average_end": list(os.getloadavg())},
                  "settings": {"count": count, "seed": seed, "split": split, "model": shown_path(model),
                               "backend": predictor.backend,
                               "detectors": detectors, "conditions": conditions, "canvas_sides": CANVAS_SIDES,
                               "big_sides": BIG_SIDES,
                               "jpeg_quality": JPEG_QUALITY, "target_ms": TARGET_MS,
                               "match_width_eye_distances": MATCH_WIDTH},
                  "reference": reference(predictor, canvases), **tabulate(records, detectors, conditions)}
        write_json(out / "detectors.json", report)
        write_text(out / "detectors.md", markdown(report))
        print_tables(report)
        console.print(f"Wrote {out / 'detectors.json'} and {out / 'detectors.md'}.")


if __name__ == "__main__":
    app()
