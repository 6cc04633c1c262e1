"""Training past one machine, as a user runs it: a run killed mid-way continues from its last finished epoch when
the same command runs again (slow tier)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agegender import training
from agegender.faces import Predictor
from agegender.modelio import run_path
from tasks import train_gender
from tests.conftest import TEST_IMAGE_SIZE

runner = CliRunner()


class Killed(Exception):
    """Stands for the machine going away."""


@pytest.mark.slow
def test_a_run_killed_after_its_first_epoch_resumes_at_the_second(prepared, tmp_path, monkeypatch):
    out = tmp_path / "resumed-gender"
    command = ["--epochs", "3", "--image-size", str(TEST_IMAGE_SIZE), "--limit", "64", "--batch-size", "16",
               "--lr-schedule", "plateau", "--no-tensorboard", "--data-dir", str(prepared["data_dir"]),
               "--out", str(out)]
    real_timer = training.EpochTimer

    def timer_that_dies():  # the process dies as the second epoch starts, after the first one's backup
        timer = real_timer()
        begin = timer.on_epoch_begin

        def on_epoch_begin(epoch, logs=None):
            if epoch == 1:
                raise Killed
            begin(epoch, logs)

        timer.on_epoch_begin = on_epoch_begin
        return timer

    monkeypatch.setattr(training, "EpochTimer", timer_that_dies)
    result = runner.invoke(train_gender.app, command)
    assert isinstance(result.exception, Killed), result.output
    assert not out.exists()
    runs = run_path(out.name).parent
    backups = list(runs.glob("*/backup"))
    assert len(backups) == 1
    with np.load(backups[0] / "state-1.npz") as stored:
        first_epoch = json.loads(stored["state"].tobytes().decode())["rows"][0]
    monkeypatch.setattr(training, "EpochTimer", real_timer)

    other = runner.invoke(train_gender.app, [*command[:-2], "--out", str(tmp_path / "other"), "--run-dir",
                                             str(backups[0].parent)])
    assert other.exit_code == 1 and "other settings" in " ".join(other.output.split())

    result = runner.invoke(train_gender.app, command)  # the same command again
    assert result.exit_code == 0, result.output
    assert "Resuming the interrupted run" in " ".join(result.output.split())
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["val_loss"].iloc[0] == pytest.approx(first_epoch["val_loss"])  # the first run's epoch, kept
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["resumed_at_epoch"] == 2 and metadata["epochs_run"] == 3
    assert not list(runs.glob("*/backup"))  # a finished run leaves no backup
    predicted = Predictor.load(out).predict_arrays(np.zeros((2, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3), np.uint8))
    assert predicted["p_female"].shape == (2,)
