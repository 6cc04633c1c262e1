"""A DEX model's age distribution as a Keras graph: the softmax over whole years named `age_bins` that feeds the
`AgeExpectation` layer named `age`. The ensemble's builder (agegender.models.ensemble) mixes these
distributions; the predictor, Grad-CAM, the age interval's calibration and export read them.

Importing it loads neither TensorFlow nor Keras: the functions import them when called.
"""

from __future__ import annotations

DISTRIBUTION_LAYER = "age_bins"


def age_distribution_layer(model):
    """The softmax layer over ages (`age_bins`) whose expectation is the model's `age` output, or None."""
    from agegender.models.layers import AgeExpectation  # imported when called: it loads Keras

    try:
        bins, age = model.get_layer(DISTRIBUTION_LAYER), model.get_layer("age")
    except ValueError:
        return None
    return bins if isinstance(age, AgeExpectation) else None


def with_age_distribution(model):
    """The model with its age distribution as an extra output named `age_bins` (sharing its layers), or the
    model itself when it has no DEX head."""
    import keras

    layer = age_distribution_layer(model)
    if layer is None:
        return model
    outputs = model.output if isinstance(model.output, dict) else {"age": model.output}
    return keras.Model(model.input, {**outputs, DISTRIBUTION_LAYER: layer.output}, name=model.name)
