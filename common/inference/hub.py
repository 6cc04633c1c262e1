"""The Hugging Face Hub as the project uses it: each model lives in its own model repo
<namespace>/agegender-<name>, and a Space loads its model from that repo at the revision `tasks/publish.py`
pinned in the Space's hub_models.json, through the Hub cache.

Importing it loads neither huggingface_hub nor TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from agegender.cli import UserError, write_json
from agegender.models.folders import EXPORT_FILES, METADATA_FILE, METRICS_FILE, MODEL_FILE, ModelEntry

REPO_PREFIX = "agegender"  # model repo and Space <namespace>/agegender-<name>
PINS_FILE = "hub_models.json"  # in a staged Space: the model repos it loads, each at a revision
MANIFEST_FILE = "agegender.json"  # in every repo publish writes: the files it wrote there
# what a Space downloads from a model repo: what agegender.inference.predictor.Predictor reads (an export only when
# it matches model.keras), the About page's metrics, and nothing else (no plots, no second copy of the weights)
SPACE_DOWNLOADS = (MODEL_FILE, *EXPORT_FILES.values(), METADATA_FILE, METRICS_FILE)


def repo_name(model_name: str) -> str:
    """The Hub repo name of a model (its name under results/models/; a nested one with its / as -)."""
    return f"{REPO_PREFIX}-{model_name.replace('/', '-')}"


@dataclass(frozen=True)
class Pin:
    """One model a staged Space loads."""

    space: str  # its model family (agegender.models.registry)
    name: str  # the model's name: its path under results/models/ and its name in comparison.json
    repo_id: str  # <namespace>/agegender-<name>
    revision: str | None  # the commit publish pushed; None in a dry run (the repo's main branch)


def write_pins(path: Path, pins: list[Pin]) -> None:
    write_json(path, {"models": [asdict(pin) for pin in pins]})


def read_pins(path: Path) -> list[Pin] | None:
    """The pins of a staged Space, or None where there is no pins file (the app runs from the repository)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return [Pin(**item) for item in json.loads(path.read_text())["models"]]
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a list of pinned models ({error}); publish the Space again.") from error


def download_model(pin: Pin) -> Path:
    """The model's folder in the Hub cache at its pinned revision (downloaded when missing; with HF_HUB_OFFLINE=1
    only the cache is read)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(pin.repo_id, revision=pin.revision, allow_patterns=list(SPACE_DOWNLOADS))
    except Exception as error:  # offline with nothing cached, a private repo without a token, a deleted revision
        reason = str(error).split("\n")[0][:200] or type(error).__name__
        raise UserError(f"Could not get the model {pin.repo_id} at revision {pin.revision or 'main'} from the "
                        f"Hugging Face Hub ({reason}).") from error
    if not (Path(folder) / MODEL_FILE).exists():
        raise UserError(f"The model repo {pin.repo_id} at revision {pin.revision or 'main'} has no {MODEL_FILE}.")
    return Path(folder)


def hub_entry(pin: Pin) -> ModelEntry:
    return ModelEntry(pin.space, pin.name, download_model(pin))


def git_blob_sha(path: Path) -> str:
    """The git object id of a file's content, as the Hub reports it for a file not stored with LFS."""
    path = Path(path)
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # noqa: S324 (git's own hash)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
