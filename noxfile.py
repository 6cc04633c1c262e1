"""Task runner: `nox -s train_all` trains every model from its recipe and promotes the better ones; `nox -s tests`
runs the fast tier of the test suite, `nox -s tests_full` every test of the code and `nox -s shipped` the checks
that the committed results agree with it."""

from __future__ import annotations

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]
PYTHON = "3.11"
TEST_ENV = {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def install(session: nox.Session, extras: str = "") -> None:
    session.install("-e", f".[{extras}]" if extras else ".")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The fast tier: every task's command line on a few hundred real UTKFace images, neither the slow tests nor
    the shipped checks (needs UTKFACE_SOURCE or ../shared)."""
    install(session, "dev")
    session.run("pytest", "-m", "not slow and not shipped", *session.posargs, env=TEST_ENV)


@nox.session(python=PYTHON)
def tests_full(session: nox.Session) -> None:
    """Every test of the code, the slow ones too: real training, every backbone, the Spaces in a browser (not the
    shipped checks)."""
    install(session, "dev")
    session.run("pytest", "-m", "not shipped", *session.posargs, env=TEST_ENV)


@nox.session(python=PYTHON)
def shipped(session: nox.Session) -> None:
    """Checks that the committed results agree with the code: the README's tables, the benchmark reports, the
    shipped models against their recipes and Spaces (tests/shipped)."""
    install(session, "dev")
    session.run("pytest", "-m", "shipped", "tests/shipped", *session.posargs, env=TEST_ENV)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Check style and common bugs with ruff."""
    session.install("ruff>=0.8")
    session.run("ruff", "check", "common", "tasks", "tests", "spaces", "noxfile.py")


@nox.session(python=PYTHON)
def prepare_data(session: nox.Session) -> None:
    """Read UTKFace, explore it, split it and cache decoded images (posargs go to prepare_data.py)."""
    install(session)
    session.run("python", "tasks/prepare_data.py", *session.posargs)


def trainable_families(session: nox.Session) -> list[str]:
    """The trained model families, read from the registry (agegender.models.registry) in the session's environment."""
    return session.run("python", "-c", "from agegender.models.registry import TRAINABLE; print(*TRAINABLE)",
                       silent=True).split()


@nox.session(python=PYTHON)
def train_all(session: nox.Session) -> None:
    """Prepare the data, train every model from its recipe (recipes/) into results/runs/, promote the runs that
    beat the current models on validation, export them and rerun the comparison (posargs go to
    tasks/train_all.py, e.g. --quick or --only multitask)."""
    install(session)
    session.run("python", "tasks/prepare_data.py")
    session.run("python", "tasks/train_all.py", *session.posargs)


@nox.session(python=PYTHON)
def tensorboard(session: nox.Session) -> None:
    """Serve the training runs' TensorBoard logs (results/runs/) on http://localhost:6006 (posargs go to
    tensorboard)."""
    install(session)
    session.run("tensorboard", "--logdir", "results/runs", *session.posargs)


@nox.session(python=PYTHON)
def tune(session: nox.Session) -> None:
    """Tune every trainable model family with Optuna at the default budget (posargs go to each tune.py call)."""
    install(session)
    for model in trainable_families(session):
        session.run("python", "tasks/tune.py", "--model", model, *session.posargs)


@nox.session(python=PYTHON)
def compare(session: nox.Session) -> None:
    """Evaluate every saved model on the test split, with bias and robustness tables; refresh the README's table."""
    install(session)
    session.run("python", "tasks/compare.py", *session.posargs)
    session.run("python", "tasks/readme.py")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmark training and inference speed; writes results/bench/cpu.json and cpu.md."""
    install(session)
    session.run("python", "tasks/bench.py", *session.posargs)


@nox.session(python=PYTHON)
def publish(session: nox.Session) -> None:
    """Stage every Space (dry run; pass --push to upload to the Hugging Face Hub)."""
    install(session)
    session.run("python", "tasks/publish.py", "--all", *session.posargs)


@nox.session(python=PYTHON)
def finetune_transfer(session: nox.Session) -> None:
    """Fine-tune the pretrained backbones (needs ImageNet weights or --weights none/PATH; posargs go through)."""
    install(session)
    session.run("python", "tasks/finetune_transfer.py", *(session.posargs or ["--all"]))


@nox.session(python=PYTHON)
def gpu_recipe(session: nox.Session) -> None:
    """The multi-task model's recipe with GPU settings, for a machine with one or more GPUs (docs/scaling.md):
    every GPU (--strategy auto), mixed precision, the global batch 64 -> 256 with the learning rate scaled by
    sqrt(256/64) = 2, the recipe's epochs. Writes the model to results/gpu/multitask (train_all promotes models,
    this does not) and its figures (device, throughput, seconds per epoch, test metrics) to results/bench/gpu.json.
    posargs go to train_multitask.py (e.g. --epochs 10 for a first look)."""
    install(session)
    session.run("python", "tasks/prepare_data.py")
    # the recipe trains on the crops the inference path makes; the trainer reads them from data-detected
    session.run("python", "tasks/prepare_data.py", "--data-dir", "data-detected", "--utkface-crops", "detected",
                "--image-size", "128")
    out = "results/gpu/multitask"
    session.run("python", "tasks/train_multitask.py", "--recipe", "recipes/multitask.toml", "--strategy", "auto",
                "--mixed-precision", "--batch-size", "256", "--learning-rate", "0.0006", "--out", out,
                *session.posargs)
    summary = """
import json, sys
from pathlib import Path
import tensorflow as tf
from agegender.cli import write_json
folder = Path(sys.argv[1])
metadata = json.loads((folder / "metadata.json").read_text())
metrics = json.loads((folder / "metrics.json").read_text())
gpus = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
        for gpu in tf.config.list_physical_devices("GPU")]
seconds = metadata["seconds_per_epoch"]
write_json(Path(sys.argv[2]), {
    "model": str(folder), "gpus": gpus, "distribution": metadata.get("distribution"),
    "batch_size": metadata["params"]["batch_size"], "learning_rate": metadata["params"]["learning_rate"],
    "epochs_run": metadata["epochs_run"], "seconds_per_epoch": seconds,
    "train_images_per_second": metadata["train_images"] / seconds if seconds else None,
    "train_seconds": metadata.get("train_seconds"),
    "test": {"age_mae": metrics["age"]["mae"], "gender_accuracy": metrics["gender"]["accuracy"]}})
print(f"Wrote {sys.argv[2]}.")
"""
    session.run("python", "-c", summary, out, "results/bench/gpu.json")
