"""The three CNN trainers: one epoch on real faces, loadable files, same predictions after reload."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agegender.data.manifest import load_split
from agegender.inference.predictor import Predictor
from agegender.models.folders import load_model, staging_dir
from agegender.models.registry import FAMILIES
from agegender.training.trainers import TRAINERS
from tests.conftest import TEST_IMAGE_SIZE

runner = CliRunner()
EXPECTED_OUTPUTS = {"gender": ["gender"], "age": ["age"], "multitask": ["age", "gender"]}


@pytest.mark.parametrize("task", ["gender", "age", "multitask"])
def test_trainer_writes_a_complete_model_folder(trained_models, task):
    folder = trained_models[task]
    for name in ("model.keras", "metadata.json", "metrics.json", "history.csv", "learning_curves.png"):
        assert (folder / name).stat().st_size > 0, name
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["task"] == task
    assert metadata["outputs"] == EXPECTED_OUTPUTS[task]
    assert metadata["image_size"] == TEST_IMAGE_SIZE
    assert metadata["pixel_scaling"] == "divide_by_255"
    assert metadata["age_scale"] == 120.0
    assert metadata["labels"] == {"0": "male", "1": "female"}
    assert len(metadata["manifest_sha256"]) == 64
    assert len(metadata["utkface_split_sha256"]) == 64
    metrics = json.loads((folder / "metrics.json").read_text())
    if "gender" in metadata["outputs"]:
        assert 0.0 <= metrics["gender"]["accuracy"] <= 1.0
        assert set(metrics["gender"]) >= {"precision", "recall", "f1", "roc_auc", "confusion_matrix"}
        assert (folder / "confusion_matrix.png").exists()
    if "age" in metadata["outputs"]:
        assert 0 < metrics["age"]["mae"] <= metrics["age"]["rmse"]  # large errors weigh more in the RMSE
        assert 0 <= metrics["age"]["cs5"] <= 1
        assert (folder / "age_error.png").exists()
    assert len(pd.read_csv(folder / "history.csv")) == 2


@pytest.mark.parametrize("task", ["gender", "age", "multitask"])
def test_reloaded_model_predicts_what_the_trained_model_predicted(trained_runs, prepared, task):
    """The saved file against the model as training left it in memory (not two loads of one file)."""
    from agegender.training.loop import evaluate

    images, rows = load_split("test", TEST_IMAGE_SIZE, prepared["data_dir"])
    run = trained_runs[task]
    _, metadata = load_model(run.out_dir)
    before = Predictor(run.model, metadata).predict_arrays(images)
    reloaded = Predictor.load(run.out_dir, backend="keras").predict_arrays(images)
    interval = {"age_low", "age_high"}  # a trained age model is calibrated, so every age carries its interval
    gender = {"p_female", "p_female_model", "gender_certain"}  # calibrated too, with its certainty
    assert set(reloaded) == set(before) == {"age": {"age", *interval}, "gender": gender,
                                            "multitask": {"age", *interval, *gender}}[task]
    for key in set(before) - interval:
        np.testing.assert_allclose(reloaded[key], before[key], rtol=1e-5, atol=1e-5)
        assert np.isfinite(reloaded[key]).all()
    if "p_female" in reloaded:
        assert ((reloaded["p_female"] >= 0) & (reloaded["p_female"] <= 1)).all()
    if "age" in reloaded:
        low, high = reloaded["age_low"], reloaded["age_high"]
        np.testing.assert_array_equal(low, before["age_low"])  # the same whole years from the saved file
        np.testing.assert_array_equal(high, before["age_high"])
        assert (low == np.rint(low)).all() and (high == np.rint(high)).all() and (low >= 0).all()
        said = np.rint(reloaded["age"])  # the age as shown, "about 31 (26-37)": always inside its interval
        assert ((low <= said) & (said <= high)).all() and (high > low).any()
    # metrics.json was computed before saving, on the whole test split: the reloaded model gives it again
    saved = json.loads((run.out_dir / "metrics.json").read_text())
    again = evaluate(reloaded, rows)
    assert set(again) == set(saved) - {"split", "validation"}
    for head, values in again.items():
        assert values["n"] == saved[head]["n"] == len(rows)
        key = "accuracy" if head == "gender" else "mae"
        assert values[key] == pytest.approx(saved[head][key], abs=1e-4)


@pytest.mark.parametrize("task", ["gender", "age", "multitask"])
def test_the_trainer_calibrates_the_age_interval_on_validation(trained_models, prepared, task):
    from agegender.inference.intervals import summarise

    metadata = json.loads((trained_models[task] / "metadata.json").read_text())
    if task == "gender":
        assert "age_interval" not in metadata
        return
    record = metadata["age_interval"]
    assert record["split"] == "val" and record["target_coverage"] == 0.8
    images, rows = load_split("val", TEST_IMAGE_SIZE, prepared["data_dir"])
    predicted = Predictor.load(trained_models[task], backend="keras").predict_arrays(images)
    found = summarise(predicted["age_low"], predicted["age_high"], rows["age"].to_numpy())
    assert record["validation"]["faces"] == found["faces"] == len(rows)
    assert found["coverage"] == pytest.approx(record["validation"]["coverage"]) and found["coverage"] >= 0.8


@pytest.mark.parametrize("task", ["gender", "age", "multitask"])
def test_the_default_cosine_schedule_anneals_the_learning_rate(trained_models, task):
    history = pd.read_csv(trained_models[task] / "history.csv")
    base = json.loads((trained_models[task] / "metadata.json").read_text())["params"]["learning_rate"]
    first, second = history["learning_rate"]
    assert first == pytest.approx(base, rel=1e-5)
    assert 0.4 * base < second < 0.6 * base  # the last of two epochs about halfway down, not at the floor


def test_the_cosine_is_slow_at_both_ends_and_never_reaches_its_floor():
    from agegender.training.loop import cosine_rate

    rates = np.array([cosine_rate(epoch, 10, 1.0) for epoch in range(10)])
    drops = -np.diff(rates)
    assert rates[0] == 1.0 and (drops > 0).all() and rates[-1] > 0.01
    assert drops[0] < drops[4] > drops[-1]  # a cosine, not a straight line


@pytest.mark.slow
def test_cli_trains_with_a_params_file_and_flags(prepared, tmp_path):
    from tasks import train_age

    params = tmp_path / "age.json"
    params.write_text(json.dumps({"best_params": {"learning_rate": 0.003, "dropout": 0.1, "batch_size": 16},
                                  "best_value": 1.0}))
    out = tmp_path / "age-dex"
    result = runner.invoke(train_age.app, ["--epochs", "1", "--image-size", "48", "--limit", "64",
                                           "--params", str(params), "--batch-size", "32", "--age-head", "dex",
                                           "--lr-schedule", "plateau", "--augment", "0.3", "--noise-augment", "0.05",
                                           "--data-dir", str(prepared["data_dir"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["params"]["learning_rate"] == 0.003 and metadata["params"]["dropout"] == 0.1
    assert metadata["params"]["batch_size"] == 32  # the flag wins over the file
    assert metadata["age_head"] == "dex" and metadata["image_size"] == 48
    assert metadata["params"]["lr_schedule"] == "plateau"
    assert metadata["params"]["augment"] == 0.3 and metadata["params"]["noise_augment"] == 0.05
    assert metadata["train_images"] == 64
    age = Predictor.load(out).predict_arrays(load_split("test", 48, prepared["data_dir"])[0][:8])["age"]
    assert ((age >= 0) & (age <= 116.01)).all()  # DEX reads out an expected age in 0..116


def test_the_seed_flag_reaches_the_runs_metadata(prepared, tmp_path):
    from tasks import train_gender

    out = tmp_path / "gender"
    result = runner.invoke(train_gender.app, ["--seed", "7", "--epochs", "1", "--image-size", "32", "--limit", "32",
                                              "--batch-size", "16", "--no-tensorboard", "--no-backup",
                                              "--data-dir", str(prepared["data_dir"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metadata.json").read_text())["seed"] == 7


def test_bad_flags_and_files_are_one_sentence(prepared, tmp_path):
    from tasks import train_age, train_gender, train_multitask

    result = runner.invoke(train_multitask.app, ["--age-head", "cubic", "--data-dir", str(prepared["data_dir"])])
    assert result.exit_code != 0 and "--age-head" in result.output
    result = runner.invoke(train_age.app, ["--age-weight-power", "strong", "--data-dir", str(prepared["data_dir"])])
    assert result.exit_code == 2 and "--age-weight-power" in result.output
    result = runner.invoke(train_age.app, ["--init-from", str(tmp_path / "nothing"), "--image-size", "64", "--data-dir",
                                           str(prepared["data_dir"]), "--out", str(tmp_path / "age")])
    assert result.exit_code == 1 and "does not exist" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "age").exists()
    result = runner.invoke(train_gender.app, ["--lr-schedule", "linear", "--data-dir", str(prepared["data_dir"])])
    assert result.exit_code != 0 and "--lr-schedule" in result.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"best_params": {"learning_rate": 0.01, "unknown_knob": 3}}))
    result = runner.invoke(train_gender.app, ["--params", str(bad), "--data-dir", str(prepared["data_dir"])])
    assert result.exit_code == 1 and "unknown_knob" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    result = runner.invoke(train_gender.app, ["--data-dir", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "prepare_data" in " ".join(result.output.split())


def test_an_interrupted_save_leaves_the_previous_model_intact(trained_models, tmp_path):
    import shutil

    folder = tmp_path / "gender"
    shutil.copytree(trained_models["gender"], folder)
    before = (folder / "model.keras").read_bytes()
    with pytest.raises(KeyboardInterrupt), staging_dir(folder) as staging:
        (staging / "model.keras").write_bytes(b"half a model")
        raise KeyboardInterrupt
    assert (folder / "model.keras").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["gender"]


def test_a_monitor_keras_never_logs_fails_before_training(prepared):
    from agegender.cli import UserError

    with pytest.raises(UserError, match="val_accuracy"):
        TRAINERS["gender"]({}, 32, 1, prepared["data_dir"], 32, None, monitor="val_accuracy", verbose=0)
    # multi-output names carry the output's prefix under Keras 3
    with pytest.raises(UserError, match="val_gender_binary_accuracy"):
        TRAINERS["multitask"]({}, 32, 1, prepared["data_dir"], 32, None, monitor="val_binary_accuracy",
                                    verbose=0)


@pytest.mark.slow
def test_init_from_starts_where_a_saved_model_ended(trained_models, prepared, tmp_path):
    from agegender.training.loop import warm_start
    from tasks import train_multitask

    images, _ = load_split("test", TEST_IMAGE_SIZE, prepared["data_dir"])
    fresh = FAMILIES["multitask"].build(TEST_IMAGE_SIZE, FAMILIES["multitask"].defaults)
    record = warm_start(fresh, trained_models["multitask"], "multitask", TEST_IMAGE_SIZE)
    saved = Predictor.load(trained_models["multitask"], backend="keras").predict_arrays(images[:8])
    started = Predictor(fresh, {"outputs": ["age", "gender"]}).predict_arrays(images[:8])
    np.testing.assert_allclose(started["age"], saved["age"], atol=1e-4)
    assert record["epochs_before"] == 2 and record["seconds_before"] > 0

    out = tmp_path / "restart"
    result = runner.invoke(train_multitask.app, ["--init-from", str(trained_models["multitask"]), "--epochs", "1",
                                                 "--image-size", str(TEST_IMAGE_SIZE), "--limit", "64",
                                                 "--batch-size", "16", "--data-dir", str(prepared["data_dir"]),
                                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metadata.json").read_text())["init_from"]["epochs_before"] == 2

    result = runner.invoke(train_multitask.app, ["--init-from", str(trained_models["gender"]),
                                                 "--image-size", str(TEST_IMAGE_SIZE),
                                                 "--data-dir", str(prepared["data_dir"]), "--out", str(out)])
    assert result.exit_code == 1 and "needs a multitask model" in " ".join(result.output.split())
    assert json.loads((out / "metadata.json").read_text())["init_from"]["epochs_before"] == 2  # kept


def test_weight_averaging_schedule_mean_and_batchnorm_statistics(prepared):
    import keras

    from agegender.training.loop import WeightAverager, swa_rate_for, update_batchnorm

    # cosine down to the averaging rate, then held through the averaged epochs
    assert [swa_rate_for(e, 4, 1e-3, 2, 5e-4) for e in range(4)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 5e-4])

    class Snapshots(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.weights = []

        def on_epoch_end(self, epoch, logs=None):
            self.weights.append(self.model.get_weights())

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    averager, snapshots = WeightAverager(epochs=3, swa_epochs=2), Snapshots()
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    model.fit(x, x[:, :1], epochs=3, batch_size=8, verbose=0, callbacks=[snapshots, averager])
    assert averager.averaged_epochs == [2, 3]
    for averaged, second, third in zip(averager.average(), snapshots.weights[1], snapshots.weights[2], strict=True):
        np.testing.assert_allclose(averaged, (second + third) / 2, rtol=1e-6)

    # re-estimated BatchNorm statistics are the mean over batches of what the layer sees, dropout switched off
    import tensorflow as tf

    images = load_split("train", TEST_IMAGE_SIZE, prepared["data_dir"])[0][:64].astype(np.float32) / 255.0
    inputs = keras.Input((TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3))
    conv = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    dropped = keras.layers.SpatialDropout2D(0.5, name="dropout")(conv)
    net = keras.Model(inputs, keras.layers.BatchNormalization(momentum=0.9, name="bn")(dropped))
    update_batchnorm(net, tf.data.Dataset.from_tensor_slices((images, np.zeros(64))).batch(16))
    features = keras.Model(inputs, conv).predict(images, verbose=0).reshape(4, 16, -1, 4)  # 4 batches
    bn = net.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), features.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), features.var(axis=(1, 2)).mean(axis=0), rtol=1e-3)
    assert bn.momentum == 0.9 and net.get_layer("dropout").rate == 0.5  # restored


@pytest.mark.slow
def test_cli_swa_averages_the_last_epochs_and_records_the_choice(prepared, tmp_path):
    from tasks import train_gender

    out = tmp_path / "gender-swa"
    result = runner.invoke(train_gender.app, ["--epochs", "3", "--swa", "2", "--learning-rate", "0.002",
                                              "--image-size", str(TEST_IMAGE_SIZE), "--limit", "64",
                                              "--batch-size", "16", "--data-dir", str(prepared["data_dir"]),
                                              "--out", str(out)])
    assert result.exit_code == 0, result.output
    metadata = json.loads((out / "metadata.json").read_text())
    swa = metadata["swa"]
    assert metadata["params"]["swa_epochs"] == 2 and swa["epochs"] == [2, 3]
    assert swa["learning_rate"] == pytest.approx(0.001)  # half the learning rate by default
    assert swa["used"] == (swa["averaged"] < swa["best_epoch"])
    history = pd.read_csv(out / "history.csv")
    assert history["learning_rate"].tolist() == pytest.approx([0.002, 0.001, 0.001], rel=1e-5)
    assert "weight average of epochs 2-3" in " ".join(result.output.split()).lower()
    p_female = Predictor.load(out).predict_arrays(load_split("test", TEST_IMAGE_SIZE, prepared["data_dir"])[0][:8])
    assert ((p_female["p_female"] >= 0) & (p_female["p_female"] <= 1)).all()


def test_a_model_over_the_size_bound_is_stored_as_deflated_float16(trained_runs, tmp_path, monkeypatch):
    """A model folder over FLOAT16_ABOVE_BYTES keeps float16 weights in a deflated archive, and loads back into
    the float32 model it was, within float16's rounding."""
    import zipfile

    from agegender.models import folders

    run = trained_runs["multitask"]
    monkeypatch.setattr(folders, "FLOAT16_ABOVE_BYTES", 0)
    folders.save_model(run.model, tmp_path / "small", {"task": "multitask"})
    assert json.loads((tmp_path / "small" / "metadata.json").read_text())["stored_weights"] == "float16"
    with zipfile.ZipFile(tmp_path / "small" / "model.keras") as archive:
        weights = archive.getinfo("model.weights.h5")
    assert weights.compress_type == zipfile.ZIP_DEFLATED and weights.compress_size < weights.file_size
    images = np.random.default_rng(0).uniform(0, 1, (4, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3)).astype(np.float32)
    before = run.model.predict(images, verbose=0)
    after = load_model(tmp_path / "small")[0].predict(images, verbose=0)
    for output in before:
        np.testing.assert_allclose(after[output], before[output], rtol=2e-2, atol=2e-3)
