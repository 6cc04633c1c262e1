"""Gender you can trust: a calibrated p_female, and a per-model confidence above which a gender is given as
certain.

Calibration maps the model's own p_female to a probability that matches how often the face is female. Two
candidates are fitted on the validation split (every dataset in it, pooled) and the one with the lower
out-of-fold log loss (FOLDS-fold cross-fitting on the validation faces) is kept, refitted on all of them:

- "temperature": p = sigmoid(logit(p_model) / T), one number, never changes which gender is called;
- "isotonic": a monotone step function of p_model (scikit-learn's isotonic regression), stored as its
  breakpoints and applied by linear interpolation between them.

The certainty threshold is then chosen on the calibrated validation probabilities: the smallest confidence
max(p, 1 - p) such that the answers at or above it are at least TARGET_ACCURACY right. A face whose confidence
is below it is answered "uncertain (52% female)"; its gender and p_female are still given.

ECE (expected calibration error) bins the confidence of the called gender into ECE_BINS equal-width bins over
[0.5, 1] and averages |accuracy - mean confidence| over the bins, weighted by their share of faces.

Both live in metadata.json under "gender_calibration", fitted by agegender.training.calibrate;
agegender.inference.predictor.Predictor applies them to every prediction. A model without one predicts as before:
identity calibration, threshold 0.5 (every answer certain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from agegender.cli import UserError

CALIBRATION_KEY = "gender_calibration"
IDENTITY, TEMPERATURE, ISOTONIC = "identity", "temperature", "isotonic"
TARGET_ACCURACY = 0.97
ECE_BINS = 10
EPSILON = 1e-6  # probabilities are kept this far from 0 and 1, so logits and log losses stay finite
MIN_CONFIDENCE, MAX_CONFIDENCE = 0.5, 1.0


# ---------------------------------------------------------------- figures


def confidence_of(p_female: np.ndarray) -> np.ndarray:
    """The probability of the gender called: max(p, 1 - p)."""
    p = np.asarray(p_female, dtype=float)
    return np.maximum(p, 1.0 - p)


def correct_calls(p_female: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return (np.asarray(p_female, dtype=float) >= 0.5) == (np.asarray(truth, dtype=float) == 1)


def log_loss(p_female: np.ndarray, truth: np.ndarray) -> float:
    p = np.clip(np.asarray(p_female, dtype=float), EPSILON, 1 - EPSILON)
    y = np.asarray(truth, dtype=float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def reliability_bins(p_female: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty confidence bin over [0.5, 1]: its bounds, faces, mean confidence and accuracy."""
    confidence = confidence_of(p_female)
    correct = correct_calls(p_female, truth)
    edges = np.linspace(MIN_CONFIDENCE, MAX_CONFIDENCE, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    found = []
    for number in range(bins):
        mask = index == number
        if mask.any():
            found.append({"low": float(edges[number]), "high": float(edges[number + 1]), "faces": int(mask.sum()),
                          "confidence": float(confidence[mask].mean()), "accuracy": float(correct[mask].mean())})
    return found


def expected_calibration_error(p_female: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> float:
    found = reliability_bins(p_female, truth, bins)
    total = sum(item["faces"] for item in found)
    if not total:
        return float("nan")
    return float(sum(item["faces"] * abs(item["accuracy"] - item["confidence"]) for item in found) / total)


def certainty_threshold(p_female: np.ndarray, truth: np.ndarray, target: float = TARGET_ACCURACY) -> float:
    """The smallest confidence whose answers at or above it are at least `target` right: 0.5 when every answer
    is, 1.0 (nothing certain short of a probability of 1) when no confidence reaches it."""
    confidence = confidence_of(p_female)
    correct = correct_calls(p_female, truth)
    if not len(confidence) or correct.mean() >= target:
        return MIN_CONFIDENCE
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    accuracy = np.cumsum(correct) / np.arange(1, len(correct) + 1)
    # a face ties with every face of the same confidence: the set "at or above" a value ends at its last tie
    last_of_value = np.append(confidence[1:] != confidence[:-1], True)
    reaching = np.flatnonzero(last_of_value & (accuracy >= target))
    return float(confidence[reaching[-1]]) if reaching.size else MAX_CONFIDENCE


def coverage_and_accuracy(p_female: np.ndarray, truth: np.ndarray, threshold: float) -> dict[str, float]:
    """faces; coverage (share answered with certainty); certain_accuracy (accuracy of those); accuracy (of all)."""
    correct = correct_calls(p_female, truth)
    certain = confidence_of(p_female) >= threshold
    return {"faces": int(len(correct)), "coverage": float(certain.mean()) if len(correct) else float("nan"),
            "certain_accuracy": float(correct[certain].mean()) if certain.any() else float("nan"),
            "accuracy": float(correct.mean()) if len(correct) else float("nan")}


def accuracy_coverage_curve(p_female: np.ndarray, truth: np.ndarray, points: int = 101) -> dict[str, list[float]]:
    """Accuracy of the most confident answers against their share of faces (coverage), at `points` coverages."""
    confidence, correct = confidence_of(p_female), correct_calls(p_female, truth)
    order = np.argsort(-confidence, kind="stable")
    accuracy = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    coverages = np.linspace(1 / len(order), 1.0, min(points, len(order)))
    index = np.clip(np.ceil(coverages * len(order)).astype(int) - 1, 0, len(order) - 1)
    return {"coverage": [float(c) for c in coverages], "accuracy": [float(a) for a in accuracy[index]]}


# ---------------------------------------------------------------- the calibration


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), EPSILON, 1 - EPSILON)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass(frozen=True)
class GenderCalibration:
    """How a model's p_female is calibrated and the confidence its answers are certain at."""

    method: str = IDENTITY
    temperature: float = 1.0  # TEMPERATURE
    breakpoints: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # ISOTONIC: (model p, calibrated p)
    threshold: float = MIN_CONFIDENCE

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> GenderCalibration:
        record = metadata.get(CALIBRATION_KEY)
        if not record:
            return cls()
        breakpoints = record.get("breakpoints")
        return cls(record["method"], float(record.get("temperature", 1.0)),
                   (tuple(breakpoints["p_model"]), tuple(breakpoints["p_calibrated"])) if breakpoints else None,
                   float(record.get("threshold", MIN_CONFIDENCE)))

    def apply(self, p_model: np.ndarray) -> np.ndarray:
        p = np.clip(np.asarray(p_model, dtype=float), 0.0, 1.0)
        if self.method == TEMPERATURE:
            p = sigmoid(logit(p) / self.temperature)
        elif self.method == ISOTONIC:
            p = np.interp(p, self.breakpoints[0], self.breakpoints[1])
        elif self.method != IDENTITY:
            raise ValueError(f"unknown gender calibration {self.method!r}")
        return p if self.method == IDENTITY else np.clip(p, EPSILON, 1 - EPSILON)

    def record(self) -> dict[str, Any]:
        found: dict[str, Any] = {"method": self.method, "threshold": self.threshold}
        if self.method == TEMPERATURE:
            found["temperature"] = self.temperature
        if self.method == ISOTONIC:
            found["breakpoints"] = {"p_model": list(self.breakpoints[0]), "p_calibrated": list(self.breakpoints[1])}
        return found


def calibration_label(record: dict[str, Any]) -> str:
    """The stored calibration in a few words, e.g. "temperature 1.31" or "isotonic"."""
    if record.get("method") == TEMPERATURE:
        return f"temperature {record['temperature']:.2f}"
    return record.get("method", IDENTITY)


def check_min_confidence(value: float | None, option: str = "--min-gender-confidence") -> float | None:
    """The override of a model's certainty threshold, or a one-sentence error when it is out of range."""
    if value is not None and not MIN_CONFIDENCE <= value <= MAX_CONFIDENCE:
        raise UserError(f"{option} takes a confidence from 0.5 to 1 (e.g. 0.9); got {value:g}.")
    return value
