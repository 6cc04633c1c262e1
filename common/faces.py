"""The one inference path: image -> faces (MTCNN) -> UTKFace-like aligned crop -> model -> age, p_female.

`predict`, `compare`, the benchmarks and every Gradio Space call this module; nothing re-implements it."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from common.cli import UserError
from common.data import file_sha256, resize_face
from common.modelio import EXPORT_FILES, MODEL_FILE, load_model, read_metadata

# Where UTKFace's aligned 200x200 crops put the eyes (measured with MTCNN on 60 of them):
# eye midpoint at (0.49, 0.289) of the side, eyes 0.389 of the side apart.
CROP_SIDE = 200
EYE_CENTRE = (0.49, 0.289)
EYE_DISTANCE = 0.389
MAX_SIDE = 1600  # very large photos are shrunk before detection; crops come from the full image
MIN_CONFIDENCE = 0.9


class UnreadableImage(UserError):
    """The file is not an image PIL can decode."""


def read_image(source: str | Path | np.ndarray | Image.Image) -> Image.Image:
    """Any file, array or PIL image as an upright RGB PIL image (grayscale, RGBA, palette and EXIF handled)."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        array = source if source.dtype == np.uint8 else np.clip(source, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    else:
        try:
            with Image.open(source) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
        except FileNotFoundError as error:
            raise UserError(f"{source} does not exist.") from error
        except Exception as error:
            raise UnreadableImage(f"{source} is not a readable image ({type(error).__name__}).") from error
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


_detector = None


def detect_faces(image: Image.Image, min_confidence: float = MIN_CONFIDENCE) -> list[Face]:
    """Faces found by MTCNN (bundled weights, no download), largest first."""
    global _detector
    if _detector is None:
        import tensorflow as tf
        from mtcnn import MTCNN

        _detector = MTCNN()
        # mtcnn calls each stage's Keras model eagerly, layer by layer; one compiled graph per stage (shapes
        # relaxed, so every pyramid scale shares it) finds the same faces for ~1/3 of the CPU time
        for stage in getattr(_detector, "stages", []):
            if getattr(stage, "_model", None) is not None:
                stage._model = tf.function(stage._model, reduce_retracing=True)
    scale = min(1.0, MAX_SIDE / max(image.size))
    small = image if scale == 1.0 else image.resize((round(image.width * scale), round(image.height * scale)))
    # MTCNN needs a few pixels to work with: pad tiny images instead of failing
    array = np.asarray(small)
    if min(array.shape[:2]) < 48:
        pad = 48 - min(array.shape[:2])
        array = np.pad(array, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        offset = pad
    else:
        offset = 0
    faces = []
    for found in _detector.detect_faces(array):
        if found["confidence"] < min_confidence:
            continue
        x, y, w, h = found["box"]

        def back(point):
            return ((point[0] - offset) / scale, (point[1] - offset) / scale)

        keypoints = found.get("keypoints", {})
        box = (round((x - offset) / scale), round((y - offset) / scale), round(w / scale), round(h / scale))
        faces.append(Face(box, float(found["confidence"]),
                          back(keypoints["left_eye"]) if "left_eye" in keypoints else None,
                          back(keypoints["right_eye"]) if "right_eye" in keypoints else None))
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


def to_model_input(faces: list[np.ndarray] | np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
    """uint8 face crops (already resized) as the float batch the model takes."""
    batch = np.asarray(faces)
    if metadata.get("pixel_scaling", "divide_by_255") != "divide_by_255":
        raise UserError(f"Unknown pixel_scaling {metadata.get('pixel_scaling')!r} in the model metadata.")
    return batch.astype(np.float32) / 255.0


BACKENDS = ("auto", "keras", *EXPORT_FILES)


def tflite_runner(path: Path, threads: int | None = None):
    """A TFLite (LiteRT) signature runner for model.tflite: LiteRT's own package when installed, else the
    interpreter bundled with TensorFlow (same XNNPACK kernels)."""
    import os
    import warnings

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():  # TF's copy warns that it moved to ai_edge_litert
        warnings.simplefilter("ignore")
        try:
            interpreter = Interpreter(model_path=str(path), num_threads=threads or os.cpu_count() or 1)
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
            for kind in ("tflite-int8", "tflite") if backend == "auto" else (backend,):
                if export_is_current(folder, metadata, kind):
                    return cls(None, metadata, folder, kind, _runner=tflite_runner(folder / EXPORT_FILES[kind]))
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

            spec = tf.TensorSpec((None, *self.model.input_shape[1:]), tf.float32)
            self._compiled = tf.function(lambda x: self.model(x, training=False), input_signature=[spec])
        return self._compiled(batch)

    def predict_arrays(self, faces: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
        """uint8 crops at the model's size -> {"age": years, "p_female": probability} (keys the model has)."""
        results: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(faces), batch_size):
            batch = to_model_input(faces[start:start + batch_size], self.metadata)
            output = self.forward(batch)
            if not isinstance(output, dict):
                output = {self.outputs[0]: output}
            for name, value in output.items():
                results.setdefault(name, []).append(np.asarray(value).reshape(-1))
        scale = float(self.metadata.get("age_scale", 120.0))
        merged = {name: np.concatenate(parts) for name, parts in results.items()}
        out = {}
        if "age" in merged:
            out["age"] = np.clip(merged["age"] * scale, 0.0, None)
        if "gender" in merged:
            out["p_female"] = np.clip(merged["gender"], 0.0, 1.0)
        return out

    def prepare_crop(self, crop: Image.Image) -> np.ndarray:
        return resize_face(crop, self.image_size)

    def predict_image(self, image: Image.Image, detect: bool = True) -> list[dict[str, Any]]:
        """One dict per face: box, confidence, age, gender, p_female; a single row with a reason if none."""
        if detect:
            faces = detect_faces(image)
            if not faces:
                return [{"reason": "no face found"}]
            crops = [self.prepare_crop(face_crop(image, face, self.image_size)) for face in faces]
        else:
            faces = [Face((0, 0, image.width, image.height), 1.0)]
            crops = [self.prepare_crop(image)]
        predicted = self.predict_arrays(np.stack(crops))
        rows = []
        for index, face in enumerate(faces):
            row: dict[str, Any] = {"box": face.box, "confidence": face.confidence, "reason": ""}
            if "age" in predicted:
                row["age"] = float(predicted["age"][index])
            if "p_female" in predicted:
                p_female = float(predicted["p_female"][index])
                row["p_female"] = p_female
                row["gender"] = self.metadata["labels"]["1" if p_female >= 0.5 else "0"]
            rows.append(row)
        return rows
