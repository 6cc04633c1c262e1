"""Stage each model's Gradio Space into build/spaces/<name>/; with --push, publish it on the Hugging Face Hub.

    python tasks/publish.py --all                     # dry run: stage every Space, print what would go where
    python tasks/publish.py --model multitask --push  # create or update <you>/agegender-multitask
    python tasks/publish.py --all --combined --push   # one Space with a tab per model (one Space to pay for)

A staged Space is self-contained: spaces/<name>/{app.py,README.md,requirements.txt}, spaces/app_common.py,
the example photos, a copy of common/ as the package agegender (the one inference path) and
results/models/<model>/ (model.keras, metadata.json, metrics.json, plots and a model card README.md), plus its
rows of results/comparison.json.
The token comes from HF_TOKEN or the stored login (`hf auth login`); it is checked before any upload.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token

from agegender.cards import COMPARISON_FILE, UTKFACE_URL, about_markdown, load_comparison, read_json
from agegender.cli import UserError, console, user_errors, write_json
from agegender.data import MODELS_DIR, REPO_ROOT, RESULTS_DIR
from agegender.families import FAMILIES
from agegender.modelio import ModelEntry, find_model, staging_dir
from agegender.tables import rich_table

REPO = REPO_ROOT
SPACES_DIR = REPO / "spaces"
BUILD_DIR = REPO / "build" / "spaces"
SPACE_FILES = ("app.py", "README.md", "requirements.txt")
MODEL_FILES = ("model.keras", "model.tflite", "model-int8.tflite", "metadata.json", "metrics.json",
               "history.csv")  # plus the folder's *.png
COMBINED = "combined"
REPO_PREFIX = "agegender"  # Space <namespace>/agegender-<name>
# stale copies deleted on update (common/** from Spaces staged before the package was named agegender)
OWNED_REMOTE = ["*.py", "*.txt", "common/**", "agegender/**", "examples/**", "results/**"]
LICENCE = {"license": "other", "license_name": "utkface-non-commercial-research",
           "license_link": UTKFACE_URL}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@dataclass
class StagedSpace:
    space: str  # a model family (agegender.families) or combined
    folder: Path
    models: list[ModelEntry]
    files: list[str]  # relative paths, sorted
    size: int  # bytes

    def repo_id(self, namespace: str) -> str:
        return f"{namespace}/{REPO_PREFIX}-{self.space}"


# ---------------------------------------------------------------- the model card


def eval_results(entry: ModelEntry) -> list[EvalResult]:
    """Test metrics of metrics.json in the Hub's model-index form."""
    metrics = read_json(entry.folder / "metrics.json") or {}
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


def model_card(entry: ModelEntry, comparison: dict[str, Any] | None) -> ModelCard:
    """huggingface_hub ModelCard: metrics, training data and licence, intended use and limits, bias table."""
    results = eval_results(entry)
    data = ModelCardData(model_name=f"{REPO_PREFIX}-{entry.name.replace('/', '-')}", library_name="keras",
                         pipeline_tag="image-classification", eval_results=results or None,
                         tags=["keras", "age-estimation", "gender-classification", "utkface"], **LICENCE)
    usage = "\n".join([
        "## How to use",
        "With the project's code (the package `agegender` is in the Space), on any photo:",
        "```python",
        "from agegender.faces import Predictor, read_image",
        f'predictor = Predictor.load("results/models/{entry.name}")',
        'for face in predictor.predict_image(read_image("photo.jpg")):',
        "    print(face)  # box, confidence and gender/p_female and/or age",
        "```",
    ])
    about = about_markdown(entry.name, entry.folder, comparison)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{about}\n\n{usage}\n")


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
                   "notes": {k: v for k, v in (comparison.get("notes") or {}).items() if k in names}})
    return subset


# ---------------------------------------------------------------- staging


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
    """The model of each chosen Space; a missing one fails for --model and is skipped (and said) for --all."""
    entries, missing = [], []
    for space in spaces:
        entry = find_model(space, models_dir)
        if entry is None:
            missing.append(f"{space}: no trained model in {Path(models_dir) / space}")
        else:
            entries.append(entry)
    if missing and (not every or not entries):
        raise UserError(f"Nothing to publish for {missing[0]}: train it first or pass --models-dir.")
    return entries, missing


def copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".tmp-*"))


def stage_space(space: str, entries: list[ModelEntry], build_dir: Path,
                comparison: dict[str, Any] | None) -> StagedSpace:
    """Write build_dir/<space>/ atomically: Space files, shared app, examples, agegender/, models and cards."""
    final = Path(build_dir) / space
    with staging_dir(final) as folder:
        for name in SPACE_FILES:
            shutil.copy2(SPACES_DIR / space / name, folder / name)
        shutil.copy2(SPACES_DIR / "app_common.py", folder / "app_common.py")
        copy_tree(SPACES_DIR / "examples", folder / "examples")
        copy_tree(REPO / "common", folder / "agegender")  # the package under its installed name
        for entry in entries:
            target = folder / "results" / "models" / entry.name
            target.mkdir(parents=True)
            for path in sorted(entry.folder.iterdir()):
                if path.is_file() and (path.name in MODEL_FILES or path.suffix == ".png"):
                    shutil.copy2(path, target / path.name)
            model_card(entry, comparison).save(target / "README.md")
        subset = comparison_subset(comparison, [entry.name for entry in entries])
        if subset is not None:
            write_json(folder / "results" / COMPARISON_FILE, subset)
    files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    return StagedSpace(space, final, entries, files, sum((final / f).stat().st_size for f in files))


def stage(spaces: list[str], every: bool = False, combined: bool = False, models_dir: Path = MODELS_DIR,
          results_dir: Path = RESULTS_DIR,
          build_dir: Path = BUILD_DIR) -> tuple[list[StagedSpace], list[str]]:
    """Stage one Space per model (or one combined Space); returns the staged Spaces and the skipped models."""
    entries, missing = find_entries(spaces, models_dir, every)
    comparison = load_comparison(results_dir)
    if combined:
        return [stage_space(COMBINED, entries, build_dir, comparison)], missing
    return [stage_space(entry.space, [entry], build_dir, comparison) for entry in entries], missing


def print_plan(staged: list[StagedSpace], namespace: str | None, missing: list[str], pushed: bool) -> None:
    title = ("Uploaded to https://huggingface.co/spaces/" if pushed
             else "Would upload to https://huggingface.co/spaces/ (dry run: add --push)")
    rows = [[item.repo_id(namespace or "<your-username>"), ", ".join(e.name for e in item.models),
             str(len(item.files)), f"{item.size / 1e6:.2f}"] for item in staged]
    console.print(rich_table(title, ["Hub Space (gradio SDK)", "models", "files", "MB"], rows,
                             left=("Hub Space (gradio SDK)", "models"), fold=True))
    if staged:
        console.print(f"Staged in {shown_path(staged[0].folder.parent)}/")
    for line in missing:
        console.print(f"[yellow]skipped[/] {line}")


def shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- pushing


def hub_login(api: HfApi) -> tuple[str, str]:
    """(token, user name), checked with a whoami call before anything is uploaded."""
    try:
        token = get_token()
    except Exception as error:  # e.g. HF_OIDC_RESOURCE set and the exchange failed
        raise UserError(f"Could not get a Hugging Face token ({error}); nothing was uploaded.") from error
    if not token:
        raise UserError("No Hugging Face token: set HF_TOKEN or run `hf auth login`, then rerun with --push.")
    try:
        user = api.whoami(token=token)
    except Exception as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise UserError(f"The Hugging Face Hub rejected the token (HTTP {status}): create a write token "
                            "at https://huggingface.co/settings/tokens and set HF_TOKEN.") from error
        reason = str(error).split("\n")[0][:160] or type(error).__name__
        raise UserError(f"Cannot reach the Hugging Face Hub ({reason}); nothing was uploaded.") from error
    return token, user["name"]


def push(staged: list[StagedSpace], namespace: str | None, private: bool, api: HfApi | None = None) -> str:
    """Create or update each staged Space on the Hub; returns the namespace used."""
    api = api or HfApi()
    token, user = hub_login(api)
    namespace = namespace or user
    for item in staged:
        repo_id = item.repo_id(namespace)
        try:
            api.create_repo(repo_id, token=token, repo_type="space", space_sdk="gradio", exist_ok=True,
                            private=private)
            api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=item.folder, token=token,
                              commit_message=f"Publish the {item.space} Space from agegender",
                              delete_patterns=OWNED_REMOTE)
        except Exception as error:
            reason = str(error).split("\n")[0][:200] or type(error).__name__
            raise UserError(f"Publishing {repo_id} failed ({reason}).") from error
        console.print(f"published https://huggingface.co/spaces/{repo_id}")
    return namespace


@app.command()
def main(
    model: Annotated[list[str] | None, typer.Option(
        "--model", help=f"Model to publish (repeatable): {', '.join(FAMILIES)}.")] = None,
    every: Annotated[bool, typer.Option("--all", help="Every model that has been trained.")] = False,
    combined: Annotated[bool, typer.Option(help="One Space, a tab per model, not one each.")] = False,
    push_: Annotated[bool, typer.Option("--push", help="Upload to the Hub (default: stage only).")] = False,
    namespace: Annotated[str | None, typer.Option(help="Hub user or organisation (default: yours).")] = None,
    private: Annotated[bool, typer.Option(help="Create the Spaces private.")] = False,
    models_dir: Annotated[Path, typer.Option(help="Folder of model folders.")] = MODELS_DIR,
    results_dir: Annotated[Path, typer.Option(help="Results folder holding comparison.json.")] = RESULTS_DIR,
    build_dir: Annotated[Path, typer.Option(help="Where the Spaces are staged.")] = BUILD_DIR,
) -> None:
    """Stage each Space (its files, model files, model card); --push creates or updates it on the Hub."""
    with user_errors():
        spaces = select_spaces(model, every)
        staged, missing = stage(spaces, every, combined, models_dir, results_dir, build_dir)
        if push_:
            namespace = push(staged, namespace, private)
        print_plan(staged, namespace, missing, push_)


if __name__ == "__main__":
    app()
