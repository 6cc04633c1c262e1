"""compare: tables and files from two small trained models, cached reruns, broken folders skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agegender.reporting.plots import panel_reference
from tasks import compare
from tests.conftest import said

REPO = Path(__file__).resolve().parent.parent

runner = CliRunner()
GENDER_COLUMNS = ["accuracy", "precision", "recall", "f1", "roc_auc"]
AGE_COLUMNS = ["mae", "mse", "rmse", "cs5"]
COST_COLUMNS = ["parameters", "size_mb", "ms_batch1", "images_per_s"]


@pytest.fixture(scope="module")
def models_dir(trained_models, tmp_path_factory) -> Path:
    """A models folder holding the gender and multitask test models, a folder without metadata and a
    folder whose model.keras is corrupt."""
    root = tmp_path_factory.mktemp("compare-models")
    for name in ("gender", "multitask"):
        shutil.copytree(trained_models[name], root / name)
    (root / "no_metadata").mkdir()
    shutil.copy(trained_models["age"] / "model.keras", root / "no_metadata" / "model.keras")
    (root / "corrupt").mkdir()
    shutil.copy(trained_models["age"] / "metadata.json", root / "corrupt" / "metadata.json")
    (root / "corrupt" / "model.keras").write_bytes(b"not a keras archive" * 100)
    return root


def run_compare(models_dir: Path, prepared, out: Path, *extra: str):
    arguments = ["--models-dir", str(models_dir), "--data-dir", str(prepared["data_dir"]), "--out", str(out)]
    return runner.invoke(compare.app, [*arguments, *extra])


@pytest.fixture(scope="module")
def first_run(models_dir, prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare-out")
    result = run_compare(models_dir, prepared, out)
    return result, out


def test_writes_tables_with_the_right_columns(first_run, prepared, models_dir):
    result, out = first_run
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "comparison.csv")
    assert sorted(frame["model"]) == ["gender", "multitask"]
    for column in ["model", "task", "image_size", *GENDER_COLUMNS, *AGE_COLUMNS, *COST_COLUMNS]:
        assert column in frame.columns, column
    test_rows = pd.read_csv(prepared["data_dir"] / "manifest.csv").query("split == 'test'")
    assert (frame["n"] == len(test_rows)).all()
    gender = frame.set_index("model").loc["gender"]
    assert 0.0 <= gender["accuracy"] <= 1.0 and np.isnan(gender["mae"])  # a gender model has no age metrics
    multitask = frame.set_index("model").loc["multitask"]
    assert multitask["mae"] > 0 and multitask["rmse"] >= multitask["mae"] and 0 <= multitask["cs5"] <= 1
    assert (frame["parameters"] > 1000).all() and (frame["ms_batch1"] > 0).all()

    # the metrics agree with the model's own test evaluation (same split, same inference path)
    saved = json.loads((models_dir / "multitask" / "metrics.json").read_text())
    assert multitask["mae"] == pytest.approx(saved["age"]["mae"], abs=1e-3)
    assert multitask["accuracy"] == pytest.approx(saved["gender"]["accuracy"], abs=1e-6)

    markdown = (out / "comparison.md").read_text()
    for heading in ("## Gender", "## Age", "## Cost", "## Bias", "## Robustness", "ROC AUC", "CS@5"):
        assert heading in markdown
    assert "**" in markdown  # best values marked

    summary = json.loads((out / "comparison.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert summary["best"]["gender"]["accuracy"] == frame["accuracy"].max()
    groups = pd.DataFrame(summary["bias"]["groups"])
    assert set(groups["grouping"]) == {"race", "race, age 13+", "age band", "gender"}
    assert set(groups.query("grouping == 'age band'")["group"]) <= {"0-2", "3-9", "10-19", "20-29", "30-39", "40-49",
                                                                   "50-59", "60-69", "70+"}
    by_gender = groups.query("grouping == 'gender' and model == 'multitask'")
    assert by_gender["n"].sum() == len(test_rows)
    # race among the faces 13 and older: the same races, only those faces
    adults = groups.query("grouping == 'race, age 13+' and model == 'multitask'")
    assert adults["n"].sum() == (test_rows["age"] >= 13).sum()
    assert set(adults["group"]) <= set(groups.query("grouping == 'race'")["group"])
    # a bias panel's dashed line is the figure over the panel's faces: over every test face for race
    by_race = groups.query("grouping == 'race' and model == 'multitask'")
    for key in ("accuracy", "mae"):
        assert panel_reference(by_race, key) == pytest.approx(multitask[key], abs=1e-6)
    gaps = pd.read_csv(out / "compare" / "bias_gaps.csv")
    assert {"best_group", "worst_group", "gap"} <= set(gaps.columns)
    assert (gaps["gap"] >= 0).all()

    robustness = pd.read_csv(out / "compare" / "robustness.csv")
    assert list(robustness.query("model == 'multitask'")["condition"]) == list(compare.CONDITIONS)
    clean = robustness.query("model == 'multitask' and condition == 'clean'")
    assert clean["change_mae"].iloc[0] == 0
    degraded = robustness.query("condition != 'clean'")
    assert np.nansum(degraded[["change_roc_auc", "change_mae"]].abs().to_numpy()) > 0  # degradations matter

    for name in ("gender-robustness.png", "multitask-robustness.png", "multitask-age_error.png",
                 "gender-bias.png", "multitask-bias.png", "conditions.png"):
        assert (out / "compare" / name).stat().st_size > 1000, name
    assert summary["plots"]["multitask bias"] == "compare/multitask-bias.png"


def test_broken_and_missing_folders_are_reported_and_skipped(first_run):
    result, _ = first_run
    output = " ".join(result.output.split())
    assert "no_metadata: " in output and "no metadata.json" in output
    assert "corrupt: Could not load" in output
    assert result.output.count("skipped") >= 2


def test_second_run_reuses_cached_predictions(first_run, models_dir, prepared, monkeypatch):
    result, out = first_run
    cache_files = sorted((out / "compare" / "cache").glob("*.npz"))
    assert [f.name.split("-")[0] for f in cache_files] == ["gender", "multitask"]
    before = {f: f.stat().st_mtime_ns for f in cache_files}
    first_table = pd.read_csv(out / "comparison.csv")

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached model was loaded again")

    from agegender.inference import predictor

    monkeypatch.setattr(predictor.Predictor, "load", classmethod(no_loading))
    again = run_compare(models_dir, prepared, out, "--models", "gender", "--models", "multitask")
    assert again.exit_code == 0, again.output
    assert again.output.count("cache hit") == 2
    assert {f: f.stat().st_mtime_ns for f in cache_files} == before
    pd.testing.assert_frame_equal(pd.read_csv(out / "comparison.csv"), first_table)


def test_selecting_an_absent_model_is_reported(first_run, models_dir, prepared, tmp_path):
    shutil.copytree(first_run[1] / "compare" / "cache", tmp_path / "compare" / "cache")  # no re-prediction
    result = run_compare(models_dir, prepared, tmp_path, "--models", "multitask", "--models", "nosuchmodel")
    assert result.exit_code == 0, result.output
    assert "multitask: cache hit" in " ".join(result.output.split())
    assert "nosuchmodel: no model folder" in " ".join(result.output.split())
    assert list(pd.read_csv(tmp_path / "comparison.csv")["model"]) == ["multitask"]


def test_no_usable_model_fails_in_one_sentence(prepared, tmp_path):
    (tmp_path / "models" / "empty").mkdir(parents=True)
    result = run_compare(tmp_path / "models", prepared, tmp_path / "out")
    assert result.exit_code != 0
    assert "No usable model folder" in result.output
    assert "Traceback" not in result.output


def test_degradations_are_seeded_and_change_the_images():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    for condition in compare.CONDITIONS:
        first, second = compare.degrade(images, condition), compare.degrade(images, condition)
        assert first.shape == images.shape and first.dtype == np.uint8
        np.testing.assert_array_equal(first, second)
        assert (condition == "clean") == np.array_equal(first, images), condition
    darker, brighter = compare.degrade(images, "darker"), compare.degrade(images, "brighter")
    assert darker.mean() < images.mean() < brighter.mean()


def test_missing_data_fails_in_one_sentence(models_dir, tmp_path):
    result = runner.invoke(compare.app, ["--models-dir", str(models_dir), "--data-dir", str(tmp_path / "nodata"),
                                         "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "No manifest" in result.output and "Traceback" not in result.output


def test_the_age_interval_coverage_and_the_mean_heatmaps(first_run, models_dir, prepared):
    from agegender.data.manifest import load_split
    from agegender.inference.gradcam import load_means
    from agegender.inference.intervals import summarise
    from agegender.inference.predictor import Predictor

    result, out = first_run
    summary = json.loads((out / "comparison.json").read_text())
    assert set(summary["age_interval"]) == {"multitask"}  # the gender model has no age
    found = summary["age_interval"]["multitask"]
    predictor = Predictor.load(models_dir / "multitask")
    images, rows = load_split("test", predictor.image_size, prepared["data_dir"])
    predicted = predictor.predict_arrays(images)
    expected = summarise(predicted["age_low"], predicted["age_high"], rows["age"].to_numpy())
    assert found["coverage"] == pytest.approx(expected["coverage"]) and found["faces"] == len(rows)
    assert set(found["by_band"]) == set(expected["by_band"])
    for band, values in expected["by_band"].items():
        assert found["by_band"][band] == pytest.approx(values)
    assert found["validation_coverage"] >= 0.8
    markdown = (out / "comparison.md").read_text()
    assert "## Age interval" in markdown and f"{found['coverage']:.1%}" in markdown
    for name, outputs in (("gender", {"gender"}), ("multitask", {"age", "gender"})):
        assert (out / "compare" / f"{name}-heatmaps.png").stat().st_size > 10_000
        assert summary["plots"][f"{name} mean heatmaps"] == f"compare/{name}-heatmaps.png"
        # the figure's cells: per output, every test face counted once in its true-age band and gender
        [cached] = (out / "compare" / "cache" / "heatmaps").glob(f"{name}-*.npz")
        means = load_means(cached)
        assert means["faces"] == len(rows) and {output for output, _, _ in means["maps"]} == outputs
        for output in outputs:
            assert sum(count for key, count in means["counts"].items() if key[0] == output) == len(rows)
        assert all(heat.min() >= 0 and heat.max() <= 1 for heat in means["maps"].values())


def test_each_gender_model_s_calibration_and_certain_answers_by_group(first_run, models_dir, prepared):
    from agegender.data.manifest import load_split
    from agegender.inference.gender_calibration import coverage_and_accuracy
    from agegender.inference.predictor import Predictor

    result, out = first_run
    summary = json.loads((out / "comparison.json").read_text())
    assert set(summary["gender_certainty"]) == {"gender", "multitask"}
    predictor = Predictor.load(models_dir / "multitask")
    images, rows = load_split("test", predictor.image_size, prepared["data_dir"])
    predicted = predictor.predict_arrays(images)
    found = summary["gender_certainty"]["multitask"]
    expected = coverage_and_accuracy(predicted["p_female"], rows["gender"].to_numpy(), predictor.gender_threshold)
    for key in ("coverage", "certain_accuracy", "accuracy"):  # NaN (no certain answer) is null in the JSON
        assert found.get(key) == (None if np.isnan(expected[key]) else pytest.approx(expected[key])), key
    assert found["ece_before"] >= 0 and found["ece_after"] >= 0
    groups = pd.DataFrame(found["groups"])
    assert set(groups["grouping"]) == {"race", "race, age 13+", "age band", "gender"}
    assert groups.loc[groups["grouping"] == "gender", "faces"].sum() == len(rows)
    spreads = pd.DataFrame(found["race_spreads"])
    assert set(spreads["grouping"]) == {"race", "race, age 13+"}
    assert (spreads["spread"] >= 0).all()
    assert summary["plots"]["multitask gender calibration"] == "compare/multitask-gender_calibration.png"
    assert (out / "compare" / "multitask-gender_calibration.png").stat().st_size > 1000
    markdown = (out / "comparison.md").read_text()
    assert "## Certain or uncertain gender" in markdown and "Spread between races" in markdown
    assert "Certain or uncertain gender (test)" in said(result)


def test_a_model_without_a_calibrated_interval_says_so():
    rows = pd.DataFrame({"age": [5, 30, 70]})
    result = compare.ModelResult("old", Path("old"), {"outputs": ["age"]},
                                 {"clean/age": np.array([6.0, 28.0, 60.0])}, {}, False, Path("old.npz"))
    report = compare.interval_report([result], rows)
    assert report == {"old": {"interval": None, "note": "no age interval: not calibrated (tasks/calibrate.py)"}}
    assert "- `old`: no age interval: not calibrated" in compare.interval_markdown(report)


def test_everyday_photos_come_from_evaluate_s_fairface_test_figures(tmp_path):
    import json

    from tasks.compare import everyday_markdown, everyday_photos

    assert everyday_photos(tmp_path / "missing.json", ["a"]) is None
    evaluation = {"images": 100, "faces_found": 98,
                  "models": {"a": {"metrics": {"accuracy": 0.9, "age_group_accuracy": 0.55, "years_outside": 1.5}},
                             "other": {"metrics": {"accuracy": 0.5}}},
                  "gaps": [{"model": "a", "grouping": "race_fairface, age 13+", "metric": "accuracy", "gap": 0.04,
                            "best_group": "White", "worst_group": "Black"},
                           {"model": "a", "grouping": "race", "metric": "accuracy", "gap": 0.2,
                            "best_group": "White", "worst_group": "Asian"}]}
    (tmp_path / "evaluation.json").write_text(json.dumps(evaluation))
    found = everyday_photos(tmp_path / "evaluation.json", ["a", "not-evaluated"])
    assert list(found["models"]) == ["a"]
    assert found["models"]["a"]["gender_spread_13_plus"] == 0.04 and found["models"]["a"]["faces_found"] == 98
    table = everyday_markdown(found)
    assert "| a | 98 | 0.9000 | 0.5500 | 1.50 | 4.0 (Black .. White) |" in table
