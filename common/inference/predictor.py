"""The one inference path: image -> faces (a detector, BlazeFace by default) -> UTKFace-like aligned crop -> model
-> age, p_female.

`predict`, `compare`, the benchmarks and every Gradio Space call the Predictor; nothing re-implements it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agegender.cli import UserError
from agegender.data.images import Face, input_crop, resize_face
from agegender.data.labels import age_band
from agegender.inference.detectors import DEFAULT_DETECTOR, detect_faces
from agegender.inference.gender_calibration import GenderCalibration, confidence_of
from agegender.inference.intervals import AgeInterval
from agegender.inference.runtime import BACKENDS, export_is_current, tflite_runner
from agegender.models.age_bins import DISTRIBUTION_LAYER, with_age_distribution
from agegender.models.folders import EXPORT_FILES, load_model, read_metadata


def to_model_input(faces: list[np.ndarray] | np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
    """uint8 face crops (already resized) as the float batch the model takes."""
    batch = np.asarray(faces)
    if metadata.get("pixel_scaling", "divide_by_255") != "divide_by_255":
        raise UserError(f"Unknown pixel_scaling {metadata.get('pixel_scaling')!r} in the model metadata.")
    return batch.astype(np.float32) / 255.0


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
        (agegender.inference.gender_calibration), "p_female_model" is the model's own, and "gender_certain" says
        whether the called gender's probability reaches the certainty threshold."""
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
