"""The Spaces' new views, their functions called directly as the app calls them: "about 31 (26–37)" with the
interval, "What the model looked at" for a chosen face, the live webcam fed a sequence of frames, and the About
page / model card stating the interval's coverage. (The served apps are driven in tests/test_spaces.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from agegender.cli import UserError
from tests.test_tracking import moving_face_frames

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "spaces" / "examples"
sys.path.insert(0, str(REPO / "spaces"))  # as spaces/<name>/app.py finds it

import app_common  # noqa: E402


@pytest.fixture(scope="module")
def predictor(trained_models):
    from agegender.inference.predictor import Predictor

    return Predictor.load(trained_models["multitask"])


def test_each_face_says_its_age_with_the_interval(predictor):
    drawn, message, rows = app_common.predict_photo(predictor, EXAMPLES / "two_faces.jpg")
    assert len(rows) == 2 and message.startswith("**Found 2 faces.**")
    for row, line in zip(rows, app_common.table_rows(rows), strict=True):
        assert f"about {row['age']:.0f} ({row['age_low']}–{row['age_high']}) years old" in message
        headers = app_common.table_headers(predictor.outputs)
        shown = dict(zip(headers, line, strict=True))
        assert shown["80% interval"] == f"{row['age_low']}–{row['age_high']}" and shown["age band"] == row["age_band"]


def test_what_the_model_looked_at_in_a_chosen_face(predictor, trained_models):
    from agegender.inference.gradcam import load_gradcam

    cam = load_gradcam(trained_models["multitask"])
    pictures = app_common.looked_at(predictor, cam, EXAMPLES / "two_faces.jpg", 2)
    assert [caption.split(":")[0] for _, caption in pictures] == ["face 2, aligned as the model sees it", "age",
                                                                   "gender"]
    assert all(picture.size == (256, 256) for picture, _ in pictures)
    with pytest.raises(UserError, match="There is no face 3: the photo has 2"):
        app_common.looked_at(predictor, cam, EXAMPLES / "two_faces.jpg", 3)
    with pytest.raises(UserError, match="No face was found"):
        app_common.looked_at(predictor, cam, EXAMPLES / "landscape.jpg", 1)


def test_the_live_webcam_function_tracks_the_face_over_frames(predictor):
    session, numbers, messages = None, [], []
    for frame in moving_face_frames(8):
        drawn, message, session = app_common.live_frame(predictor, frame, session)
        assert drawn.size == (640, 360)
        numbers.append([track.number for track in session.tracker.tracks])
        messages.append(message)
    assert numbers == [[1]] * 8  # one face, one number all along
    assert messages[0].startswith("1 face, measuring the frame rate")
    assert "frames per second" in messages[-1]
    assert app_common.live_frame(predictor, None, session) == (None, "", session)  # the webcam not started yet


@pytest.mark.slow  # imports Gradio and builds the app, ~8 s
def test_the_app_has_the_heatmap_and_live_endpoints(trained_models):
    demo = app_common.build_demo(["multitask"], trained_models["multitask"].parent)
    names = {getattr(fn, "api_name", None) for fn in demo.fns.values()}
    assert {"predict", "heatmaps", "live", "about"} <= names


def test_the_about_page_states_the_interval_coverage(trained_models):
    from agegender.reporting.cards import about_markdown

    comparison = {"age_interval": {"multitask": {
        "coverage": 0.812, "faces": 86, "mean_width": 14.2,
        "by_band": {"20-29": {"faces": 40, "coverage": 0.85, "mean_width": 12.0}}}}}
    about = about_markdown("multitask", trained_models["multitask"], comparison)
    assert "## Age interval" in about and "held the true age of **81.2%** of 86 faces" in about
    assert "| 20-29 | 40 | 85.0% | 12.0 |" in about
    assert "not measured yet" in about_markdown("multitask", trained_models["multitask"], None)
    assert "## Age interval" not in about_markdown("gender", trained_models["gender"], comparison)


def test_the_about_page_states_the_certainty_rule_by_group_and_the_race_spreads(trained_models):
    from agegender.reporting.cards import about_markdown

    record = json.loads((trained_models["multitask"] / "metadata.json").read_text())["gender_calibration"]
    comparison = {"gender_certainty": {"multitask": {
        "faces": 86, "ece_after": 0.031, "coverage": 0.804, "certain_accuracy": 0.972,
        "groups": [{"grouping": "race", "group": "Asian", "faces": 12, "coverage": 0.75, "certain_accuracy": 0.889,
                    "accuracy": 0.833}],
        "race_spreads": [{"grouping": "race, age 13+", "figure": "certain_accuracy", "best_group": "White",
                          "best": 0.99, "worst_group": "Asian", "worst": 0.889, "spread": 0.101}]}}}
    about = about_markdown("multitask", trained_models["multitask"], comparison)
    assert "## Certain or uncertain gender" in about
    assert f"at least **{record['threshold']:.1%}**" in about and "uncertain (52% female)" in about
    assert "80.4% answered with certainty, 97.2% of those right" in about
    assert "| race | Asian | 12 | 75.0% | 88.9% | 83.3% |" in about
    assert "| 13 and older | certain accuracy | White 99.0% | Asian 88.9% | 10.1 points |" in about
    assert "babies" not in about and "young children" in about
    # before compare has run: the validation figures by group, stored by the calibration
    before_compare = about_markdown("multitask", trained_models["multitask"], None)
    assert "test figures are not measured yet" in before_compare
    assert "on the validation split, by group" in before_compare
    assert "| gender | female |" in before_compare
    assert "## Certain or uncertain gender" not in about_markdown("age", trained_models["age"], comparison)
