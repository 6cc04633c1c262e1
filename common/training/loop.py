"""The training loop every trainer shares: data, callbacks (TensorBoard included), fit, and the tail that
evaluates on validation and test and saves the model folder."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agegender.cli import UserError, console, write_json
from agegender.data.datasets import UTKFACE
from agegender.data.labels import AGE_SCALE, TASK_OUTPUTS
from agegender.data.manifest import (
    data_state,
    load_split,
    manifest_datasets,
    prepared_crops,
    prepared_extras,
    utkface_split_sha256,
)
from agegender.data.paths import DATA_DIR, SEED
from agegender.data.pipeline import Augment, make_dataset
from agegender.inference.gender_calibration import CALIBRATION_KEY, GenderCalibration
from agegender.inference.intervals import INTERVAL_KEY, calibrate
from agegender.inference.predictor import Predictor
from agegender.models.age_bins import DISTRIBUTION_LAYER
from agegender.models.folders import METRICS_FILE, load_model, make_metadata, save_model, staging_dir
from agegender.reporting.metrics import age_metrics, gender_metrics, range_rows, ranged_metrics
from agegender.reporting.plots import plot_age_error, plot_confusion, plot_history
from agegender.reporting.tables import rich_table
from agegender.training.calibrate import can_fit_calibration, fit_calibration
from agegender.training.sampling import check_dataset_weights, describe_sampling, sampling_probabilities


@dataclass
class SplitData:
    images: np.ndarray
    rows: pd.DataFrame

    def targets(self, outputs: list[str]) -> dict[str, np.ndarray]:
        """Per output, the training target: gender as 0/1, age as its range [low, high] / AGE_SCALE (N x 2;
        low == high for an exact age); NaN where the label is missing."""
        values = {"age": lambda: age_range_targets(self.rows),
                  "gender": lambda: self.rows["gender"].to_numpy(np.float32)}
        return {name: values[name]() for name in outputs}


def age_range_targets(rows: pd.DataFrame) -> np.ndarray:
    """[low, high] / AGE_SCALE per row (N x 2): an exact age gives low == high, an age range (age_min, age_max;
    an open-ended one reaches AGE_SCALE) the ages that round into it (age_min - 0.5 to age_max + 0.5, as
    agegender.reporting.metrics.range_metrics scores it), no age NaN in both."""
    exact = pd.to_numeric(rows["age"], errors="coerce").to_numpy(np.float64) if len(rows) else np.zeros(0)
    low, high = exact.copy(), exact.copy()
    if "age_min" in rows:
        ranged = range_rows(rows)
        low[ranged] = rows["age_min"].to_numpy(np.float64, na_value=np.nan)[ranged] - 0.5
        high[ranged] = np.nan_to_num(rows["age_max"].to_numpy(np.float64, na_value=np.nan)[ranged] + 0.5,
                                     nan=AGE_SCALE)
    return (np.stack([low, high], axis=1) / AGE_SCALE).astype(np.float32)


@dataclass
class TrainResult:
    model: Any
    history: pd.DataFrame
    val_metrics: dict[str, Any]
    test_metrics: dict[str, Any] | None
    seconds_per_epoch: float
    out_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def split_cap(split: str, limit: int | None) -> int | None:
    """How many images of a split a run with `limit` training images uses (val and test: a proportional cap)."""
    return None if limit is None else max(8, limit if split == "train" else limit // 4)


def load_data(image_size: int, data_dir: Path = DATA_DIR, limit: int | None = None,
              splits=("train", "val", "test"), datasets=(UTKFACE,),
              outputs: list[str] | None = None) -> dict[str, SplitData]:
    """Cached arrays per split of the named datasets (None: every one in the manifest); `limit` caps the training
    images of each (val and test get a proportional cap). With `outputs`, only the images with at least one of
    those labels (a gender-only dataset gives an age model nothing)."""
    data = {}
    for split in splits:
        images, rows = load_split(split, image_size, data_dir, split_cap(split, limit), datasets)
        if outputs is not None:
            keep = rows[list(outputs)].notna().any(axis=1).to_numpy().copy()
            if "age" in outputs and "age_min" in rows:  # an age range is an age label too
                keep |= rows["age_min"].notna().to_numpy()
            if not keep.all():
                images, rows = images[keep], rows[keep].reset_index(drop=True)
        data[split] = SplitData(images, rows)
    return data


def age_sample_weights(ages: np.ndarray, power: float) -> np.ndarray | None:
    """Weights ~ (frequency of the 5-year age bin) ** -power, mean 1; power 0 means none."""
    if power <= 0:
        return None
    ages = np.asarray(ages, dtype=float)
    known = ~np.isnan(ages)  # an image without an age keeps weight 1 (its age loss is masked anyway)
    bins = np.minimum(ages[known] // 5, 20).astype(int)
    counts = np.bincount(bins, minlength=21).astype(float)
    weights = np.ones(len(ages))
    weights[known] = counts[bins] ** -power
    weights[known] /= weights[known].mean()
    return weights.astype(np.float32)


LR_SCHEDULES = ("plateau", "cosine")


def default_patience(schedule: str) -> int:
    """Epochs without improvement before early stopping: a cosine cycle gains most in its low-rate tail, so
    it gets more room than plateau (a warm restart stopped after 5 noisy high-rate epochs)."""
    return 10 if schedule == "cosine" else 5


def cosine_rate(epoch: int, epochs: int, base_rate: float, floor: float = 0.01) -> float:
    """Learning rate for `epoch` (0-based): a cosine from base_rate that would reach floor * base_rate one epoch
    after the last, so a 1- or 2-epoch run still learns in every epoch."""
    progress = epoch / max(1, epochs)
    return float(base_rate * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * progress))))


def swa_rate_for(epoch: int, epochs: int, base_rate: float, swa_epochs: int, swa_rate: float) -> float:
    """Learning rate with weight averaging: a cosine from base_rate down to swa_rate over the epochs before the
    averaging window, then swa_rate held through the last swa_epochs (Izmailov et al.'s SWA schedule)."""
    anneal = epochs - swa_epochs
    if epoch >= anneal:
        return float(swa_rate)
    return float(swa_rate + (base_rate - swa_rate) * 0.5 * (1 + np.cos(np.pi * epoch / anneal)))


def train_sample_weights(rows: pd.DataFrame, outputs: list[str], params: dict[str, Any]) -> np.ndarray | None:
    """Rare-age weights for the training images (params["age_weight_power"]); None without an age output."""
    if "age" not in outputs:
        return None
    return age_sample_weights(rows["age"].to_numpy(), float(params.get("age_weight_power", 0.0)))


def history_frame(history, timer) -> pd.DataFrame:
    """A Keras History as a table: epoch (from 1), every logged metric, and wall seconds per epoch."""
    frame = pd.DataFrame(history.history)
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    frame["seconds"] = timer.seconds[: len(frame)]
    return frame


def callbacks(monitor: str, mode: str, patience: int, checkpoint: Path | None, schedule: str = "plateau",
              epochs: int = 1, base_rate: float = 1e-3, swa_epochs: int = 0, swa_rate: float = 0.0) -> list:
    """Early stopping (best weights restored), the learning-rate schedule and best-checkpoint saving.

    "plateau" halves the rate when the monitor stalls; "cosine" anneals it over the planned epochs, which
    suits a fixed CPU budget better (the rate is still high when plateau would first cut it). With weight
    averaging (swa_epochs > 0), cosine anneals to swa_rate instead and holds it for the averaged epochs."""
    import keras

    if schedule not in LR_SCHEDULES:
        raise UserError(f"Unknown learning-rate schedule {schedule!r}; expected one of {', '.join(LR_SCHEDULES)}.")
    found = [keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience, restore_best_weights=True,
                                           verbose=1)]
    if schedule == "plateau":
        found.append(keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=0.5,
                                                       patience=max(1, patience // 2), min_lr=1e-6, verbose=1))
    elif swa_epochs > 0:
        found.append(keras.callbacks.LearningRateScheduler(
            lambda epoch: swa_rate_for(epoch, epochs, base_rate, swa_epochs, swa_rate)))
    else:
        found.append(keras.callbacks.LearningRateScheduler(lambda epoch: cosine_rate(epoch, epochs, base_rate)))
    if checkpoint is not None:
        found.append(keras.callbacks.ModelCheckpoint(checkpoint, monitor=monitor, mode=mode, save_best_only=True))
    return found


class EpochTimer:
    """Keras callback recording wall seconds per epoch."""
    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.seconds = []

            def on_epoch_begin(self, epoch, logs=None):
                self._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.seconds.append(time.perf_counter() - self._start)

        return _Timer()


class StopOnSignal:
    """Keras callback: the first Ctrl-C (or SIGTERM) ends training after the current epoch, so the best
    weights are restored, evaluated and saved as usual; a second one interrupts at once."""
    def __new__(cls):
        import signal

        import keras

        class _Stop(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self._previous = {}
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(ValueError):  # not the main thread
                        self._previous[sig] = signal.signal(sig, self._handle)

            def _handle(self, signum, frame):
                if self.model.stop_training:
                    raise KeyboardInterrupt
                console.print("\n[yellow]Stopping after this epoch; press Ctrl-C again to abort.[/]")
                self.model.stop_training = True

            def on_train_end(self, logs=None):
                for sig, handler in self._previous.items():
                    signal.signal(sig, handler)

        return _Stop()


class WeightAverager:
    """Keras callback: the running mean of the weights at the end of each of the last `swa_epochs` planned
    epochs (stochastic weight averaging); `average()` gives them as a list for set_weights."""
    def __new__(cls, epochs: int, swa_epochs: int):
        import keras

        class _Averager(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.total, self.averaged_epochs = None, []

            def on_epoch_end(self, epoch, logs=None):
                if epoch < epochs - swa_epochs:
                    return
                weights = [np.asarray(w, dtype=np.float64) for w in self.model.get_weights()]
                self.total = weights if self.total is None else [t + w for t, w in zip(self.total, weights,
                                                                                     strict=True)]
                self.averaged_epochs.append(epoch + 1)

            def average(self) -> list[np.ndarray]:
                return [(t / len(self.averaged_epochs)).astype(np.float32) for t in self.total]

        return _Averager()


def update_batchnorm(model, batches, max_batches: int = 64) -> None:
    """Re-estimate every BatchNorm layer's moving statistics on training batches: averaged weights need
    statistics of their own. Each batch enters with weight 1/(k+1), an exact mean over batches.

    The batches should be augmented as in training: the heads learned on activations normalised by the
    augmented population's statistics (statistics of clean training faces raised the validation age MAE by
    0.75 years). Dropout is switched off meanwhile, so the statistics are those of the inference path."""
    import keras

    def walk(layer):
        yield layer
        for inner in getattr(layer, "layers", []):  # nested models, e.g. a transfer backbone
            yield from walk(inner)

    layers = list(walk(model))
    norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    dropouts = [layer for layer in layers if isinstance(layer, keras.layers.Dropout)]
    momenta, rates = [layer.momentum for layer in norms], [layer.rate for layer in dropouts]
    try:
        for layer in dropouts:
            layer.rate = 0.0
        for step, batch in enumerate(batches.take(max_batches)):
            for layer in norms:
                layer.momentum = step / (step + 1)
            model(batch[0], training=True)
    finally:
        for layer, momentum in zip(norms, momenta, strict=True):
            layer.momentum = momentum
        for layer, rate in zip(dropouts, rates, strict=True):
            layer.rate = rate


def average_weights(model, averager, train_ds, val_ds, monitor: str, mode: str, best_value: float) -> dict[str, Any]:
    """Swap in the averaged weights when they beat the best epoch's (`best_value`, the monitor as logged at the
    epoch early stopping restored) on validation; returns what was done."""
    best_weights = model.get_weights()
    model.set_weights(averager.average())
    update_batchnorm(model, train_ds)
    averaged_value = float(model.evaluate(val_ds, return_dict=True, verbose=0)[monitor.removeprefix("val_")])
    used = averaged_value < best_value if mode == "min" else averaged_value > best_value
    if not used:
        model.set_weights(best_weights)
    first, last = averager.averaged_epochs[0], averager.averaged_epochs[-1]
    console.print(f"Weight average of epochs {first}-{last}: {monitor} "
                  f"{averaged_value:.4f} against the best epoch's {best_value:.4f} -> "
                  f"{'averaged weights kept' if used else 'best epoch kept'}.")
    return {"epochs": averager.averaged_epochs, "monitor": monitor, "averaged": averaged_value,
            "best_epoch": best_value, "used": used}


def check_monitor(model, monitor: str, validation: bool = True) -> None:
    """Fail loudly when a callback would watch a metric that Keras will never log.

    Call it after one evaluate() step: Keras 3 only knows the flattened names (e.g. "age_mae") by then."""
    names = {"loss", *model.get_metrics_result()}
    logged = {f"val_{n}" for n in names} | names if validation else names
    if monitor not in logged:
        raise UserError(f"Metric {monitor!r} is not logged by this model; it logs {', '.join(sorted(logged))}.")


def resolve_verbose(verbose: int | str) -> int | str:
    """Keras's "auto" draws a progress bar that redraws one line, which a log file keeps as one long line of
    control characters: outside a terminal, one line per epoch instead."""
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    return verbose


def tensorboard_callback(log_dir: Path):
    """Keras's TensorBoard callback: losses, metrics and the learning rate per epoch under log_dir/train and
    log_dir/validation (`tensorboard --logdir results/runs`)."""
    import keras

    return keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False, update_freq="epoch")


def fit(model, data: dict[str, SplitData], outputs: list[str], params: dict[str, Any], epochs: int,
        monitor: str, mode: str = "min", patience: int | None = None, extra_callbacks: list | None = None,
        checkpoint: Path | None = None, verbose: int | str = "auto",
        summary: dict[str, Any] | None = None, seed: int = SEED,
        sampling: np.ndarray | None = None) -> tuple[pd.DataFrame, float]:
    """Train with early stopping, LR reduction and checkpointing; returns (history, seconds per epoch). With
    `sampling` (a chance per training image, agegender.training.sampling), epochs draw images by it instead of
    shuffling.

    params["swa_epochs"] > 0 averages the weights of that many last epochs; what came of it goes into
    summary["swa"] when a summary dict is given. An agegender.training.distribution.training_backup among
    extra_callbacks backs the training state up after every epoch, so a killed run continues from its last
    finished epoch when fit runs again (summary["resumed_at_epoch"] says where), its history covering every
    epoch."""
    import keras

    schedule = str(params.get("lr_schedule", "plateau"))
    if patience is None:
        patience = default_patience(schedule)

    keras.utils.set_random_seed(seed)
    augment = replace(Augment().scaled(float(params.get("augment", 1.0))),
                      noise=float(params.get("noise_augment", 0.0)), photo=float(params.get("photo_augment", 0.0)))
    train, val = data["train"], data["val"]
    weights = train_sample_weights(train.rows, outputs, params)
    batch_size = int(params["batch_size"])
    train_ds = make_dataset(train.images, train.targets(outputs), batch_size, training=True, augment=augment,
                            sample_weight=weights, sampling=sampling)
    val_ds = make_dataset(val.images, val.targets(outputs), batch_size, training=False)
    # one step first so the metric names exist, then check what the callbacks watch
    model.evaluate(val_ds.take(1), verbose=0)
    check_monitor(model, monitor)
    timer = EpochTimer()
    base_rate = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    swa_epochs = min(int(params.get("swa_epochs", 0)), epochs)
    swa_rate = float(params.get("swa_learning_rate") or base_rate / 2)
    averager = WeightAverager(epochs, swa_epochs) if swa_epochs > 0 else None
    every = [timer, StopOnSignal(), *callbacks(monitor, mode, patience, checkpoint, schedule, epochs, base_rate,
                                               swa_epochs, swa_rate),
             *([averager] if averager else []), *(extra_callbacks or [])]
    backup = next((callback for callback in every if hasattr(callback, "keep_state_of")), None)
    if backup is not None:  # after the callbacks whose state it keeps
        backup.keep_state_of(every, timer, averager)
        every = [*(callback for callback in every if callback is not backup), backup]
    history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=resolve_verbose(verbose),
                        shuffle=False,  # make_dataset shuffles (Keras warns that it would ignore True)
                        callbacks=every)
    frame = history_frame(history, timer) if backup is None else backup.history()
    if backup is not None and backup.resumed_at and summary is not None:
        summary["resumed_at_epoch"] = backup.resumed_at
    if averager is not None and averager.averaged_epochs:
        logged = frame[monitor]
        best_value = float(min(logged) if mode == "min" else max(logged))  # the epoch early stopping restored
        swa = {**average_weights(model, averager, train_ds, val_ds, monitor, mode, best_value),
               "learning_rate": swa_rate if schedule == "cosine" else None}  # plateau sets its own rates
        if summary is not None:
            summary["swa"] = swa
    return frame, float(frame["seconds"].mean()) if len(frame) else 0.0


def predict_split(model, split: SplitData, outputs: list[str], batch_size: int = 128,
                  age_bins: bool = False) -> dict[str, np.ndarray]:
    """Predictions in user units: age in years, p_female (and with age_bins the age distribution of a model
    that has one)."""
    predictor = Predictor(model, {"outputs": outputs, "age_scale": AGE_SCALE, "pixel_scaling": "divide_by_255"})
    return predictor.predict_arrays(split.images, batch_size=batch_size, age_bins=age_bins)


def evaluate(predicted: dict[str, np.ndarray], rows: pd.DataFrame) -> dict[str, Any]:
    """Gender and age metrics over the images that have each label. With several datasets, the top level is
    UTKFace's (the figures every model is compared on) and "datasets" holds each dataset's."""
    if "dataset" in rows and rows["dataset"].nunique() > 1:
        each = {name: evaluate({key: value[(rows["dataset"] == name).to_numpy()] for key, value in predicted.items()},
                               rows[rows["dataset"] == name])
                for name in dict.fromkeys(rows["dataset"])}
        return {**each.get(UTKFACE, {}), "datasets": each}
    metrics: dict[str, Any] = {}
    if "p_female" in predicted and rows["gender"].notna().any():
        known = rows["gender"].notna().to_numpy()
        metrics["gender"] = gender_metrics(rows["gender"].to_numpy()[known], predicted["p_female"][known])
    if "age" in predicted and rows["age"].notna().any():
        known = rows["age"].notna().to_numpy()
        metrics["age"] = age_metrics(rows["age"].to_numpy()[known], predicted["age"][known])
    within = ranged_metrics(rows, predicted["age"]) if "age" in predicted else None
    if within is not None:
        metrics["age_range"] = within
    return metrics


def primary(predicted: dict[str, np.ndarray], rows: pd.DataFrame) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """The UTKFace part of predictions and rows (the plots and the age interval are UTKFace's)."""
    if "dataset" not in rows or rows["dataset"].eq(UTKFACE).all():
        return predicted, rows
    keep = rows["dataset"].eq(UTKFACE).to_numpy()
    return ({key: value[keep] for key, value in predicted.items()}, rows[keep].reset_index(drop=True))


def save_run(out_dir: Path, model, metadata: dict[str, Any], history: pd.DataFrame | None, test_metrics: dict,
             predicted: dict[str, np.ndarray], rows: pd.DataFrame, validation: dict[str, Any] | None = None) -> None:
    """model.keras, metadata.json, metrics.json (test figures, and the validation ones under "validation"),
    history.csv and the plots, swapped in atomically (no history for a model that was assembled rather than
    trained, such as the ensemble)."""
    with staging_dir(out_dir) as folder:
        save_model(model, folder, metadata)
        write_json(folder / METRICS_FILE, {"split": "test", **test_metrics,
                                           **({"validation": validation} if validation else {})})
        if history is not None:
            history.to_csv(folder / "history.csv", index=False)
            plot_history(history, folder / "learning_curves.png")
        if "p_female" in predicted:
            plot_confusion(np.array(test_metrics["gender"]["confusion_matrix"]), folder / "confusion_matrix.png")
        if "age" in predicted:
            plot_age_error(rows["age"].to_numpy(), predicted["age"], folder / "age_error.png")


def fit_gender_calibration(predicted: dict[str, np.ndarray], rows: pd.DataFrame) -> dict[str, Any] | None:
    """The gender calibration record fitted on validation predictions (agegender.training.calibrate), or None
    when there are too few faces with a gender to fit one."""
    known = rows["gender"].notna().to_numpy()
    truth = rows["gender"].to_numpy()[known]
    if not can_fit_calibration(truth):
        return None
    return fit_calibration(predicted["p_female_model"][known], truth, rows=rows[known])


def finish_run(model, task: str, data: dict[str, SplitData], params: dict[str, Any], image_size: int,
               data_dir: Path, out_dir: Path | None, history: pd.DataFrame | None = None,
               seconds_per_epoch: float = 0.0, evaluate_test: bool = True, limit: int | None = None,
               metadata_extra: dict[str, Any] | None = None,
               test_predicted: dict[str, np.ndarray] | None = None) -> TrainResult:
    """The tail every trainer shares: validation metrics, then (unless evaluate_test is False, as in a tuning
    trial, which must never see the test split) test metrics and the model folder saved to out_dir (skipped
    when it is None), with metadata.json recording metadata_extra and, for a model with an age output, its 80%
    age interval calibrated on the validation predictions (for one with a gender output, its gender calibration
    and certainty threshold, agegender.inference.gender_calibration). test_predicted: the model's test predictions in
    predict_split's units when the caller already has them (the ensemble mixes its members'), not made again."""
    outputs = list(TASK_OUTPUTS[task])
    val_predicted = predict_split(model, data["val"], outputs, age_bins=True)
    val_metrics = evaluate(val_predicted, data["val"].rows)
    result = TrainResult(model, history, val_metrics, None, seconds_per_epoch)
    if not evaluate_test:
        return result
    predicted = test_predicted if test_predicted is not None else predict_split(model, data["test"], outputs)
    gender_calibration = fit_gender_calibration(val_predicted, data["val"].rows) if "gender" in outputs else None
    if gender_calibration:  # the test figures are those of the p_female the saved model will give
        predicted = {**predicted, "p_female": GenderCalibration.from_metadata(
            {CALIBRATION_KEY: gender_calibration}).apply(predicted["p_female"])}
    result.test_metrics = evaluate(predicted, data["test"].rows)
    if out_dir is not None:
        extra = {"epochs_run": 0 if history is None else len(history), "seconds_per_epoch": seconds_per_epoch,
                 "train_images": len(data["train"].rows) if "train" in data else 0,  # none for an ensemble
                 "parameters": int(model.count_params()),
                 "utkface_crops": prepared_crops(data_dir), "extra_datasets": prepared_extras(data_dir),
                 "utkface_split_sha256": utkface_split_sha256(data_dir),
                 **(metadata_extra or {})}
        if "age" in outputs:
            val_age, val_rows = primary(val_predicted, data["val"].rows)
            extra[INTERVAL_KEY] = calibrate(val_age["age"], val_rows["age"].to_numpy(),
                                            val_age.get(DISTRIBUTION_LAYER))
        if gender_calibration:
            extra[CALIBRATION_KEY] = gender_calibration
        metadata = make_metadata(task, image_size, params, manifest_hash(data_dir), **extra)
        save_run(out_dir, model, metadata, history, result.test_metrics, *primary(predicted, data["test"].rows),
                 validation={**val_metrics, "limit": limit})
        result.out_dir = Path(out_dir)
    return result


def train_model(task: str, build_model, params: dict[str, Any], image_size: int, epochs: int,
                data_dir: Path = DATA_DIR, limit: int | None = None, out_dir: Path | None = None,
                extra_callbacks: list | None = None, monitor: str = "val_loss", mode: str = "min",
                evaluate_test: bool = True, verbose: int | str = "auto",
                metadata_extra: dict[str, Any] | None = None, init_from: Path | None = None,
                patience: int | None = None, seed: int = SEED, tensorboard_dir: Path | None = None,
                balance: tuple[str, ...] = (), dataset_weights: dict[str, float] | None = None) -> TrainResult:
    """Build, fit, evaluate on validation (and test) and save to out_dir (skipped when it is None); with
    tensorboard_dir, TensorBoard logs every epoch there.

    Every dataset in the manifest is used (the images with a label this task predicts); `dataset_weights`
    ({name: weight}, 1 unless given, 0 leaves one out of training) and `balance` (labels whose groups are drawn
    equally often, agegender.training.sampling) set how often each training image is drawn."""
    started = time.perf_counter()
    outputs = list(TASK_OUTPUTS[task])
    data = load_data(image_size, data_dir, limit, datasets=None, outputs=outputs)
    sampling, sampling_record = training_sampling(data["train"].rows, data_dir, task, balance, dataset_weights)
    import keras

    keras.utils.set_random_seed(seed)  # the initial weights too: the same seed gives the same run (and replicas)
    model = build_model(image_size, params)
    metadata_extra = {"family": task, **({"age_head": params.get("age_head")} if "age" in outputs else {}),
                      **(metadata_extra or {})}
    if init_from is not None:
        metadata_extra["init_from"] = warm_start(model, init_from, task, image_size)
    patience = patience or default_patience(str(params.get("lr_schedule", "plateau")))
    extra_callbacks = [*(extra_callbacks or []), *([tensorboard_callback(tensorboard_dir)] if tensorboard_dir else [])]
    summary: dict[str, Any] = {}
    history, seconds = fit(model, data, outputs, params, epochs, monitor, mode, patience,
                           extra_callbacks=extra_callbacks, verbose=verbose, summary=summary, seed=seed,
                           sampling=sampling)
    if sampling_record is not None:
        metadata_extra["sampling"] = sampling_record
    metadata_extra.update(summary, monitor=monitor, patience=patience, seed=seed,
                          tensorboard=None if tensorboard_dir is None else str(tensorboard_dir),
                          train_seconds=round(time.perf_counter() - started, 1))
    return finish_run(model, task, data, params, image_size, data_dir, out_dir, history, seconds, evaluate_test,
                      limit, metadata_extra)


def training_sampling(rows: pd.DataFrame, data_dir: Path, task: str, balance: tuple[str, ...] = (),
                      dataset_weights: dict[str, float] | None = None
                      ) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """The chance of each training row per draw (None: every image once an epoch), from `dataset_weights`
    ({name: weight}, 1 unless given) and `balance`, and what metadata.json records of it (`sampling`: the
    balance and the weight of each dataset that has training rows; None for a plain run on one dataset); the
    split is printed when it is not uniform."""
    weights = check_dataset_weights(dataset_weights or {}, manifest_datasets(data_dir))
    weights = {name: weight for name, weight in weights.items() if name in set(rows["dataset"])}
    if not any(weights.values()):  # e.g. an age model whose only weighted dataset has no ages
        raise UserError(f"No training image of a dataset with weight above 0 has a label the {task} model learns.")
    sampling = sampling_probabilities(rows, tuple(balance), weights)
    if sampling is not None:
        describe_sampling(rows, sampling, tuple(balance))
    record = {"balance": list(balance), "dataset_weights": weights} if sampling is not None or len(weights) > 1 \
        else None
    return sampling, record


def evaluate_folder(folder: Path, split: str = "val", data_dir: Path = DATA_DIR,
                    limit: int | None = None) -> dict[str, Any]:
    """A saved model's metrics on a split of every dataset in data_dir, as its trainer measured them (the Keras
    model, the split capped as load_data caps it for `limit`; UTKFace's at the top level, each dataset's under
    "datasets")."""
    predictor = Predictor.load(folder, backend="keras")
    images, rows = load_split(split, predictor.image_size, data_dir, split_cap(split, limit), datasets=None)
    return evaluate(predictor.predict_arrays(images, batch_size=128), rows)


def warm_start(model, folder: Path, task: str, image_size: int) -> dict[str, Any]:
    """Copy a saved model's weights into a freshly built one of the same architecture; returns what the new
    metadata records about the start (including the epochs already trained, summed over earlier restarts)."""
    source, metadata = load_model(folder)
    if metadata.get("task") != task or int(metadata.get("image_size", 0)) != image_size:
        raise UserError(f"{folder} holds a {metadata.get('task')} model at {metadata.get('image_size')} px; "
                        f"--init-from needs a {task} model at {image_size} px.")
    try:
        model.set_weights(source.get_weights())
    except ValueError as error:
        raise UserError(f"{folder} has a different architecture from the model being trained "
                        f"(check --age-head and the width): {str(error).splitlines()[0]}") from error
    earlier = metadata.get("init_from") or {}
    return {"folder": str(folder), "created": metadata.get("created"),
            "epochs_before": int(earlier.get("epochs_before", 0)) + int(metadata.get("epochs_run", 0)),
            "seconds_before": float(earlier.get("seconds_before", 0.0))
            + float(metadata.get("seconds_per_epoch", 0.0)) * int(metadata.get("epochs_run", 0))}


def weights_between(start: list[np.ndarray], end: list[np.ndarray], start_share: float) -> list[np.ndarray]:
    """Each weight start_share of the way back from a warm restart's end to its start (a WiSE-FT average): the
    restart's gains on its new data are largely held while the start's behaviour on its own data comes back.
    Variables that are not real numbers (a random layer's integer seed state) keep the end's value."""
    return [start_share * np.asarray(a, np.float32) + (1.0 - start_share) * np.asarray(b, np.float32)
            if np.issubdtype(np.asarray(b).dtype, np.floating) else b for a, b in zip(start, end, strict=True)]


def report(task: str, result: TrainResult) -> None:
    print_metrics(f"{task}: test split", result.test_metrics)
    console.print(f"Saved to {result.out_dir} ({result.seconds_per_epoch:.1f} s per epoch, "
                  f"{len(result.history)} epochs).")


def manifest_hash(data_dir: Path = DATA_DIR) -> str:
    return data_state(data_dir)["manifest_sha256"]


def print_metrics(title: str, metrics: dict[str, Any]) -> None:
    rows = [[f"{group} {name}", f"{value:.4f}"] for group, values in metrics.items() if isinstance(values, dict)
            for name, value in values.items() if isinstance(value, float)]
    console.print(rich_table(title, ["metric", "value"], rows))
