"""Hugging Face Space: age and gender of every face in a photo, with every model, a tab each
(one Space instead of one per model).

    python spaces/combined/app.py          # from the repository, then open http://127.0.0.1:7860
"""

import sys
from pathlib import Path

# In the repository app_common.py sits one folder up, in spaces/; in a staged Space it is beside this file.
sys.path.append(str(Path(__file__).resolve().parent.parent))

from app_common import SPACES, launch_app  # noqa: E402

if __name__ == "__main__":
    launch_app(SPACES)
