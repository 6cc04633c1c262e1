"""What machine a measurement ran on (the benchmarks record it beside their figures)."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np


def machine_info() -> dict[str, Any]:
    import keras
    import PIL
    import tensorflow as tf

    cpu_model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "device": "cpu", "cpu_model": cpu_model,
        "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
                     "pillow": PIL.__version__}, "gpus": len(tf.config.list_physical_devices("GPU")),
        "load_average_start": list(os.getloadavg()),
    }
