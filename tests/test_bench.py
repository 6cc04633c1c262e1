"""bench.py as a user runs it: a --quick benchmark on a few hundred real faces (full tier) and bad input
(the committed report: tests/shipped)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasks import bench

runner = CliRunner()
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def quick_report(prepared, trained_models, tmp_path_factory):
    """One --quick run (multitask family, the two-epoch multitask model, tiny sizes): (report, output, folder)."""
    out = tmp_path_factory.mktemp("bench")
    readme = README.read_bytes()
    result = runner.invoke(bench.app, ["--quick", "--image-size", "64", "--data-dir", str(prepared["data_dir"]),
                                       "--model", str(trained_models["multitask"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert README.read_bytes() == readme  # bench writes its own files only
    return json.loads((out / "cpu-quick.json").read_text()), result.output, out


@pytest.mark.slow
def test_quick_run_times_every_pipeline_of_the_family(quick_report):
    report, output, _ = quick_report
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and machine["versions"]["tensorflow"]
    assert machine["date"].startswith("20")
    rows = {row["pipeline"]: row for row in report["training"]}
    assert set(rows) == set(bench.PIPELINES)
    for row in rows.values():
        assert row["family"] == "multitask" and row["image_size"] == 64
        assert row["steps"] == bench.QUICK["steps"] and row["batch_size"] == bench.QUICK["batch_size"]
        assert row["images_per_s"] > 0 and row["cpu_s_per_1000_images"] > 0
        assert row["peak_rss_mb"] >= row["rss_before_training_mb"] > 50  # TensorFlow alone takes more
    assert set(rows["ours"]["pipeline_only_images_per_s"]) == {"ours", "ours_no_augment"}
    assert set(rows["naive"]["pipeline_only_images_per_s"]) == {"naive", "naive_no_augment"}
    assert all(v > 0 for v in rows["naive"]["pipeline_only_images_per_s"].values())
    ratios = report["ratios"]["multitask"]
    assert all(value > 0 for value in ratios.values())
    faster = rows["ours"]["images_per_s"] > rows["in_memory"]["images_per_s"]
    assert (ratios["ours_vs_in_memory"] > 1) == faster  # the ratio says which pipeline was faster
    assert "Training throughput" in output and "CPU inference" in output


@pytest.mark.slow
def test_quick_run_measures_inference_and_predict(quick_report, trained_models):
    report, _, _ = quick_report
    [row] = report["inference"]
    assert row["model"] == trained_models["multitask"].name and row["image_size"] == 64
    assert row["load_s"] > 0 and row["peak_rss_mb"] > 0
    assert row["batch1"]["faces"] == bench.QUICK["faces"]
    assert row["batch1"]["ms_per_face"] >= row["batch1"]["model_ms"] > 0
    assert row["batch64"]["model_faces_per_s"] > 0 and row["batch64"]["faces_per_s_with_alignment"] > 0
    for batch in ("batch1", "batch64"):
        profile = row["forward_profile"][batch]
        assert {"eager_call", "tf_function", "keras_predict"} <= set(profile)
        assert profile["tf_function_max_abs_diff"] < 1e-4  # the compiled forward gives the same predictions
    runs = {run["detect"]: run for run in report["predict"]}
    assert set(runs) == {False, True}
    for run in runs.values():
        assert run["images"] == bench.QUICK["images"] and run["images_per_s"] > 0 and run["skipped"] == 0
    assert runs[False]["faces_predicted"] == bench.QUICK["images"]  # one row per image without detection
    assert runs[True]["faces_predicted"] >= bench.QUICK["images"] - 2  # MTCNN finds (nearly) every face


@pytest.mark.slow
def test_quick_run_writes_its_tables_next_to_its_report(quick_report):
    report, _, out = quick_report
    text = (out / "cpu-quick.md").read_text()
    assert text.startswith("# Speed benchmark") and "results/bench/cpu-quick.json" in text
    for title in ("Training, 64 px", "Each pipeline alone", "Inference on the CPU", "Per face at batch 1"):
        assert title in text
    assert "| multitask |" in text and report["machine"]["cpu_model"] in text


@pytest.mark.parametrize("args, message", [
    (["--family", "resnet"], "Unknown family"),
    (["--data-dir", "/nonexistent/data"], "No manifest"),
    (["--model", "/nonexistent/model"], "Model folder /nonexistent/model does not exist"),
])
def test_bad_input_ends_in_one_sentence(args, message, prepared):
    extra = [] if "--data-dir" in args else ["--data-dir", str(prepared["data_dir"])]
    result = runner.invoke(bench.app, ["--quick", *extra, *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
