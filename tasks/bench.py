"""Speed benchmark: training throughput through three input pipelines, and CPU inference for every saved model

    python tasks/bench.py            # full run: results/bench/cpu.json and its tables in results/bench/cpu.md
    python tasks/bench.py --quick    # a smoke test on tiny sizes (cpu-quick.json and cpu-quick.md)

Training (per model family, after warm-up steps): images/s through our pipeline (`agegender.data.pipeline.make_dataset`
with augmentation), the same model fed one batch already in memory (the ceiling), and a "naive" pipeline
that reads, decodes and resizes every JPEG at every step the way `keras.utils.image_dataset_from_directory`
does, with Keras augmentation layers, as most notebooks do.
Inference (per folder in results/models/): model load time, latency per face at batch 1 including
alignment, faces/s at batch 64, and `predict` (tasks/predict.py's predict_files) over a folder of images with
and without face detection. Each measurement runs in its own Python process, so its peak memory (maxrss) is
its own. Wall figures on a shared machine move with the load, so CPU seconds per image are recorded too.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from agegender.cli import UserError, console, err_console, user_errors, write_json, write_text
from agegender.data.paths import DATA_DIR, MODELS_DIR, REPO_ROOT, RESULTS_DIR, SEED
from agegender.models.folders import EXPORT_FILES, model_folders
from agegender.models.registry import FAMILIES, TRAINABLE
from agegender.reporting.machine import machine_info
from agegender.reporting.tables import markdown_table, rich_table

BENCH_DIR = RESULTS_DIR / "bench"
PIPELINES = ("ours", "in_memory", "naive")
TRANSFER_BACKBONE = "efficientnetb0"  # random weights: ImageNet weights do not change the speed
IMAGE_SIZE = 128
BATCH_SIZE = 64
STEPS, WARMUP = 20, 3
PREDICT_IMAGES, LATENCY_FACES = 1000, 200
THROUGHPUT_BATCH = 64
QUICK = {"steps": 3, "warmup": 1, "images": 12, "faces": 8, "batch_size": 16}
WORKER_TIMEOUT_S = 1800
TARGETS = {  # from issue 8: an off-the-shelf ONNX age+gender model measured on this machine
    "pipeline_vs_ceiling": 0.9, "pipeline_vs_naive": 3.0,
    "ms_per_face_batch1": 2.7, "faces_per_s_batch64": 470.0,
}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


# ---------------------------------------------------------------- measurement helpers (run inside a worker)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(function, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Wall milliseconds (median, mean, 90th percentile) and median CPU milliseconds (all threads) of
    `function()` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        function()
    times, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        function()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"median_ms": 1000 * float(np.median(times)), "mean_ms": 1000 * float(np.mean(times)),
            "p90_ms": 1000 * float(np.percentile(times, 90)), "cpu_median_ms": 1000 * float(np.median(cpu))}


def iterate_throughput(dataset, batches: int, batch_size: int, warmup: int = 2) -> float:
    """Images/s a dataset alone delivers (no model), after `warmup` batches."""
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


# ---------------------------------------------------------------- training pipelines


def family_model(family: str, image_size: int, backbone: str = TRANSFER_BACKBONE):
    """A freshly built, compiled model of a family (the registry's builder), with its default parameters; a
    transfer model gets random weights, which train as fast as pretrained ones."""
    params = dict(FAMILIES[family].defaults)
    return FAMILIES[family].build(image_size, params, backbone=backbone, weights="none"), params


def naive_dataset(paths: list[str], targets: dict[str, np.ndarray], batch_size: int, image_size: int,
                  augment: bool = True, seed: int = SEED):
    """The notebook way: keras.utils.image_dataset_from_directory's loader (read, decode and resize every file
    at every step, in parallel) and Keras augmentation layers on each batch."""
    import keras
    import tensorflow as tf
    from keras import layers

    augmenter = keras.Sequential([
        layers.RandomFlip("horizontal", seed=seed),
        layers.RandomRotation(12 / 360, fill_mode="reflect", seed=seed),
        layers.RandomZoom(0.1, fill_mode="reflect", seed=seed),
        layers.RandomTranslation(0.08, 0.08, fill_mode="reflect", seed=seed),
        layers.RandomBrightness(0.15, value_range=(0.0, 1.0), seed=seed),
        layers.RandomContrast(0.2, seed=seed),
    ])

    def load(path, target):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.image.resize(image, (image_size, image_size)) / 255.0, target

    labels = {name: np.asarray(v, np.float32).reshape(len(v), -1) for name, v in targets.items()}
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels)).shuffle(len(paths), seed=seed).repeat()
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    if augment:
        dataset = dataset.map(lambda x, y: (augmenter(x, training=True), y),
                              num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def in_memory_dataset(images: np.ndarray, targets: dict[str, np.ndarray], batch_size: int):
    """One float batch already in memory, repeated: the model's own speed, the ceiling for any pipeline."""
    import tensorflow as tf

    batch = tf.constant(images[:batch_size].astype(np.float32) / 255.0)
    labels = {name: tf.constant(np.asarray(v[:batch_size], np.float32).reshape(min(len(v), batch_size), -1))
              for name, v in targets.items()}
    return tf.data.Dataset.from_tensors((batch, labels)).repeat()


def training_datasets(pipeline: str, spec: dict[str, Any], outputs: list[str], params: dict[str, Any]):
    """(dataset for training, {name: dataset} to time without a model) for one pipeline."""
    from agegender.data.manifest import image_root, load_split
    from agegender.data.pipeline import Augment, make_dataset
    from agegender.training.loop import SplitData

    data_dir, size, batch = Path(spec["data_dir"]), int(spec["image_size"]), int(spec["batch_size"])
    count = batch * (spec["warmup"] + spec["steps"])  # one epoch of distinct images covers the run
    images, rows = load_split("train", size, data_dir, limit=count)
    targets = SplitData(images, rows).targets(outputs)
    if pipeline == "in_memory":
        return in_memory_dataset(images, targets, batch), {}
    if pipeline == "ours":
        augment = Augment().scaled(float(params.get("augment", 1.0)))
        return (make_dataset(images, targets, batch, training=True, augment=augment).repeat(),
                {"ours": make_dataset(images, targets, batch, training=True, augment=augment).repeat(),
                 "ours_no_augment": make_dataset(images, targets, batch, training=True).repeat()})
    paths = [str(image_root(data_dir) / name) for name in rows["file"]]
    return (naive_dataset(paths, targets, batch, size),
            {"naive": naive_dataset(paths, targets, batch, size),
             "naive_no_augment": naive_dataset(paths, targets, batch, size, augment=False)})


def measure_training(spec: dict[str, Any]) -> dict[str, Any]:
    """Train `warmup + steps` steps of a fresh model through one pipeline; time the steps after warm-up."""
    import keras

    keras.utils.set_random_seed(SEED)
    family, pipeline, batch = spec["family"], spec["pipeline"], int(spec["batch_size"])
    model, params = family_model(family, int(spec["image_size"]), spec.get("backbone", TRANSFER_BACKBONE))
    outputs = list(model.output.keys()) if isinstance(model.output, dict) else list(FAMILIES[family].outputs)
    dataset, data_only = training_datasets(pipeline, spec, outputs, params)
    pipeline_only = {name: iterate_throughput(ds, spec["steps"], batch) for name, ds in data_only.items()}
    rss_before = current_rss_mb()

    class StepClock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_index, logs=None):
            marks.append((time.perf_counter(), time.process_time()))

    marks: list[tuple[float, float]] = []
    model.fit(dataset, epochs=1, steps_per_epoch=spec["warmup"] + spec["steps"], verbose=0,
              callbacks=[StepClock()])
    (wall0, cpu0), (wall1, cpu1) = marks[spec["warmup"] - 1], marks[-1]
    timed_images = batch * (len(marks) - spec["warmup"])
    steps_s = np.diff([wall for wall, _ in marks[spec["warmup"] - 1:]])
    return {
        "family": family, "pipeline": pipeline, "image_size": int(spec["image_size"]), "batch_size": batch,
        "steps": len(marks) - spec["warmup"], "warmup_steps": spec["warmup"],
        "images_per_s": timed_images / (wall1 - wall0),
        "step_ms_median": 1000 * float(np.median(steps_s)),
        "cpu_s_per_1000_images": 1000 * (cpu1 - cpu0) / timed_images,
        "pipeline_only_images_per_s": pipeline_only,
        "parameters": int(model.count_params()),
        "rss_before_training_mb": rss_before,
    }


# ---------------------------------------------------------------- inference


def sample_files(data_dir: Path, count: int, split: str = "test") -> list[Path]:
    """`count` seeded-random image files of a split (repeated when the split is smaller)."""
    from agegender.data.manifest import image_root, load_manifest

    manifest = load_manifest(data_dir)
    files = manifest.loc[manifest["split"] == split, "file"].tolist()
    if not files:
        raise UserError(f"The {split} split of {data_dir} is empty.")
    order = np.random.default_rng(SEED).permutation(len(files))
    root = image_root(data_dir)
    return [root / files[order[i % len(files)]] for i in range(count)]


def canonical_face(image):
    """A Face with UTKFace's eye positions, so face_crop does its real affine warp without a detector."""
    from agegender.data.images import CROP_SIDE, EYE_CENTRE, EYE_DISTANCE, Face

    sx, sy = image.width / CROP_SIDE, image.height / CROP_SIDE
    half = EYE_DISTANCE * CROP_SIDE / 2
    cx, cy = EYE_CENTRE[0] * CROP_SIDE, EYE_CENTRE[1] * CROP_SIDE
    return Face((0, 0, image.width, image.height), 1.0, ((cx - half) * sx, cy * sy),
                ((cx + half) * sx, cy * sy))


def forward_variants(model, batch: np.ndarray, repeats: int) -> dict[str, Any]:
    """Milliseconds per call of three ways to run the same forward pass, and how far their outputs differ."""
    import tensorflow as tf

    compiled = tf.function(lambda x: model(x, training=False), reduce_retracing=True,
                           input_signature=[tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)])
    variants = {
        "eager_call": lambda: model(batch, training=False),  # what agegender.inference.predictor.Predictor does today
        "tf_function": lambda: compiled(batch),
        "keras_predict": lambda: model.predict(batch, verbose=0, batch_size=len(batch)),
    }
    found = {name: timed(run, repeats if name != "keras_predict" else max(2, repeats // 4))
             for name, run in variants.items()}
    eager, graph = model(batch, training=False), compiled(batch)
    if not isinstance(eager, dict):
        eager, graph = {"output": eager}, {"output": graph}
    found["tf_function_max_abs_diff"] = max(float(np.max(np.abs(np.asarray(eager[k]) - np.asarray(graph[k]))))
                                            for k in eager)
    return found


def measure_inference(spec: dict[str, Any]) -> dict[str, Any]:
    """Load time, per-face latency at batch 1 (alignment + resize + model) and faces/s at batch 64."""
    start = time.perf_counter()
    import keras  # noqa: F401
    import tensorflow  # noqa: F401

    from agegender.data.images import input_crop, read_image
    from agegender.inference.predictor import Predictor

    import_s = time.perf_counter() - start
    start = time.perf_counter()
    predictor = Predictor.load(spec["model_dir"], spec.get("backend", "keras"))
    load_s = time.perf_counter() - start
    images = [read_image(path) for path in sample_files(Path(spec["data_dir"]), int(spec["faces"]))]
    faces = [canonical_face(image) for image in images]
    start = time.perf_counter()
    first = predictor.prepare_crop(input_crop(images[0], faces[0], predictor.image_size))
    predictor.predict_arrays(first[None])
    first_call_s = time.perf_counter() - start

    align, resize, model_ms, total = [], [], [], []
    cpu_start = time.process_time()
    for image, face in zip(images, faces, strict=True):
        t0 = time.perf_counter()
        crop = input_crop(image, face, predictor.image_size)
        t1 = time.perf_counter()
        array = predictor.prepare_crop(crop)
        t2 = time.perf_counter()
        predictor.predict_arrays(array[None])
        t3 = time.perf_counter()
        align.append(t1 - t0)
        resize.append(t2 - t1)
        model_ms.append(t3 - t2)
        total.append(t3 - t0)
    cpu_per_face = (time.process_time() - cpu_start) / len(images)

    crops = np.stack([predictor.prepare_crop(input_crop(image, face, predictor.image_size))
                      for image, face in zip(images, faces, strict=True)])
    batch = np.resize(crops, (THROUGHPUT_BATCH, *crops.shape[1:]))  # repeats the crops to fill one batch
    repeats = max(2, int(spec["faces"]) // THROUGHPUT_BATCH)
    batched = timed(lambda: predictor.predict_arrays(batch, THROUGHPUT_BATCH), repeats, warmup=1)
    start = time.perf_counter()
    for image, face in zip(images[:THROUGHPUT_BATCH], faces[:THROUGHPUT_BATCH], strict=False):
        predictor.prepare_crop(input_crop(image, face, predictor.image_size))
    prepare_ms = 1000 * (time.perf_counter() - start) / min(len(images), THROUGHPUT_BATCH)

    floats = batch.astype(np.float32) / 255.0
    profile = None
    if predictor.model is not None:  # the three ways to run a Keras model (the TFLite one has one way)
        profile = {"batch1": forward_variants(predictor.model, floats[:1], max(10, int(spec["faces"]) // 4)),
                   f"batch{THROUGHPUT_BATCH}": forward_variants(predictor.model, floats, repeats)}

    def ms(values):
        return 1000 * float(np.median(values))

    return {
        "model": spec["name"], "backend": predictor.backend, "task": predictor.metadata.get("task"),
        "backbone": predictor.metadata.get("backbone"),
        "image_size": predictor.image_size, "parameters": predictor.parameters,
        "import_s": import_s, "load_s": load_s, "first_call_s": first_call_s,
        "batch1": {"faces": len(total), "ms_per_face": ms(total), "ms_per_face_mean": 1000 * float(np.mean(total)),
                   "cpu_ms_per_face": 1000 * cpu_per_face, "align_ms": ms(align), "resize_ms": ms(resize),
                   "model_ms": ms(model_ms)},
        f"batch{THROUGHPUT_BATCH}": {
            "model_faces_per_s": THROUGHPUT_BATCH / (batched["median_ms"] / 1000),
            "faces_per_s_with_alignment": 1000 / (batched["median_ms"] / THROUGHPUT_BATCH + prepare_ms),
            "batch_ms": batched["median_ms"], "cpu_batch_ms": batched["cpu_median_ms"],
            "align_resize_ms_per_face": prepare_ms},
        "forward_profile": profile,
    }


def measure_predict(spec: dict[str, Any]) -> dict[str, Any]:
    """tasks/predict.py's predict_files over a folder, as `python tasks/predict.py MODEL FOLDER` runs it."""
    from agegender.inference.photos import collect_images, predict_files
    from agegender.inference.predictor import Predictor

    predictor = Predictor.load(spec["model_dir"])  # "auto", as a user's predict call
    files = collect_images([Path(spec["folder"])])
    detect = bool(spec["detect"])
    start, cpu_start = time.perf_counter(), time.process_time()
    frame, skipped = predict_files(predictor, files, detect=detect)
    seconds = time.perf_counter() - start
    found = frame["age" if "age" in frame else "p_female"].notna().sum()
    return {"model": spec["name"], "backend": predictor.backend, "detect": detect, "images": len(files),
            "seconds": seconds,
            "images_per_s": len(files) / seconds, "ms_per_image": 1000 * seconds / len(files),
            "cpu_s": time.process_time() - cpu_start, "rows": len(frame), "faces_predicted": int(found),
            "skipped": len(skipped)}


WORKERS = {"training": measure_training, "inference": measure_inference, "predict": measure_predict}


def worker(kind: str, spec_path: str, out_path: str) -> None:
    """Entry point of a measurement process: run one measurement, add peak memory, write JSON."""
    spec = json.loads(Path(spec_path).read_text())
    result = WORKERS[kind](spec)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mb"] = usage.ru_maxrss / 1024.0  # Linux reports KiB
    result["process_cpu_s"] = usage.ru_utime + usage.ru_stime  # the whole measurement, imports included
    Path(out_path).write_text(json.dumps(result, default=float))


# ---------------------------------------------------------------- orchestration (the parent process)


def run_isolated(kind: str, spec: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """One measurement in a fresh Python process; its log goes to scratch, a failure becomes a UserError."""
    index = len(list(scratch.glob("*.spec.json")))
    spec_path, out_path = scratch / f"{index:02d}-{kind}.spec.json", scratch / f"{index:02d}-{kind}.out.json"
    log_path = scratch / f"{index:02d}-{kind}.log"
    spec_path.write_text(json.dumps(spec, default=str))
    # run from the repository root, whose tasks/ package `python -c` finds on its path
    code = f"from tasks.bench import worker; worker({kind!r}, {str(spec_path)!r}, {str(out_path)!r})"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    with open(log_path, "w") as log:
        try:
            done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired as error:
            raise UserError(f"The {kind} measurement ran past {WORKER_TIMEOUT_S} s (log: {log_path}).") \
                from error
    if done.returncode != 0 or not out_path.exists():
        lines = [line for line in log_path.read_text().splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        raise UserError(f"The {kind} measurement failed: {last} (log: {log_path}).")
    return json.loads(out_path.read_text())


def backends(model_dir: Path) -> list[str]:
    """keras always, and each export tasks/export.py wrote and checked for the model.keras in the folder."""
    from agegender.inference.runtime import export_is_current

    metadata = json.loads((Path(model_dir) / "metadata.json").read_text())
    return ["keras", *(kind for kind in EXPORT_FILES if export_is_current(Path(model_dir), metadata, kind))]


def predict_folder(data_dir: Path, count: int, scratch: Path) -> Path:
    """A folder of `count` test-split images (links, not copies), like a user's folder of face photos."""
    folder = scratch / "predict-images"
    folder.mkdir(exist_ok=True)
    for index, path in enumerate(sample_files(data_dir, count)):
        (folder / f"{index:05d}-{path.name}").symlink_to(path.resolve())
    return folder


def ratios(training: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per family: our pipeline / in-memory ceiling and our pipeline / naive pipeline (wall images/s)."""
    found: dict[str, dict[str, float]] = {}
    for family in dict.fromkeys(row["family"] for row in training):
        speed = {row["pipeline"]: row["images_per_s"] for row in training if row["family"] == family}
        if {"ours", "in_memory", "naive"} <= set(speed):
            cpu = {row["pipeline"]: row["cpu_s_per_1000_images"] for row in training if row["family"] == family}
            found[family] = {"ours_vs_in_memory": speed["ours"] / speed["in_memory"],
                             "ours_vs_naive": speed["ours"] / speed["naive"],
                             # CPU seconds per image, which moves less than wall time on a shared machine
                             "ours_vs_in_memory_cpu": cpu["in_memory"] / cpu["ours"],
                             "ours_vs_naive_cpu": cpu["naive"] / cpu["ours"]}
    return found


def run_benchmark(families: list[str], models: list[Path], data_dir: Path = DATA_DIR,
                  image_size: int = IMAGE_SIZE, batch_size: int = BATCH_SIZE, steps: int = STEPS, warmup: int = WARMUP,
                  images: int = PREDICT_IMAGES, faces: int = LATENCY_FACES, detect: bool = True,
                  backbone: str = TRANSFER_BACKBONE, progress: Progress | None = None) -> dict[str, Any]:
    """Every measurement, each in its own process; the report that goes to results/bench/<device>.json."""
    info = machine_info()
    plan: list[tuple[str, str, dict[str, Any]]] = []
    base = {"data_dir": str(data_dir), "image_size": image_size, "batch_size": batch_size, "steps": steps,
            "warmup": warmup, "backbone": backbone}
    for family in families:
        for pipeline in PIPELINES:
            spec = {**base, "family": family, "pipeline": pipeline}
            plan.append(("training", f"train {family} / {pipeline}", spec))
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        scratch = Path(tmp)
        folder = predict_folder(data_dir, images, scratch) if models else None
        for model_dir in models:
            name = model_dir.name
            common = {"model_dir": str(model_dir), "name": name, "data_dir": str(data_dir)}
            for backend in backends(model_dir):
                plan.append(("inference", f"infer {name} ({backend})", {**common, "faces": faces,
                                                                         "backend": backend}))
            for with_detection in ((False, True) if detect else (False,)):
                label = f"predict {name} {images} images{' + detection' if with_detection else ''}"
                plan.append(("predict", label, {**common, "folder": str(folder), "detect": with_detection}))
        task = progress.add_task("benchmark", total=len(plan)) if progress else None
        results: dict[str, list] = {"training": [], "inference": [], "predict": []}
        started = time.perf_counter()
        for kind, label, spec in plan:
            if progress:
                progress.update(task, description=label)
            results[kind].append(run_isolated(kind, spec, scratch))
            if progress:
                progress.advance(task)
    info["load_average_end"] = list(os.getloadavg())
    info["seconds"] = time.perf_counter() - started
    return {"machine": info, "settings": {**base, "predict_images": images, "latency_faces": faces,
                                          "throughput_batch": THROUGHPUT_BATCH},
            "targets": TARGETS, **results, "ratios": ratios(results["training"])}


# ---------------------------------------------------------------- tables


def training_table(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for family, ratio in report["ratios"].items():
        speed = {r["pipeline"]: r for r in report["training"] if r["family"] == family}
        rows.append([
            family, *(f"{speed[name]['images_per_s']:.0f}" for name in PIPELINES),
            f"{ratio['ours_vs_in_memory']:.2f} ({ratio['ours_vs_in_memory_cpu']:.2f})",
            f"{ratio['ours_vs_naive']:.1f} ({ratio['ours_vs_naive_cpu']:.1f})",
            f"{max(r['peak_rss_mb'] for r in speed.values()):.0f}"])
    return rows


def pipeline_table(report: dict[str, Any]) -> list[list[str]]:
    """Where training time goes: each pipeline alone (no model), and CPU seconds per 1000 images trained."""
    rows = []
    for family in report["ratios"]:
        speed = {r["pipeline"]: r for r in report["training"] if r["family"] == family}
        alone = {**speed["ours"]["pipeline_only_images_per_s"], **speed["naive"]["pipeline_only_images_per_s"]}
        rows.append([family, *(f"{alone[name]:.0f}" for name in ("ours", "ours_no_augment", "naive",
                                                                  "naive_no_augment")),
                     *(f"{speed[name]['cpu_s_per_1000_images']:.1f}" for name in PIPELINES)])
    return rows


def inference_table(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for row in report["inference"]:
        backend = row.get("backend", "keras")
        runs = {r["detect"]: r for r in report["predict"]
                if r["model"] == row["model"] and r.get("backend", "keras") == backend}
        peak = max([row["peak_rss_mb"], *(r["peak_rss_mb"] for r in runs.values())])
        rows.append([row["model"], backend, f"{row['load_s']:.2f}", f"{row['batch1']['ms_per_face']:.1f}",
                     f"{row['batch1']['cpu_ms_per_face']:.1f}", f"{row['batch64']['model_faces_per_s']:.0f}",
                     f"{runs[False]['images_per_s']:.0f}" if False in runs else "-",
                     f"{runs[True]['images_per_s']:.1f}" if True in runs else "-", f"{peak:.0f}"])
    return rows


def forward_table(report: dict[str, Any]) -> list[list[str]]:
    """Where inference time goes: alignment, resize, and three ways to run the same forward pass."""
    rows = []
    for row in report["inference"]:
        profile = row.get("forward_profile")
        if not profile:
            continue
        rows.append([row["model"], f"{row['batch1']['align_ms']:.2f}", f"{row['batch1']['resize_ms']:.2f}",
                     *(f"{profile[batch][way]['median_ms']:.1f}" for batch in ("batch1", "batch64")
                       for way in ("eager_call", "tf_function", "keras_predict"))])
    return rows


TRAINING_COLUMNS = ["family", "ours img/s", "in-memory img/s", "naive img/s", "ours / in-memory (CPU)",
                    "ours / naive (CPU)", "peak MB"]
PIPELINE_COLUMNS = ["family", "ours alone img/s", "ours, no augmentation", "naive alone", "naive, no augmentation",
                    "CPU s/1000 img: ours", "in-memory", "naive"]
INFERENCE_COLUMNS = ["model", "backend", "load s", "ms/face batch 1 (align + model)", "CPU ms/face batch 1",
                     "faces/s batch 64", "predict no-detect img/s", "predict + detection img/s", "peak MB"]
FORWARD_COLUMNS = ["model", "align ms", "resize ms", "b1 model(x) ms", "b1 tf.function ms", "b1 predict ms",
                   "b64 model(x) ms", "b64 tf.function ms", "b64 predict ms"]


def tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    return [("Training throughput", TRAINING_COLUMNS, training_table(report)),
            ("Where training time goes", PIPELINE_COLUMNS, pipeline_table(report)),
            ("CPU inference", INFERENCE_COLUMNS, inference_table(report)),
            ("Where inference time goes", FORWARD_COLUMNS, forward_table(report))]


def print_report(report: dict[str, Any]) -> None:
    for title, columns, rows in tables(report):
        if rows:
            console.print(rich_table(title, columns, rows, left=("family", "model", "backend")))


def markdown(report: dict[str, Any], json_name: str) -> str:
    """The report as markdown (written next to its JSON): machine, the tables and the targets."""
    info, settings = report["machine"], report["settings"]
    lines = ["# Speed benchmark", "",
             f"`nox -s bench` (tasks/bench.py) on {info['cpu_model']}, {info['cores']} cores, TensorFlow "
             f"{info['versions']['tensorflow']}, Keras {info['versions']['keras']}, {info['date'][:10]}; "
             f"load average {info['load_average_start'][0]:.1f} at the start (a shared machine: wall figures "
             f"move with the load, CPU figures much less). Full figures: `results/bench/{json_name}`.", ""]
    intro = {
        "Training throughput": (f"Measured on {info['training_measured'][:10]} (an inference-only rerun kept "
                                "them). " if info.get("training_measured") else "")
        + f"Training, {settings['image_size']} px, batch {settings['batch_size']}, "
        f"images/s after {settings['warmup']} warm-up steps; ratios by wall time (by CPU time). Targets: ours / "
        f"in-memory >= {TARGETS['pipeline_vs_ceiling']}, ours / naive >= {TARGETS['pipeline_vs_naive']:.0f}.",
        "Where training time goes": "Each pipeline alone (no model), images/s, and CPU seconds per 1000 "
        "images trained:",
        "CPU inference": f"Inference on the CPU; targets {TARGETS['ms_per_face_batch1']} ms per face at batch "
        f"1 with alignment and {TARGETS['faces_per_s_batch64']:.0f} faces/s batched; predict over "
        f"{settings['predict_images']} images:",
        "Where inference time goes": "Per face at batch 1, and the same Keras forward pass run three ways (the "
        "tflite rows above run tasks/export.py's model.tflite, checked to predict the same, and tflite-int8 rows its "
        "model-int8.tflite with int8 weights, checked to within tolerances):",
    }
    for title, columns, rows in tables(report):
        if rows:
            lines += [intro[title], "", markdown_table(columns, rows, right_after=1), ""]
    return "\n".join(lines)


def keep_training(report: dict[str, Any], previous_path: Path) -> None:
    """Copy the training figures (and their date) of the previous report into an inference-only report."""
    if not previous_path.exists():
        return
    previous = json.loads(previous_path.read_text())
    report["training"], report["ratios"] = previous.get("training", []), previous.get("ratios", {})
    report["machine"]["training_measured"] = previous.get("machine", {}).get(
        "training_measured", previous.get("machine", {}).get("date"))
    report["settings"] = {**previous.get("settings", {}), **report["settings"]}


@app.command()
def main(
    steps: Annotated[int | None, typer.Option(
        min=1, help=f"Timed training steps per pipeline [{STEPS}].")] = None,
    warmup: Annotated[int | None, typer.Option(
        min=1, help=f"Untimed training steps first [{WARMUP}].")] = None,
    images: Annotated[int | None, typer.Option(
        min=1, help=f"Images in the folder `predict` runs over [{PREDICT_IMAGES}].")] = None,
    faces: Annotated[int | None, typer.Option(
        min=1, help=f"Faces timed at batch 1 [{LATENCY_FACES}].")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help=f"Training batch size [{BATCH_SIZE}].")] = None,
    quick: Annotated[bool, typer.Option(help="Tiny sizes for a smoke test (multitask family only unless "
                                             "--family is given).")] = False,
    family: Annotated[list[str] | None, typer.Option(
        help=f"Model families to train ({', '.join(TRAINABLE)}); repeat the flag; default all of them.")] = None,
    training: Annotated[bool, typer.Option(
        "--training/--no-training", help="Measure training; --no-training measures inference only and keeps "
        "the training figures of the previous report (with their date).")] = True,
    model: Annotated[list[Path] | None, typer.Option(
        help="Model folders to run inference with; default every folder in results/models/.")] = None,
    models_dir: Annotated[Path, typer.Option(help="Where to find the models when --model is not given.")]
    = MODELS_DIR,
    image_size: Annotated[int, typer.Option(
        min=32, max=512, help="Training input side in pixels.")] = IMAGE_SIZE,
    backbone: Annotated[str, typer.Option(help="Backbone of the transfer family.")] = TRANSFER_BACKBONE,
    detect: Annotated[bool, typer.Option("--detect/--no-detect",
                                         help="Also time predict with face detection.")] = True,
    data_dir: Annotated[Path, typer.Option(help="Folder prepare_data wrote.")] = DATA_DIR,
    out: Annotated[Path, typer.Option(help="Folder for the JSON report and its markdown tables.")] = BENCH_DIR,
) -> None:
    """Benchmark training throughput per input pipeline and CPU inference per saved model."""
    defaults = QUICK if quick else {}
    steps = steps or defaults.get("steps", STEPS)
    warmup = warmup or defaults.get("warmup", WARMUP)
    images = images or defaults.get("images", PREDICT_IMAGES)
    faces = faces or defaults.get("faces", LATENCY_FACES)
    batch_size = batch_size or defaults.get("batch_size", BATCH_SIZE)
    families = (family or (["multitask"] if quick else list(TRAINABLE))) if training else []
    with user_errors():
        unknown = [f for f in families if f not in TRAINABLE]
        if unknown:
            raise UserError(f"Unknown family {unknown[0]!r}; expected one of {', '.join(TRAINABLE)}.")
        if not (data_dir / "manifest.csv").exists():
            raise UserError(f"No manifest in {data_dir}: run `python tasks/prepare_data.py` first.")
        folders = model_folders(model, models_dir)
        if not folders:
            err_console.print(f"[yellow]No models in {models_dir}: only training is measured.[/]")
        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=err_console,
                      transient=True) as progress:
            report = run_benchmark(families, folders, data_dir, image_size, batch_size, steps, warmup, images,
                                   faces, detect, backbone, progress)
        name = f"{report['machine']['device']}{'-quick' if quick else ''}.json"
        if not training:
            keep_training(report, out / name)
        write_json(out / name, report)
        write_text((out / name).with_suffix(".md"), markdown(report, name).rstrip() + "\n")
        print_report(report)
        console.print(f"Wrote {out / name} and {(out / name).with_suffix('.md').name} "
                      f"({report['machine']['seconds']:.0f} s).")


if __name__ == "__main__":
    app()
