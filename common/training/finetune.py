"""Transfer learning's training (tasks/finetune_transfer.py is its command line; tune and the trainers' registry
use it too): a transfer model (agegender.models.transfer) trained in two phases, the frozen backbone's features
or the activations below its top blocks computed once and cached, then scored and saved like every model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agegender.cli import UserError, atomic_path, console
from agegender.data.labels import TASK_OUTPUTS
from agegender.data.manifest import load_split
from agegender.data.paths import DATA_DIR, SEED
from agegender.data.pipeline import Augment, augment_batch, make_dataset
from agegender.models.backbones import Backbone, backbone_of, resolve_backbone, weights_label
from agegender.models.cydral import build_cydral
from agegender.models.registry import FAMILIES
from agegender.models.transfer import build_model, compile_heads, set_phase
from agegender.training.loop import (
    EpochTimer,
    SplitData,
    StopOnSignal,
    TrainResult,
    callbacks,
    check_monitor,
    finish_run,
    fit,
    history_frame,
    load_data,
    predict_split,
    resolve_verbose,
    tensorboard_callback,
    train_sample_weights,
    training_sampling,
    warm_start,
    weights_between,
)

FOLDER_PREFIX = FAMILIES["transfer"].folder_prefix
MONITOR = "val_loss"
HEAD_PATIENCE = 8  # head epochs on cached features take seconds: let early stopping decide
IMAGE_SIZE = FAMILIES["transfer"].image_size


def model_folder(out: Path, backbone: Backbone, weights: str) -> Path:
    """results/models/transfer-<backbone>, with -scratch appended for random initialisation."""
    return out / f"{FOLDER_PREFIX}{backbone.name}{'-scratch' if weights == 'none' else ''}"


# ---------------------------------------------------------------- phase 1 on features computed once


def cpu_ms_per_image(model, outputs: list[str], images: np.ndarray, count: int = 16) -> float:
    """Mean wall milliseconds to predict one image at batch size 1 (after two warm-up calls)."""
    split = SplitData(images[:count], pd.DataFrame())
    for _ in range(2):
        predict_split(model, SplitData(images[:1], pd.DataFrame()), outputs, batch_size=1)
    start = time.perf_counter()
    predict_split(model, split, outputs, batch_size=1)
    return 1000.0 * (time.perf_counter() - start) / len(split.images)


def drawn_weights(weights: np.ndarray | None, sampling: np.ndarray | None, count: int) -> np.ndarray | None:
    """Sample weights that stand in for drawing images by `sampling` where a phase trains on every image once an
    epoch (features in memory): each image's weight times its chance per draw, scaled to a mean of 1."""
    if sampling is None:
        return weights
    drawn = np.asarray(sampling, dtype=np.float64) * count
    return (drawn if weights is None else drawn * weights).astype(np.float32)


def fit_head_on_features(model, data: dict[str, SplitData], outputs: list[str], params: dict[str, Any],
                         epochs: int, task: str, verbose: int | str = "auto",
                         extra_callbacks: list | None = None, seed: int = SEED,
                         sampling: np.ndarray | None = None) -> tuple[pd.DataFrame, float]:
    """Phase 1 with a frozen pretrained backbone: its pooled features are computed once per image (without
    augmentation), then the head layers (shared with `model`) train on them; returns (history, seconds). With
    `sampling`, each image's loss is weighted by its chance of being drawn (drawn_weights).

    A frozen backbone gives the same features every epoch, so this replaces a forward pass per epoch with one
    in all: on a CPU, head epochs then take seconds and phase 1 can run until early stopping."""
    import keras


    start = time.perf_counter()
    pooled = model.get_layer("gap").output
    extractor = keras.Model(model.input, pooled)
    features = {}
    for split in ("train", "val"):
        images = make_dataset(data[split].images, data[split].targets(outputs), 64, training=False)
        features[split] = extractor.predict(images, verbose=0)
    extract_seconds = time.perf_counter() - start
    console.print(f"Backbone features of {len(features['train'])} + {len(features['val'])} images computed "
                  f"once in {extract_seconds:.0f} s; the head trains on them.")
    head = keras.Model(pooled, model.output, name=f"{model.name}_head")
    compile_heads(head, float(params["learning_rate"]), params, task)
    train_targets, val_targets = data["train"].targets(outputs), data["val"].targets(outputs)
    head.evaluate(features["val"][:8], {k: v[:8] for k, v in val_targets.items()}, verbose=0)
    check_monitor(head, MONITOR)
    weights = drawn_weights(train_sample_weights(data["train"].rows, outputs, params), sampling,
                            len(data["train"].rows))
    keras.utils.set_random_seed(seed)
    timer = EpochTimer()
    history = head.fit(features["train"], train_targets, sample_weight=weights, batch_size=int(params["batch_size"]),
                       epochs=epochs, validation_data=(features["val"], val_targets), shuffle=True,
                       verbose=resolve_verbose(verbose), callbacks=[timer, StopOnSignal(),
                                                   *callbacks(MONITOR, "min", HEAD_PATIENCE, None),
                                                   *(extra_callbacks or [])])
    return history_frame(history, timer), extract_seconds + float(np.sum(timer.seconds))


# ---------------------------------------------------------------- fine-tuning the top blocks on cached activations


def block_cut(backbone: Backbone, base, blocks: int) -> str | None:
    """Name of the backbone layer whose output enters its top `blocks` residual blocks, or None when this
    backbone has no known block boundaries (only the WideResNet does: its blocks end in add_1 .. add_6)."""
    if backbone.application is not None or blocks <= 0:
        return None
    adds = [layer.name for layer in base.layers if layer.name.startswith("add_")]
    if blocks >= len(adds):
        raise UserError(f"--unfreeze-blocks {blocks} is too many: {backbone.name} has {len(adds)} blocks and "
                        "the one below them must stay frozen.")
    return adds[-blocks - 1]


@dataclass
class SplitModel:
    """The model cut below its top blocks: `lower` maps [0, 1] images to the activations entering them
    (frozen, run once per image and view), `upper` maps those activations to the outputs. Both share their
    layers with the full model, so training `upper` trains the model."""

    lower: Any
    upper: Any
    pooled: Any  # upper's input -> pooled backbone features (phase 1's head input)
    head: Any  # pooled features -> outputs
    cut: str

    @classmethod
    def build(cls, model, base, cut: str) -> SplitModel:
        import keras

        cut_tensor = base.get_layer(cut).output
        base_lower = keras.Model(base.input, cut_tensor, name="backbone_lower")
        base_upper = keras.Model(cut_tensor, base.output, name="backbone_upper")
        # everything of the full model before the backbone (margin, the backbone's own scaling)
        stem = keras.Model(model.input, model.get_layer("backbone_preprocess").output, name="stem")
        lower = keras.Model(model.input, base_lower(stem(model.input)), name="lower")
        head = keras.Model(model.get_layer("gap").output, model.output, name="head")
        upper_input = keras.Input(cut_tensor.shape[1:], name="activations")
        pooled_features = model.get_layer("gap")(base_upper(upper_input))
        pooled = keras.Model(upper_input, pooled_features, name="pooled")
        upper = keras.Model(upper_input, head(pooled_features), name="upper")
        return cls(lower, upper, pooled, head, cut)

    def set_trainable(self, base) -> int:
        """Only the top blocks' convolutions and the head train; every BatchNorm keeps its pretrained
        statistics (a frozen Keras 3 BatchNormalization also runs in inference mode)."""
        import keras

        top = {layer.name for layer in self.upper.get_layer("backbone_upper").layers}
        trained = 0
        for layer in base.layers:
            layer.trainable = layer.name in top and not isinstance(layer, keras.layers.BatchNormalization)
            trained += int(layer.trainable and bool(layer.weights))
        return trained


ACTIVATION_VIEWS = ("clean", "flip", "augment-1", "augment-2", "augment-3", "augment-4")


def activation_views(count: int) -> list[str]:
    if not 1 <= count <= len(ACTIVATION_VIEWS):
        raise UserError(f"--views must be between 1 and {len(ACTIVATION_VIEWS)}.")
    return list(ACTIVATION_VIEWS[:count])


def view_batch(images, view: str, augment_strength: float, batch_seed: int, photo: float = 0.0):
    """A [0, 1] float batch as one cached view sees it: as is, mirrored, or augmented like training batches
    (random crop, flip, rotation, zoom, colour, and with `photo` > 0 the photo degradations, each with that
    chance) with a seed fixed per view and batch."""
    from dataclasses import replace

    import tensorflow as tf


    batch = tf.cast(images, tf.float32) / 255.0
    if view == "flip":
        return tf.reverse(batch, axis=[2])
    if view.startswith("augment"):
        seed = tf.constant([SEED + int(view.split("-")[1]), batch_seed], dtype=tf.int64)
        return augment_batch(batch, replace(Augment().scaled(augment_strength), photo=photo), seed)
    return batch


def activation_cache_key(split: SplitModel, images: np.ndarray, view: str, augment: float,
                         photo: float = 0.0) -> str:
    """What a cached view depends on: the lower model's weights and cut, the images and the view."""
    import hashlib

    strength = ""
    if view.startswith("augment"):  # photo 0: the key of caches made before it existed
        strength = f"{augment}|photo {photo}" if photo > 0 else f"{augment}"
    digest = hashlib.sha256()
    digest.update(f"{split.cut}|{view}|{strength}|{images.shape}".encode())
    for weight in split.lower.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes()[:1 << 16])
    digest.update(np.ascontiguousarray(images[:: max(1, len(images) // 256)]).tobytes())
    return digest.hexdigest()[:16]


def cached_activations(split: SplitModel, images: np.ndarray, view: str, augment: float, folder: Path,
                       batch_size: int = 64, photo: float = 0.0) -> np.ndarray:
    """The lower model's float16 activations for every image in one view, as a read-only memory map under
    `folder` (computed once; a finished file is reused, an interrupted one is recomputed)."""
    import tensorflow as tf
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    key = activation_cache_key(split, images, view, augment, photo)
    path = folder / f"{key}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    shape = (len(images), *split.lower.output.shape[1:])
    forward = tf.function(lambda x: split.lower(x, training=False))
    with atomic_path(path) as tmp, Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                            TimeRemainingColumn(), console=console,
                                            transient=not console.is_terminal) as progress:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        task = progress.add_task(f"activations ({view})", total=len(images))
        for start in range(0, len(images), batch_size):
            batch = view_batch(images[start:start + batch_size], view, augment, start, photo)
            out[start:start + len(batch)] = forward(batch).numpy().astype(np.float16)
            progress.advance(task, len(batch))
        out.flush()
        del out
    return np.load(path, mmap_mode="r")


def activations_dataset(views: list[np.ndarray], targets: dict[str, np.ndarray], batch_size: int,
                        weights: np.ndarray | None = None, seed: int = SEED, sampling: np.ndarray | None = None):
    """Shuffled batches of cached activations as a tf.data pipeline: each image is seen once an epoch, in one
    of its views drawn afresh every epoch (reproducible from `seed`). With `sampling` (a chance per image), an
    epoch is as many draws with replacement by those chances as there are images of non-zero chance."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    count, shape = len(views[0]), tuple(views[0].shape[1:])
    draws = count if sampling is None else int(np.count_nonzero(sampling))
    chances = None if sampling is None else np.asarray(sampling, dtype=np.float64) / np.sum(sampling)

    def batches():
        order = rng.permutation(count) if chances is None else rng.choice(count, size=draws, p=chances)
        chosen_view = rng.integers(0, len(views), count)
        for start in range(0, draws, batch_size):
            rows = np.sort(order[start:start + batch_size])
            batch = np.empty((len(rows), *shape), dtype=np.float32)
            chosen = chosen_view[rows]
            for index, source in enumerate(views):
                picked = np.flatnonzero(chosen == index)
                if len(picked):
                    batch[picked] = source[rows[picked]]
            labels = {name: value[rows].reshape(len(rows), -1).astype(np.float32) for name, value in targets.items()}
            yield (batch, labels) if weights is None else (batch, labels, weights[rows].astype(np.float32))

    signature = (tf.TensorSpec((None, *shape), tf.float32),
                 {name: tf.TensorSpec((None, int(np.prod(np.shape(value)[1:]))), tf.float32)
                  for name, value in targets.items()})
    if weights is not None:
        signature = (*signature, tf.TensorSpec((None,), tf.float32))
    dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
    # a known length: Keras warns that a generator of unknown length 'ran out of data' after every epoch
    return dataset.apply(tf.data.experimental.assert_cardinality(-(-draws // batch_size))).prefetch(2)


def fit_on_activations(model, base, backbone: Backbone, data: dict[str, SplitData], outputs: list[str],
                       params: dict[str, Any], head_epochs: int, epochs: int, task: str, cache_root: Path,
                       verbose: int | str = "auto", extra_callbacks: list | None = None,
                       tensorboard_dir: Path | None = None, seed: int = SEED,
                       sampling: np.ndarray | None = None) -> dict[str, Any]:
    """Both phases on activations computed once: the frozen lower backbone runs once per training image and
    view (and once per validation image); phase 1 trains the head on pooled features of those activations,
    phase 2 the top `unfreeze_blocks` blocks and the head on the activations themselves, with a cosine
    schedule and early stopping. With `sampling`, phase 2 draws images by it and phase 1 weights them by it.
    Returns the phase histories, seconds and what the cache held."""
    import keras

    split = SplitModel.build(model, base, block_cut(backbone, base, int(params["unfreeze_blocks"])))
    views = activation_views(int(params["views"]))
    augment, photo = float(params["augment"]), float(params.get("photo_augment", 0.0))
    start = time.perf_counter()
    train_views = [cached_activations(split, data["train"].images, view, augment, cache_root, photo=photo)
                   for view in views]
    val_activations = cached_activations(split, data["val"].images, "clean", augment, cache_root)
    extract_seconds = time.perf_counter() - start
    console.print(f"Activations below the top {params['unfreeze_blocks']} block(s) ({split.cut}) of "
                  f"{len(data['train'].rows)} training images x {len(views)} view(s) and "
                  f"{len(data['val'].rows)} validation images ready in {extract_seconds:.0f} s.")
    train_targets, val_targets = data["train"].targets(outputs), data["val"].targets(outputs)
    weights = train_sample_weights(data["train"].rows, outputs, params)
    pooled_weights = drawn_weights(weights, sampling, len(data["train"].rows))
    batch_size = int(params["batch_size"])
    histories, seconds = [], []

    def val_batches():
        return activations_dataset([val_activations], val_targets, 128, seed=SEED)

    # phase 1: the head on pooled features of every view (the backbone's top is still frozen)
    if head_epochs > 0:
        base.trainable = False
        pool = tf_function(split.pooled)
        train_pooled = np.concatenate([pooled_features(pool, v) for v in train_views])
        val_pooled = pooled_features(pool, val_activations)
        repeat = len(train_views)
        compile_heads(split.head, float(params["learning_rate"]), params, task)
        split.head.evaluate(val_pooled[:8], {k: v[:8] for k, v in val_targets.items()}, verbose=0)
        check_monitor(split.head, MONITOR)
        keras.utils.set_random_seed(seed)
        timer = EpochTimer()
        history = split.head.fit(
            train_pooled, {k: np.concatenate([v] * repeat) for k, v in train_targets.items()},
            sample_weight=None if pooled_weights is None else np.tile(pooled_weights, repeat), batch_size=batch_size,
            epochs=head_epochs, validation_data=(val_pooled, val_targets), shuffle=True,
            verbose=resolve_verbose(verbose),
            callbacks=[timer, StopOnSignal(), *callbacks(MONITOR, "min", HEAD_PATIENCE, None),
                       *phase_callbacks(extra_callbacks, tensorboard_dir, 1)])
        histories.append(history_frame(history, timer))
        seconds.append(float(np.sum(timer.seconds)))
    phase_one = (float(histories[0][MONITOR].min()), model.get_weights()) if histories else None

    # phase 2: the top blocks and the head on the cached activations
    trained = 0
    if epochs > 0:
        trained = split.set_trainable(base)
        rate = float(params["fine_tune_learning_rate"])
        compile_heads(split.upper, rate, params, task)
        split.upper.evaluate(val_batches(), steps=1, verbose=0)  # the same shapes as fit's, so no retracing
        check_monitor(split.upper, MONITOR)
        keras.utils.set_random_seed(seed)
        timer = EpochTimer()
        patience = int(params["patience"])
        history = split.upper.fit(
            activations_dataset(train_views, train_targets, batch_size, weights, seed, sampling), epochs=epochs,
            validation_data=val_batches(), shuffle=False,  # the dataset draws its own order every epoch
            verbose=resolve_verbose(verbose),
            callbacks=[timer, StopOnSignal(), *callbacks(MONITOR, "min", patience, None, "cosine", epochs, rate),
                       *phase_callbacks(extra_callbacks, tensorboard_dir, 2)])
        histories.append(history_frame(history, timer))
        seconds.append(float(np.sum(timer.seconds)))
    return {"histories": histories, "seconds": seconds, "extract_seconds": extract_seconds,
            "phase_one": phase_one, "trained_layers": trained,
            "cache": {"cut": split.cut, "blocks": int(params["unfreeze_blocks"]), "views": views,
                      "extract_seconds": round(extract_seconds, 1)}}


def phase_callbacks(extra_callbacks: list | None, tensorboard_dir: Path | None, phase: int) -> list:
    """The callbacks a phase adds: the caller's (tune's pruning) and TensorBoard's, logging each phase apart
    (tensorboard_dir/phase1, phase2), since each phase counts its epochs from 1."""
    logs = [tensorboard_callback(tensorboard_dir / f"phase{phase}")] if tensorboard_dir is not None else []
    return [*(extra_callbacks or []), *logs]


def tf_function(model):
    import tensorflow as tf

    return tf.function(lambda x: model(x, training=False))


def pooled_features(pool, activations: np.ndarray, batch_size: int = 128) -> np.ndarray:
    parts = [np.asarray(pool(np.asarray(activations[i:i + batch_size], dtype=np.float32)))
             for i in range(0, len(activations), batch_size)]
    return np.concatenate(parts)


def transfer_data(image_size: int, data_dir: Path, limit: int | None, test_limit: int | None,
                  splits=("train", "val", "test"), outputs: list[str] | None = None) -> dict[str, SplitData]:
    """The splits of every dataset in the manifest (extra datasets too); with test_limit, a test subset of its own
    size (the same images for every run)."""
    data = load_data(image_size, data_dir, limit, splits=splits, datasets=None, outputs=outputs)
    if test_limit is not None:
        data["test"] = SplitData(*load_split("test", image_size, data_dir, test_limit))
    return data


def finetune(backbone: str, task: str = "multitask", weights: str = "pretrained",
             params: dict[str, Any] | None = None, image_size: int = IMAGE_SIZE, epochs: int = 5,
             fine_tune_epochs: int = 5, data_dir: Path = DATA_DIR, limit: int | None = None,
             out_dir: Path | None = None, data: dict[str, SplitData] | None = None,
             verbose: int | str = "auto", test_limit: int | None = None, extra_callbacks: list | None = None,
             evaluate_test: bool = True, cache_features: bool = True, seed: int = SEED,
             tensorboard_dir: Path | None = None, metadata_extra: dict[str, Any] | None = None,
             init_from: Path | None = None, dataset_weights: dict[str, float] | None = None,
             start_share: float = 0.0) -> TrainResult:
    """Both phases for one backbone, then validation and test metrics; saved to out_dir unless it is None
    (model_folder gives the usual name, results/models/transfer-<backbone>[-scratch]).

    extra_callbacks join both phases' fit() (tune's pruning); evaluate_test=False stops after the validation
    metrics and saves nothing, so a tuning trial never sees the test split. With a pretrained backbone,
    cache_features trains phase 1 on features computed once (fit_head_on_features). With tensorboard_dir,
    TensorBoard logs each phase under it (phase1/, phase2/). init_from starts from a saved transfer model's
    weights (a warm restart: usually with phase 1's epochs at 0); dataset_weights ({name: weight}) sets how
    often each dataset's images are drawn, as in the CNN trainers. start_share > 0 (with init_from) moves the
    trained weights that share of the way back to the start's (loop.weights_between) before they are scored."""
    started = time.perf_counter()
    spec = resolve_backbone(backbone)
    params = {**FAMILIES["transfer"].defaults, **(params or {})}
    if spec.zero_shot:
        return zero_shot(spec, task, weights, params, image_size, epochs + fine_tune_epochs, data_dir, limit,
                         out_dir, data, test_limit, evaluate_test, metadata_extra)
    outputs = list(TASK_OUTPUTS[task])
    pretrained = weights != "none"
    model = build_model(spec, image_size, params, task, weights)  # fails fast on weights, before the data
    data = {} if data is None else data
    if not data:  # filled in place, so several backbones share one load
        data.update(transfer_data(image_size, data_dir, limit, test_limit, outputs=outputs))
    sampling, sampling_record = training_sampling(data["train"].rows, data_dir, task, (), dataset_weights)
    started_from = None if init_from is None else warm_start(model, Path(init_from), task, image_size)
    start_weights = model.get_weights() if started_from and start_share > 0 else None
    base = backbone_of(model)
    histories, seconds, phase_epochs, unfrozen = [], [], [], len([x for x in base.layers if x.weights])
    phase_one, kept_phase = None, 2 if fine_tune_epochs > 0 else 1
    on_activations = None
    if pretrained and cache_features and block_cut(spec, base, int(params["unfreeze_blocks"])) is not None:
        console.print(f"[bold]{spec.name}[/]: head for {epochs} epoch(s), then the top "
                      f"{params['unfreeze_blocks']} block(s) and the head for {fine_tune_epochs} epoch(s) at "
                      f"learning rate {params['fine_tune_learning_rate']}, on activations computed once.")
        on_activations = fit_on_activations(model, base, spec, data, outputs, params, epochs, fine_tune_epochs,
                                            task, Path(data_dir) / "activations" / spec.name, verbose,
                                            extra_callbacks, tensorboard_dir, seed, sampling)
        histories, seconds = on_activations["histories"], on_activations["seconds"]
        seconds[0] += on_activations["extract_seconds"]
        phase_epochs = [len(histories[0]) if epochs > 0 else 0, len(histories[-1]) if fine_tune_epochs > 0 else 0]
        unfrozen = on_activations["trained_layers"] or unfrozen
        phase_one = on_activations["phase_one"]
        if phase_one is not None and len(histories) == 2 and float(histories[1][MONITOR].min()) > phase_one[0]:
            console.print(f"Fine-tuning did not beat phase 1 on {MONITOR} ({histories[1][MONITOR].min():.4f} vs "
                          f"{phase_one[0]:.4f}): keeping the phase 1 weights.")
            model.set_weights(phase_one[1])
            kept_phase = 1
    for phase, count in ((1, epochs), (2, fine_tune_epochs)):
        if on_activations is not None:
            break
        if count <= 0:
            phase_epochs.append(0)
            continue
        trained = set_phase(model, base, phase, params, task, pretrained)
        console.print(f"[bold]{spec.name}[/] phase {phase}: {trained} backbone layers training, "
                      f"learning rate {params['learning_rate' if phase == 1 else 'fine_tune_learning_rate']}")
        unfrozen = trained if phase == 2 else unfrozen
        if phase == 1 and pretrained and cache_features:
            history, total = fit_head_on_features(model, data, outputs, params, count, task, verbose,
                                                  phase_callbacks(extra_callbacks, tensorboard_dir, phase), seed,
                                                  sampling)
        else:
            history, per_epoch = fit(model, data, outputs, params, count, MONITOR, verbose=verbose, seed=seed,
                                     extra_callbacks=phase_callbacks(extra_callbacks, tensorboard_dir, phase),
                                     sampling=sampling)
            total = per_epoch * len(history)
        histories.append(history)
        seconds.append(total)
        phase_epochs.append(len(history))
        best_val = float(history[MONITOR].min())
        if phase == 1 and fine_tune_epochs > 0:
            phase_one = (best_val, model.get_weights())
        elif phase_one is not None and best_val > phase_one[0]:
            # early stopping restores the best epoch of a phase; keep phase 1 when fine-tuning never beat it
            console.print(f"Fine-tuning did not beat phase 1 on {MONITOR} ({best_val:.4f} vs "
                          f"{phase_one[0]:.4f}): keeping the phase 1 weights.")
            model.set_weights(phase_one[1])
            kept_phase = 1
    if start_weights is not None:
        model.set_weights(weights_between(start_weights, model.get_weights(), start_share))
        started_from["start_share"] = start_share
    history = pd.concat(histories, ignore_index=True)
    history["epoch"] = np.arange(1, len(history) + 1)
    seconds_per_epoch = float(sum(seconds) / max(1, len(history)))
    extra = {"family": "transfer", "backbone": spec.name, "weights": weights_label(spec, weights),
             "phase_epochs": phase_epochs, "backbone_layers_fine_tuned": unfrozen, "preprocessing": spec.preprocess,
             "input_margin": spec.margin,
             "phase1_on_cached_features": bool(pretrained and cache_features and epochs > 0),
             "on_cached_activations": None if on_activations is None else on_activations["cache"],
             "kept_phase": kept_phase, "monitor": MONITOR, "age_head": params["age_head"] if "age" in outputs else None,
             "seed": seed, "tensorboard": None if tensorboard_dir is None else str(tensorboard_dir),
             **({"init_from": started_from} if started_from else {}),
             **({"sampling": sampling_record} if sampling_record is not None else {}),
             **(metadata_extra or {})}
    if evaluate_test:
        extra["cpu_ms_per_image"] = cpu_ms_per_image(model, outputs, data["test"].images)
        extra["test_images"] = len(data["test"].rows)
    extra["train_seconds"] = round(time.perf_counter() - started, 1)
    result = finish_run(model, task, data, params, image_size, data_dir, out_dir, history, seconds_per_epoch,
                        evaluate_test, limit, extra)
    result.extra["cpu_ms_per_image"] = extra.get("cpu_ms_per_image")
    return result


def zero_shot(spec: Backbone, task: str, weights: str, params: dict[str, Any], image_size: int, epochs: int,
              data_dir: Path, limit: int | None, out_dir: Path | None, data: dict[str, SplitData] | None,
              test_limit: int | None, evaluate_test: bool, metadata_extra: dict[str, Any] | None) -> TrainResult:
    """A whole pretrained model (the Cydral networks) scored and saved as its authors trained it: nothing is
    trained, so the recipe's training parameters are recorded but unused and the training split is not read."""
    started = time.perf_counter()
    if weights != "pretrained" or epochs or task != "multitask":
        raise UserError(f"{spec.name} is used as its authors trained it: --weights pretrained, --epochs 0, "
                        "--fine-tune-epochs 0 and --task multitask.")
    model = build_cydral(image_size=image_size)
    if not data:  # val and test only (not the caller's dict, which a trained backbone would fill with all three)
        data = transfer_data(image_size, data_dir, limit, test_limit, splits=("val", "test"))
    extra = {"family": "transfer", "backbone": spec.name, "weights": spec.pretrained, "phase_epochs": [0, 0],
             "backbone_layers_fine_tuned": 0, "preprocessing": "inside the model", "input_margin": spec.margin,
             "zero_shot": True, "kept_phase": 0, "age_head": "cydral", **(metadata_extra or {})}
    if evaluate_test:
        extra["cpu_ms_per_image"] = cpu_ms_per_image(model, list(TASK_OUTPUTS[task]), data["test"].images)
        extra["test_images"] = len(data["test"].rows)
    extra["train_seconds"] = round(time.perf_counter() - started, 1)
    result = finish_run(model, task, data, params, image_size, data_dir, out_dir, None, 0.0, evaluate_test, limit,
                        extra)
    result.extra["cpu_ms_per_image"] = extra.get("cpu_ms_per_image")
    return result
