"""The tf.data input pipeline: augmentation only when training, and the fast warp matches TensorFlow's kernel."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import tensorflow as tf

from agegender.data.manifest import load_split
from agegender.data.pipeline import Augment, affine_warp, make_dataset
from tests.conftest import TEST_IMAGE_SIZE


def test_fast_affine_warp_matches_image_projective_transform():
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((4, 33, 33, 3)), tf.float32)
    angle = rng.uniform(-0.5, 0.5, 4)
    scale = rng.uniform(0.6, 1.5, 4)
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    shift = rng.uniform(-70, 70, (4, 2))  # shifts of several image widths exercise the mirrored border
    transforms = np.stack([cos, -sin, shift[:, 0], sin, cos, shift[:, 1], np.zeros(4), np.zeros(4)], 1)
    transforms = tf.constant(transforms, tf.float32)
    expected = tf.raw_ops.ImageProjectiveTransformV3(images=images, transforms=transforms, output_shape=[33, 33],
                                                     fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")
    np.testing.assert_allclose(affine_warp(images, transforms), expected, atol=1e-4)


def test_training_batches_are_augmented_and_evaluation_batches_are_not(prepared):
    images, rows = load_split("val", TEST_IMAGE_SIZE, prepared["data_dir"])
    targets = {"gender": rows["gender"].to_numpy(), "age": rows["age"].to_numpy() / 120}
    plain = next(iter(make_dataset(images, targets, 16, training=False)))
    np.testing.assert_allclose(plain[0].numpy(), images[:16] / 255.0, atol=1e-6)
    np.testing.assert_allclose(plain[1]["gender"].numpy().ravel(), rows["gender"][:16])

    first, second = (next(iter(make_dataset(images, targets, 16, training=True, augment=Augment())))
                     for _ in range(2))
    batch = first[0].numpy()
    assert batch.shape == (16, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3) and batch.min() >= 0.0 and batch.max() <= 1.0
    np.testing.assert_allclose(batch, second[0].numpy(), atol=1e-6)  # same seed, same augmented batch
    assert not np.allclose(np.sort(batch.mean(axis=(1, 2, 3))), np.sort(images[:16].mean(axis=(1, 2, 3)) / 255))


NO_GEOMETRY_OR_COLOUR = Augment(crop=0, flip=False, rotation=0, zoom=0, brightness=0, contrast=0, saturation=0)


def first_batch(prepared, augment: Augment, batch_size: int = 16) -> np.ndarray:
    """The first training batch of the validation images under an augmentation (seeded, so repeatable)."""
    images, rows = load_split("val", TEST_IMAGE_SIZE, prepared["data_dir"])
    dataset = make_dataset(images, {"gender": rows["gender"].to_numpy()}, batch_size, training=True, augment=augment)
    return next(iter(dataset))[0].numpy()


def test_noise_augmentation_adds_seeded_noise_of_a_random_strength_per_image(prepared):
    clean = first_batch(prepared, NO_GEOMETRY_OR_COLOUR)
    noisy = first_batch(prepared, replace(NO_GEOMETRY_OR_COLOUR, noise=0.1))
    np.testing.assert_allclose(noisy, first_batch(prepared, replace(NO_GEOMETRY_OR_COLOUR, noise=0.1)), atol=1e-6)
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0
    spread = (noisy - clean).std(axis=(1, 2, 3))  # per image, under 0.1 and not all alike
    assert 0.0 < spread.max() <= 0.1 and spread.max() - spread.min() > 0.02
    assert Augment(noise=0.1).scaled(0.5).noise == 0.1  # --augment scales the rest, not the noise


def test_photo_augmentation_degrades_a_seeded_share_of_the_images(prepared):
    def batch(chance: float) -> np.ndarray:
        return first_batch(prepared, replace(NO_GEOMETRY_OR_COLOUR, photo=chance), 32)

    clean, every = batch(0.0), batch(1.0)  # 1.0: every degradation on every image
    assert every.min() >= 0.0 and every.max() <= 1.0
    np.testing.assert_allclose(every[..., 0], every[..., 1], atol=0.02)  # grey (JPEG adds a little colour)
    sharpness = lambda images: np.abs(np.diff(images, axis=2)).mean(axis=(1, 2, 3))  # noqa: E731
    assert (sharpness(every) < sharpness(clean)).all()  # blurred, shrunk and compressed: softer
    some = batch(0.3)
    np.testing.assert_allclose(some, batch(0.3), atol=1e-6)  # seeded
    changed = np.abs(some - clean).mean(axis=(1, 2, 3)) > 1e-3
    assert 0 < changed.sum() < len(changed)  # some images, not all
    assert Augment(photo=0.3).scaled(0.5).photo == 0.3  # --augment scales the rest, not these
