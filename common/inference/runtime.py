"""The TFLite (LiteRT) runtime: an interpreter for a .tflite file, the signature runner of a model's export, and
whether an export still matches the model.keras beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agegender import silenced_stderr
from agegender.cli import UserError
from agegender.data.manifest import file_sha256
from agegender.models.folders import EXPORT_FILES, MODEL_FILE

BACKENDS = ("auto", "keras", *EXPORT_FILES)


def tflite_interpreter(path: Path, threads: int | None = None):
    """A TFLite (LiteRT) interpreter: LiteRT's own package when installed, else the interpreter bundled with
    TensorFlow (same XNNPACK kernels); threads defaults to every core."""
    import os
    import warnings
    from contextlib import nullcontext

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():  # TF's copy warns that it moved to ai_edge_litert
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_path=str(path), num_threads=threads or os.cpu_count() or 1)
    # the first allocation applies the XNNPACK delegate, which announces itself on stderr
    with nullcontext() if os.environ.get("AGEGENDER_TF_LOGS") == "1" else silenced_stderr():
        interpreter.allocate_tensors()
    return interpreter


def tflite_runner(path: Path, threads: int | None = None):
    """A TFLite signature runner for model.tflite."""
    try:
        interpreter = tflite_interpreter(path, threads)
    except (ValueError, RuntimeError) as error:  # a truncated or foreign file
        raise UserError(f"{path} is not a readable TFLite model; run tasks/export.py again or use "
                        f"--backend keras ({str(error).splitlines()[0]}).") from error
    return interpreter.get_signature_runner()


def export_is_current(folder: Path, metadata: dict[str, Any], kind: str) -> bool:
    """Whether tasks/export.py wrote and checked this export for the model.keras that is in the folder now."""
    export = metadata.get("exports", {}).get(kind)
    return (export is not None and (folder / EXPORT_FILES[kind]).exists() and (folder / MODEL_FILE).exists()
            and export.get("model_sha256") == file_sha256(folder / MODEL_FILE))
