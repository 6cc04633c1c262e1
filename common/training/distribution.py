"""Training past one machine: fault tolerance (a killed run resumes from its last finished epoch), and (below)
tf.distribute strategies and mixed precision for the trainers. docs/scaling.md shows the commands.

A run's backup lives in <run folder>/backup while it trains: Keras's BackupAndRestore keeps the model and
optimizer state (the weights, the optimizer's moments, step count and learning rate, so a plateau schedule's cuts
survive) and the epoch; Keras leaves every callback's own state out, so this module adds it: early stopping's
best value, patience count and best weights, the plateau schedule's counters, the weight averager's running sum,
and the logged rows and seconds of the epochs already run. The backup goes when training ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from agegender.cli import UserError, atomic_path, console, write_json

BACKUP_FOLDER = "backup"
RUN_KEY_FILE = "run.json"  # what the run was started with: a rerun resumes only the same command


def run_key(settings: dict[str, Any]) -> str:
    """A short hash of what makes two runs the same run (parameters, epochs, data, ...)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def interrupted_run(runs_dir: Path, key: str) -> Path | None:
    """The newest run folder under runs_dir whose unfinished backup was started with the same run key."""
    if not runs_dir.is_dir():
        return None
    for folder in sorted(runs_dir.iterdir(), reverse=True):
        marker = folder / BACKUP_FOLDER / RUN_KEY_FILE
        with contextlib.suppress(OSError, ValueError):
            if json.loads(marker.read_text())["key"] == key:
                return folder
    return None


def mark_run(run_dir: Path, key: str, settings: dict[str, Any]) -> None:
    """Record in the run's backup folder which command it belongs to."""
    write_json(run_dir / BACKUP_FOLDER / RUN_KEY_FILE, {"key": key, "settings": settings})


def _find(callbacks: list, kind: str):
    return next((callback for callback in callbacks if type(callback).__name__ == kind), None)


def training_backup(folder: Path):
    """A keras.callbacks.BackupAndRestore in `folder` that also keeps the state of our other callbacks. Give it
    to agegender.training.loop.fit among the extra callbacks: fit calls keep_state_of() with its early stopping,
    schedule, epoch timer and weight averager, and keeps it after them in the callback list, so it restores
    after they have reset themselves at the start of training and saves after they have updated at the end of
    each epoch. history() gives the logged rows of every epoch, those run before a restart included."""
    import keras

    folder = Path(folder)

    class _Backup(keras.callbacks.BackupAndRestore):
        def __init__(self):
            super().__init__(backup_dir=str(folder / "keras"), double_checkpoint=True)
            self.stopping = self.plateau = self.timer = self.averager = None
            self.earlier: list[dict[str, Any]] = []
            self.resumed_at = 0  # the first epoch (from 1) this process ran, when it continued a backup
            self.rows: list[dict[str, Any]] = []

        def keep_state_of(self, callbacks: list, timer, averager=None) -> None:
            self.stopping, self.plateau = _find(callbacks, "EarlyStopping"), _find(callbacks, "ReduceLROnPlateau")
            self.timer, self.averager = timer, averager

        def history(self):
            import pandas as pd

            return pd.DataFrame(self.earlier + self.rows)

        def on_epoch_end(self, epoch, logs=None):
            self.rows.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()},
                              "seconds": self.timer.seconds[-1] if self.timer else 0.0})
            super().on_epoch_end(epoch, logs)

        def _state_path(self, epoch: int) -> Path:
            return folder / f"state-{epoch}.npz"

        def _save_model(self):
            # ours first, named by epoch: a kill between the two writes leaves Keras at the previous epoch,
            # whose state file is still there (the two newest are kept)
            epoch = self._current_epoch
            state = {"epoch": epoch, "rows": self.earlier + self.rows}
            arrays: dict[str, np.ndarray] = {}
            if self.stopping is not None:
                best = None if self.stopping.best is None else float(self.stopping.best)
                state["early_stopping"] = {"wait": self.stopping.wait, "best": best,
                                           "best_epoch": self.stopping.best_epoch,
                                           "stopped_epoch": self.stopping.stopped_epoch}
                for index, weight in enumerate(self.stopping.best_weights or []):
                    arrays[f"best_{index}"] = np.asarray(weight)
            if self.plateau is not None:
                state["plateau"] = {"wait": self.plateau.wait, "best": float(self.plateau.best),
                                    "cooldown_counter": self.plateau.cooldown_counter}
            if self.averager is not None and self.averager.total is not None:
                state["averaged_epochs"] = self.averager.averaged_epochs
                for index, total in enumerate(self.averager.total):
                    arrays[f"swa_{index}"] = total
            buffer = io.BytesIO()
            np.savez(buffer, state=np.frombuffer(json.dumps(state).encode(), np.uint8), **arrays)
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self._state_path(epoch)) as tmp:
                tmp.write_bytes(buffer.getvalue())
            super()._save_model()
            for old in folder.glob("state-*.npz"):
                if int(old.stem.split("-")[1]) < epoch - 1:
                    old.unlink(missing_ok=True)

        def _load_model(self):
            super()._load_model()  # the weights, optimizer state and epoch, when a backup is there
            epoch = self.model._initial_epoch
            if not epoch:
                return
            try:
                self._restore(epoch)
            except FileNotFoundError:
                console.print(f"[yellow]The backup in {folder} holds epoch {epoch}'s weights but not its callbacks' "
                              "state; early stopping and the schedule's counters start afresh.[/]")
            self.resumed_at = epoch + 1
            console.print(f"[yellow]Resuming the interrupted run from its backup in {folder}: epoch "
                          f"{epoch + 1}.[/]")

        def _restore(self, epoch: int) -> None:
            with np.load(self._state_path(epoch)) as stored:
                state = json.loads(stored["state"].tobytes().decode())
                arrays = {key: stored[key] for key in stored.files if key != "state"}
            if self.stopping is not None and "early_stopping" in state:
                for key, value in state["early_stopping"].items():
                    setattr(self.stopping, key, value)
                best = [arrays[f"best_{i}"] for i in range(sum(key.startswith("best_") for key in arrays))]
                self.stopping.best_weights = best or None
            if self.plateau is not None and "plateau" in state:
                for key, value in state["plateau"].items():
                    setattr(self.plateau, key, value)
            if self.averager is not None and "averaged_epochs" in state:
                self.averager.averaged_epochs = list(state["averaged_epochs"])
                self.averager.total = [arrays[f"swa_{i}"] for i in range(sum(k.startswith("swa_") for k in arrays))]
            self.earlier = [row for row in state["rows"] if row["epoch"] <= epoch]

        def on_train_end(self, logs=None):
            super().on_train_end(logs)
            self.model._initial_epoch = None  # Keras keeps it on the model, where a later fit() would read it
            shutil.rmtree(folder, ignore_errors=True)

    return _Backup()


# ---------------------------------------------------------------- strategies and mixed precision

STRATEGIES = ("auto", "one", "mirrored", "multi-worker")
TRY_MULTI_WORKER = "AGEGENDER_TRY_MULTI_WORKER"  # set: build the multi-worker strategy despite the known failure


def cluster_task() -> tuple[str, int, int]:
    """(task type, index, number of workers) from TF_CONFIG; ("worker", 0, 1) without it."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster, task = config.get("cluster", {}), config.get("task", {})
    workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    return str(task.get("type", "worker")), int(task.get("index", 0)), max(1, workers)


def is_chief() -> bool:
    """Whether this process writes the model folder and logs: the chief, or worker 0 when there is none."""
    kind, index, _ = cluster_task()
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    return kind == "chief" or (kind == "worker" and index == 0 and "chief" not in config.get("cluster", {}))


def make_strategy(name: str):
    """(the tf.distribute strategy, what metadata.json records about it). auto: mirrored when more than one
    GPU is visible, else one. mirrored: every GPU, or without one every logical CPU device (tests split the CPU
    in two). multi-worker: MultiWorkerMirroredStrategy over the cluster TF_CONFIG describes."""
    import tensorflow as tf

    if name not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {name!r}.")
    # physical devices: listing logical ones starts TensorFlow's runtime, after which the multi-worker
    # strategy can no longer set up its collectives
    gpus = [f"/device:GPU:{index}" for index, _ in enumerate(tf.config.list_physical_devices("GPU"))]
    chosen = ("mirrored" if len(gpus) > 1 else "one") if name == "auto" else name
    if chosen == "one":
        strategy, devices = tf.distribute.get_strategy(), gpus[:1] or ["/device:CPU:0"]
    elif chosen == "mirrored":
        devices = gpus or [device.name for device in tf.config.list_logical_devices("CPU")]
        # NCCL is for GPUs; CPU replicas reduce through one device
        strategy = tf.distribute.MirroredStrategy(
            devices=devices, cross_device_ops=None if gpus else tf.distribute.ReductionToOneDevice())
    else:
        if not os.environ.get("TF_CONFIG"):
            raise UserError("--strategy multi-worker reads the cluster from the TF_CONFIG environment variable; "
                            "set it on every machine (docs/scaling.md shows one for two machines).")
        if not os.environ.get(TRY_MULTI_WORKER):
            raise UserError(
                "--strategy multi-worker does not train with this Keras: Keras 3 fails inside fit() under "
                "tf.distribute.MultiWorkerMirroredStrategy (a PerReplica conversion error; keras-team/keras#20585, "
                f"seen here with two workers on one machine); set {TRY_MULTI_WORKER}=1 to try a newer Keras, or "
                "use --strategy mirrored on one machine with several GPUs.")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        devices = gpus or ["/device:CPU:0"]
    kind, index, workers = cluster_task() if chosen == "multi-worker" else ("worker", 0, 1)
    return strategy, {"strategy": chosen, "asked": name, "replicas": int(strategy.num_replicas_in_sync),
                      "devices": devices, "workers": workers, "task": f"{kind}:{index}"}


def set_precision(mixed: bool) -> dict[str, Any]:
    """The Keras dtype policy for the models built next: mixed_float16 (float16 maths, float32 weights; the
    output layers of agegender.models.cnn keep float32) or float32. On a CPU, float16 is slower, so it is only
    used there when asked with a warning."""
    import keras
    import tensorflow as tf

    policy = "mixed_float16" if mixed else "float32"
    if mixed and not tf.config.list_physical_devices("GPU"):
        console.print("[yellow]--mixed-precision pays on a GPU; this machine has none, so float16 maths run on "
                      "the CPU (slower).[/]")
    keras.mixed_precision.set_global_policy(policy)
    return {"mixed_precision": mixed, "dtype_policy": policy}


@contextlib.contextmanager
def distributed(strategy_name: str = "one", mixed_precision: bool = False):
    """Build and train inside: the strategy's scope and the dtype policy, yielding what metadata.json records
    under "distribution". The policy goes back to float32 afterwards."""
    import keras

    strategy, record = make_strategy(strategy_name)
    record.update(set_precision(mixed_precision))
    try:
        with strategy.scope():
            yield record
    finally:
        keras.mixed_precision.set_global_policy("float32")
