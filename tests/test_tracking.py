"""The live webcam's tracking: faces matched across frames by box overlap, their numbers averaged over the last
frames, the frame rate; fed a sequence of frames (a real face moving across a canvas) through the same function
the Space streams to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agegender.inference.tracking import WINDOW, FaceTracker, FrameRate, LiveSession, overlap

ASTRONAUT = Path(__file__).resolve().parent.parent / "spaces" / "examples" / "astronaut.jpg"


def face_row(x: int, y: int, age: float, p_female: float, side: int = 100) -> dict:
    return {"box": (x, y, side, side), "age": age, "age_low": age - 5, "age_high": age + 6, "p_female": p_female,
            "gender": "female" if p_female >= 0.5 else "male"}


def test_overlap_of_boxes():
    assert overlap((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert overlap((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert overlap((0, 0, 10, 10), (20, 20, 10, 10)) == 0.0


def test_two_faces_keep_their_numbers_and_their_numbers_are_smoothed():
    rng = np.random.default_rng(0)
    tracker = FaceTracker()
    left_ages, shown = [], []
    for frame in range(20):  # one face moving right, one moving left; they never overlap
        left_age = 30 + rng.normal(0, 4)
        left_ages.append(left_age)
        rows = [face_row(400 - 10 * frame, 50, 60 + rng.normal(0, 4), 0.2), face_row(10 * frame, 60, left_age, 0.9)]
        found = tracker.update(rows)
        assert [row["number"] for row in found] == [1, 2]
        shown.append(found[1])
    assert all(row["number"] == 2 and row["gender"] == "female" for row in shown)
    for index, row in enumerate(shown):  # the mean of the face's last WINDOW frames
        assert row["age"] == pytest.approx(np.mean(left_ages[max(0, index - WINDOW + 1):index + 1]))
        assert row["age_high"] - row["age_low"] == pytest.approx(11)
    assert np.std(np.diff([row["age"] for row in shown])) < np.std(np.diff(left_ages)) / 2  # no flicker


def test_a_face_gone_for_a_while_comes_back_with_a_new_number():
    tracker = FaceTracker(max_missed=3)
    assert tracker.update([face_row(0, 0, 30, 0.1)])[0]["number"] == 1
    assert tracker.update([]) == []
    assert tracker.update([face_row(5, 0, 30, 0.1)])[0]["number"] == 1  # missed one frame: the same face
    for _ in range(4):
        tracker.update([])
    row = tracker.update([face_row(5, 0, 50, 0.1)])[0]
    assert row["number"] == 2 and row["age"] == 50 and row["frames"] == 1


def test_frame_rate_from_the_frames_times():
    times = iter(np.arange(0, 3, 0.1))
    rate = FrameRate(clock=lambda: next(times))
    assert rate.tick() is None
    for _ in range(9):
        fps = rate.tick()
    assert fps == pytest.approx(10.0)


def moving_face_frames(count: int = 12) -> list[np.ndarray]:
    """The astronaut's head pasted on a grey 640 x 360 canvas, 30 px further right each frame."""
    with Image.open(ASTRONAUT) as photo:
        head = photo.convert("RGB").crop((120, 20, 340, 240))
    frames = []
    for index in range(count):
        canvas = Image.new("RGB", (640, 360), (128, 128, 128))
        canvas.paste(head, (20 + 30 * index, 70))
        frames.append(np.asarray(canvas))
    return frames


def test_the_live_session_tracks_a_moving_face_and_smooths_what_it_shows(trained_models):
    from agegender.data.images import read_image
    from agegender.inference.predictor import Predictor

    predictor = Predictor.load(trained_models["multitask"])
    clock = iter(np.arange(0, 10, 0.25))
    session = LiveSession(predictor, "blazeface-back", clock=lambda: next(clock))
    raw, shown, rates = [], [], []
    for frame in moving_face_frames():
        drawn, rows, fps = session.frame(frame)
        assert drawn.size == (640, 360) and len(rows) == 1 and rows[0]["number"] == 1
        raw.append(predictor.predict_image(read_image(frame))[0])
        shown.append(rows[0])
        rates.append(fps)
    assert shown[-1]["box"][0] - shown[0]["box"][0] > 250  # the face did move across
    for index, row in enumerate(shown):
        recent = raw[max(0, index - WINDOW + 1):index + 1]
        for key in ("age", "p_female", "age_low", "age_high"):
            if key in row:
                assert row[key] == pytest.approx(np.mean([r[key] for r in recent]), abs=1e-4)
    assert rates[0] is None and rates[-1] == pytest.approx(4.0)
