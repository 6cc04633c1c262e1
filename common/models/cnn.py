"""The model factory: our CNN trunk, the age and gender heads, the three CNN models built from them and the
one compile step every model shares (the transfer models add a backbone: agegender.models.transfer)."""

from __future__ import annotations

import keras
from keras import layers

from agegender.data.labels import AGE_SCALE, TASK_OUTPUTS
from agegender.models.layers import AgeExpectation

AGE_HEADS = ("regression", "dex")
BN_MOMENTUM = 0.9  # moving statistics settle within a few dozen steps (Keras's 0.99 needs hundreds)


def conv_trunk(inputs, width: int = 32, dropout: float = 0.25, depth: int = 3):
    """Our own CNN: a 5x5 stride-2 stem and max-pool (128 -> 32 px), then `depth` stages of two 3x3 conv +
    BatchNorm + ReLU, max-pooled, widths doubling from 2 * width; global average pooling and dropout.

    Downsampling early keeps it ~3.5x faster to train on a CPU than stacking full-resolution convs."""
    x = layers.Conv2D(width, 5, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    x = layers.MaxPooling2D(name="stem_pool")(x)
    filters = width * 2
    for stage in range(depth):
        for conv in range(2):
            name = f"stage{stage + 1}_conv{conv + 1}"
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
            x = layers.ReLU(name=f"{name}_relu")(x)
        x = layers.MaxPooling2D(name=f"stage{stage + 1}_pool")(x)
        if stage >= 1:
            x = layers.SpatialDropout2D(dropout / 2, name=f"stage{stage + 1}_dropout")(x)
        filters = min(filters * 2, 512)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return layers.Dropout(dropout, name="trunk_dropout")(x)


def gender_head(features, dropout: float = 0.25, units: int = 128):
    x = layers.Dense(units, activation="relu", name="gender_dense")(features)
    x = layers.Dropout(dropout, name="gender_dropout")(x)
    return layers.Dense(1, activation="sigmoid", name="gender", dtype="float32")(x)


def age_head(features, dropout: float = 0.25, units: int = 128, kind: str = "regression"):
    """Age divided by AGE_SCALE: a linear output, or DEX's softmax over 0..116 read as its expected value."""
    x = layers.Dense(units, activation="relu", name="age_dense")(features)
    x = layers.Dropout(dropout, name="age_dropout")(x)
    if kind == "dex":
        probabilities = layers.Dense(117, activation="softmax", name="age_bins", dtype="float32")(x)
        return AgeExpectation(max_age=116, scale=AGE_SCALE, name="age")(probabilities)
    if kind != "regression":
        raise ValueError(f"unknown age head {kind!r}; expected one of {AGE_HEADS}")
    # start at UTKFace's mean age (about 33) instead of 0, so the first epoch is not spent walking there
    return layers.Dense(1, name="age", dtype="float32",
                        bias_initializer=keras.initializers.Constant(33.0 / AGE_SCALE))(x)


def image_input(image_size: int):
    return keras.Input((image_size, image_size, 3), name="image")


# per task, each output's metrics (Keras 3 logs them as e.g. "val_binary_accuracy" for a one-output model and
# "val_gender_binary_accuracy" for several, which tune's goals and early stopping watch)
CNN_METRICS = {"gender": {"gender": ["binary_accuracy", "auc"]}, "age": {"age": ["mae", "mse"]},
               "multitask": {"age": ["mae"], "gender": ["binary_accuracy"]}}


def labelled(y_true, y_pred=None):
    """1 where the target is a label, 0 where it is missing (NaN), and the targets with 0 in the gaps; targets
    given one rank below the predictions (N against N x 1, as fit on plain arrays passes them) get the
    predictions' last axis, as Keras's own losses do."""
    y_true = keras.ops.cast(y_true, "float32")
    if y_pred is not None and len(y_true.shape) == len(y_pred.shape) - 1:
        y_true = keras.ops.expand_dims(y_true, -1)
    known = keras.ops.logical_not(keras.ops.isnan(y_true))
    return keras.ops.cast(known, "float32"), keras.ops.where(known, y_true, keras.ops.zeros_like(y_true))


def years_outside(y_true, y_pred):
    """How far each prediction lies outside its target range: targets are [low, high] (an age range; its last
    axis has 2 entries) or one value (an exact age, low == high). Zero inside the range, growing linearly
    outside it; for an exact age, the absolute error."""
    low, high = y_true[..., :1], y_true[..., -1:]
    return keras.ops.relu(low - y_pred) + keras.ops.relu(y_pred - high)


@keras.saving.register_keras_serializable("agegender")
class MaskedLoss(keras.losses.Loss):
    """A per-image loss over the images that have the label: a missing one (NaN target) adds nothing, and the
    others' mean is taken over their own count (Keras divides the batch's sum by the batch size, so each value
    is scaled by batch size / labelled images). Without a missing label it is the plain loss. "mae" reads an
    age range target ([low, high]) as the distance to the range (years_outside)."""

    def __init__(self, kind: str = "mae", label_smoothing: float = 0.0, name: str | None = None, **kwargs):
        super().__init__(name=name or f"masked_{kind}", **kwargs)
        self.kind, self.label_smoothing = kind, float(label_smoothing)

    def call(self, y_true, y_pred):
        mask, y_true = labelled(y_true, y_pred)
        if self.kind == "mae":
            per_image = keras.ops.mean(years_outside(y_true, y_pred), axis=-1)
        else:
            per_image = keras.losses.binary_crossentropy(y_true, y_pred, label_smoothing=self.label_smoothing)
        mask = keras.ops.min(mask, axis=-1)
        count = keras.ops.cast(keras.ops.shape(mask)[0], "float32")
        return per_image * mask * count / keras.ops.maximum(keras.ops.sum(mask), 1.0)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "label_smoothing": self.label_smoothing}


def masked_metric(base):
    """A Keras metric class that skips images whose label is missing (NaN target), under the same name."""

    class Masked(base):
        def update_state(self, y_true, y_pred, sample_weight=None):
            mask, y_true = labelled(y_true, y_pred)
            weight = mask if sample_weight is None else mask * keras.ops.reshape(
                keras.ops.cast(sample_weight, "float32"), keras.ops.shape(mask))
            return super().update_state(y_true, y_pred, sample_weight=weight)

    Masked.__name__ = f"Masked{base.__name__}"
    return Masked


def range_metric(squared: bool):
    """A Keras metric class: the mean (squared) distance of the predictions to their age ranges over the images
    that have one (for exact ages, the mean absolute or squared error)."""

    def distance(y_true, y_pred):
        outside = years_outside(y_true, y_pred)
        return outside * outside if squared else outside

    class RangeError(keras.metrics.MeanMetricWrapper):
        def __init__(self, name: str = "mse" if squared else "mae", dtype=None):
            super().__init__(distance, name=name, dtype=dtype)

        def update_state(self, y_true, y_pred, sample_weight=None):
            mask, y_true = labelled(y_true, y_pred)
            mask = keras.ops.min(mask, axis=-1, keepdims=True)
            weight = mask if sample_weight is None else mask * keras.ops.reshape(
                keras.ops.cast(sample_weight, "float32"), keras.ops.shape(mask))
            return super().update_state(y_true, y_pred, sample_weight=weight)

        def get_config(self):
            return {"name": self.name, "dtype": self.dtype}

    RangeError.__name__ = "RangeSquaredError" if squared else "RangeAbsoluteError"
    return RangeError


MASKED_METRICS = {"mae": range_metric(squared=False),
                  "mse": range_metric(squared=True),
                  "binary_accuracy": masked_metric(keras.metrics.BinaryAccuracy),
                  "auc": masked_metric(keras.metrics.AUC)}


def compile_outputs(model, rate: float, params: dict, metrics: dict[str, list[str]]) -> None:
    """AdamW at `rate`; MAE on age / 120 and binary cross-entropy (label-smoothed by
    params["gender_label_smoothing"]) on gender, weighted by params["<output>_loss_weight"]. Losses and metrics
    leave out the images whose label is missing (a NaN target: a dataset without ages trains the gender head
    alone); the metrics keep Keras's names (age_mae, gender_binary_accuracy, ...)."""
    outputs = list(metrics)
    losses = {"age": lambda: MaskedLoss("mae"),
              "gender": lambda: MaskedLoss("binary_crossentropy",
                                           label_smoothing=float(params.get("gender_label_smoothing", 0.0)))}
    model.compile(
        optimizer=keras.optimizers.AdamW(rate, weight_decay=float(params["weight_decay"])),
        loss={name: losses[name]() for name in outputs},
        loss_weights={name: float(params.get(f"{name}_loss_weight", 1.0)) for name in outputs},
        metrics={name: [MASKED_METRICS[m](name=m) for m in found] for name, found in metrics.items()},
    )


def build_cnn(task: str, image_size: int, params: dict):
    """Our CNN trunk with the task's heads (age before gender), compiled for training."""
    inputs = image_input(image_size)
    dropout = float(params["dropout"])
    features = conv_trunk(inputs, width=int(params["width"]), dropout=dropout)
    heads = {"age": lambda: age_head(features, dropout, kind=params["age_head"]),
             "gender": lambda: gender_head(features, dropout)}
    outputs = {name: heads[name]() for name in TASK_OUTPUTS[task]}
    name = f"age_cnn_{params['age_head']}" if task == "age" else f"{task}_cnn"
    model = keras.Model(inputs, outputs, name=name)
    compile_outputs(model, float(params["learning_rate"]), params, CNN_METRICS[task])
    return model
