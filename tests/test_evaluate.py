"""tasks/evaluate.py on a small labelled dataset (30 UTKFace faces in the labels.csv format, half without age and
race): its figures match predict's output scored by hand, per label and per group present."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agegender.data.manifest import file_sha256
from agegender.inference.detectors import DEFAULT_DETECTOR
from agegender.reporting.metrics import age_metrics, gender_metrics
from tasks import evaluate, predict
from tests.conftest import model_trained_on, said

runner = CliRunner()


def run_evaluate(*args: str):
    result = runner.invoke(evaluate.app, list(args))
    assert result.exit_code == 0, result.output
    return result


def predicted_by_predict(model, labelled_dataset, tmp_path, *flags: str) -> pd.DataFrame:
    """predict's CSV for the dataset's images, one row per image (its first face), files relative to the folder."""
    out = tmp_path / "predict.csv"
    result = runner.invoke(predict.app, [str(model), str(labelled_dataset / "images"), "--out", str(out), *flags])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    if "face" in frame:
        frame = frame[frame["face"].fillna(0) <= 1]
    frame["file"] = frame["file"].map(lambda path: "images/" + path.split("/")[-1])
    return frame.drop_duplicates("file").set_index("file")


def test_no_detect_scores_each_label_over_the_rows_that_have_it(trained_models, labelled_dataset, tmp_path):
    result = run_evaluate(str(trained_models["multitask"]), str(trained_models["gender"]), "--dataset",
                          str(labelled_dataset), "--no-detect", "--out", str(tmp_path / "out"),
                          "--data-dir", str(tmp_path / "data"))
    folder = tmp_path / "out" / "faces-ds"
    summary = json.loads((folder / "evaluation.json").read_text())
    assert summary["images"] == 30 and summary["faces_found"] == 30 and summary["not_found_rate"] == 0
    assert {item["file"] for item in summary["skipped"]} == {"images/missing.jpg", "images/broken.jpg",
                                                             "images/99.jpg", "images/00.jpg"}
    labels = pd.read_csv(labelled_dataset / "labels.csv").query("note == 'kept'").set_index("file")
    predictions = pd.read_csv(folder / "predictions.csv")

    # the same figures as predict's own output, scored by hand
    by_predict = predicted_by_predict(trained_models["multitask"], labelled_dataset, tmp_path, "--no-detect")
    mine = predictions[predictions["model"] == "multitask"].set_index("file")
    np.testing.assert_allclose(mine["age"], by_predict.loc[mine.index, "age"], atol=2e-4)
    np.testing.assert_allclose(mine["p_female"], by_predict.loc[mine.index, "p_female"], atol=2e-4)
    metrics = summary["models"]["multitask"]["metrics"]
    with_age = labels["age"].notna()
    expected_age = age_metrics(labels.loc[with_age, "age"], by_predict.loc[labels.index[with_age], "age"])
    assert metrics["n_age"] == 15 and metrics["mae"] == pytest.approx(expected_age["mae"], abs=1e-3)
    expected_gender = gender_metrics(labels["gender"], by_predict.loc[labels.index, "p_female"])
    assert metrics["n_gender"] == 30 and metrics["accuracy"] == pytest.approx(expected_gender["accuracy"])
    assert "mae" not in summary["models"]["gender"]["metrics"]
    assert not any(found["trained_on_dataset"] for found in summary["models"].values())
    assert "learned from" not in said(result)

    # groups: race and age bands from the 15 rows that have them, gender from all 30
    groups = pd.DataFrame(summary["groups"])
    multitask = groups[groups["model"] == "multitask"]
    assert multitask.loc[multitask["grouping"] == "gender", "n"].sum() == 30
    assert multitask.loc[multitask["grouping"] == "race", "n"].sum() == 15
    assert multitask.loc[multitask["grouping"] == "age band", "n"].sum() == 15
    adults = labels[labels["race"].notna() & (pd.to_numeric(labels["age"]) >= 13)]
    assert 0 < len(adults) < 15  # the subset holds children and adults, so the grouping is not race again
    assert multitask.loc[multitask["grouping"] == "race, age 13+", "n"].sum() == len(adults)
    assert (folder / "multitask-age_error.png").stat().st_size > 1000
    assert not (folder / "gender-age_error.png").exists()
    report = (folder / "evaluation.md").read_text()
    assert "## Bias: best and worst group per metric" in report and "### By race" in report
    assert "images/missing.jpg" in report and "missing file" in result.output


def test_detection_scores_the_face_predict_finds(trained_models, labelled_dataset, tmp_path):
    # a model that learned from this dataset (prepare_data --extra-source names it faces-ds, by its path) is
    # scored with a warning, also when --name renames the dataset in the results
    model = model_trained_on(trained_models["multitask"], tmp_path / "multitask", ["faces-ds"])
    result = run_evaluate(str(model), "--dataset", str(labelled_dataset), "--limit", "12", "--name", "my-faces",
                          "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"))
    assert "multitask learned from my-faces (its training split)" in said(result)
    summary = json.loads((tmp_path / "out" / "my-faces" / "evaluation.json").read_text())
    assert summary["models"]["multitask"]["trained_on_dataset"] is True
    assert "include faces it was trained on" in (tmp_path / "out" / "my-faces" / "evaluation.md").read_text()
    images = summary["images"]  # the usable ones among 12 labelled rows drawn
    assert 8 <= images <= 12 and images + len(summary["skipped"]) >= 12 and summary["detector"] == DEFAULT_DETECTOR
    assert summary["faces_found"] + len(summary["not_found"]) == images
    assert summary["not_found_rate"] == pytest.approx(len(summary["not_found"]) / images)
    predictions = pd.read_csv(tmp_path / "out" / "my-faces" / "predictions.csv").set_index("file")
    assert len(predictions) == summary["faces_found"] > 0
    by_predict = predicted_by_predict(trained_models["multitask"], labelled_dataset, tmp_path)
    np.testing.assert_allclose(predictions["age"], by_predict.loc[predictions.index, "age"], atol=2e-4)
    assert by_predict.loc[summary["not_found"], "reason"].eq("no face found").all()


def test_split_scores_the_held_out_faces_of_a_prepared_dataset(trained_models, prepared_extra, labelled_dataset,
                                                                tmp_path):
    # faces-ds went through prepare_data --extra-source; --split test scores only its test faces, and a model that
    # learned from faces-ds on that very manifest is scored without the warning (it never saw them)
    data_dir = prepared_extra["data_dir"]
    manifest = pd.read_csv(data_dir / "manifest.csv")
    test_files = set(manifest.query("dataset == 'faces-ds' and split == 'test'")["file"])
    assert 0 < len(test_files) < 30
    same = model_trained_on(trained_models["multitask"], tmp_path / "same", ["faces-ds"],
                            manifest_sha256=file_sha256(data_dir / "manifest.csv"))
    other = model_trained_on(trained_models["gender"], tmp_path / "other", ["faces-ds"])
    result = run_evaluate(str(same), str(other), "--dataset", str(labelled_dataset), "--split", "test",
                          "--no-detect", "--out", str(tmp_path / "out"), "--data-dir", str(data_dir))
    folder = tmp_path / "out" / "faces-ds-test"
    summary = json.loads((folder / "evaluation.json").read_text())
    assert summary["split"] == "test" and summary["images"] == len(test_files)
    assert set(pd.read_csv(folder / "predictions.csv")["file"]) == test_files
    assert summary["models"]["same"]["trained_on_dataset"] is False
    assert summary["models"]["other"]["trained_on_dataset"] is True  # trained on another preparation
    assert "other learned from faces-ds as another manifest split it" in said(result)
    assert "the test split as prepare_data made it" in (folder / "evaluation.md").read_text()

    # a data folder whose manifest has no such dataset, and a split that does not exist
    bare = tmp_path / "bare"
    bare.mkdir()
    manifest.query("dataset != 'faces-ds'").to_csv(bare / "manifest.csv", index=False)
    for flags, message in ((["--split", "test", "--data-dir", str(bare)], "has no test split of faces-ds"),
                           (["--split", "holdout"], "must be one of train, val, test")):
        result = runner.invoke(evaluate.app, [str(same), "--dataset", str(labelled_dataset), "--no-detect",
                                              "--out", str(tmp_path / "out2"), *flags])
        assert result.exit_code != 0 and message in said(result) and "Traceback" not in result.output
    assert not (tmp_path / "out2").exists()


def test_an_ensemble_s_member_tells_whether_the_split_was_held_out(tmp_path):
    # the shipped ensemble records its members' folders, not their manifests: the member's own metadata says
    # (at its recorded folder, else beside the ensemble); a member whose manifest cannot be read may have seen them
    member = tmp_path / "models" / "wrn"
    member.mkdir(parents=True)
    (member / "metadata.json").write_text(json.dumps({"manifest_sha256": "abc", "extra_datasets": ["faces-ds"]}))
    ensemble = {"extra_datasets": [], "members": [{"name": "wrn", "folder": str(tmp_path / "moved"),
                                                   "extra_datasets": ["faces-ds"]},
                                                  {"name": "cnn", "extra_datasets": []}]}
    folder = tmp_path / "models" / "ensemble"
    assert not evaluate.saw_faces(ensemble, folder, {"faces-ds"}, "test", "abc")
    assert evaluate.saw_faces(ensemble, folder, {"faces-ds"}, "test", "another")
    assert evaluate.saw_faces(ensemble, folder, {"faces-ds"}, None, None)
    assert evaluate.saw_faces(ensemble, folder, {"faces-ds"}, "train", "abc")
    lost = {**ensemble, "members": [{"name": "gone", "extra_datasets": ["faces-ds"]}]}
    assert evaluate.saw_faces(lost, folder, {"faces-ds"}, "test", "abc")
    recorded = {**ensemble, "members": [{"name": "gone", "extra_datasets": ["faces-ds"], "manifest_sha256": "abc"}]}
    assert not evaluate.saw_faces(recorded, folder, {"faces-ds"}, "test", "abc")
    assert not evaluate.saw_faces(ensemble, folder, {"celeba-10k"}, None, None)


def test_bad_inputs_end_in_one_sentence(trained_models, labelled_dataset, tmp_path):
    for args, message in (([str(trained_models["gender"]), "--dataset", str(tmp_path / "nowhere")], "does not exist"),
                          ([str(trained_models["gender"]), "--dataset", str(labelled_dataset / "images")],
                           "has no labels.csv"),
                          ([str(tmp_path / "no-model"), "--dataset", str(labelled_dataset)], "no-model")):
        result = runner.invoke(evaluate.app, [*args, "--out", str(tmp_path / "out")])
        assert result.exit_code != 0 and message in " ".join(result.output.split())
        assert "Traceback" not in result.output


def test_each_gender_model_s_certain_answers_by_group(trained_models, labelled_dataset, tmp_path):
    from agegender.inference.gender_calibration import coverage_and_accuracy, expected_calibration_error

    result = run_evaluate(str(trained_models["multitask"]), "--dataset", str(labelled_dataset), "--no-detect",
                          "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"))
    folder = tmp_path / "out" / "faces-ds"
    summary = json.loads((folder / "evaluation.json").read_text())
    found = summary["gender_certainty"]["multitask"]
    predictions = pd.read_csv(folder / "predictions.csv")
    labels = pd.read_csv(labelled_dataset / "labels.csv").query("note == 'kept'").set_index("file")
    truth = labels.loc[predictions["file"], "gender"].to_numpy()
    threshold = json.loads((trained_models["multitask"] / "metadata.json").read_text())["gender_calibration"][
        "threshold"]
    assert found["threshold"] == threshold
    expected = coverage_and_accuracy(predictions["p_female"], truth, threshold)
    assert found["coverage"] == pytest.approx(expected["coverage"]) and found["faces"] == 30
    assert found["ece_before"] == pytest.approx(expected_calibration_error(predictions["p_female_model"], truth),
                                                abs=1e-3)
    assert (predictions["gender_certain"] == (np.maximum(predictions["p_female"], 1 - predictions["p_female"])
                                              >= threshold - 1e-4)).all()
    groups = pd.DataFrame(found["groups"])
    assert groups.loc[groups["grouping"] == "gender", "faces"].sum() == 30
    assert groups.loc[groups["grouping"] == "race", "faces"].sum() == 15
    assert {spread["grouping"] for spread in found["race_spreads"]} <= {"race", "race, age 13+"}
    assert (folder / found["plot"]).stat().st_size > 1000
    report = (folder / "evaluation.md").read_text()
    assert "## Certain or uncertain gender" in report and "13 and older" in report
    assert "Certain or uncertain gender" in said(result)
