"""Publish each model to its own Hugging Face model repo, and a Gradio Space that loads it from there.

    python tasks/publish.py --all                        # dry run: stage everything, print what would go where
    python tasks/publish.py --model multitask --push     # <you>/agegender-multitask: the model repo, then its Space
    python tasks/publish.py --all --models-only --push   # the model repos only (free on the Hub), no Space
    python tasks/publish.py --all --combined --push      # the model repos and one Space with a tab per model

A model repo (staged in build/hub/models/<repo>/) holds the model folder's files (model.keras, its TFLite exports,
metadata.json, metrics.json, history and plots), the same model in Keras's folder layout (config.json and
model.weights.h5, taken out of model.keras) so that `keras.saving.load_model("hf://<namespace>/agegender-<name>")`
loads it, the model card as README.md, and agegender.json: the files publish wrote.
A Space (staged in build/hub/spaces/<name>/) holds spaces/<name>/{app.py,README.md,requirements.txt},
spaces/app_common.py, the example photos, a copy of common/ as the package agegender, its rows of
results/comparison.json and hub_models.json: the model repos it loads and, for each, the commit just pushed. It
carries no model: it downloads its own at start-up, through the Hub cache.

An update uploads only the files whose hash differs from the remote one (git blob id, or the LFS sha256) and
deletes only files an earlier publish wrote (agegender.json) that are gone now; files anyone else added stay.
The token comes from HF_TOKEN or the stored login (`hf auth login`); the token, the network and the namespace are
checked, and every repo created, before anything is uploaded.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    get_session,
    get_token,
)

from agegender.cli import UserError, console, user_errors, write_json, write_text
from agegender.data.manifest import file_sha256
from agegender.data.paths import MODELS_DIR, REPO_ROOT, RESULTS_DIR
from agegender.inference.hub import (
    MANIFEST_FILE,
    PINS_FILE,
    REPO_PREFIX,
    Pin,
    git_blob_sha,
    read_pins,
    repo_name,
    write_pins,
)
from agegender.models.folders import (
    EXPORT_FILES,
    METADATA_FILE,
    METRICS_FILE,
    MODEL_FILE,
    ModelEntry,
    find_model,
    staging_dir,
)
from agegender.models.registry import FAMILIES
from agegender.reporting.cards import COMPARISON_FILE, UTKFACE_URL, about_markdown, load_comparison, read_json

REPO = REPO_ROOT
SPACES_DIR = REPO / "spaces"
BUILD_DIR = REPO / "build" / "hub"  # models/<repo>/ and spaces/<name>/
SPACE_FILES = ("app.py", "README.md", "requirements.txt")
MODEL_FILES = ("model.keras", "model.tflite", "model-int8.tflite", "metadata.json", "metrics.json",
               "history.csv")  # plus the folder's *.png
KERAS_LAYOUT = ("config.json", "model.weights.h5")  # what keras.saving.load_model("hf://...") reads
COMBINED = "combined"
# a Space published before agegender.json existed: the files that publish wrote there (common/**: before the
# package was named agegender; results/**: the model copies Spaces carried)
LEGACY_SPACE_FILES = ("*.py", "*.txt", "README.md", "common/**", "agegender/**", "examples/**", "results/**")
LICENCE = {"license": "other", "license_name": "utkface-non-commercial-research",
           "license_link": UTKFACE_URL}
HUB = "https://huggingface.co"
NAMESPACE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
SHOWN_NAMESPACE = "<your-username>"  # in a dry run without --namespace
HUB_TIMEOUT_S = 60  # longest wait for a connection or for the next bytes of any Hub request

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@dataclass
class StagedRepo:
    """A model repo or a Space, staged: what would be its whole content on the Hub."""

    kind: str  # "model" or "space"
    name: str  # the repo name after agegender-: the model's name, or the Space's family (or combined)
    folder: Path
    models: list[ModelEntry]

    @property
    def files(self) -> list[str]:
        """Relative paths, sorted."""
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())

    @property
    def size(self) -> int:
        return sum((self.folder / name).stat().st_size for name in self.files)

    def repo_id(self, namespace: str) -> str:
        return f"{namespace}/{REPO_PREFIX}-{self.name}"

    def url(self, namespace: str) -> str:
        return f"{HUB}/{'spaces/' if self.kind == 'space' else ''}{self.repo_id(namespace)}"


@dataclass
class Update:
    """What pushing one staged repo did."""

    revision: str  # the repo's commit after the push (the one already there when nothing changed)
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- the model card


def eval_results(entry: ModelEntry) -> list[EvalResult]:
    """Test metrics of metrics.json in the Hub's model-index form."""
    metrics = read_json(entry.folder / METRICS_FILE) or {}
    found = []
    common = {"dataset_type": "utkface", "dataset_name": "UTKFace",
              "dataset_split": metrics.get("split", "test")}
    for key, label in (("accuracy", "accuracy"), ("f1", "f1"), ("roc_auc", "roc_auc")):
        if metrics.get("gender", {}).get(key) is not None:
            found.append(EvalResult(task_type="image-classification", task_name="Gender classification",
                                    metric_type=label, metric_value=float(metrics["gender"][key]), **common))
    for key, label in (("mae", "mae"), ("rmse", "rmse"), ("cs5", "cs@5")):
        if metrics.get("age", {}).get(key) is not None:
            found.append(EvalResult(task_type="image-regression", task_name="Age estimation",
                                    metric_type=label, metric_value=float(metrics["age"][key]), **common))
    return found


def usage_markdown(entry: ModelEntry, repo_id: str) -> str:
    """How to load the model from its repo: Keras alone on a face crop, and the project's code on any photo."""
    metadata = read_json(entry.folder / METADATA_FILE) or {}
    size, scale = metadata.get("image_size", 128), float(metadata.get("age_scale", 120.0))
    found = [name for name in EXPORT_FILES.values() if (entry.folder / name).is_file()]
    exports = (f"the model's TFLite export{'s' if len(found) > 1 else ''} ({', '.join(f'`{n}`' for n in found)}, "
               f"checked against `{MODEL_FILE}` by the project's `tasks/export.py`), " if found else "")
    prints = {"age": f'print("age:", max(0.0, float(outputs["age"][0, 0]) * {scale:g}), "years")',
              "gender": 'print("P(female):", float(outputs["gender"][0, 0]))'}
    return "\n".join([
        "## How to use",
        "With Keras 3 alone, on one face already cropped like UTKFace's (the model's custom layers come with the "
        "agegender project's package: `pip install -e .` in a clone of the project):",
        "```python",
        "import keras",
        "import numpy as np",
        "from PIL import Image",
        "",
        "import agegender.models.layers  # registers the project's custom Keras layers",
        "",
        f'model = keras.saving.load_model("hf://{repo_id}")',
        f'face = Image.open("face.jpg").convert("RGB").resize(({size}, {size}))',
        'batch = np.asarray(face, dtype="float32")[None] / 255.0  # RGB in [0, 1]',
        "outputs = model.predict(batch, verbose=0)",
        *(prints[name] for name in metadata.get("outputs", []) if name in prints),
        "```",
        "With the project's code, on any photo (faces found and aligned for you):",
        "```python",
        "from huggingface_hub import snapshot_download",
        "",
        "from agegender.data.images import read_image",
        "from agegender.inference.predictor import Predictor",
        "",
        f'predictor = Predictor.load(snapshot_download("{repo_id}"))',
        'for face in predictor.predict_image(read_image("photo.jpg")):',
        "    print(face)  # box, confidence, gender/p_female and/or age, age_band and the 80% interval",
        "```",
        f"The repo also holds {exports}`{METADATA_FILE}` (input size, scaling, labels, training parameters), "
        f"`{METRICS_FILE}` and the training history and plots.",
    ])


def model_card(entry: ModelEntry, comparison: dict[str, Any] | None, repo_id: str) -> ModelCard:
    """huggingface_hub ModelCard: metrics (model-index), training data and licence, intended use and limits, the
    bias table, and how to load it from repo_id."""
    results = eval_results(entry)
    data = ModelCardData(model_name=repo_id.split("/")[-1], library_name="keras",
                         pipeline_tag="image-classification", eval_results=results or None,
                         tags=["keras", "age-estimation", "gender-classification", "utkface"], **LICENCE)
    about = about_markdown(entry.name, entry.folder, comparison)
    plots = sorted(path.name for path in entry.folder.glob("*.png"))
    shown = "\n".join(["## Training plots", *(f"![{Path(name).stem.replace('_', ' ')}]({name})" for name in plots)])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{about}\n\n{usage_markdown(entry, repo_id)}\n"
                     + (f"\n{shown}\n" if plots else ""))


def comparison_subset(comparison: dict[str, Any] | None, names: list[str]) -> dict[str, Any] | None:
    """comparison.json cut down to the Space's models (same layout), without this machine's cache paths."""
    if not comparison:
        return None

    def keep(rows: Any) -> list:
        return [row for row in rows or [] if isinstance(row, dict) and row.get("model") in names]

    bias = comparison.get("bias") or {}
    subset = {key: value for key, value in comparison.items() if key not in ("cache", "plots")}
    subset["settings"] = {key: value for key, value in (comparison.get("settings") or {}).items()
                          if key not in ("models_dir", "data_dir")}
    subset.update({"models": keep(comparison.get("models")), "robustness": keep(comparison.get("robustness")),
                   "bias": {"groups": keep(bias.get("groups")), "gaps": keep(bias.get("gaps"))},
                   "notes": {k: v for k, v in (comparison.get("notes") or {}).items() if k in names},
                   "age_interval": {k: v for k, v in (comparison.get("age_interval") or {}).items() if k in names},
                   "gender_certainty": {k: v for k, v in (comparison.get("gender_certainty") or {}).items()
                                        if k in names}})
    return subset


# ---------------------------------------------------------------- choosing and staging


def select_spaces(models: list[str] | None, every: bool) -> list[str]:
    if every and models:
        raise UserError("Give either --model NAME (repeatable) or --all, not both.")
    if not every and not models:
        raise UserError("Choose the models to publish: --model NAME (repeatable) or --all.")
    chosen = list(FAMILIES) if every else list(dict.fromkeys(models or []))
    unknown = [name for name in chosen if name not in FAMILIES]
    if unknown:
        raise UserError(f"Unknown model {unknown[0]!r}: choose from {', '.join(FAMILIES)}.")
    return chosen


def find_entries(spaces: list[str], models_dir: Path,
                 every: bool) -> tuple[list[ModelEntry], list[str]]:
    """The model of each chosen Space; a missing one fails for --model and is skipped (and said) for --all. A
    model without metrics.json fails either way: its card would have no measured accuracy."""
    entries, missing = [], []
    for space in spaces:
        entry = find_model(space, models_dir)
        if entry is None:
            missing.append(f"{space}: no trained model in {Path(models_dir) / space}")
        else:
            entries.append(entry)
    if missing and (not every or not entries):
        raise UserError(f"Nothing to publish for {missing[0]}: train it first or pass --models-dir.")
    for entry in entries:
        if not (entry.folder / METRICS_FILE).is_file():
            raise UserError(f"{entry.folder} has no {METRICS_FILE}, so its model card would have no measured "
                            "accuracy: train it again (the trainers write it) before publishing.")
    return entries, missing


def copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".tmp-*"))


def write_manifest(folder: Path, what: str) -> None:
    """agegender.json: the files publish wrote into this repo, so that a later publish deletes only those."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    write_json(folder / MANIFEST_FILE, {"written_by": "agegender tasks/publish.py", "content": what,
                                        "files": [name for name in files if name != MANIFEST_FILE]})


def stage_model_repo(entry: ModelEntry, build_dir: Path, comparison: dict[str, Any] | None,
                     namespace: str) -> StagedRepo:
    """Write build_dir/models/agegender-<name>/ atomically: the model folder's files, the Keras folder layout,
    the model card and the manifest."""
    final = Path(build_dir) / "models" / repo_name(entry.name)
    repo = StagedRepo("model", final.name.removeprefix(f"{REPO_PREFIX}-"), final, [entry])
    with staging_dir(final) as folder:
        for path in sorted(entry.folder.iterdir()):
            if path.is_file() and (path.name in MODEL_FILES or path.suffix == ".png"):
                shutil.copy2(path, folder / path.name)
        with zipfile.ZipFile(entry.folder / MODEL_FILE) as archive:
            for member in archive.namelist():
                if member in KERAS_LAYOUT or member.startswith("assets/"):
                    archive.extract(member, folder)
        model_card(entry, comparison, repo.repo_id(namespace)).save(folder / "README.md")
        write_manifest(folder, f"the model {entry.name}")
    return repo


def space_readme(space: str, pins: list[Pin]) -> str:
    """The Space's README.md: spaces/<space>/README.md with the model repos it loads in its front matter (the Hub
    links them) and its closing "Built by" paragraph saying where each model comes from."""
    text = (SPACES_DIR / space / "README.md").read_text()
    front, body = text.removeprefix("---\n").split("\n---\n", 1)
    front += "\nmodels:\n" + "".join(f"  - {pin.repo_id}\n" for pin in pins)
    loads = "; ".join(f"[{pin.repo_id}]({HUB}/{pin.repo_id})"
                      + (f" at commit `{pin.revision[:12]}`" if pin.revision else "") for pin in pins)
    built = (f"Built by `tasks/publish.py` of the agegender project. The Space carries no model: at start-up it "
             f"downloads {loads} (the model card, `model.keras`, `metadata.json` and `metrics.json` are there), "
             "through the Hub cache; `agegender/` (the project's `common/`) is its one inference path.\n")
    body = body[:body.index("Built by")] + built if "Built by" in body else f"{body.rstrip()}\n\n{built}"
    return f"---\n{front.rstrip()}\n---\n{body}"


def write_space_pins(folder: Path, space: str, pins: list[Pin]) -> None:
    """hub_models.json and the README that names the same model repos and revisions."""
    write_pins(folder / PINS_FILE, pins)
    write_text(folder / "README.md", space_readme(space, pins))


def stage_space(space: str, entries: list[ModelEntry], build_dir: Path, comparison: dict[str, Any] | None,
                pins: list[Pin]) -> StagedRepo:
    """Write build_dir/spaces/<space>/ atomically: Space files, shared app, examples, agegender/, comparison rows
    and the pinned model repos."""
    final = Path(build_dir) / "spaces" / space
    with staging_dir(final) as folder:
        for name in SPACE_FILES:
            shutil.copy2(SPACES_DIR / space / name, folder / name)
        shutil.copy2(SPACES_DIR / "app_common.py", folder / "app_common.py")
        copy_tree(SPACES_DIR / "examples", folder / "examples")
        copy_tree(REPO / "common", folder / "agegender")  # the package under its installed name
        subset = comparison_subset(comparison, [entry.name for entry in entries])
        if subset is not None:
            write_json(folder / "results" / COMPARISON_FILE, subset)
        write_space_pins(folder, space, pins)
        write_manifest(folder, f"the {space} Space")
    return StagedRepo("space", space, final, entries)


def pin_space(space: StagedRepo, pins: list[Pin]) -> None:
    """Point a staged Space at the revisions just pushed (its manifest lists the same files)."""
    write_space_pins(space.folder, space.name, [pin for pin in pins if pin.name in {e.name for e in space.models}])


def stage(spaces: list[str], every: bool = False, combined: bool = False, models_only: bool = False,
          namespace: str | None = None, models_dir: Path = MODELS_DIR, results_dir: Path = RESULTS_DIR,
          build_dir: Path = BUILD_DIR) -> tuple[list[StagedRepo], list[StagedRepo], list[str]]:
    """Stage a model repo per model and one Space per model (or one combined Space, or none); returns the model
    repos, the Spaces and the skipped models. The Spaces' pins name no revision until push() writes them."""
    entries, missing = find_entries(spaces, models_dir, every)
    comparison = load_comparison(results_dir)
    shown = namespace or SHOWN_NAMESPACE
    models = [stage_model_repo(entry, build_dir, comparison, shown) for entry in entries]
    pins = [Pin(entry.space, entry.name, repo.repo_id(shown), None) for entry, repo in zip(entries, models,
                                                                                            strict=True)]
    if models_only:
        return models, [], missing
    if combined:
        return models, [stage_space(COMBINED, entries, build_dir, comparison, pins)], missing
    return models, [stage_space(entry.space, [entry], build_dir, comparison, [pin])
                    for entry, pin in zip(entries, pins, strict=True)], missing


# ---------------------------------------------------------------- the plan


def megabytes(size: int) -> str:
    return f"{size / 1e6:.2f}"


def file_lines(repo: StagedRepo, names: list[str]) -> list[tuple[str, int]]:
    """(name, bytes) per file; a Space's folders (agegender/, examples/, results/) one line each."""
    lines, folders = [], {}
    for name in names:
        size = (repo.folder / name).stat().st_size
        if "/" in name and repo.kind == "space":
            top = name.split("/")[0]
            count, total = folders.get(top, (0, 0))
            folders[top] = (count + 1, total + size)
        else:
            lines.append((name, size))
    return lines + [(f"{top}/ ({count} file{'s' if count > 1 else ''})", total)
                    for top, (count, total) in sorted(folders.items())]


def print_plan(models: list[StagedRepo], spaces: list[StagedRepo], namespace: str | None, missing: list[str],
               updates: dict[tuple[str, str], Update] | None = None) -> None:
    """A table with a section per repo: the repo with its size and commit (a Space: the model commit it pins for
    each model), then a line per file (a Space's folders one line each) that would go up (dry run) or went up."""
    from rich.table import Table

    pushed = updates is not None
    namespace = namespace or SHOWN_NAMESPACE
    title = ("Pushed to the Hugging Face Hub: what changed" if pushed
             else "Dry run: what --push would upload (files already on the Hub are skipped)")
    table = Table(title=title)
    table.add_column("Hub repo, then its files", overflow="fold")
    table.add_column("MB", justify="right")
    table.add_column("revision (commit)", overflow="fold")
    for repo in [*models, *spaces]:
        update = updates.get((repo.kind, repo.repo_id(namespace))) if pushed else None
        names = repo.files if update is None else update.uploaded
        total = sum((repo.folder / name).stat().st_size for name in names)
        commit = update.revision[:12] if update else "new commit"
        if repo.kind == "model":
            table.add_row(f"[bold]model {repo.repo_id(namespace)}[/]", megabytes(total), commit)
        else:
            table.add_row(f"[bold]Space {repo.repo_id(namespace)}[/]", megabytes(total), commit)
            for pin in read_pins(repo.folder / PINS_FILE) or []:
                pinned = pin.revision[:12] if pin.revision else "its new commit"
                table.add_row(f"  loads {pin.repo_id}", "", f"pins {pinned}")
        rows = [(f"  {name}", megabytes(size)) for name, size in file_lines(repo, names)]
        if update is not None:
            rows += [(f"  deleted {name}", "") for name in update.deleted]
            rows = rows or [("  nothing to upload", "")]
            rows += [(f"  ({len(update.unchanged)} files unchanged)", "")] if update.unchanged else []
        for index, (name, size) in enumerate(rows):
            table.add_row(name, size, "", end_section=index == len(rows) - 1)
    console.print(table)
    staged = [*models, *spaces]
    if staged:
        console.print(f"Staged in {shown_path(staged[0].folder.parent.parent)}/ (models/ and spaces/)")
    for line in missing:
        console.print(f"[yellow]skipped[/] {line}")


def shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- pushing


def reason_of(error: Exception) -> str:
    return str(error).split("\n")[0][:200] or type(error).__name__


def status_of(error: Exception) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def hub_login(api: HfApi) -> tuple[str, dict[str, Any]]:
    """(token, whoami) checked with a whoami call before anything is uploaded."""
    try:
        token = get_token()
    except Exception as error:  # e.g. HF_OIDC_RESOURCE set and the exchange failed
        raise UserError(f"Could not get a Hugging Face token ({error}); nothing was uploaded.") from error
    if not token:
        raise UserError("No Hugging Face token: set HF_TOKEN or run `hf auth login`, then rerun with --push.")
    try:
        user = api.whoami(token=token)
    except Exception as error:
        status = status_of(error)
        if status in (401, 403):
            raise UserError(f"The Hugging Face Hub rejected the token (HTTP {status}): create a write token "
                            "at https://huggingface.co/settings/tokens and set HF_TOKEN.") from error
        raise UserError(f"Cannot reach the Hugging Face Hub ({reason_of(error)}); nothing was uploaded.") from error
    return token, user


def check_namespace(whoami: dict[str, Any], namespace: str) -> None:
    """Fail unless whoami says this token may write repos in namespace: a write token, and the user's own
    namespace or an organisation where the user has more than read access."""
    access = ((whoami.get("auth") or {}).get("accessToken") or {})
    if access.get("role") == "read":
        raise UserError("The Hugging Face token is read-only: create a write token at "
                        "https://huggingface.co/settings/tokens and set HF_TOKEN; nothing was uploaded.")
    if namespace == whoami.get("name"):
        return
    roles = {org.get("name"): org.get("roleInOrg") for org in whoami.get("orgs") or []}
    if namespace not in roles:
        raise UserError(f"{whoami.get('name')} cannot write to the namespace {namespace!r}: it is neither your user "
                        f"name nor one of your organisations ({', '.join(sorted(roles)) or 'none'}); nothing was "
                        "uploaded.")
    if roles[namespace] == "read":
        raise UserError(f"{whoami.get('name')} may only read in the organisation {namespace}: ask one of its admins "
                        "for the write role; nothing was uploaded.")


def create_repos(api: HfApi, token: str, repos: list[StagedRepo], namespace: str, private: bool) -> None:
    """Create every repo (kept as it is where it exists) before any file goes up."""
    for repo in repos:
        repo_id = repo.repo_id(namespace)
        options = {"repo_type": "space", "space_sdk": "gradio"} if repo.kind == "space" else {"repo_type": "model"}
        try:
            api.create_repo(repo_id, token=token, exist_ok=True, private=private, **options)
        except Exception as error:
            if status_of(error) in (401, 403):
                raise UserError(f"The Hub refused to create {repo_id} (HTTP {status_of(error)}): this token may not "
                                f"create repos in {namespace}; nothing was uploaded.") from error
            raise UserError(f"Could not create {repo_id} ({reason_of(error)}); nothing was uploaded.") from error


def same_content(path: Path, remote: Any) -> bool:
    """Whether a local file has the content of a remote one (RepoSibling): the LFS sha256 for LFS files, else the
    git blob id."""
    if remote is None:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs:
        sha256 = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        return sha256 == file_sha256(path)
    return getattr(remote, "blob_id", None) == git_blob_sha(path)


def owned_remote_files(api: HfApi, token: str, repo: StagedRepo, repo_id: str, revision: str,
                       remote: list[str]) -> set[str]:
    """The remote files an earlier publish wrote: its manifest's list, or for a Space published before there were
    manifests, the files matching what publish used to write there."""
    if MANIFEST_FILE in remote:
        path = api.hf_hub_download(repo_id=repo_id, filename=MANIFEST_FILE, revision=revision, token=token,
                                   repo_type=repo.kind)
        return {*(read_json(Path(path)) or {}).get("files", []), MANIFEST_FILE}
    if repo.kind == "space":
        return {name for name in remote if any(fnmatch.fnmatch(name, pattern) for pattern in LEGACY_SPACE_FILES)}
    return set()


def sync_repo(api: HfApi, token: str, repo: StagedRepo, namespace: str) -> Update:
    """One commit that makes the remote repo hold the staged files: only changed files go up, and only files an
    earlier publish wrote and that are gone now are deleted."""
    repo_id = repo.repo_id(namespace)
    try:
        info = api.repo_info(repo_id, repo_type=repo.kind, files_metadata=True, token=token)
        remote = {sibling.rfilename: sibling for sibling in info.siblings or []}
        owned = owned_remote_files(api, token, repo, repo_id, info.sha, list(remote))
        files = repo.files
        update = Update(info.sha)
        for name in files:
            (update.unchanged if same_content(repo.folder / name, remote.get(name)) else update.uploaded).append(name)
        update.deleted = sorted(name for name in owned if name in remote and name not in files)
        operations = [*(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(repo.folder / name))
                        for name in update.uploaded),
                      *(CommitOperationDelete(path_in_repo=name) for name in update.deleted)]
        if operations:
            what = f"the model {repo.models[0].name}" if repo.kind == "model" else f"the {repo.name} Space"
            commit = api.create_commit(repo_id, operations, repo_type=repo.kind, token=token,
                                       commit_message=f"Publish {what} from agegender", parent_commit=info.sha)
            update.revision = commit.oid
    except Exception as error:
        raise UserError(f"Publishing {repo_id} failed ({reason_of(error)}).") from error
    return update


def login(api: HfApi, namespace: str | None) -> tuple[str, str]:
    """(token, namespace): the token checked with the Hub, and the namespace (default: the user's) checked
    writable, before anything is created or uploaded."""
    get_session().timeout = HUB_TIMEOUT_S  # huggingface_hub's shared client has none: a dead link would hang
    token, whoami = hub_login(api)
    namespace = namespace or whoami["name"]
    check_namespace(whoami, namespace)
    return token, namespace


def push(models: list[StagedRepo], spaces: list[StagedRepo], api: HfApi, token: str, namespace: str,
         private: bool) -> dict[tuple[str, str], Update]:
    """Create every repo, push each model repo, pin each Space to the commits just pushed, then push the Spaces;
    returns what each push did, by (repo type, repo id): a model repo and its Space share their id."""
    create_repos(api, token, [*models, *spaces], namespace, private)
    updates, pins = {}, []
    for repo in models:
        update = updates[repo.kind, repo.repo_id(namespace)] = sync_repo(api, token, repo, namespace)
        pins.append(Pin(repo.models[0].space, repo.models[0].name, repo.repo_id(namespace), update.revision))
        console.print(f"model {repo.url(namespace)} at {update.revision[:12]}: {len(update.uploaded)} files "
                      f"uploaded, {len(update.deleted)} deleted")
    for space in spaces:
        pin_space(space, pins)
        update = updates[space.kind, space.repo_id(namespace)] = sync_repo(api, token, space, namespace)
        console.print(f"Space {space.url(namespace)} at {update.revision[:12]}: {len(update.uploaded)} files "
                      f"uploaded, {len(update.deleted)} deleted")
    if private and spaces:
        console.print("The model repos are private: give each Space a secret HF_TOKEN (a read token) so that it "
                      "can download its model.")
    return updates


@app.command()
def main(
    model: Annotated[list[str] | None, typer.Option(
        "--model", help=f"Model to publish (repeatable): {', '.join(FAMILIES)}.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every model that has been trained.")] = False,
    combined: Annotated[bool, typer.Option(help="One Space, a tab per model, not one each.")] = False,
    models_only: Annotated[bool, typer.Option(
        "--models-only", help="Only the model repos (free on the Hub), no Space.")] = False,
    push_: Annotated[bool, typer.Option("--push", help="Upload to the Hub (default: stage only).")] = False,
    namespace: Annotated[str | None, typer.Option(help="Hub user or organisation (default: yours).")] = None,
    private: Annotated[bool, typer.Option(help="Create the repos private.")] = False,
    models_dir: Annotated[Path, typer.Option(help="Folder of model folders.")] = MODELS_DIR,
    results_dir: Annotated[Path, typer.Option(help="Results folder holding comparison.json.")] = RESULTS_DIR,
    build_dir: Annotated[Path, typer.Option(help="Where the repos are staged (models/ and spaces/).")] = BUILD_DIR,
) -> None:
    """Stage a model repo per model (files, Keras layout, model card) and its Space; --push creates or updates
    them on the Hub, the models first."""
    with user_errors():
        spaces = select_spaces(model, every)
        if models_only and combined:
            raise UserError("--models-only publishes no Space, so --combined has nothing to do: drop one of them.")
        if namespace is not None and not NAMESPACE.match(namespace):
            raise UserError(f"{namespace!r} is not a Hub user or organisation name (letters, digits, '-', '_', '.').")
        find_entries(spaces, models_dir, every)  # bad choices and missing metrics fail before the Hub is asked
        api = token = updates = None
        if push_:
            api = HfApi()
            token, namespace = login(api, namespace)
        models, staged_spaces, missing = stage(spaces, every, combined, models_only, namespace, models_dir,
                                               results_dir, build_dir)
        if push_:
            updates = push(models, staged_spaces, api, token, namespace, private)
        print_plan(models, staged_spaces, namespace, missing, updates)


if __name__ == "__main__":
    app()
