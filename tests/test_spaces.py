"""The Gradio Spaces as a visitor meets them: staged and pushed by publish (to tests/fake_hub.py's stand-in Hub,
whose pushed model revisions fill a Hub cache, as a Space's first start would), launched from their build folder
on 127.0.0.1 offline, queried through gradio_client with a real face photo (NASA's public-domain astronaut
portrait) and photos with no face, two faces or unusual modes, and driven once through headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import publish
from tests.fake_hub import FakeHub, published_spaces

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "spaces" / "examples"
ASTRONAUT, TWO_FACES, LANDSCAPE = (EXAMPLES / name for name in ("astronaut.jpg", "two_faces.jpg", "landscape.jpg"))
MODELS = ("gender", "age", "multitask")  # the conftest models; transfer has none in the tests
LAUNCHED = (*MODELS, publish.COMBINED)
STARTUP_TIMEOUT = 600  # seconds: ~10 s of CPU each, but the test machine may be shared and busy
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def results_dir(trained_models, prepared, tmp_path_factory) -> Path:
    """compare run on the test models, so the Spaces have a real bias table to show."""
    from tasks.compare import compare

    out = tmp_path_factory.mktemp("spaces-results")
    compare(models_dir=trained_models["gender"].parent, data_dir=prepared["data_dir"], out=out,
            names=list(MODELS), robustness_faces=20)
    return out


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """The Hub cache the Spaces load their models from (filled by the staged fixture)."""
    return tmp_path_factory.mktemp("spaces-hub-cache")


@pytest.fixture(scope="module")
def staged(trained_models, results_dir, hub_cache, tmp_path_factory) -> dict[str, publish.StagedRepo]:
    """Every single-model Space and the combined one, pushed with their model repos: {Space name: StagedRepo}."""
    root = tmp_path_factory.mktemp("spaces-build")
    hub = FakeHub(root / "fake-hub")
    options = {"models_dir": trained_models["gender"].parent, "results_dir": results_dir, "cache_dir": hub_cache,
               "hub": hub}
    return {**published_spaces(list(MODELS), build_dir=root / "singles", **options),
            **published_spaces(list(MODELS), build_dir=root / "combined", combined=True, **options)}


def space_env(hub_cache: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a Space: offline with its Hub cache, no project paths or settings leaking in from the
    test run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGEGENDER_", "PYTHONPATH", "HF_HUB_CACHE"))}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2", **extra)
    if hub_cache is not None:
        env["HF_HUB_CACHE"] = str(hub_cache)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def tail(self) -> str:
        return self.log.read_text()[-3000:]


def wait_until_up(server: Server, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the Space exited with {server.process.returncode}:\n{server.tail()}")
        try:
            with urllib.request.urlopen(server.url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the Space at {server.url} did not start in {STARTUP_TIMEOUT} s:\n{server.tail()}")


@pytest.fixture(scope="module")
def servers(staged, hub_cache, tmp_path_factory):
    """Every staged Space started at once with `python app.py` in its folder, as the Hub starts it."""
    logs = tmp_path_factory.mktemp("spaces-logs")
    running = {}
    try:
        for name in LAUNCHED:
            port = free_port()
            log = logs / f"{name}.log"
            with open(log, "w") as handle:
                process = subprocess.Popen(
                    [sys.executable, "app.py"], cwd=staged[name].folder, stdout=handle, stderr=subprocess.STDOUT,
                    env=space_env(hub_cache, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
                                  GRADIO_TEMP_DIR=str(logs / f"{name}-files")))
            running[name] = Server(f"http://127.0.0.1:{port}/", process, log)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for server in running.values():
            wait_until_up(server, deadline)
        yield running
    finally:
        for server in running.values():
            server.process.terminate()
        for server in running.values():
            try:
                server.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.process.kill()


@pytest.fixture(scope="module")
def clients(servers):
    from gradio_client import Client

    return {name: Client(server.url, verbose=False) for name, server in servers.items()}


def ask(client, path: Path, api_name: str = "/predict") -> tuple[Path, str, dict]:
    from gradio_client import handle_file

    image, message, table = client.predict(handle_file(str(path)), api_name=api_name)
    return Path(image), message, table


def rows_of(table: dict) -> list[dict]:
    return [dict(zip(table["headers"], row, strict=True)) for row in table["data"]]


def expected_rows(model_dir: Path, path: Path) -> list[dict]:
    """What the one inference path gives for the same photo, in this process."""
    from agegender.data.images import read_image
    from agegender.inference.predictor import Predictor

    return Predictor.load(model_dir).predict_image(read_image(path))


def shown_gender(row: dict) -> str:
    """The gender a Space's table shows for a face: the gender called, or "uncertain (48% female)"."""
    from agegender.inference.drawing import gender_text, is_uncertain

    return gender_text(row) if is_uncertain(row) else row["gender"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_face_photo_gets_a_box_and_the_predict_path_numbers(name, clients, trained_models):
    image, message, table = ask(clients[name], ASTRONAUT)
    rows = rows_of(table)
    assert message.startswith("**Found 1 face.**") and len(rows) == 1
    with Image.open(image) as drawn, Image.open(ASTRONAUT) as original:
        assert drawn.size == original.size
        assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(original.convert("RGB")))
    [expected] = expected_rows(trained_models[name], ASTRONAUT)
    assert rows[0]["box (x, y, width, height)"] == ", ".join(str(v) for v in expected["box"])
    if name in ("gender", "multitask"):
        # a gender below the model's certainty threshold reads "uncertain (48% female)" (agegender.inference.drawing)
        assert rows[0]["gender"] == shown_gender(expected) and rows[0]["gender"] in message
        assert rows[0]["P(female)"] == pytest.approx(expected["p_female"], abs=1e-3)
        # the probability shown is that of the gender called
        shown = {"female": rows[0]["P(female)"], "male": 1 - rows[0]["P(female)"]}[expected["gender"]]
        assert rows[0]["probability"] == pytest.approx(shown, abs=1e-3) and rows[0]["probability"] >= 0.5
    else:
        assert "gender" not in table["headers"]
    if name in ("age", "multitask"):
        assert rows[0]["age (years)"] == pytest.approx(expected["age"], abs=0.06)
        assert f"about {expected['age']:.0f} ({expected['age_low']}–{expected['age_high']}) years old" in message
        assert rows[0]["80% interval"] == f"{expected['age_low']}–{expected['age_high']}"
    else:
        assert "age (years)" not in table["headers"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_photo_without_a_face_says_so(name, clients):
    _, message, table = ask(clients[name], LANDSCAPE)
    assert message.startswith("**No face found** in this 640 x 400 photo")
    assert table["data"] == []


@pytest.mark.slow
def test_two_faces_and_any_mode_or_size(clients, tmp_path):
    client = clients["multitask"]
    _, message, table = ask(client, TWO_FACES)
    rows = rows_of(table)
    assert message.startswith("**Found 2 faces.**") and [row["face"] for row in rows] == [1, 2]
    lefts = sorted(int(row["box (x, y, width, height)"].split(",")[0]) for row in rows)
    assert lefts[0] < 384 < lefts[1]  # one face in each half of the side-by-side photo
    with Image.open(ASTRONAUT) as photo:
        photo.convert("L").save(tmp_path / "grey.png")
        rgba = photo.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(tmp_path / "rgba.png")
        photo.resize((2048, 2048), Image.Resampling.BICUBIC).save(tmp_path / "large.jpg", quality=85)
    boxes = {}
    for name in ("grey.png", "rgba.png", "large.jpg"):
        _, message, table = ask(client, tmp_path / name)
        assert message.startswith("**Found 1 face.**"), name
        boxes[name] = [int(v) for v in rows_of(table)[0]["box (x, y, width, height)"].split(",")]
    # the 4x photo is shrunk for detection but its box is given in its own pixels
    assert boxes["large.jpg"] == pytest.approx([4 * v for v in boxes["grey.png"]], abs=24)


@pytest.mark.slow
def test_the_space_shows_what_the_model_looked_at_in_a_chosen_face(clients):
    from gradio_client import handle_file

    gallery = clients["multitask"].predict(handle_file(str(TWO_FACES)), 2, "blazeface-back", api_name="/heatmaps")
    assert [item["caption"].split(":")[0] for item in gallery] == ["face 2, aligned as the model sees it", "age",
                                                                    "gender"]
    pictures = [np.asarray(Image.open(item["image"]).convert("RGB"), np.int16) for item in gallery]
    assert all(picture.shape == (256, 256, 3) for picture in pictures)
    assert np.abs(pictures[1] - pictures[0]).mean() > 5  # the heatmap is drawn over the crop
    with pytest.raises(Exception, match="There is no face 3"):
        clients["multitask"].predict(handle_file(str(TWO_FACES)), 3, "blazeface-back", api_name="/heatmaps")


@pytest.mark.slow
def test_a_file_that_is_not_an_image_is_refused_and_the_space_keeps_working(clients, tmp_path):
    broken = tmp_path / "photo.jpg"
    broken.write_bytes(b"this is not a JPEG" * 50)
    with pytest.raises(Exception, match="(?i)identify|image"):
        ask(clients["gender"], broken)
    assert ask(clients["gender"], ASTRONAUT)[1].startswith("**Found 1 face.**")


@pytest.mark.slow
def test_combined_space_has_a_tab_and_endpoints_per_model(clients):
    client = clients[publish.COMBINED]
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {f"/{kind}_{name}" for kind in ("predict", "heatmaps", "about") for name in MODELS} <= endpoints
    _, message, table = ask(client, ASTRONAUT, "/predict_age")
    assert message.startswith("**Found 1 face.**") and "age (years)" in table["headers"]


@pytest.mark.slow
def test_the_detector_chosen_in_the_space_finds_the_face(clients, trained_models):
    from gradio_client import handle_file

    from agegender.data.images import read_image
    from agegender.inference.predictor import Predictor

    client = clients["multitask"]
    predictor = Predictor.load(trained_models["multitask"])
    for detector in ("mtcnn", "blazeface-short"):
        _, message, table = client.predict(handle_file(str(ASTRONAUT)), detector, api_name="/predict")
        [expected] = predictor.predict_image(read_image(ASTRONAUT), detector=detector)
        assert message.startswith("**Found 1 face.**")
        assert rows_of(table)[0]["box (x, y, width, height)"] == ", ".join(str(v) for v in expected["box"])
    with pytest.raises(Exception, match="(?i)choices|retina"):
        client.predict(handle_file(str(ASTRONAUT)), "retina", api_name="/predict")


@pytest.mark.slow
def test_about_page_reads_metrics_and_bias_from_the_published_files(clients, staged, results_dir, trained_models):
    import json

    about = clients[publish.COMBINED].predict(api_name="/about_multitask")
    folder = staged[publish.COMBINED].folder
    metrics = json.loads((trained_models["multitask"] / "metrics.json").read_text())  # pushed to its model repo
    assert f"| gender accuracy | {metrics['gender']['accuracy']:.4f} |" in about
    assert f"| age MAE | {metrics['age']['mae']:.2f} years |" in about
    assert "non-commercial research only" in about and "## Intended use and limits" in about
    comparison = json.loads((results_dir / "comparison.json").read_text())
    gaps = [g for g in comparison["bias"]["gaps"] if g["model"] == "multitask" and g["metric"] == "mae"]
    assert gaps, "compare wrote no age-MAE gap for the multitask model"
    for gap in gaps:
        assert f"| {gap['grouping']} | mae | {gap['best_group']} ({gap['best']:.3f}) |" in about
    staged_comparison = json.loads((folder / "results/comparison.json").read_text())
    assert {row["model"] for row in staged_comparison["bias"]["gaps"]} == set(MODELS)
    assert "Not measured for this model yet" not in about


@pytest.mark.slow
def test_staged_space_uses_its_own_copy_of_the_package(staged):
    folder = staged["gender"].folder
    found = subprocess.run([sys.executable, "-c", "import app_common, agegender; print(agegender.__file__)"],
                           cwd=folder, env=space_env(), capture_output=True, text=True, timeout=600)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()).parent == folder / "agegender"


def test_app_run_from_the_repository_without_a_model_says_so(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "spaces" / "age" / "app.py")], cwd=tmp_path,
                            env=space_env(AGEGENDER_RESULTS_DIR=str(tmp_path)), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: No trained model in {tmp_path / 'models' / 'age'}: train one (e.g. `python tasks/train_age.py`) "
        "or point AGEGENDER_RESULTS_DIR at a results folder that has one."]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_browser_uploads_a_photo_and_reads_the_result(servers, trained_models):
    import json

    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.page_load_strategy = "none"  # get() returns at once; the waits below poll (each call stays short)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                     "--window-size=1280,1600"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(servers["gender"].url)
        wait = WebDriverWait(driver, STARTUP_TIMEOUT)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#photo input[type=file]")).send_keys(str(ASTRONAUT))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo img"))  # the upload is shown
        driver.find_element(By.ID, "predict").click()
        message = wait.until(lambda d: "face" in (text := d.find_element(By.ID, "message").text) and text)
        assert message.startswith("Found 1 face.") and ("female" in message or "male" in message)
        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'About this model')]").click()
        about = wait.until(lambda d: "Measured accuracy" in (text := d.find_element(By.ID, "about").text) and text)
        metrics = json.loads((trained_models["gender"] / "metrics.json").read_text())
        assert f"{metrics['gender']['accuracy']:.4f}" in about and "UTKFace" in about
    finally:
        driver.quit()
