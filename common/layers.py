"""Custom Keras layers that saved models use; importing this module registers them for loading."""

from __future__ import annotations

import keras
from keras import ops


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
