"""The calibrated 80% age interval: fitted on validation by tasks/calibrate.py (and by the trainers), stored in
metadata.json, applied to every prediction, for models with an age distribution (DEX) and without one."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agegender.data.labels import age_band
from agegender.data.manifest import load_split
from agegender.inference.intervals import (
    QUANTILES,
    RESIDUALS,
    AgeInterval,
    calibrate,
    distribution_quantiles,
    summarise,
)
from agegender.inference.predictor import Predictor
from tasks import calibrate as calibrate_task
from tasks import predict
from tests.conftest import said

runner = CliRunner()


def test_quantiles_of_a_distribution_over_whole_years():
    bins = np.zeros((2, 117))
    bins[0, 30] = 1.0  # all the mass on 30: spread evenly over [29.5, 30.5]
    bins[1, [20, 40]] = 0.5
    np.testing.assert_allclose(distribution_quantiles(bins, 0.5), [30.0, 20.5])
    np.testing.assert_allclose(distribution_quantiles(bins, 0.1), [29.6, 19.7])
    np.testing.assert_allclose(distribution_quantiles(bins, 0.9), [30.4, 40.3])


def test_the_scale_is_bisected_to_the_target_coverage_on_synthetic_ages():
    rng = np.random.default_rng(0)
    truth = rng.integers(1, 90, 3000).astype(float)
    predicted = np.clip(truth + rng.normal(0, 2 + truth / 10), 0, None)  # errors grow with age, as real ones do
    years = np.arange(117)
    bins = np.exp(-0.5 * ((years - predicted[:, None]) / 3.0) ** 2)  # too narrow: the scale must widen it
    for given in (None, bins):
        record = calibrate(predicted, truth, given)
        assert record["validation"]["coverage"] == pytest.approx(0.8, abs=0.005)
        interval = AgeInterval.from_metadata({"age_interval": record})
        low, high = interval.bounds(predicted, given)
        assert (low <= np.rint(predicted)).all() and (np.rint(predicted) <= high).all() and (low >= 0).all()
        assert summarise(low, high, truth)["coverage"] == pytest.approx(record["validation"]["coverage"])
    # with a distribution every candidate is fitted, and the narrowest is the one kept
    widths = {name: found["mean_width"] for name, found in record["candidates"].items()}
    assert "distribution quantiles" in widths
    assert record["validation"]["mean_width"] == pytest.approx(min(widths.values()))


@pytest.fixture(scope="module")
def calibrated(trained_models, prepared):
    """tasks/calibrate.py run on the DEX age model and the regression-head multi-task model."""
    folders = [trained_models["age"], trained_models["multitask"]]
    result = runner.invoke(calibrate_task.app, [*map(str, folders), "--data-dir", str(prepared["data_dir"])])
    assert result.exit_code == 0, result.output
    assert "Wrote the calibration into 2 metadata.json file(s)" in said(result)
    return {"output": said(result), "age": trained_models["age"], "multitask": trained_models["multitask"]}


@pytest.mark.parametrize("name, methods", [("age", {QUANTILES, RESIDUALS}), ("multitask", {RESIDUALS})])
def test_calibration_holds_80_percent_of_validation_ages_and_is_stored(calibrated, prepared, name, methods):
    record = json.loads((calibrated[name] / "metadata.json").read_text())["age_interval"]
    assert record["method"] in methods and record["split"] == "val" and record["target_coverage"] == 0.8
    if name == "multitask":  # no distribution: only residual intervals, no spread term
        assert record["spread_power"] == 0 and list(record["candidates"]) == ["band residuals"]
    # what the predictor now gives on the validation split holds the stored share, at least 80%
    predictor = Predictor.load(calibrated[name], "keras")
    images, rows = load_split("val", predictor.image_size, prepared["data_dir"])
    predicted = predictor.predict_arrays(images)
    found = summarise(predicted["age_low"], predicted["age_high"], rows["age"].to_numpy())
    assert found["coverage"] == pytest.approx(record["validation"]["coverage"])
    assert 0.8 <= found["coverage"] <= 0.8 + 3 / len(rows)  # the narrowest scale reaching 80%
    assert set(found["by_band"]) == set(record["validation"]["by_band"])


def test_the_predict_csv_has_the_interval_and_the_band(calibrated, prepared, tmp_path):
    faces = sorted(prepared["images"].glob("*.jpg"))[:4]
    for name in ("age", "multitask"):
        out = tmp_path / f"{name}.csv"
        result = runner.invoke(predict.app, [str(calibrated[name]), *map(str, faces), "--no-detect", "--out",
                                             str(out)])
        assert result.exit_code == 0, result.output
        frame = pd.read_csv(out)
        assert {"age_low", "age_high", "age_band"} <= set(frame.columns)
        assert (frame["age_low"] <= frame["age"].round()).all() and (frame["age"].round() <= frame["age_high"]).all()
        assert list(frame["age_band"]) == [age_band(age) for age in frame["age"]]


def test_a_model_without_calibration_has_empty_interval_columns(trained_runs, prepared, tmp_path):
    folder = tmp_path / "uncalibrated"
    folder.mkdir()
    source = trained_runs["multitask"].out_dir
    for name in ("model.keras", "metadata.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata.pop("age_interval", None)
    (folder / "metadata.json").write_text(json.dumps(metadata))
    out = tmp_path / "p.csv"
    face = next(prepared["images"].glob("*.jpg"))
    result = runner.invoke(predict.app, [str(folder), str(face), "--no-detect", "--out", str(out)])
    assert result.exit_code == 0, result.output
    row = pd.read_csv(out).iloc[0]
    assert np.isnan(row["age_low"]) and np.isnan(row["age_high"]) and row["age_band"] == age_band(row["age"])


def test_a_gender_model_gets_no_age_interval_and_a_missing_folder_is_one_sentence(trained_models, prepared,
                                                                                   tmp_path):
    import shutil

    folder = shutil.copytree(trained_models["gender"], tmp_path / "gender")
    result = runner.invoke(calibrate_task.app, [str(folder), "--data-dir", str(prepared["data_dir"])])
    assert result.exit_code == 0, result.output
    assert "age_interval" not in json.loads((folder / "metadata.json").read_text())
    result = runner.invoke(calibrate_task.app, [str(tmp_path / "nowhere"), "--data-dir", str(prepared["data_dir"])])
    assert result.exit_code == 1 and "does not exist" in said(result)
    assert "Traceback" not in result.output
