"""Code shared by the task scripts, in layers whose imports go one way (docs/testing.md, "Layout"): data, then
models, then inference, then reporting, then training; cli (console output and the one-sentence failure) sits
below them all.

Importing it keeps TensorFlow's start-up chatter (CUDA probes on a CPU machine, oneDNN and absl notices) out
of the tasks' output; set AGEGENDER_TF_LOGS=1 to see it."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
from contextlib import contextmanager


@contextmanager
def silenced_stderr():
    """Point file descriptor 2 at /dev/null: TensorFlow's native libraries write there directly, before its
    log-level settings are read."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Import hook: the first `import tensorflow` (direct, or through keras) runs with stderr silenced, and
    probes the devices while still silenced, since the CUDA probe on a CPU machine happens then."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            with silenced_stderr():
                run(module)
                module.config.list_physical_devices()
            module.get_logger().setLevel(logging.ERROR)  # retracing notices and the like
            logging.getLogger("absl").setLevel(logging.ERROR)

        spec.loader.exec_module = exec_module
        return spec


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("AGEGENDER_TF_LOGS") != "1" and "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlow())
