"""Training past one machine, as a user runs it: a run killed mid-way continues from its last finished epoch when
the same command runs again; two replicas (the CPU split in two) train as one device does; mixed precision keeps
float32 outputs (slow tier)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agegender.inference.predictor import Predictor
from agegender.models.folders import run_path
from agegender.training import loop
from tasks import train_gender
from tests.conftest import REPO, TEST_IMAGE_SIZE

runner = CliRunner()


class Killed(Exception):
    """Stands for the machine going away."""


@pytest.mark.slow
def test_a_run_killed_after_its_first_epoch_resumes_at_the_second(prepared, tmp_path, monkeypatch):
    out = tmp_path / "resumed-gender"
    command = ["--epochs", "3", "--image-size", str(TEST_IMAGE_SIZE), "--limit", "64", "--batch-size", "16",
               "--lr-schedule", "plateau", "--no-tensorboard", "--data-dir", str(prepared["data_dir"]),
               "--out", str(out)]
    real_timer = loop.EpochTimer

    def timer_that_dies():  # the process dies as the second epoch starts, after the first one's backup
        timer = real_timer()
        begin = timer.on_epoch_begin

        def on_epoch_begin(epoch, logs=None):
            if epoch == 1:
                raise Killed
            begin(epoch, logs)

        timer.on_epoch_begin = on_epoch_begin
        return timer

    monkeypatch.setattr(loop, "EpochTimer", timer_that_dies)
    result = runner.invoke(train_gender.app, command)
    assert isinstance(result.exception, Killed), result.output
    assert not out.exists()
    runs = run_path(out.name).parent
    backups = list(runs.glob("*/backup"))
    assert len(backups) == 1
    with np.load(backups[0] / "state-1.npz") as stored:
        first_epoch = json.loads(stored["state"].tobytes().decode())["rows"][0]
    monkeypatch.setattr(loop, "EpochTimer", real_timer)

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


# Runs in a fresh interpreter: the CPU must be split into two logical devices before TensorFlow starts.
TWO_CPUS = """
import functools, json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from typer.testing import CliRunner
from tasks import train_gender
# per-replica BatchNorm statistics (over half the batch each) are the one way two replicas may differ from one
# device; synchronised BatchNorm removes it, so what is left to compare is the distribution itself
keras.layers.BatchNormalization = functools.partial(keras.layers.BatchNormalization, synchronized=True)
data, root, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
for name, flags in runs.items():
    result = CliRunner().invoke(train_gender.app, [*flags, "--data-dir", data, "--out", f"{root}/{name}"])
    assert result.exit_code == 0, result.output
"""


@pytest.mark.slow
def test_two_replicas_train_as_one_device_does(prepared, tmp_path):
    # one global batch per epoch and no augmentation: under a strategy tf.data's per-epoch draws (the reshuffle,
    # the augmentation seeds) may start one iteration later, a legitimate but different run; the order of the
    # images in the one batch does not change its gradient
    common = ["--epochs", "3", "--image-size", str(TEST_IMAGE_SIZE), "--limit", "16", "--batch-size", "16",
              "--dropout", "0", "--augment", "0", "--lr-schedule", "cosine", "--no-tensorboard", "--no-backup"]
    runs = {"one": [*common, "--strategy", "one"], "mirrored": [*common, "--strategy", "mirrored"],
            "mixed": [*common[:1], "1", *common[2:], "--strategy", "one", "--mixed-precision"]}
    done = subprocess.run([sys.executable, "-c", TWO_CPUS, str(prepared["data_dir"]), str(tmp_path), json.dumps(runs)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    setups = {name: json.loads((tmp_path / name / "metadata.json").read_text())["distribution"] for name in runs}
    assert setups["one"]["replicas"] == 1 and setups["mirrored"]["replicas"] == 2
    assert setups["mirrored"]["devices"] == ["/device:CPU:0", "/device:CPU:1"]
    one, two = (pd.read_csv(tmp_path / name / "history.csv") for name in ("one", "mirrored"))
    for column in ("loss", "val_loss", "val_binary_accuracy"):  # same global batch, same seed: the same run
        np.testing.assert_allclose(two[column], one[column], rtol=2e-3, atol=1e-4, err_msg=column)
    assert setups["mixed"]["dtype_policy"] == "mixed_float16"
    mixed = Predictor.load(tmp_path / "mixed", backend="keras")
    assert mixed.model.outputs[0].dtype == "float32"
    predicted = mixed.predict_arrays(np.zeros((2, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3), np.uint8))
    assert predicted["p_female"].dtype == np.float32 and np.isfinite(predicted["p_female"]).all()


def test_multi_worker_needs_tf_config_and_says_why_it_cannot_train(prepared, monkeypatch):
    command = ["--epochs", "1", "--limit", "16", "--image-size", str(TEST_IMAGE_SIZE), "--no-tensorboard",
               "--data-dir", str(prepared["data_dir"]), "--strategy", "multi-worker"]
    monkeypatch.delenv("TF_CONFIG", raising=False)
    result = runner.invoke(train_gender.app, command)
    assert result.exit_code == 1 and "TF_CONFIG" in " ".join(result.output.split())
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    result = runner.invoke(train_gender.app, command)
    assert result.exit_code == 1 and "keras-team/keras#20585" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    result = runner.invoke(train_gender.app, [*command[:-1], "ring"])
    assert result.exit_code == 2 and "--strategy" in " ".join(result.output.split())
