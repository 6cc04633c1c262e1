"""export.py as a user runs it: a checked TFLite twin of each model that predict and the Spaces pick up."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from common.cli import UserError
from common.data import load_split
from common.faces import Predictor
from tasks import export, predict
from tests.conftest import TEST_IMAGE_SIZE

runner = CliRunner()


def said(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def exported(trained_models, prepared, tmp_path_factory) -> dict:
    """Copies of the two-epoch gender and multitask models, exported through the CLI."""
    root = tmp_path_factory.mktemp("exported")
    folders = {name: root / name for name in ("gender", "multitask")}
    for name, folder in folders.items():
        shutil.copytree(trained_models[name], folder)
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


def test_auto_backend_runs_the_export_and_predicts_what_keras_predicts(exported, prepared):
    images, _ = load_split("test", TEST_IMAGE_SIZE, prepared["data_dir"], 40)
    for name, folder in exported.items():
        lite, keras_model = Predictor.load(folder), Predictor.load(folder, backend="keras")
        assert (lite.backend, lite.model) == ("tflite", None)
        assert keras_model.backend == "keras"
        assert lite.parameters == keras_model.parameters
        got, want = lite.predict_arrays(images, batch_size=16), keras_model.predict_arrays(images)
        assert set(got) == set(want) == ({"p_female"} if name == "gender" else {"age", "p_female"})
        np.testing.assert_allclose(got["p_female"], want["p_female"], atol=1e-4)
        if "age" in want:
            np.testing.assert_allclose(got["age"], want["age"], atol=0.01)
        single = lite.predict_arrays(images[:1])  # batch 1 after batch 16: the runner resizes its input
        np.testing.assert_allclose(single["p_female"], want["p_female"][:1], atol=1e-4)


def test_predict_cli_gives_the_same_rows_with_either_backend(exported, prepared, tmp_path):
    rows = pd.read_csv(prepared["data_dir"] / "manifest.csv").query("split == 'test'").head(5)
    paths = [str(prepared["images"] / name) for name in rows["file"]]
    frames = {}
    for backend in ("auto", "keras"):
        out = tmp_path / f"{backend}.csv"
        result = runner.invoke(predict.app, [str(exported["multitask"]), *paths, "--no-detect", "--out", str(out),
                                             "--backend", backend])
        assert result.exit_code == 0, result.output
        frames[backend] = pd.read_csv(out)
    np.testing.assert_allclose(frames["auto"]["age"], frames["keras"]["age"], atol=0.01)
    assert list(frames["auto"]["gender"]) == list(frames["keras"]["gender"])


def test_a_stale_export_is_ignored_and_a_missing_one_is_one_sentence(exported, trained_models, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(exported["gender"], stale)
    metadata = json.loads((stale / "metadata.json").read_text())
    metadata["exports"]["tflite"]["model_sha256"] = "0" * 64  # as if model.keras were replaced after export
    (stale / "metadata.json").write_text(json.dumps(metadata))
    assert Predictor.load(stale).backend == "keras"

    result = runner.invoke(predict.app, [str(trained_models["age"]), str(stale / "metadata.json"),
                                         "--backend", "tflite"])
    assert result.exit_code == 1
    assert "has no up-to-date model.tflite; run python tasks/export.py" in said(result)
    result = runner.invoke(predict.app, [str(trained_models["age"]), str(stale), "--backend", "onnx"])
    assert result.exit_code == 2 and "must be one of auto, keras, tflite" in said(result)
    result = runner.invoke(export.app, [str(tmp_path / "missing")])
    assert result.exit_code == 1 and "does not exist" in said(result)
    assert not (tmp_path / "missing").exists()


def test_a_corrupt_export_is_one_sentence(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported["gender"], broken)
    (broken / "model.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(UserError, match="is not a readable TFLite model"):
        Predictor.load(broken)
