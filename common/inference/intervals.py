"""The age interval that holds the true age 80% of the time, calibrated on the validation split.

Two kinds of interval, each scaled by one factor per model, the smallest that makes the interval (in whole
years) hold the true age of TARGET_COVERAGE of the validation faces, found by bisection:

- "quantiles" (models with a DEX head: a softmax named `age_bins` over whole years feeding the
  `AgeExpectation` layer named `age`): the central 10%-90% range of the face's predicted distribution, scaled
  around its median;
- "residuals" (every model with an age output): the prediction plus the 10% and 90% quantiles of the validation
  residuals (true - predicted age) of its predicted-age band; with a distribution, each face's range is also
  multiplied by (its distribution's standard deviation / the band's median one) ** spread_power.

Regression heads get "residuals" with spread_power 0. For a DEX head every candidate is fitted and the one with
the narrowest mean width on validation is kept: our DEX heads learn their distribution only through its
expected value (an L1 loss on it), and put the mass on a few ages whose mix gives that value, so the
distribution's own quantiles make a poor interval. Each candidate's width is recorded beside the choice.

The calibration lives in metadata.json under "age_interval"; agegender.inference.predictor.Predictor applies it to every
prediction. A model's distribution layer is found by agegender.models.age_bins.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from agegender.data.labels import AGE_BANDS, age_band

TARGET_COVERAGE = 0.8
BASE_QUANTILES = (0.1, 0.9)  # an interval with the target's nominal coverage before scaling
MIN_BAND_FACES = 30  # a predicted-age band with fewer validation faces takes the residual quantiles of all faces
BISECTION_STEPS = 50
INTERVAL_KEY = "age_interval"


def band_names() -> list[str]:
    return [age_band(low) for low, _ in AGE_BANDS]


# ---------------------------------------------------------------- quantiles and intervals


def distribution_quantiles(bins: np.ndarray, quantile: float) -> np.ndarray:
    """The age at `quantile` of each row's distribution over whole years 0..K-1, each year's probability spread
    evenly over [year - 0.5, year + 0.5] (so the quantile moves smoothly)."""
    bins = normalised(bins)
    cumulative = np.cumsum(bins, axis=1)
    index = np.minimum((cumulative < quantile).sum(axis=1), bins.shape[1] - 1)
    rows = np.arange(len(bins))
    below = cumulative[rows, index] - bins[rows, index]
    inside = np.clip((quantile - below) / np.maximum(bins[rows, index], 1e-12), 0.0, 1.0)
    return np.clip(index - 0.5 + inside, 0.0, bins.shape[1] - 1)


def normalised(bins: np.ndarray) -> np.ndarray:
    bins = np.asarray(bins, dtype=np.float64)
    return bins / np.maximum(bins.sum(axis=1, keepdims=True), 1e-12)


def distribution_std(bins: np.ndarray) -> np.ndarray:
    """The standard deviation (years) of each row's distribution over whole years."""
    bins = normalised(bins)
    years = np.arange(bins.shape[1])
    mean = bins @ years
    return np.sqrt(np.maximum(bins @ years**2 - mean**2, 0.0))


@dataclass(frozen=True)
class Spread:
    """Per face: a centre and how far below and above it the unscaled interval reaches (years)."""

    centre: np.ndarray
    below: np.ndarray
    above: np.ndarray


def interval_bounds(spread: Spread, age: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Whole-year bounds (inclusive), scaled around the centre, never below 0 and always holding the rounded
    point prediction."""
    rounded = np.rint(age)
    low = np.maximum(np.minimum(np.rint(spread.centre - scale * spread.below), rounded), 0.0)
    high = np.maximum(np.rint(spread.centre + scale * spread.above), rounded)
    return low, high


def coverage(low: np.ndarray, high: np.ndarray, truth: np.ndarray) -> float:
    truth = np.asarray(truth, dtype=float)
    return float(np.mean((low <= truth) & (truth <= high))) if len(truth) else float("nan")


def fit_scale(spread: Spread, age: np.ndarray, truth: np.ndarray, target: float = TARGET_COVERAGE) -> float:
    """The smallest scale whose intervals hold at least `target` of the true ages (coverage only grows with the
    scale, so bisection finds it)."""
    def covered(scale: float) -> float:
        return coverage(*interval_bounds(spread, age, scale), truth)

    low, high = 0.0, 1.0
    if covered(low) >= target:
        return 0.0
    while covered(high) < target:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError("no scale reaches the target coverage")
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (low, middle) if covered(middle) >= target else (middle, high)
    return high


# ---------------------------------------------------------------- the two kinds of interval


QUANTILES, RESIDUALS = "quantiles", "residuals"
SPREAD_POWERS = (0.0, 0.25, 0.5, 1.0)  # the residual candidates fitted for a model with a distribution


def band_of(ages: np.ndarray) -> np.ndarray:
    return np.array([age_band(age) for age in np.asarray(ages, dtype=float)], dtype=object)


def per_band(values: np.ndarray, bands: np.ndarray, summary, fallback) -> dict[str, Any]:
    """summary(values of a band) per band name, or `fallback` for bands with under MIN_BAND_FACES values."""
    return {band: summary(values[bands == band]) if (bands == band).sum() >= MIN_BAND_FACES else fallback
            for band in band_names()}


@dataclass(frozen=True)
class AgeInterval:
    """A model's interval before or after calibration (scale), as stored in metadata.json."""

    method: str  # QUANTILES or RESIDUALS
    scale: float = 1.0
    offsets: dict[str, list[float]] | None = None  # RESIDUALS: years below and above, per predicted-age band
    spread_power: float = 0.0  # RESIDUALS: how much the distribution's spread widens or narrows a face's range
    band_spreads: dict[str, float] | None = None  # RESIDUALS with spread_power: median std per predicted band

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> AgeInterval | None:
        record = metadata.get(INTERVAL_KEY)
        if not record:
            return None
        return cls(record["method"], float(record["scale"]), record.get("offsets"),
                   float(record.get("spread_power", 0.0)), record.get("band_spreads"))

    @classmethod
    def fitted_residuals(cls, age: np.ndarray, truth: np.ndarray, bins: np.ndarray | None = None,
                         spread_power: float = 0.0) -> AgeInterval:
        """Residual quantiles per predicted-age band (and, with spread_power, the bands' median spreads)."""
        residual = np.asarray(truth, dtype=float) - np.asarray(age, dtype=float)
        bands = band_of(age)

        def offsets(values: np.ndarray) -> list[float]:
            low, high = np.quantile(values, BASE_QUANTILES)
            return [float(max(0.0, -low)), float(max(0.0, high))]

        spreads = None
        if spread_power:
            std = distribution_std(bins)
            spreads = per_band(std, bands, lambda values: float(np.median(values)), float(np.median(std)))
        return cls(RESIDUALS, 1.0, per_band(residual, bands, offsets, offsets(residual)), spread_power, spreads)

    @property
    def needs_distribution(self) -> bool:
        return self.method == QUANTILES or self.spread_power > 0

    def spread(self, age: np.ndarray, bins: np.ndarray | None) -> Spread:
        age = np.asarray(age, dtype=float)
        if self.needs_distribution and bins is None:
            raise ValueError("this interval needs the age distribution")
        if self.method == QUANTILES:
            low, median, high = (distribution_quantiles(bins, q) for q in (BASE_QUANTILES[0], 0.5, BASE_QUANTILES[1]))
            return Spread(median, median - low, high - median)
        bands = band_of(age)
        below, above = np.array([self.offsets[band] for band in bands]).reshape(-1, 2).T
        if self.spread_power:
            typical = np.array([self.band_spreads[band] for band in bands])
            factor = (np.maximum(distribution_std(bins), 0.5) / np.maximum(typical, 0.5)) ** self.spread_power
            below, above = below * factor, above * factor
        return Spread(age, below, above)

    def bounds(self, age: np.ndarray, bins: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return interval_bounds(self.spread(age, bins), np.asarray(age, dtype=float), self.scale)

    def record(self) -> dict[str, Any]:
        found = {"method": self.method, "scale": self.scale}
        if self.method == RESIDUALS:
            found.update(offsets=self.offsets, spread_power=self.spread_power)
            if self.band_spreads is not None:
                found["band_spreads"] = self.band_spreads
        return found

    @property
    def label(self) -> str:
        if self.method == QUANTILES:
            return "distribution quantiles"
        return f"band residuals x spread^{self.spread_power:g}" if self.spread_power else "band residuals"


def interval_label(record: dict[str, Any]) -> str:
    """How a stored calibration builds its interval, in a few words."""
    return AgeInterval.from_metadata({INTERVAL_KEY: record}).label


def summarise(low: np.ndarray, high: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Coverage and mean width (high - low, years) overall and per true-age band."""
    truth = np.asarray(truth, dtype=float)
    bands = band_of(truth)
    by_band = {}
    for band in band_names():
        mask = bands == band
        if mask.any():
            by_band[band] = {"faces": int(mask.sum()), "coverage": coverage(low[mask], high[mask], truth[mask]),
                             "mean_width": float(np.mean(high[mask] - low[mask]))}
    return {"faces": len(truth), "coverage": coverage(low, high, truth), "mean_width": float(np.mean(high - low)),
            "by_band": by_band}


def calibrate(age: np.ndarray, truth: np.ndarray, bins: np.ndarray | None = None,
              target: float = TARGET_COVERAGE) -> dict[str, Any]:
    """The metadata.json record of the interval fitted to validation predictions: every candidate the model
    allows scaled to `target` coverage, the narrowest kept."""
    age, truth = np.asarray(age, dtype=float), np.asarray(truth, dtype=float)
    candidates = [AgeInterval.fitted_residuals(age, truth)]
    if bins is not None:
        candidates += [AgeInterval(QUANTILES)]
        candidates += [AgeInterval.fitted_residuals(age, truth, bins, power) for power in SPREAD_POWERS if power]
    fitted = []
    for candidate in candidates:
        spread = candidate.spread(age, bins)
        scaled = replace(candidate, scale=fit_scale(spread, age, truth, target))
        fitted.append((float(np.mean(np.subtract(*interval_bounds(spread, age, scaled.scale)[::-1]))), scaled))
    width, best = min(fitted, key=lambda item: item[0])
    return {**best.record(), "target_coverage": target, "base_quantiles": list(BASE_QUANTILES), "split": "val",
            "validation": summarise(*best.bounds(age, bins), truth),
            "candidates": {interval.label: {"scale": interval.scale, "mean_width": mean_width}
                           for mean_width, interval in fitted},
            "created": datetime.now(UTC).isoformat(timespec="seconds")}
