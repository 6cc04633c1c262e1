"""Where the project's files live (each folder movable by an environment variable), and the seed every split,
shuffle and subset starts from."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # common/data/paths.py -> the repository
DATA_DIR = Path(os.environ.get("AGEGENDER_DATA_DIR", REPO_ROOT / "data"))
RESULTS_DIR = Path(os.environ.get("AGEGENDER_RESULTS_DIR", REPO_ROOT / "results"))
MODELS_DIR = RESULTS_DIR / "models"
# one folder per training run (TensorBoard logs; train_all's candidates), never committed
RUNS_DIR = Path(os.environ.get("AGEGENDER_RUNS_DIR", RESULTS_DIR / "runs"))

SEED = 42
