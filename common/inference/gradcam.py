"""Grad-CAM (Selvaraju et al., 2017): where in the aligned face a model found the evidence for its age and its
gender. A convolutional layer's activations are weighted by the mean gradient of the output over each channel,
summed, and only the positive part is kept; the map is scaled to [0, 1] per face.

What the gradient is taken of:
- gender: the logit of the gender predicted (so the map shows what made it say female, or male);
- age, with a DEX head: the log-probability that the age lies within AGE_WINDOW years of the predicted age
  (what made it say this age); with a regression head: the predicted age itself (what raised it).

Works from a saved model.keras of every family: the layer may sit in a nested backbone, and an ensemble's
map is its members' maps, each on its own input size (and averaged with the mirror image's when the ensemble
averages with it), mixed with the ensemble's weights for that output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agegender.cli import UserError, atomic_path
from agegender.data.images import Face, face_crop, input_crop, is_grey, resize_face
from agegender.data.labels import GENDER_LABELS, age_band
from agegender.models.age_bins import DISTRIBUTION_LAYER, age_distribution_layer, with_age_distribution
from agegender.models.folders import load_model

AGE_WINDOW = 5  # years either side of the predicted age whose probability the age map explains
DISPLAY_SIDE = 256  # side of the aligned crop a heatmap is drawn on
OVERLAY_ALPHA = 0.45
MIN_CELL_FACES = 20  # a mean heatmap over fewer faces is left out (never close to a single face)
# a jet-like colour map, cold to hot
COLOUR_STOPS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
COLOUR_VALUES = np.array([(0, 0, 128), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (128, 0, 0)], float)


# ---------------------------------------------------------------- finding the layer


def walk(model, prefix: str = ""):
    """(path, layer) for every layer, depth first into nested models; the path joins model names with '/'."""
    import keras

    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        yield path, layer
        if isinstance(layer, keras.Model):
            yield from walk(layer, f"{path}/")


def spatial(layer) -> bool:
    try:
        return len(layer.output.shape) == 4
    except (AttributeError, ValueError):  # a layer used more than once has no single output
        return False


def conv_layers(model) -> list[tuple[str, Any]]:
    import keras

    kinds = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
    return [(path, layer) for path, layer in walk(model) if isinstance(layer, kinds) and spatial(layer)]


def find_layer(model, name: str | None = None) -> tuple[str, Any]:
    """The named layer (its name, or its path through nested models), or by default the last convolutional
    layer; a wrong name ends in one sentence."""
    convs = conv_layers(model)
    if name is None:
        if not convs:
            raise UserError(f"The model {model.name} has no convolutional layer to take a heatmap of.")
        return convs[-1]
    found = [(path, layer) for path, layer in walk(model) if name in (path, layer.name)]
    last = ", ".join(path for path, _ in convs[-3:])
    if not found:
        raise UserError(f"The model has no layer named {name!r}; its last convolutional layers are {last}.")
    if len(found) > 1:
        raise UserError(f"Several layers are named {name!r}; give its path instead, one of "
                        f"{', '.join(path for path, _ in found)}.")
    if not spatial(found[0][1]):
        raise UserError(f"Layer {name!r} gives no spatial map to take a heatmap of; choose a convolutional layer "
                        f"such as {last}.")
    return found[0]


# ---------------------------------------------------------------- maps


def explained(outputs: dict[str, Any], output: str, age_scale: float):
    """Per face, the quantity whose gradient the map shows (see the module's docstring)."""
    from keras import ops

    if output == "gender":
        p = ops.clip(ops.reshape(outputs["gender"], (-1,)), 1e-6, 1 - 1e-6)
        logit = ops.log(p) - ops.log(1 - p)
        return ops.where(p >= 0.5, logit, -logit)
    if DISTRIBUTION_LAYER in outputs:
        bins = outputs[DISTRIBUTION_LAYER]
        years = ops.cast(ops.arange(bins.shape[-1]), bins.dtype)
        expected = ops.sum(bins * years, axis=-1, keepdims=True)
        near = ops.cast(ops.abs(years - expected) <= AGE_WINDOW, bins.dtype)
        return ops.log(ops.sum(bins * near, axis=-1) + 1e-6)
    return ops.reshape(outputs["age"], (-1,)) * age_scale


@dataclass
class Part:
    """A model whose maps make up the heatmap: the model itself, or one member of an ensemble."""

    model: Any
    image_size: int
    weights: dict[str, float]  # output -> its weight in the mix
    layer_path: str
    layer: Any
    functions: dict[str, Any]
    mirror: bool = False  # averaged with its map of the mirror image, as the ensemble averages this member
    grey_weights: dict[str, float] | None = None  # the mix for grey images, where the ensemble has one

    def weight(self, output: str, grey: np.ndarray) -> np.ndarray:
        """The part's weight for each image of a batch (`grey`: whether each image is grey)."""
        colour = self.weights.get(output, 0.0)
        if self.grey_weights is None:
            return np.full(len(grey), colour, np.float32)
        return np.where(grey, self.grey_weights.get(output, 0.0), colour).astype(np.float32)


class GradCam:
    """Heatmaps of a saved model's outputs; build with GradCam(model, metadata, layer_name)."""

    def __init__(self, model, metadata: dict[str, Any], layer_name: str | None = None):
        self.metadata = metadata
        self.image_size = int(metadata["image_size"])
        self.outputs = [name for name in metadata["outputs"] if name in ("age", "gender")]
        self.age_scale = float(metadata.get("age_scale", 120.0))
        if metadata.get("backbone") == "ensemble":
            self.parts = self.ensemble_parts(model, metadata, layer_name)
        else:
            path, layer = find_layer(model, layer_name)
            self.parts = [Part(with_age_distribution(model), self.image_size, {o: 1.0 for o in self.outputs},
                               path, layer, {})]

    @staticmethod
    def ensemble_parts(model, metadata: dict[str, Any], layer_name: str | None) -> list[Part]:
        """One part per member (nested models named member<index>_...), weighted as the ensemble mixes them; with
        a layer name, the members that have that layer."""
        import keras

        nested = {layer.name.split("_", 1)[0]: layer for layer in model.layers if isinstance(layer, keras.Model)}
        weights, tta = metadata["params"]["weights"], bool(metadata["params"].get("tta"))
        grey_weights = metadata["params"].get("grey_weights")
        plain = set(metadata["params"].get("plain_members", []))
        parts, missing = [], []

        def member_mix(chosen, name):
            return {output: float(chosen.get(output, {}).get(name, 0.0)) for output in chosen}

        for index, member in enumerate(metadata["members"]):
            inner = nested[f"member{index}"]
            mix = member_mix(weights, member["name"])
            grey_mix = None if grey_weights is None else member_mix(grey_weights, member["name"])
            if not any(mix.values()) and not any((grey_mix or {}).values()):
                continue
            try:
                path, layer = find_layer(inner, layer_name)
            except UserError as error:
                missing.append(str(error))
                continue
            distribution = inner if age_distribution_layer(inner) is None else with_age_distribution(inner)
            parts.append(Part(distribution, int(member["image_size"]), mix, f"{inner.name}/{path}", layer, {},
                              mirror=tta and member["name"] not in plain, grey_weights=grey_mix))
        if not parts:
            raise UserError(missing[0] if missing else "The ensemble has no member with a say in its outputs.")
        return parts

    @property
    def layer_paths(self) -> list[str]:
        return [part.layer_path for part in self.parts]

    def part_function(self, part: Part, output: str):
        """A compiled function: float images at the part's size -> its map per face at the layer's resolution."""
        if output not in part.functions:
            import tensorflow as tf

            model, layer, scale = part.model, part.layer, self.age_scale

            @tf.function(reduce_retracing=True)
            def run(images):
                captured = []
                original = layer.call

                def recording(*args, **kwargs):
                    result = original(*args, **kwargs)
                    captured.append(result)
                    return result

                layer.call = recording  # read the layer's activations wherever it sits in nested models
                try:
                    with tf.GradientTape() as tape:
                        found = model(images, training=False)
                        found = found if isinstance(found, dict) else {output: found}
                        target = tf.reduce_sum(explained(found, output, scale))
                finally:
                    layer.call = original
                activations = captured[0]
                gradients = tape.gradient(target, activations)
                channel_weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
                return tf.nn.relu(tf.reduce_sum(channel_weights * activations, axis=-1))

            part.functions[output] = run
        return part.functions[output]

    def part_maps(self, part: Part, images: np.ndarray, output: str) -> np.ndarray:
        """The part's maps at the ensemble's input size, each scaled to [0, 1]."""
        import tensorflow as tf

        pixels = tf.convert_to_tensor(np.asarray(images, np.float32) / 255.0)
        if part.image_size != pixels.shape[1]:
            pixels = tf.image.resize(pixels, (part.image_size, part.image_size), method="area")
        maps = self.part_function(part, output)(pixels)
        return scaled(tf.image.resize(maps[..., None], (self.image_size, self.image_size))[..., 0].numpy())

    def maps(self, images: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
        """uint8 face crops at the model's size -> {output: maps (faces x side x side) in [0, 1]}."""
        found: dict[str, list[np.ndarray]] = {output: [] for output in self.outputs}
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start:start + batch_size])
            grey = is_grey(batch)
            for output in self.outputs:
                total = np.zeros(batch.shape[:3], np.float32)
                for part in self.parts:
                    weight = part.weight(output, grey)
                    if not weight.any():
                        continue
                    maps = self.part_maps(part, batch, output)
                    if part.mirror:
                        maps = (maps + self.part_maps(part, batch[:, :, ::-1], output)[:, :, ::-1]) / 2
                    total += weight[:, None, None] * maps
                found[output].append(scaled(total))
        return {output: np.concatenate(parts) for output, parts in found.items()}


def scaled(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its own maximum (an all-zero map stays zero)."""
    peak = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(peak > 0, maps / np.maximum(peak, 1e-12), 0.0).astype(np.float32)


def load_gradcam(folder: Path, layer_name: str | None = None) -> GradCam:
    model, metadata = load_model(folder)
    return GradCam(model, metadata, layer_name)


# ---------------------------------------------------------------- pictures


def colourise(heat: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 through the jet-like COLOUR_STOPS."""
    heat = np.clip(heat, 0.0, 1.0)
    channels = [np.interp(heat, COLOUR_STOPS, COLOUR_VALUES[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def overlay(crop: Image.Image, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The crop with the heatmap (any resolution, values in [0, 1]) blended over it."""
    resized = Image.fromarray(np.asarray(heat, np.float32), mode="F").resize(crop.size, Image.Resampling.BILINEAR)
    colours = colourise(np.asarray(resized))
    blended = (1 - alpha) * np.asarray(crop.convert("RGB"), np.float32) + alpha * colours
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))


def row_face(row: dict[str, Any]):
    left, right = row.get("eyes") or (None, None)
    return Face(tuple(row["box"]), float(row.get("confidence", 1.0)), left, right)


def face_heatmaps(cam: GradCam, image: Image.Image, rows: list[dict[str, Any]], detect: bool = True,
                  side: int = DISPLAY_SIDE) -> list[dict[str, Any]]:
    """Per face with a box and per output: {"face": number from 1, "output", "image": the aligned crop at
    side x side with the heatmap over it}. Crops are aligned as Predictor.predict_image aligned them (the
    whole image with detect False)."""
    faces = [row for row in rows if row.get("box")]
    if not faces:
        return []
    if detect:
        crops = [input_crop(image, row_face(row), cam.image_size) for row in faces]
        shown = [face_crop(image, row_face(row), side) for row in faces]
    else:
        crops, shown = [image], [image.resize((side, side), Image.Resampling.BILINEAR)]
    maps = cam.maps(np.stack([resize_face(crop, cam.image_size) for crop in crops]))
    return [{"face": index + 1, "output": output, "image": overlay(shown[index], maps[output][index])}
            for index in range(len(faces)) for output in cam.outputs]


# ---------------------------------------------------------------- mean heatmaps (compare)


def mean_heatmaps(cam: GradCam, images: np.ndarray, rows, batch_size: int = 32) -> dict[str, Any]:
    """Over labelled face crops: the mean face, and per output, true-age band and gender the mean map and how
    many faces it averages."""
    bands = rows["age"].map(age_band).to_numpy()
    genders = rows["gender"].astype(int).astype(str).map(GENDER_LABELS).to_numpy()
    sums: dict[tuple[str, str, str], np.ndarray] = {}
    counts: dict[tuple[str, str, str], int] = {}
    for start in range(0, len(images), batch_size):
        maps = cam.maps(images[start:start + batch_size], batch_size)
        for output, values in maps.items():
            for offset, heat in enumerate(values):
                key = (output, bands[start + offset], genders[start + offset])
                sums[key] = sums.get(key, 0.0) + heat
                counts[key] = counts.get(key, 0) + 1
    return {"mean_face": np.asarray(images, np.float64).mean(axis=0), "faces": len(images),
            "maps": {key: sums[key] / counts[key] for key in sums}, "counts": counts,
            "layers": cam.layer_paths}


def save_means(path: Path, means: dict[str, Any]) -> None:
    """mean_heatmaps' result as one .npz, written atomically."""
    import json

    arrays = {"mean_face": means["mean_face"]}
    for (output, band, gender), heat in means["maps"].items():
        arrays[f"map|{output}|{band}|{gender}"] = heat
    about = {"faces": means["faces"], "layers": means["layers"],
             "counts": [[*key, count] for key, count in means["counts"].items()]}
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, about=np.array(json.dumps(about)), **arrays)


def load_means(path: Path) -> dict[str, Any] | None:
    """What save_means wrote, or None when it is missing or unreadable."""
    import json

    try:
        with np.load(path, allow_pickle=False) as stored:
            about = json.loads(str(stored["about"]))
            maps = {tuple(key.split("|")[1:]): stored[key] for key in stored.files if key.startswith("map|")}
            mean_face = stored["mean_face"]
    except (OSError, KeyError, ValueError):
        return None
    return {"mean_face": mean_face, "faces": about["faces"], "layers": about["layers"], "maps": maps,
            "counts": {tuple(item[:3]): item[3] for item in about["counts"]}}
