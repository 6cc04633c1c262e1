"""Faces followed across video frames (the Spaces' live webcam): each face is matched to the one it overlaps
most in the frames before, and its age, interval and gender probability are averaged over its last frames so
the numbers on screen do not flicker; the frame rate is measured as the frames arrive."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agegender.data.images import read_image
from agegender.inference.drawing import draw_faces

SMOOTHED = ("age", "age_low", "age_high", "p_female")
WINDOW = 8  # frames a face's numbers are averaged over
MIN_OVERLAP = 0.3  # intersection over union for a face to be the same face as in the frame before
MAX_MISSED = 5  # frames a face may go unseen (a blink of the detector) before it is forgotten


def overlap(first: tuple[int, int, int, int], second: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x, y, width, height) boxes."""
    ax, ay, aw, ah = first
    bx, by, bw, bh = second
    width = min(ax + aw, bx + bw) - max(ax, bx)
    height = min(ay + ah, by + bh) - max(ay, by)
    inter = max(width, 0) * max(height, 0)
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    number: int  # shown on the box; stays with the face while it is tracked
    box: tuple[int, int, int, int]
    history: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    missed: int = 0


class FaceTracker:
    """Give it each frame's predicted faces (rows with box, age, p_female, ...); it returns the same rows with
    a stable "number" per face and its numbers averaged over the face's last `window` frames; the gender and
    whether it is certain (its averaged probability at or above `gender_threshold`) follow the average."""

    def __init__(self, window: int = WINDOW, min_overlap: float = MIN_OVERLAP, max_missed: int = MAX_MISSED,
                 gender_threshold: float = 0.5):
        self.window, self.min_overlap, self.max_missed = window, min_overlap, max_missed
        self.gender_threshold = gender_threshold
        self.tracks: list[Track] = []
        self.next_number = 1

    def match(self, rows: list[dict[str, Any]]) -> list[Track | None]:
        """Each row's track: pairs taken greedily from the largest overlap down, each track and row used once."""
        pairs = sorted(((overlap(track.box, row["box"]), t, r) for t, track in enumerate(self.tracks)
                        for r, row in enumerate(rows)), reverse=True)
        matched: list[Track | None] = [None] * len(rows)
        used = set()
        for score, t, r in pairs:
            if score < self.min_overlap:
                break
            if t not in used and matched[r] is None:
                matched[r], used = self.tracks[t], used | {t}
        return matched

    def update(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = [row for row in rows if "box" in row]
        matched = self.match(rows)
        for track in self.tracks:
            track.missed += 1
        smoothed = []
        for row, track in zip(rows, matched, strict=True):
            if track is None:
                track = Track(self.next_number, row["box"], deque(maxlen=self.window))
                self.next_number += 1
                self.tracks.append(track)
            track.box, track.missed = row["box"], 0
            track.history.append({key: row[key] for key in SMOOTHED if row.get(key) is not None})
            smoothed.append(self.smooth(row, track, self.gender_threshold))
        self.tracks = [track for track in self.tracks if track.missed <= self.max_missed]
        return smoothed

    @staticmethod
    def smooth(row: dict[str, Any], track: Track, gender_threshold: float = 0.5) -> dict[str, Any]:
        out = {**row, "number": track.number, "frames": len(track.history)}
        for key in SMOOTHED:
            values = [frame[key] for frame in track.history if key in frame]
            if values and key in row:
                out[key] = float(np.mean(values))
        if "p_female" in out and "gender" in row:
            out["gender"] = "female" if out["p_female"] >= 0.5 else "male"
            out["gender_certain"] = max(out["p_female"], 1.0 - out["p_female"]) >= gender_threshold
        return out


class FrameRate:
    """Frames per second over the last `window` frames."""

    def __init__(self, window: int = 20, clock=time.monotonic):
        self.times: deque = deque(maxlen=window)
        self.clock = clock

    def tick(self) -> float | None:
        self.times.append(self.clock())
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return None
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


class LiveSession:
    """One viewer's webcam stream: every frame's faces predicted, tracked, smoothed and drawn."""

    def __init__(self, predictor, detector: str, clock=time.monotonic):
        self.predictor, self.detector = predictor, detector
        self.tracker = FaceTracker(gender_threshold=predictor.gender_threshold)
        self.rate = FrameRate(clock=clock)

    def frame(self, image) -> tuple[Any, list[dict[str, Any]], float | None]:
        """(the frame with boxes and smoothed labels, the smoothed rows, frames per second so far)."""
        picture = read_image(image)
        rows = self.tracker.update(self.predictor.predict_image(picture, detector=self.detector))
        return draw_faces(picture, rows, [row["number"] for row in rows]), rows, self.rate.tick()
