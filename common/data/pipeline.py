"""The tf.data input pipeline of training and evaluation: cached uint8 images in batches, and the training-time
augmentations (an affine warp, colour jitter, photo degradations and noise). TensorFlow loads when a pipeline is
first built."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agegender.data.paths import SEED


@dataclass(frozen=True)
class Augment:
    """Strength of the training-time augmentations (0 turns one off)."""

    crop: float = 0.08  # largest shift, as a share of the side (random crop)
    flip: bool = True
    rotation: float = 12.0  # degrees
    zoom: float = 0.1  # +- share
    brightness: float = 0.15
    contrast: float = 0.2
    saturation: float = 0.25
    noise: float = 0.0  # largest sigma of Gaussian pixel noise on the [0, 1] scale (0.08 ~ 20 grey levels)
    photo: float = 0.0  # chance of each photo degradation (grey, blur, low-quality JPEG, down-then-up scaling)

    def scaled(self, strength: float) -> Augment:
        """Every geometric and colour strength times `strength`; noise and photo have their own flags and
        are kept."""
        return Augment(self.crop * strength, self.flip and strength > 0, self.rotation * strength,
                       self.zoom * strength, self.brightness * strength, self.contrast * strength,
                       self.saturation * strength, self.noise, self.photo)


# What --photo-augment draws, each degradation with its own chance per image (what real photos bring that
# UTKFace's studio-like crops lack: old grey prints, soft focus, heavy compression, small faces blown up)
PHOTO_BLUR_SIGMA = (0.5, 2.0)  # Gaussian blur, in pixels of a 128 px crop (scaled with the side)
PHOTO_JPEG_QUALITY = (10, 50)
PHOTO_DOWNSCALE = (0.2, 0.6)  # shrunk to this share of the side, then enlarged back


def augment_draws(batch, size, augment: Augment, seed):
    """The random part of augment_batch: per-image affine transforms [batch, 8] and colour factors [batch, 3]
    (brightness shift, contrast and saturation factors). `seed` is a shape-[2] int tensor (stateless draws)."""
    import tensorflow as tf

    draws = iter(range(1, 100))

    def uniform(low, high):
        return tf.random.stateless_uniform([batch], seed + next(draws), low, high)

    angle = uniform(-augment.rotation, augment.rotation) * (math.pi / 180.0)
    scale = 1.0 / uniform(1.0 - augment.zoom, 1.0 + augment.zoom)  # >1 zooms out
    shift_x = uniform(-augment.crop, augment.crop) * size
    shift_y = uniform(-augment.crop, augment.crop) * size
    flip = tf.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0) if augment.flip else tf.ones([batch])
    cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
    centre = (size - 1.0) / 2.0
    # output pixel (x, y) samples input at A @ (x - c, y - c) + c + shift
    a0, a1 = cos * flip, -sin
    b0, b1 = sin * flip, cos
    a2 = centre - a0 * centre - a1 * centre + shift_x
    b2 = centre - b0 * centre - b1 * centre + shift_y
    zeros, ones = tf.zeros([batch]), tf.ones([batch])
    transform = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    brightness = uniform(-augment.brightness, augment.brightness) if augment.brightness else zeros
    contrast = uniform(1 - augment.contrast, 1 + augment.contrast) if augment.contrast else ones
    saturation = uniform(1 - augment.saturation, 1 + augment.saturation) if augment.saturation else ones
    return transform, tf.stack([brightness, contrast, saturation], axis=1)


def affine_warp(images, transforms):
    """Bilinear affine warp with mirrored borders: the numbers of ImageProjectiveTransformV3 (fill_mode REFLECT)
    from four gathers, which XLA can compile (that kernel it cannot).

    `transforms` rows are [a0, a1, a2, b0, b1, b2, 0, 0]: output (x, y) samples input (a0 x + a1 y + a2,
    b0 x + b1 y + b2)."""
    import tensorflow as tf

    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    ys, xs = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")
    a0, a1, a2, b0, b1, b2 = (tf.reshape(transforms[:, i], [-1, 1, 1]) for i in range(6))
    source_x, source_y = a0 * xs + a1 * ys + a2, b0 * xs + b1 * ys + b2
    x0, y0 = tf.floor(source_x), tf.floor(source_y)
    fx, fy = (source_x - x0)[..., None], (source_y - y0)[..., None]
    flat = tf.reshape(images, [-1, shape[3]])
    offset = tf.reshape(tf.range(batch) * height * width, [-1, 1, 1])

    def mirror(v, n):  # half-sample symmetric: ... c b a | a b c ... z | z y x ...
        v = tf.math.floormod(v, 2.0 * n)
        return tf.cast(tf.where(v >= n, 2.0 * n - 1.0 - v, v), tf.int32)

    def pixel(y, x):
        return tf.gather(flat, offset + mirror(y, h) * width + mirror(x, w))

    top = pixel(y0, x0) * (1.0 - fx) + pixel(y0, x0 + 1.0) * fx
    bottom = pixel(y0 + 1.0, x0) * (1.0 - fx) + pixel(y0 + 1.0, x0 + 1.0) * fx
    return top * (1.0 - fy) + bottom * fy


def colour_jitter(images, colour):
    """Per-image brightness shift, then contrast and saturation factors (columns of `colour`), clipped to [0, 1]."""
    import tensorflow as tf

    brightness, contrast, saturation = (tf.reshape(colour[:, i], [-1, 1, 1, 1]) for i in range(3))
    images = images + brightness
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    images = (images - mean) * contrast + mean
    grey = tf.reduce_mean(images, axis=3, keepdims=True)
    images = (images - grey) * saturation + grey
    return tf.clip_by_value(images, 0.0, 1.0)


_xla: dict = {}


def xla(function):
    """`function` compiled by XLA once per process (two separate functions beat one: fused into the colour
    reductions, the warp's gathers would run three times)."""
    if function not in _xla:
        import tensorflow as tf

        _xla[function] = tf.function(function, jit_compile=True)
    return _xla[function]


def add_noise(images, sigma, seed):
    """Gaussian pixel noise with a per-image sigma (shape [batch]), clipped to [0, 1]."""
    import tensorflow as tf

    noise = tf.random.stateless_normal(tf.shape(images), seed) * tf.reshape(sigma, [-1, 1, 1, 1])
    return tf.clip_by_value(images + noise, 0.0, 1.0)


def photo_degrade(images, chance: float, seed):
    """Each image independently: grey with probability `chance`, blurred, shrunk and enlarged back, and
    JPEG-compressed at a low quality, each with the same probability (strengths drawn from the PHOTO_ ranges).
    `seed` is a shape-[2] int tensor; a float batch in [0, 1] comes out."""
    import tensorflow as tf

    shape = tf.shape(images)
    batch, side = shape[0], tf.cast(shape[1], tf.float32)

    def picked(offset):
        return tf.reshape(tf.random.stateless_uniform([batch], seed + offset) < chance, [-1, 1, 1, 1])

    def uniform(offset, low, high, count=None):
        return tf.random.stateless_uniform([batch] if count is None else count, seed + offset, low, high)

    grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(images))
    images = tf.where(picked(201), grey, images)
    # blur: every image with one kernel at the largest sigma, each picked image blended towards it by its own
    # share, which reads as a blur of its own strength
    sigma = PHOTO_BLUR_SIGMA[1] * side / 128.0
    radius = tf.cast(tf.math.ceil(2.0 * sigma), tf.int32)
    taps = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernel = tf.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / tf.reduce_sum(kernel)
    rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])
    blurred = tf.nn.depthwise_conv2d(images, rows, [1, 1, 1, 1], "SAME")
    blurred = tf.nn.depthwise_conv2d(blurred, tf.transpose(rows, [1, 0, 2, 3]), [1, 1, 1, 1], "SAME")
    share = tf.reshape(uniform(202, PHOTO_BLUR_SIGMA[0] / PHOTO_BLUR_SIGMA[1], 1.0), [-1, 1, 1, 1])
    images = tf.where(picked(203), images + share * (blurred - images), images)
    # down then up: one scale per batch (a resize takes one output size)
    small = tf.cast(tf.round(side * uniform(204, PHOTO_DOWNSCALE[0], PHOTO_DOWNSCALE[1], count=[])), tf.int32)
    resized = tf.image.resize(tf.image.resize(images, [small, small], method="area"), shape[1:3], "bilinear")
    images = tf.where(picked(205), resized, images)
    # JPEG: one image at a time (the codec takes single images)
    quality = tf.cast(uniform(206, PHOTO_JPEG_QUALITY[0], PHOTO_JPEG_QUALITY[1] + 1), tf.int32)
    compress = tf.reshape(picked(207), [-1])

    def jpeg(item):
        image, level, chosen = item
        return tf.cond(chosen, lambda: tf.image.adjust_jpeg_quality(image, level), lambda: image)

    images = tf.map_fn(jpeg, (images, quality, compress), fn_output_signature=tf.float32)
    return tf.clip_by_value(images, 0.0, 1.0)


def augment_batch(images, augment: Augment, seed):
    """Random crop, flip, rotation and zoom as one affine warp, then colour jitter, then (when augment.photo
    is set) photo degradations, then (when augment.noise is set) Gaussian noise of a random strength per
    image; a float batch in [0, 1].

    `seed` is a shape-[2] int tensor; the draws are stateless, so parallel calls are safe and repeatable.
    The pixel work runs as two XLA functions: ~1/4 of the CPU time of ImageProjectiveTransformV3 + plain ops."""
    import tensorflow as tf

    batch = tf.shape(images)[0]
    transform, colour = augment_draws(batch, tf.cast(tf.shape(images)[1], tf.float32), augment, seed)
    images = xla(colour_jitter)(xla(affine_warp)(images, transform), colour)
    if augment.photo > 0:
        images = photo_degrade(images, augment.photo, seed)
    if augment.noise > 0:
        sigma = tf.random.stateless_uniform([batch], seed + 100, 0.0, augment.noise)
        images = add_noise(images, sigma, seed + 101)
    return images


def make_dataset(images: np.ndarray, targets: dict[str, np.ndarray], batch_size: int, training: bool,
                 augment: Augment | None = None, seed: int = SEED, sample_weight: np.ndarray | None = None,
                 sampling: np.ndarray | None = None):
    """Batches of (float images in [0, 1], {output name: target}[, weights]) from cached uint8 arrays; a missing
    label is a NaN target, which the losses and metrics of agegender.models.cnn leave out.

    Shuffling and augmentation happen only when training; whole batches are gathered and augmented at
    once, which keeps the per-image overhead of tf.data out of the loop. With `sampling` (a chance per image,
    agegender.training.sampling), a training epoch is as many draws with replacement by those chances as there
    are images of non-zero chance (fresh draws each epoch, reproducible from `seed`) instead of a shuffle."""
    import tensorflow as tf

    image_tensor = tf.convert_to_tensor(images)
    target_tensors = {name: tf.convert_to_tensor(np.asarray(v, dtype=np.float32).reshape(len(v), -1))
                      for name, v in targets.items()}
    weight_tensor = None if sample_weight is None else tf.convert_to_tensor(sample_weight, tf.float32)
    count = len(images)
    if training and sampling is not None:
        indices = sampled_indices(sampling, seed)
    else:
        indices = tf.data.Dataset.range(count)
        if training:
            indices = indices.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    indices = indices.batch(batch_size)
    # a fresh pair of seeds per batch, different every epoch, reproducible from `seed`
    batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    do_augment = training and augment is not None

    def gather(index, batch_seed):
        batch = tf.cast(tf.gather(image_tensor, index), tf.float32) / 255.0
        if do_augment:
            batch = augment_batch(batch, augment, batch_seed)
        labels = {name: tf.gather(t, index) for name, t in target_tensors.items()}
        if weight_tensor is not None:
            return batch, labels, tf.gather(weight_tensor, index)
        return batch, labels

    dataset = tf.data.Dataset.zip(indices, batch_seeds)
    return dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def sampled_indices(probabilities: np.ndarray, seed: int):
    """A tf.data stream of image indices drawn with replacement by those probabilities (inverse-CDF sampling), as
    many as there are images of non-zero probability, new draws each time it is iterated (each epoch),
    reproducible from `seed`."""
    import tensorflow as tf

    count = len(probabilities)
    draws = int(np.count_nonzero(probabilities))
    cdf = np.cumsum(np.asarray(probabilities, dtype=np.float64) / np.sum(probabilities))
    cdf[-1] = 1.0
    cdf_tensor = tf.constant(cdf, tf.float64)

    def draw(epoch_seed):
        uniform = tf.random.stateless_uniform([draws], epoch_seed, dtype=tf.float64)
        picked = tf.searchsorted(cdf_tensor, uniform, side="right")
        return tf.data.Dataset.from_tensor_slices(tf.minimum(picked, count - 1))

    epoch_seeds = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True).batch(2).take(1)
    # a known length, so Keras counts the steps of an epoch instead of running the stream dry
    return epoch_seeds.flat_map(draw).apply(tf.data.experimental.assert_cardinality(draws))
