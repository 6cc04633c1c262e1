"""tasks/tune.py: Optuna studies over the trainers' own code, on the prepared subset (64 px, 1 epoch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from agegender.models.registry import FAMILIES
from tasks import finetune_transfer, train_gender, tune

REPO = Path(__file__).resolve().parent.parent
SIZE = 64
runner = CliRunner()


def budget(data_dir: Path, out_dir: Path) -> list[str]:
    return ["--epochs", "1", "--limit", "100", "--image-size", str(SIZE), "--data-dir", str(data_dir),
            "--out-dir", str(out_dir)]


def run_tune(*args: str):
    return runner.invoke(tune.app, list(args))


def storage_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'optuna.db'}"


@pytest.fixture(scope="module")
def two_trials(prepared, tmp_path_factory) -> tuple[Path, str]:
    """A two-trial gender study run through the CLI: (its folder, what it printed)."""
    folder = tmp_path_factory.mktemp("tuning")
    result = run_tune("--model", "gender", "--trials", "2", *budget(prepared["data_dir"], folder))
    assert result.exit_code == 0, result.output
    return folder, result.output


@pytest.mark.slow
def test_two_trials_write_the_best_parameter_file(two_trials):
    folder, output = two_trials
    summary = json.loads((folder / "gender.json").read_text())
    study = optuna.load_study(study_name="gender", storage=storage_url(folder))
    values = [t.value for t in study.trials]
    assert summary["n_trials"] == 2 and summary["counts"]["complete"] == 2
    assert summary["direction"] == "maximize" and summary["metric"] == "val gender accuracy"
    assert summary["best_value"] == max(values) and 0.0 <= summary["best_value"] <= 1.0
    assert set(summary["best_params"]) <= set(FAMILIES["gender"].defaults)
    assert summary["best_params"] == study.best_params
    assert summary["storage"] == storage_url(folder)
    # the first trial is the trainer's defaults: the baseline under the same budget
    assert study.trials[0].user_attrs["defaults"] is True
    assert study.trials[0].params == {k: FAMILIES["gender"].defaults[k] for k in study.trials[0].params}
    assert summary["defaults_value"] == values[0]
    # accuracy is maximised: the best trial is never below the defaults, and beats them only if it is another
    assert summary["improvement_over_defaults"] >= 0
    assert (summary["improvement_over_defaults"] > 0) == (summary["best_value"] > values[0])
    assert (folder / "gender_history.png").stat().st_size > 1000
    assert "best trials" in output


@pytest.mark.slow
def test_the_best_parameter_file_is_accepted_by_a_trainer(two_trials, prepared, tmp_path):
    folder, _ = two_trials
    best = json.loads((folder / "gender.json").read_text())["best_params"]
    result = runner.invoke(train_gender.app, ["--params", str(folder / "gender.json"), "--epochs", "1",
                                              "--image-size", str(SIZE), "--limit", "100", "--data-dir",
                                              str(prepared["data_dir"]), "--out", str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    metadata = json.loads((tmp_path / "model" / "metadata.json").read_text())
    assert {k: metadata["params"][k] for k in best} == best


@pytest.mark.slow
def test_a_second_call_resumes_the_study(two_trials, prepared):
    folder, _ = two_trials
    again = run_tune("--model", "gender", "--trials", "1", *budget(prepared["data_dir"], folder))
    assert again.exit_code == 0, again.output
    resumed = json.loads((folder / "gender.json").read_text())
    trials = optuna.load_study(study_name="gender", storage=storage_url(folder)).trials
    assert resumed["n_trials"] == 3 and len(trials) == 3
    assert trials[2].params not in [t.params for t in trials[:2]]  # a new point, not a replay of the seed
    assert sum(bool(t.user_attrs.get("defaults")) for t in trials) == 1

    changed = run_tune("--model", "gender", "--trials", "1", "--out-dir", str(folder), "--epochs", "2",
                       "--limit", "100", "--image-size", str(SIZE), "--data-dir", str(prepared["data_dir"]))
    assert changed.exit_code == 1
    assert "was run with epochs=1" in " ".join(changed.output.split())


@pytest.mark.slow
def test_a_pruned_trial_is_recorded_as_pruned(prepared, tmp_path):
    # accuracy never reaches 2, so this pruner stops every trial after its first epoch
    study = tune.tune("gender", trials=1, epochs=2, limit=100, image_size=SIZE, data_dir=prepared["data_dir"],
                      storage=storage_url(tmp_path), pruner=optuna.pruners.ThresholdPruner(lower=2.0),
                      verbose=0)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]  # reported epoch 1, then stopped before epoch 2
    assert 0.0 <= trial.intermediate_values[0] <= 1.0
    with pytest.raises(tune.UserError, match="No trial of study 'gender' has completed"):
        tune.write_results(study, "gender", tmp_path)


@pytest.mark.parametrize(("model", "monitor"), [("gender", "val_accuracy"), ("multitask", "val_mae")])
def test_a_wrong_monitor_fails_with_one_sentence(prepared, tmp_path, model, monitor):
    result = run_tune("--model", model, "--monitor", monitor, *budget(prepared["data_dir"], tmp_path))
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert f"Metric '{monitor}' is not logged by the" in text and "Traceback" not in text
    assert not (tmp_path / "optuna.db").exists()  # checked before any study is opened


def test_bad_inputs_fail_with_one_sentence(prepared, tmp_path):
    missing = run_tune("--model", "gender", *budget(tmp_path / "nowhere", tmp_path))
    assert missing.exit_code == 1 and "No prepared data" in missing.output
    unknown = run_tune("--model", "vgg", *budget(prepared["data_dir"], tmp_path))
    assert unknown.exit_code == 1 and "Unknown model 'vgg'" in unknown.output
    url = run_tune("--model", "age", "--storage", "nonsense://", *budget(prepared["data_dir"], tmp_path))
    assert url.exit_code == 1 and "is not a storage URL" in " ".join(url.output.split())


@pytest.mark.slow
def test_two_worker_processes_share_one_sqlite_study(prepared, tmp_path):
    url = storage_url(tmp_path)
    command = [sys.executable, str(REPO / "tasks/tune.py"), "--model", "age", "--study-name", "shared",
               "--storage", url, "--trials", "1", "--no-defaults-first",
               *budget(prepared["data_dir"], tmp_path)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    workers = [subprocess.Popen([*command, "--seed", str(seed)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    try:
        outputs = [worker.communicate(timeout=1800)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [worker.returncode for worker in workers] == [0, 0], [output[-2000:] for output in outputs]
    trials = optuna.load_study(study_name="shared", storage=url).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # one trial from each process
    assert trials[0].params != trials[1].params
    summary = json.loads((tmp_path / "shared.json").read_text())
    assert summary["n_trials"] == 2 and summary["metric"] == "val age MAE (years)"
    assert summary["best_value"] == min(t.value for t in trials) > 0


def test_a_worker_that_loses_the_race_to_create_the_tables_retries(tmp_path, monkeypatch):
    """Two workers on a new SQLite file: the slower one's schema insert fails as a duplicate (CI saw this
    once); opening the storage again then finds the tables the other worker made."""
    import sqlalchemy

    real_storage = optuna.storages.RDBStorage
    attempts = []

    def racing_storage(url, **kwargs):
        attempts.append(url)
        if len(attempts) == 1:
            real_storage(url, **kwargs)  # the other worker creates the schema first
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE failed"))
        return real_storage(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing_storage)
    monkeypatch.setattr(tune.time, "sleep", lambda seconds: None)
    storage = tune.open_storage(storage_url(tmp_path))
    assert len(attempts) == 2
    assert storage.get_all_studies() == []


@pytest.mark.slow
def test_transfer_trials_run_finetune_and_its_params_file_is_accepted(prepared, tmp_path):
    """--model transfer tunes finetune_transfer.finetune() (both phases, pruning callback, no test split).
    One trial, drawn from the search space rather than the defaults (which the finetune tests already train):
    each trial traces MobileNetV2's train step twice, the slowest thing in the suite."""
    result = run_tune("--model", "transfer", "--backbone", "mobilenetv2", "--weights", "none", "--trials", "1",
                      "--no-defaults-first",
                      "--epochs", "2", "--limit", "64", "--image-size", "32", "--data-dir",
                      str(prepared["data_dir"]), "--out-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "transfer-mobilenetv2.json").read_text())
    trials = optuna.load_study(study_name="transfer-mobilenetv2", storage=storage_url(tmp_path)).trials
    assert summary["counts"]["complete"] == 1 and len(trials) == 1
    assert list(trials[0].intermediate_values) == [0, 1]  # one report per epoch, both phases
    assert summary["best_value"] == trials[0].value > 0
    assert set(summary["best_params"]) <= set(FAMILIES["transfer"].defaults)

    model = runner.invoke(finetune_transfer.app, [
        "--backbone", "mobilenetv2", "--weights", "none", "--params", str(tmp_path / "transfer-mobilenetv2.json"),
        "--image-size", "32", "--limit", "64", "--epochs", "1", "--fine-tune-epochs", "0", "--data-dir",
        str(prepared["data_dir"]), "--out", str(tmp_path / "models"), "--reference-dir", str(tmp_path / "reference"),
        "--comparison-dir", str(tmp_path / "cmp")])
    assert model.exit_code == 0, model.output
    metadata = json.loads((tmp_path / "reference/transfer-mobilenetv2-scratch/metadata.json").read_text())
    assert {k: metadata["params"][k] for k in summary["best_params"]} == summary["best_params"]
