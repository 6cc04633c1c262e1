"""train_all as a user runs it: the plan and its estimate, real one-epoch runs promoted only when they beat the
current model on validation, and bad input in one sentence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasks import train_all
from tests.conftest import SMALL_LIMIT, TEST_IMAGE_SIZE, said

runner = CliRunner()


@pytest.fixture
def recipes(tmp_path) -> Path:
    """A recipes folder with one tiny gender recipe (one epoch at the test image size)."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "gender.toml").write_text(f'family = "gender"\nimage_size = {TEST_IMAGE_SIZE}\nepochs = 1\n\n'
                                        '[params]\nbatch_size = 16\n')
    return folder


def invoke(recipes: Path, results: Path, prepared, *extra: str):
    return runner.invoke(train_all.app, ["--recipes-dir", str(recipes), "--results-dir", str(results),
                                         "--data-dir", str(prepared["data_dir"]), *extra], terminal_width=200)


def test_the_plan_estimates_from_the_current_models_seconds_per_epoch(recipes, trained_models, prepared, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(trained_models["gender"], results / "models" / "gender")
    per_epoch = json.loads((results / "models/gender/metadata.json").read_text())["seconds_per_epoch"]
    (recipes / "ensemble.toml").write_text('family = "ensemble"\nmembers = ["gender", "age"]\n')
    result = invoke(recipes, results, prepared, "--dry-run")
    assert result.exit_code == 0, result.output
    text = said(result)
    assert text.index("│ gender") < text.index("│ ensemble")  # the registry's order: members first
    gender, ensemble = train_all.plan(recipes, None, results / "models")
    assert gender.estimate == pytest.approx(train_all.STARTUP_SECONDS + per_epoch)
    assert gender.basis == f"1 epochs x {per_epoch:.0f} s (current model)"
    assert (ensemble.estimate, ensemble.basis) == (train_all.DEFAULT_RUN_SECONDS, "default 300 s")
    total = train_all.duration(gender.estimate + ensemble.estimate)
    assert f"Estimated total: {total}." in text
    assert not (results / "runs").exists()  # a dry run trains nothing


@pytest.mark.parametrize("args, words", [
    (["--only", "nothing"], "No recipe 'nothing'"),
    (["--quick", "--results-dir", str(train_all.RESULTS_DIR)], "--quick writes to a scratch results folder"),
    (["--data-dir", "/nonexistent/data"], "No prepared data in /nonexistent/data"),
])
def test_bad_input_is_one_sentence(args, words, recipes, prepared, tmp_path):
    result = runner.invoke(train_all.app, ["--recipes-dir", str(recipes), "--data-dir", str(prepared["data_dir"]),
                                           "--results-dir", str(tmp_path / "results"), *args])
    assert result.exit_code == 1 and words in said(result) and "Traceback" not in said(result)
    assert not (tmp_path / "results" / "runs").exists()


def set_validation_accuracy(folder: Path, accuracy: float) -> None:
    """Rewrite the validation accuracy a model recorded (what train_all compares a run with)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["validation"]["gender"]["accuracy"] = accuracy
    (folder / "metrics.json").write_text(json.dumps(metrics))


@pytest.mark.slow
def test_a_run_is_promoted_only_when_it_beats_the_current_model(recipes, trained_models, prepared, tmp_path):
    """Two real one-epoch runs of the gender trainer against the conftest's gender model as the current one:
    while that model's recorded validation accuracy is 1.0 the run is kept out; at 0.0 the next run replaces
    it, and export, compare and the README table then run on the promoted model."""
    results = tmp_path / "results"
    current = results / "models" / "gender"
    shutil.copytree(trained_models["gender"], current)
    set_validation_accuracy(current, 1.0)
    before = (current / "model.keras").read_bytes()
    kept = invoke(recipes, results, prepared, "--no-refresh")
    assert kept.exit_code == 0, kept.output
    assert "Kept the current model" in said(kept) and "1.0000" in said(kept)
    assert (current / "model.keras").read_bytes() == before
    [run] = list((results / "runs" / "gender").iterdir())  # the run stays in its own folder
    assert (run / "model" / "model.keras").exists() and "loss" in (run / "train.log").read_text()
    assert list((run / "tensorboard" / "train").glob("events.out.tfevents.*"))

    set_validation_accuracy(current, 0.0)
    promoted = invoke(recipes, results, prepared)
    assert promoted.exit_code == 0, promoted.output
    assert "Promoted" in said(promoted) and "beats 0.0000" in said(promoted)
    newest = max((results / "runs" / "gender").iterdir())
    assert newest != run and (current / "model.keras").read_bytes() == (newest / "model" / "model.keras").read_bytes()
    metadata = json.loads((current / "metadata.json").read_text())
    assert metadata["recipe"]["sha256"] and metadata["tensorboard"] == str(newest / "tensorboard")
    assert metadata["exports"]["tflite"]["file"] == "model.tflite"
    comparison = json.loads((results / "comparison.json").read_text())
    assert [row["model"] for row in comparison["models"]] == ["gender"]
    # the README table went to a copy in the results folder: the real README stays as it is
    assert f"| gender | gender | {TEST_IMAGE_SIZE} |" in (results / "README.md").read_text()


def test_an_interrupted_train_all_continues_where_it_stopped(recipes, trained_models, prepared, tmp_path,
                                                             monkeypatch):
    """The second job is killed mid-run: the same command again skips the judged first job and sends the second
    back to its own run folder (its trainer resumes from its backup there); once finished, a rerun starts afresh."""
    (recipes / "age.toml").write_text(f'family = "age"\nimage_size = {TEST_IMAGE_SIZE}\nepochs = 1\n')
    results = tmp_path / "results"
    calls = []

    def trainer(command, log_path, on_line):  # stands for the trainer: the test's saved model as its run
        name = Path(command[1]).stem.removeprefix("train_")
        calls.append((name, Path(command[command.index("--run-dir") + 1])))
        if name == "age" and len(calls) == 2:
            raise KeyboardInterrupt
        shutil.copytree(trained_models[name], Path(command[command.index("--out") + 1]))
        log_path.write_text("trained\n")
        return 0

    monkeypatch.setattr(train_all, "run_trainer", trainer)
    killed = invoke(recipes, results, prepared, "--no-refresh")
    assert killed.exit_code == 130  # Ctrl-C
    assert (results / "models" / "gender" / "model.keras").exists()  # judged and promoted before the kill
    session = json.loads((results / "runs" / train_all.SESSION_FILE).read_text())
    assert session["jobs"]["gender"]["outcome"] == "promoted" and session["jobs"]["age"]["outcome"] is None

    resumed = invoke(recipes, results, prepared, "--no-refresh")
    assert resumed.exit_code == 0, resumed.output
    assert "Continuing the train_all" in said(resumed) and "not run again" in said(resumed)
    assert [name for name, _ in calls] == ["gender", "age", "age"] and calls[2][1] == calls[1][1]
    assert json.loads((results / "runs" / train_all.SESSION_FILE).read_text())["finished"]

    again = invoke(recipes, results, prepared, "--no-refresh")  # a finished train_all is not continued
    assert again.exit_code == 0 and "Continuing" not in said(again)
    assert [name for name, _ in calls[3:]] == ["gender", "age"] and calls[4][1] != calls[1][1]


def fake_gender_trainer(trained_models, prepared_small, tmp_path, monkeypatch) -> tuple[list[Path], Path]:
    """train_all's trainer replaced by a copy of the trained gender fixture, recording the --data-dir each run got;
    and a copy of the small prepared data (other data is prepared beside it, not beside the shared fixture)."""
    folders = []

    def trainer(command, log_path, on_line):
        folders.append(Path(command[command.index("--data-dir") + 1]))
        shutil.copytree(trained_models["gender"], Path(command[command.index("--out") + 1]))
        return 0

    monkeypatch.setattr(train_all, "run_trainer", trainer)
    data = tmp_path / "data"
    shutil.copytree(prepared_small["data_dir"], data)
    return folders, data


def test_a_recipe_on_detected_crops_trains_and_is_judged_on_them(recipes, trained_models, prepared_small, tmp_path,
                                                                   monkeypatch):
    """A recipe whose [data] asks for UTKFace's detected crops: train_all prepares them beside the data folder
    (once) and hands that folder to the trainer and to the validation judgement."""
    from agegender.data.manifest import data_state

    (recipes / "gender.toml").write_text(f'family = "gender"\nimage_size = {TEST_IMAGE_SIZE}\nepochs = 1\n\n'
                                         '[data]\nutkface_crops = "detected"\n')
    folders, data = fake_gender_trainer(trained_models, prepared_small, tmp_path, monkeypatch)
    result = invoke(recipes, tmp_path / "results", {"data_dir": data}, "--no-refresh")
    assert result.exit_code == 0, result.output
    [folder] = folders
    assert folder == tmp_path / "data-detected"
    assert data_state(folder)["crops"] == "detected"
    assert data_state(folder)["manifest_sha256"] == data_state(data)["manifest_sha256"]
    assert "Promoted" in said(result)
    prepared_at = (folder / "prepare.json").stat().st_mtime_ns
    again = invoke(recipes, tmp_path / "results", {"data_dir": data}, "--no-refresh")
    assert again.exit_code == 0, again.output
    assert folders == [folder, folder] and (folder / "prepare.json").stat().st_mtime_ns == prepared_at  # reused


def test_a_recipe_with_an_extra_dataset_trains_on_a_folder_prepared_with_it(recipes, trained_models,
                                                                          prepared_small, labelled_dataset, tmp_path,
                                                                          monkeypatch):
    """[data] extra_sources: train_all prepares UTKFace plus that dataset beside the data folder
    (<data>-original+<name>, same split settings), hands it to the trainer, and reuses it on the next run; a
    recipe naming a dataset that is not there stops before anything is trained."""
    from agegender.data.manifest import data_state, prepared_extras

    recipe = recipes / "gender.toml"
    recipe.write_text(f'family = "gender"\nimage_size = {TEST_IMAGE_SIZE}\nepochs = 1\n\n'
                      f'[data]\nextra_sources = ["{labelled_dataset}"]\n')
    folders, data = fake_gender_trainer(trained_models, prepared_small, tmp_path, monkeypatch)
    result = invoke(recipes, tmp_path / "results", {"data_dir": data}, "--no-refresh")
    assert result.exit_code == 0, result.output
    [folder] = folders
    assert folder == tmp_path / "data-original+faces-ds"
    assert prepared_extras(folder) == ["faces-ds"] and data_state(folder)["crops"] == "original"
    assert data_state(folder)["limit"] == data_state(data)["limit"] == SMALL_LIMIT
    again = invoke(recipes, tmp_path / "results", {"data_dir": data}, "--no-refresh")
    assert again.exit_code == 0, again.output
    assert folders == [folder, folder]

    recipe.write_text(recipe.read_text().replace(str(labelled_dataset), str(tmp_path / "gone" / "celeba.tar.gz")))
    missing = invoke(recipes, tmp_path / "results", {"data_dir": data}, "--no-refresh")
    assert missing.exit_code == 1 and "which is not here" in said(missing) and "[data] extra_sources" in said(missing)
    assert folders == [folder, folder]


def test_promotion_weighs_every_dataset_beside_utkface():
    from agegender.models.registry import GOALS
    from tasks.train_all import promotion

    def metrics(utk_accuracy, utk_mae, everyday_accuracy, everyday_group):
        return {"gender": {"accuracy": utk_accuracy}, "age": {"mae": utk_mae},
                "datasets": {"utkface": {}, "fairface-18k": {"gender": {"accuracy": everyday_accuracy},
                                                             "age_range": {"age_group_accuracy": everyday_group}}}}

    goal, current = GOALS["multitask"], metrics(0.92, 5.20, 0.85, 0.50)
    # better on UTKFace and on the everyday photos: promoted
    assert promotion(goal, metrics(0.93, 5.10, 0.86, 0.51), current)[0]
    # better on UTKFace, worse on the everyday photos: kept, and the reason names what got worse
    promoted, reason = promotion(goal, metrics(0.93, 5.10, 0.84, 0.51), current)
    assert not promoted and "fairface-18k gender_accuracy" in reason
    # better on every everyday figure at a UTKFace cost within the tolerance (0.10 y, 0.3 points): promoted
    promoted, reason = promotion(goal, metrics(0.918, 5.29, 0.90, 0.55), current)
    assert promoted and "within the tolerance" in reason
    # ... but not beyond it
    assert not promotion(goal, metrics(0.92, 5.35, 0.90, 0.55), current)[0]
    assert not promotion(goal, metrics(0.915, 5.20, 0.90, 0.55), current)[0]
