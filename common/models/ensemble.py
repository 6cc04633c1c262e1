"""The ensemble family's model builder: one Keras model holding several saved models (its members), each
applied to the image (and, with mirror-image averaging, to its mirror image), mixed per output with chosen
weights. Choosing the weights is the training layer's (agegender.training.ensemble); this module only builds
the graph, so the registry's `build` reaches no training code.

Importing it loads neither TensorFlow nor Keras: the builders import them when called.
"""

from __future__ import annotations

from typing import Any

from agegender.data.labels import AGE_SCALE
from agegender.models.age_bins import DISTRIBUTION_LAYER, age_distribution_layer, with_age_distribution

# a member: (name, Keras model, metadata) as agegender.training.ensemble.load_members gives it
# chosen weights: output -> {"members": [member indices], "weights": [one per index], ...}


def member_outputs(inputs, model, metadata: dict[str, Any], index: int, flip: bool) -> dict[str, Any]:
    """The member applied to input_size images (optionally mirrored), shrunk to its own input size first
    (box filter when the size divides, else bilinear); one nesting level, so the saved file loads."""
    from keras import layers

    from agegender.models.layers import HorizontalFlip

    member_size, input_size = int(metadata["image_size"]), int(inputs.shape[1])
    view = "mirror" if flip else "plain"
    x = HorizontalFlip(name=f"member{index}_mirror")(inputs) if flip else inputs
    if member_size != input_size:
        if input_size % member_size == 0:
            x = layers.AveragePooling2D(input_size // member_size, name=f"member{index}_{view}_shrink")(x)
        else:
            x = layers.Resizing(member_size, member_size, interpolation="bilinear",
                                name=f"member{index}_{view}_shrink")(x)
    outputs = model(x)
    outputs = outputs if isinstance(outputs, dict) else {metadata["outputs"][0]: outputs}
    if "age" in outputs:  # a regression head can go below zero; each member alone is read as at least 0
        outputs = {**outputs, "age": layers.ReLU(name=f"member{index}_{view}_age_floor")(outputs["age"])}
    return outputs


def member_branch(model, metadata: dict[str, Any], input_size: int, flip: bool, index: int = 0):
    """One member as the ensemble applies it, alone: a model from input_size images to its outputs."""
    import keras

    inputs = keras.Input((input_size, input_size, 3), name="image")
    return keras.Model(inputs, member_outputs(inputs, model, metadata, index, flip))


def mixes_distributions(members, *choices: dict[str, dict[str, Any]] | None) -> bool:
    """Whether every member with a say in the age (in any of the choices) has an age distribution over the same
    years (a DEX head): then the ensemble mixes the distributions, and its age is the mix's expected value."""
    choices = [chosen for chosen in choices if chosen is not None]
    if not choices or any("age" not in chosen for chosen in choices):
        return False
    heads = [age_distribution_layer(members[i][1]) for chosen in choices
             for i, weight in zip(chosen["age"]["members"], chosen["age"]["weights"], strict=True) if weight > 0]
    return all(head is not None for head in heads) and len({head.units for head in heads}) == 1


def build_ensemble(members, chosen: dict[str, dict[str, Any]], input_size: int, tta: bool,
                   plain: frozenset[int] = frozenset(), grey_chosen: dict[str, dict[str, Any]] | None = None):
    """One Keras model: every member (and, with TTA, the same member on the mirror image, averaged, except the
    members whose index is in `plain`), mixed per output with the chosen weights, or with grey_chosen's for grey
    images (a GreySwitch). When every age member has an age distribution, the distributions are mixed with the
    age weights into a layer named age_bins and the age is its expected value, so the ensemble has a
    distribution like any DEX model (the same age as mixing the members' ages)."""
    import keras
    from keras import layers

    from agegender.models.layers import AgeExpectation, GreySwitch

    distributions = mixes_distributions(members, chosen, grey_chosen)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    outputs_by_member = []
    for index, (_, model, metadata) in enumerate(members):
        model.name = f"member{index}_{model.name}"
        if distributions and index in chosen["age"]["members"]:
            model = with_age_distribution(model)
        found = member_outputs(inputs, model, metadata, index, flip=False)
        if tta and index not in plain:
            mirrored = member_outputs(inputs, model, metadata, index, flip=True)
            found = {name: layers.Average(name=f"member{index}_{name}_tta")([found[name], mirrored[name]])
                     for name in found}
        outputs_by_member.append(found)
    def weighted_sum(spec, mixed_name, prefix=""):
        terms = [layers.Rescaling(weight, name=f"{mixed_name}_{prefix}weight{i}")(outputs_by_member[i][mixed_name])
                 for i, weight in zip(spec["members"], spec["weights"], strict=True) if weight > 0]
        return terms[0] if len(terms) == 1 else layers.Add(name=f"{mixed_name}_{prefix}sum")(terms)

    outputs = {}
    for output, spec in chosen.items():
        mixed_name = DISTRIBUTION_LAYER if output == "age" and distributions else output
        mixed_output = weighted_sum(spec, mixed_name)
        if grey_chosen is not None:
            mixed_output = GreySwitch(name=f"{mixed_name}_grey_switch")(
                [inputs, mixed_output, weighted_sum(grey_chosen[output], mixed_name, "grey_")])
        if mixed_name == DISTRIBUTION_LAYER:
            bins = layers.Identity(name=DISTRIBUTION_LAYER)(mixed_output)
            outputs[output] = AgeExpectation(bins.shape[-1] - 1, AGE_SCALE, name="age")(bins)
        else:
            outputs[output] = layers.Identity(name=output)(mixed_output)
    return keras.Model(inputs, outputs, name="ensemble")
