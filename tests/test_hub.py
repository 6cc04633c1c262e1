"""The model repos as their users meet them, with a local folder standing in for the Hub cache (HF_HUB_OFFLINE=1,
as in every test): a staged Space loads its model at the revision publish pinned, through the same
snapshot_download call it makes on the Hub, and answers through gradio_client; Keras 3 loads a pushed repo from
its hf:// path; the model card's Keras example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from agegender.cli import UserError
from agegender.inference.drawing import gender_text, is_uncertain
from agegender.inference.hub import PINS_FILE, Pin, download_model, read_pins
from tests.fake_hub import FakeHub, fill_cache, published_spaces

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "spaces"))  # as spaces/<name>/app.py finds it

import app_common  # noqa: E402

ASTRONAUT = REPO / "spaces" / "examples" / "astronaut.jpg"
STARTUP_TIMEOUT = 600  # seconds: the test machine may be shared and busy


@pytest.fixture(scope="module")
def published(trained_models, tmp_path_factory) -> SimpleNamespace:
    """The age and multitask test models and their Spaces pushed by publish to a FakeHub (namespace tester), and
    a Hub cache holding the pushed model revisions, as a Space's first start leaves it."""
    root = tmp_path_factory.mktemp("hub")
    hub = FakeHub(root / "fake-hub")
    spaces = published_spaces(["age", "multitask"], trained_models["age"].parent, root / "no-results",
                              root / "build", root / "cache", hub=hub)
    return SimpleNamespace(hub=hub, cache=root / "cache", spaces=spaces)


@pytest.fixture
def hub_cache(published, monkeypatch) -> Path:
    """The published cache as this process's Hub cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(published.cache))
    return published.cache


def test_a_staged_space_loads_the_revision_it_pins_even_after_a_newer_one(published, hub_cache, trained_models):
    from agegender.data.images import read_image
    from agegender.inference.predictor import Predictor

    hub, repo_id = published.hub, "tester/agegender-multitask"
    pins_file = published.spaces["multitask"].folder / PINS_FILE
    [pin] = read_pins(pins_file)
    assert pin.revision == hub.head(repo_id)
    hub.put(repo_id, {"metrics.json": b'{"gender": {"accuracy": 0.0}}'})  # a later commit, now main in the cache
    fill_cache(hub_cache, hub, repo_id)
    [entry] = app_common.space_models(["multitask"], pins_file=pins_file)
    assert (entry.space, entry.name) == ("multitask", "multitask")
    assert entry.folder == hub_cache / "models--tester--agegender-multitask" / "snapshots" / pin.revision
    assert (entry.folder / "metrics.json").read_bytes() == (trained_models["multitask"] / "metrics.json").read_bytes()
    expected = Predictor.load(trained_models["multitask"]).predict_image(read_image(ASTRONAUT))
    assert Predictor.load(entry.folder).predict_image(read_image(ASTRONAUT)) == expected
    # from the repository (no pins file beside app_common.py) the app reads results/models as before
    [local] = app_common.space_models(["multitask"], trained_models["multitask"].parent)
    assert local.folder == trained_models["multitask"]


def test_a_model_the_space_cannot_get_is_one_sentence(hub_cache):
    pin = Pin("multitask", "multitask", "tester/agegender-multitask", "0" * 40)
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        download_model(pin)
    message = str(caught.value)
    assert message.startswith(f"Could not get the model tester/agegender-multitask at revision {'0' * 40} from the "
                              "Hugging Face Hub (") and message.endswith(").") and "\n" not in message
    assert time.monotonic() - started < 10  # offline: no waiting on a network


@pytest.mark.parametrize("name", ["age", "multitask"])  # the age model's DEX head is a custom layer
def test_keras_loads_the_pushed_repo_from_its_hf_path(published, hub_cache, trained_models, name):
    import keras

    import agegender.models.layers  # noqa: F401  (what the card tells a user to import)

    model = keras.saving.load_model(f"hf://tester/agegender-{name}", compile=False)
    original = keras.saving.load_model(trained_models[name] / "model.keras", compile=False)
    batch = np.random.default_rng(0).random((2, *original.input_shape[1:]), dtype=np.float32)
    got, expected = model.predict(batch, verbose=0), original.predict(batch, verbose=0)
    assert sorted(got) == sorted(expected)
    for output in expected:
        np.testing.assert_allclose(got[output], expected[output], rtol=1e-5, atol=1e-6)


def space_env(cache: Path, **extra: str) -> dict[str, str]:
    """A Space's environment: the Hub cache given, offline, and nothing of the project's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGEGENDER_", "PYTHONPATH"))}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache),
               TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


@pytest.mark.slow
def test_the_model_cards_keras_example_runs_as_written(published, trained_models, prepared, tmp_path):
    """The card's first code block, run in a fresh Python with the Hub cache, on a UTKFace crop."""
    from PIL import Image

    card = (published.spaces["multitask"].folder.parent.parent / "models" / "agegender-multitask" / "README.md")
    code = re.search(r"```python\n(.*?)```", card.read_text(), re.S).group(1)
    assert 'keras.saving.load_model("hf://tester/agegender-multitask")' in code
    face = sorted(prepared["images"].glob("*.jpg"))[0]
    Image.open(face).save(tmp_path / "face.jpg")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=space_env(published.cache),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = dict(line.split(": ", 1) for line in run.stdout.splitlines() if ": " in line)
    import keras

    import agegender.models.layers  # noqa: F401

    model = keras.saving.load_model(trained_models["multitask"] / "model.keras", compile=False)
    size = model.input_shape[1]
    batch = np.asarray(Image.open(tmp_path / "face.jpg").convert("RGB").resize((size, size)), "float32")[None] / 255
    outputs = model.predict(batch, verbose=0)
    assert float(printed["age"].split()[0]) == pytest.approx(max(0.0, float(outputs["age"][0, 0]) * 120), abs=1e-3)
    assert float(printed["P(female)"]) == pytest.approx(float(outputs["gender"][0, 0]), abs=1e-5)


@pytest.mark.slow
def test_a_staged_space_started_offline_loads_its_model_from_the_cache_and_answers(published, trained_models,
                                                                                 tmp_path):
    from gradio_client import Client, handle_file

    from agegender.data.images import read_image
    from agegender.inference.predictor import Predictor

    folder = published.spaces["multitask"].folder
    assert not any(p.suffix in (".keras", ".tflite") for p in folder.rglob("*"))  # the Space carries no model
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "space.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=folder, stdout=handle, stderr=subprocess.STDOUT,
                                   env=space_env(published.cache, GRADIO_SERVER_NAME="127.0.0.1",
                                                 GRADIO_SERVER_PORT=str(port),
                                                 GRADIO_TEMP_DIR=str(tmp_path / "files")))
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert process.poll() is None, f"the Space exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the Space did not start:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                time.sleep(1)
        _, message, table = Client(url, verbose=False).predict(handle_file(str(ASTRONAUT)), api_name="/predict")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    [expected] = Predictor.load(trained_models["multitask"]).predict_image(read_image(ASTRONAUT))
    row = dict(zip(table["headers"], table["data"][0], strict=True))
    shown = gender_text(expected) if is_uncertain(expected) else expected["gender"]  # as the Space's table shows it
    assert message.startswith("**Found 1 face.**") and row["gender"] == shown
    assert row["age (years)"] == pytest.approx(expected["age"], abs=0.06)
