"""The transfer model: [0, 1] RGB -> the backbone's own input scaling (a layer inside the saved model) ->
backbone -> global average pooling -> age and gender heads; and which of its layers train in each of the two
phases (agegender.training.finetune).

Phase 1 freezes the backbone while the new head learns; phase 2 trains the top `unfreeze` share of its layers at
a lower learning rate with its BatchNormalization layers kept frozen. With weights "none" there is nothing to
protect, so the whole backbone (BatchNorm included) trains in both phases."""

from __future__ import annotations

from typing import Any

from agegender.data.labels import TASK_OUTPUTS
from agegender.models.backbones import Backbone, build_backbone
from agegender.models.cnn import CNN_METRICS, age_head, compile_outputs, gender_head, image_input
from agegender.models.layers import BackbonePreprocess, ZoomOut


def build_model(backbone: Backbone, image_size: int, params: dict[str, Any], task: str = "multitask",
                weights: str = "pretrained"):
    """[0, 1] RGB -> the backbone's own scaling -> backbone -> global average pooling -> age/gender heads."""
    import keras
    from keras import layers


    base = build_backbone(backbone, image_size, weights)
    inputs = image_input(image_size)
    x = ZoomOut(backbone.margin, name="zoom_out")(inputs) if backbone.margin else inputs
    x = BackbonePreprocess(backbone.preprocess, name="backbone_preprocess")(x)
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    features = layers.Dropout(float(params["dropout"]), name="features_dropout")(x)
    units, dropout = int(params["head_units"]), float(params["dropout"])
    heads = {"age": lambda: age_head(features, dropout, units, kind=params["age_head"]),
             "gender": lambda: gender_head(features, dropout, units)}
    outputs = {name: heads[name]() for name in TASK_OUTPUTS[task]}
    model = keras.Model(inputs, outputs, name=f"transfer_{backbone.name.replace('-', '_')}")
    set_phase(model, base, 1, params, task, pretrained=weights != "none")
    return model


def set_phase(model, base, phase: int, params: dict[str, Any], task: str, pretrained: bool) -> int:
    """Freeze / unfreeze the backbone for a phase and compile; returns how many backbone layers train."""
    import keras

    layers = [layer for layer in base.layers if layer.weights]
    if not pretrained:  # random initialisation: everything trains in both phases
        base.trainable = True
        training = len(layers)
    elif phase == 1:
        base.trainable = False
        training = 0
    else:
        base.trainable = True
        cut = int(round(len(layers) * (1.0 - float(params["unfreeze"]))))
        training = 0
        for index, layer in enumerate(layers):
            layer.trainable = index >= cut and not isinstance(layer, keras.layers.BatchNormalization)
            training += int(layer.trainable)
    compile_heads(model, float(params["learning_rate"] if phase == 1 else params["fine_tune_learning_rate"]),
                  params, task)
    return training


def compile_heads(model, rate: float, params: dict[str, Any], task: str) -> None:
    """AdamW at `rate`, MAE for age and binary cross-entropy for gender, weighted; per-output metrics."""
    compile_outputs(model, rate, params, {name: CNN_METRICS["multitask"][name] for name in TASK_OUTPUTS[task]})
