"""export.py as a user runs it: a checked TFLite twin of each model that predict and the Spaces pick up."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agegender.cli import UserError
from agegender.data.manifest import load_split
from agegender.inference.predictor import Predictor
from tasks import export, predict
from tests.conftest import TEST_IMAGE_SIZE, said

runner = CliRunner()


# The int8 tolerances are set for trained models; the two-epoch test models sit near them (a 0.40-year mean
# age difference against 0.5 here, and over them in one CI run, which then kept no int8 export), so the
# fixture exports with these looser ones. test_an_int8_export_outside_tolerance_is_not_kept covers rejection.
LOOSE_INT8 = {"INT8_MEAN_AGE_DIFF_YEARS": 1.0, "INT8_AGE_MAE_CHANGE_YEARS": 0.5, "INT8_MEAN_P_FEMALE_DIFF": 0.02,
              "INT8_GENDER_AGREEMENT": 0.95}


@pytest.fixture(scope="module")
def exported(trained_models, prepared, tmp_path_factory) -> dict:
    """Copies of the two-epoch gender and multitask models, exported through the CLI."""
    root = tmp_path_factory.mktemp("exported")
    folders = {name: root / name for name in ("gender", "multitask")}
    for name, folder in folders.items():
        shutil.copytree(trained_models[name], folder)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in LOOSE_INT8.items():
            patch.setattr(export, name, value)
        result = runner.invoke(export.app, [*map(str, folders.values()), "--data-dir", str(prepared["data_dir"]),
                                            "--faces", "64"])
    assert result.exit_code == 0, result.output
    return folders


def test_export_writes_a_checked_tflite_next_to_the_model(exported):
    for folder in exported.values():
        assert (folder / "model.tflite").stat().st_size > 10_000
        assert not list(folder.glob(".tmp-*"))
        record = json.loads((folder / "metadata.json").read_text())["exports"]["tflite"]
        assert record["checked_on"] == "64 utkface test crops"
        assert record["max_p_female_diff"] < export.MAX_P_FEMALE_DIFF
        assert record["parameters"] > 1000
    assert json.loads((exported["multitask"] / "metadata.json").read_text())["exports"]["tflite"][
        "max_age_diff_years"] < export.MAX_AGE_DIFF_YEARS


def test_the_int8_export_is_a_quarter_of_the_size_and_within_its_tolerances(exported):
    for name, folder in exported.items():
        exports = json.loads((folder / "metadata.json").read_text())["exports"]
        record = exports["tflite-int8"]
        assert (folder / "model-int8.tflite").stat().st_size == record["bytes"] < exports["tflite"]["bytes"] / 3
        assert record["mean_p_female_diff"] <= LOOSE_INT8["INT8_MEAN_P_FEMALE_DIFF"]
        assert record["gender_agreement"] >= LOOSE_INT8["INT8_GENDER_AGREEMENT"]
        assert 0 < record["gender_accuracy_export"] <= 1
        if name == "multitask":
            assert 0 < record["mean_age_diff_years"] <= LOOSE_INT8["INT8_MEAN_AGE_DIFF_YEARS"]
            assert abs(record["age_mae_export"] - record["age_mae_keras"]) <= LOOSE_INT8["INT8_AGE_MAE_CHANGE_YEARS"]


def test_auto_backend_runs_the_fastest_export_and_predicts_what_keras_predicts(exported, prepared):
    images, _ = load_split("test", TEST_IMAGE_SIZE, prepared["data_dir"], 40)
    for name, folder in exported.items():
        keras_model = Predictor.load(folder, backend="keras")
        lite, int8 = Predictor.load(folder, backend="tflite"), Predictor.load(folder)
        assert (int8.backend, int8.model, lite.backend, keras_model.backend) == ("tflite-int8", None, "tflite", "keras")
        assert lite.parameters == int8.parameters == keras_model.parameters
        want = keras_model.predict_arrays(images)
        for predictor, p_tolerance, age_tolerance in ((lite, 1e-4, 0.01), (int8, 0.05, 1.0)):
            got = predictor.predict_arrays(images, batch_size=16)
            gender = {"p_female", "p_female_model", "gender_certain"}
            assert set(got) == set(want) == (gender if name == "gender" else {"age", "age_low", "age_high", *gender})
            np.testing.assert_allclose(got["p_female"], want["p_female"], atol=p_tolerance)
            if "age" in want:  # float: every face; int8: the mean difference the export was checked against
                gaps = np.abs(got["age"] - want["age"])
                assert (gaps.max() if predictor is lite else gaps.mean()) <= age_tolerance
        single = lite.predict_arrays(images[:1])  # batch 1 after batch 16: the runner resizes its input
        np.testing.assert_allclose(single["p_female"], want["p_female"][:1], atol=1e-4)


@pytest.mark.slow
def test_an_int8_export_outside_tolerance_is_not_kept(exported, prepared, tmp_path, monkeypatch):
    folder = tmp_path / "strict"
    shutil.copytree(exported["gender"], folder)
    monkeypatch.setattr(export, "INT8_GENDER_AGREEMENT", 1.01)  # no export can agree more than always
    result = runner.invoke(export.app, [str(folder), "--data-dir", str(prepared["data_dir"]), "--faces", "64"])
    assert result.exit_code == 0, result.output
    assert "not kept" in said(result) and "agreement" in said(result)
    assert not (folder / "model-int8.tflite").exists()
    assert set(json.loads((folder / "metadata.json").read_text())["exports"]) == {"tflite"}
    assert Predictor.load(folder).backend == "tflite"


@pytest.mark.slow
def test_a_float_export_over_the_committed_file_size_is_not_written(exported, prepared, tmp_path, monkeypatch):
    """A model too big for a float32 flatbuffer under the size bound (the WideResNet, the ensemble) is served by
    its int8 export alone; a float export left from before is removed."""
    folder = tmp_path / "big"
    shutil.copytree(exported["gender"], folder)
    small = (folder / "model-int8.tflite").stat().st_size + 1  # only the int8 flatbuffer fits
    monkeypatch.setattr(export, "FLOAT16_ABOVE_BYTES", small)
    result = runner.invoke(export.app, [str(folder), "--data-dir", str(prepared["data_dir"]), "--faces", "64"])
    assert result.exit_code == 0, result.output
    assert "not kept" in said(result) and "int8 export serves" in said(result)
    assert not (folder / "model.tflite").exists() and (folder / "model-int8.tflite").stat().st_size < small
    assert set(json.loads((folder / "metadata.json").read_text())["exports"]) == {"tflite-int8"}
    assert Predictor.load(folder).backend == "tflite-int8"


def test_predict_cli_gives_the_same_rows_with_either_backend(exported, prepared, tmp_path):
    rows = pd.read_csv(prepared["data_dir"] / "manifest.csv").query("split == 'test'").head(5)
    paths = [str(prepared["images"] / name) for name in rows["file"]]
    frames = {}
    for backend in ("auto", "tflite", "keras"):
        out = tmp_path / f"{backend}.csv"
        result = runner.invoke(predict.app, [str(exported["multitask"]), *paths, "--no-detect", "--out", str(out),
                                             "--backend", backend])
        assert result.exit_code == 0, result.output
        frames[backend] = pd.read_csv(out)
    np.testing.assert_allclose(frames["tflite"]["age"], frames["keras"]["age"], atol=0.01)
    assert list(frames["tflite"]["gender"]) == list(frames["keras"]["gender"])
    np.testing.assert_allclose(frames["auto"]["age"], frames["keras"]["age"], atol=2.0)  # int8 weights
    np.testing.assert_allclose(frames["auto"]["p_female"], frames["keras"]["p_female"], atol=0.05)


def test_a_stale_export_is_ignored_and_a_missing_one_is_one_sentence(exported, trained_models, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(exported["gender"], stale)
    metadata = json.loads((stale / "metadata.json").read_text())
    for kind in ("tflite", "tflite-int8"):
        metadata["exports"][kind]["model_sha256"] = "0" * 64  # as if model.keras were replaced after export
    (stale / "metadata.json").write_text(json.dumps(metadata))
    assert Predictor.load(stale).backend == "keras"

    result = runner.invoke(predict.app, [str(trained_models["age"]), str(stale / "metadata.json"),
                                         "--backend", "tflite"])
    assert result.exit_code == 1
    assert "has no up-to-date model.tflite; run python tasks/export.py" in said(result)
    result = runner.invoke(predict.app, [str(trained_models["age"]), str(stale), "--backend", "onnx"])
    assert result.exit_code == 2 and "must be one of auto, keras, tflite, tflite-int8" in said(result)
    result = runner.invoke(export.app, [str(tmp_path / "missing")])
    assert result.exit_code == 1 and "does not exist" in said(result)
    assert not (tmp_path / "missing").exists()


def test_a_corrupt_export_is_one_sentence(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported["gender"], broken)
    for name, backend in (("model-int8.tflite", "auto"), ("model.tflite", "tflite")):
        (broken / name).write_bytes(b"not a flatbuffer")
        with pytest.raises(UserError, match=f"{name} is not a readable TFLite model"):
            Predictor.load(broken, backend)


@pytest.mark.slow  # two conversions, ~15 s
def test_a_dex_model_exports_its_age_distribution_for_its_interval(trained_models, prepared, tmp_path):
    """The DEX age model's exports carry its distribution (age_bins), so the interval is the same from the
    export; an export without it (made before) is passed over when the interval needs it."""
    folder = tmp_path / "age"
    shutil.copytree(trained_models["age"], folder)
    result = runner.invoke(export.app, [str(folder), "--data-dir", str(prepared["data_dir"]), "--faces", "32",
                                        "--no-int8"])
    assert result.exit_code == 0, result.output
    record = json.loads((folder / "metadata.json").read_text())["exports"]["tflite"]
    assert record["outputs"] == ["age", "age_bins"] and record["interval_agreement"] == 1.0
    images, _ = load_split("test", TEST_IMAGE_SIZE, prepared["data_dir"], 24)
    want = Predictor.load(folder, "keras").predict_arrays(images, age_bins=True)
    got = Predictor.load(folder, "tflite").predict_arrays(images, age_bins=True)
    np.testing.assert_allclose(got["age_bins"], want["age_bins"], atol=1e-4)
    np.testing.assert_array_equal(got["age_low"], want["age_low"])
    np.testing.assert_array_equal(got["age_high"], want["age_high"])

    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["age_interval"].update(method="quantiles")  # an interval read off the distribution
    (folder / "metadata.json").write_text(json.dumps(metadata))
    import tensorflow as tf

    (folder / "model.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(  # no age_bins output
        Predictor.load(folder, "keras").model).convert())
    assert Predictor.load(folder).backend == "keras"
    with pytest.raises(UserError, match="lacks the age distribution"):
        Predictor.load(folder, "tflite")
