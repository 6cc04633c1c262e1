"""Gender you can trust: p_female calibrated on validation (temperature or isotonic), a certainty threshold per
model, both stored in metadata.json by tasks/calibrate.py and applied to every prediction."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agegender.data.manifest import load_split
from agegender.inference.gender_calibration import (
    ISOTONIC,
    TEMPERATURE,
    GenderCalibration,
    certainty_threshold,
    coverage_and_accuracy,
    expected_calibration_error,
    sigmoid,
)
from agegender.inference.predictor import Predictor
from agegender.training.calibrate import fit_calibration, fit_temperature
from tasks import calibrate as calibrate_task
from tasks import predict
from tests.conftest import said

runner = CliRunner()


def overconfident(temperature: float, faces: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from true probabilities, and what a model with that temperature reports: the true logits
    multiplied by it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.5, faces)
    truth = (rng.random(faces) < sigmoid(logits)).astype(float)
    return sigmoid(logits * temperature), truth


def test_temperature_scaling_recovers_a_known_temperature():
    p_model, truth = overconfident(2.0)
    fitted = fit_temperature(p_model, truth)
    assert fitted.method == TEMPERATURE and fitted.temperature == pytest.approx(2.0, rel=0.05)
    before, after = (expected_calibration_error(p, truth) for p in (p_model, fitted.apply(p_model)))
    assert after < before / 3


def test_the_chosen_calibration_is_stored_and_applied():
    p_model, truth = overconfident(2.0, faces=5000)
    record = fit_calibration(p_model, truth)
    assert record["method"] in (TEMPERATURE, ISOTONIC) and set(record["candidates"]) == {TEMPERATURE, ISOTONIC}
    assert record["validation"]["ece_after"] < record["validation"]["ece_before"]
    calibration = GenderCalibration.from_metadata({"gender_calibration": json.loads(json.dumps(record))})
    assert calibration.threshold == record["threshold"]
    found = coverage_and_accuracy(calibration.apply(p_model), truth, calibration.threshold)
    assert found["certain_accuracy"] >= 0.97 and found["coverage"] == pytest.approx(record["validation"]["coverage"])


def test_a_model_without_calibration_predicts_as_before():
    calibration = GenderCalibration.from_metadata({})
    p = np.array([0.0, 0.2, 0.5, 0.93, 1.0])
    np.testing.assert_array_equal(calibration.apply(p), p)
    assert calibration.threshold == 0.5


def test_the_threshold_is_the_smallest_confidence_whose_answers_are_97_percent_right():
    # 100 answers at confidence 0.99 (all right), 100 at 0.9 (94 right), 100 at 0.7 (60 right):
    # at or above 0.9, 194 of 200 are right (97%); at or above 0.7, 254 of 300 (85%)
    p_female = np.repeat([0.99, 0.9, 0.7], 100)
    truth = np.ones(300)
    truth[100:106] = 0
    truth[200:240] = 0
    assert certainty_threshold(p_female, truth) == pytest.approx(0.9)
    # the same faces called male (p_female mirrored) give the same confidence threshold
    assert certainty_threshold(1 - p_female, 1 - truth) == pytest.approx(0.9)
    # one more wrong answer at 0.9 and only the 0.99 answers qualify
    truth[106] = 0
    assert certainty_threshold(p_female, truth) == pytest.approx(0.99)
    # every answer right: every answer is certain
    assert certainty_threshold(p_female, np.ones(300)) == 0.5


def test_the_race_spread_table_says_which_faces_and_which_race_labels_each_spread_is_over():
    from agegender.reporting.certainty import certainty_by_group, race_spreads, spread_rows
    from agegender.reporting.metrics import GROUPINGS, named_groupings

    # FairFace-like rows: the five UTKFace races and FairFace's own seven, children and adults
    rows = pd.DataFrame({"gender": [0, 1] * 8, "age": [5, 30] * 8,
                         "race": [0, 1, 2, 3] * 4, "race_fairface": ["Black", "Black", "White", "White"] * 4})
    p_female = np.where(rows["gender"] == 1, 0.95, 0.1)
    p_female[[0, 2]] = 0.9  # two children read wrongly, with confidence
    groupings = (*GROUPINGS, *named_groupings(["race_fairface"]))
    spreads = race_spreads(certainty_by_group(p_female, rows, threshold=0.8, groupings=groupings))
    table = spread_rows({"m": {"race_spreads": spreads}})[1]
    overs = {s["grouping"]: row[1] for s, row in zip(spreads, table, strict=True)}
    assert overs == {"race": "all ages", "race, age 13+": "13 and older",
                     "race_fairface": "all ages (race_fairface)",
                     "race_fairface, age 13+": "13 and older (race_fairface)"}


# ---------------------------------------------------------------- the command, predict and the exports


@pytest.fixture(scope="module")
def calibrated(trained_models, prepared, tmp_path_factory):
    """tasks/calibrate.py run on copies of the two-epoch gender and multi-task models."""
    import shutil

    root = tmp_path_factory.mktemp("calibrated")
    folders = {name: root / name for name in ("gender", "multitask")}
    for name, folder in folders.items():
        shutil.copytree(trained_models[name], folder)
        metadata = json.loads((folder / "metadata.json").read_text())
        metadata.pop("gender_calibration", None)  # as the shipped models were, before this command
        (folder / "metadata.json").write_text(json.dumps(metadata))
    result = runner.invoke(calibrate_task.app, [*map(str, folders.values()), "--data-dir", str(prepared["data_dir"])])
    assert result.exit_code == 0, result.output
    assert "Wrote the calibration into 2 metadata.json file(s)" in said(result)
    assert "Gender calibrated on the validation split" in said(result)
    return folders


def test_calibrate_stores_the_gender_calibration_and_the_threshold(calibrated, prepared):
    for name, folder in calibrated.items():
        metadata = json.loads((folder / "metadata.json").read_text())
        record = metadata["gender_calibration"]
        assert record["split"] == "val" and record["method"] in (TEMPERATURE, ISOTONIC)
        assert 0.5 <= record["threshold"] <= 1.0
        assert ("age_interval" in metadata) == (name == "multitask")
        groups = record["validation"]["groups"]
        assert {group["grouping"] for group in groups} == {"race", "race, age 13+", "age band", "gender"}
        assert sum(group["faces"] for group in groups if group["grouping"] == "gender") == record["validation"]["faces"]
        predictor = Predictor.load(folder, "keras")
        images, rows = load_split("val", predictor.image_size, prepared["data_dir"])
        predicted = predictor.predict_arrays(images)
        found = coverage_and_accuracy(predicted["p_female"], rows["gender"].to_numpy(), record["threshold"])
        assert found["coverage"] == pytest.approx(record["validation"]["coverage"])
        assert predicted["gender_certain"].mean() == pytest.approx(record["validation"]["coverage"])


def test_the_predict_csv_says_whether_each_gender_is_certain(calibrated, prepared, tmp_path):
    faces = sorted(prepared["images"].glob("*.jpg"))[:6]
    out = tmp_path / "p.csv"
    result = runner.invoke(predict.app, [str(calibrated["gender"]), *map(str, faces), "--no-detect", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["file", "gender", "p_female", "gender_certain"]
    threshold = json.loads((calibrated["gender"] / "metadata.json").read_text())["gender_calibration"]["threshold"]
    confidence = np.maximum(frame["p_female"], 1 - frame["p_female"])
    assert frame["gender_certain"].dtype == bool
    assert (frame["gender_certain"] == (confidence >= threshold - 1e-4)).all()
    # --min-gender-confidence 1 leaves every answer uncertain, and the console says so
    result = runner.invoke(predict.app, [str(calibrated["gender"]), *map(str, faces), "--no-detect",
                                         "--min-gender-confidence", "1"])
    assert result.exit_code == 0, result.output
    assert said(result).count("uncertain (") == len(faces)


@pytest.mark.parametrize("value", ["0.3", "1.5"])
def test_an_out_of_range_min_gender_confidence_is_one_sentence_and_writes_nothing(calibrated, prepared, tmp_path,
                                                                                  value):
    face = next(prepared["images"].glob("*.jpg"))
    out, annotated = tmp_path / "p.csv", tmp_path / "annotated"
    result = runner.invoke(predict.app, [str(calibrated["gender"]), str(face), "--out", str(out), "--annotate",
                                         str(annotated), "--min-gender-confidence", value])
    assert result.exit_code == 1
    assert said(result) == f"Error: --min-gender-confidence takes a confidence from 0.5 to 1 (e.g. 0.9); got {value}."
    assert not list(tmp_path.iterdir())


def test_the_tflite_export_gives_the_same_certainty(calibrated, prepared):
    from tasks import export

    folder = calibrated["multitask"]
    result = runner.invoke(export.app, [str(folder), "--data-dir", str(prepared["data_dir"])])
    assert result.exit_code == 0, result.output
    images, _ = load_split("test", Predictor.load(folder, "keras").image_size, prepared["data_dir"])
    keras_out = Predictor.load(folder, "keras").predict_arrays(images)
    lite = Predictor.load(folder, "tflite")
    assert lite.backend == "tflite"
    lite_out = lite.predict_arrays(images)
    assert "gender_certain" in lite_out
    assert np.mean(keras_out["gender_certain"] == lite_out["gender_certain"]) >= 0.95
    np.testing.assert_allclose(lite_out["p_female"], keras_out["p_female"], atol=0.02)
    export_record = json.loads((folder / "metadata.json").read_text())["exports"]["tflite"]
    assert "certainty_agreement" in export_record


def test_an_uncertain_gender_reads_uncertain_on_photos_and_in_the_webcam_view():
    from agegender.inference.drawing import face_label
    from agegender.inference.tracking import FaceTracker

    row = {"box": (0, 0, 50, 50), "gender": "female", "p_female": 0.52, "gender_certain": False, "age": 31.0}
    assert face_label(1, row) == "1: uncertain (52% female), 31"
    assert face_label(1, {**row, "p_female": 0.97, "gender_certain": True}) == "1: female 97%, 31"
    assert face_label(1, {key: value for key, value in row.items() if key != "gender_certain"}) == "1: female 52%, 31"
    # the webcam view decides on the averaged probability, with the model's threshold
    tracker = FaceTracker(gender_threshold=0.8)
    first = tracker.update([{**row, "p_female": 0.95, "gender_certain": True}])[0]
    second = tracker.update([{**row, "p_female": 0.45, "gender_certain": False}])[0]
    assert first["gender_certain"] and first["gender"] == "female"
    assert second["p_female"] == pytest.approx(0.7) and not second["gender_certain"] and second["gender"] == "female"
