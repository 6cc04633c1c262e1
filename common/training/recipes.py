"""Recipes: one committed TOML file per shipped model, recipes/<model>.toml, holding its family, every parameter
and the schedule of one clean run that makes it. Every trainer takes `--recipe PATH`, and metadata.json records
the recipe's text, its sha256 and any flags given on top of it.

    family = "multitask"          # which trainer runs it (agegender.models.registry)
    description = "..."           # optional: why these values
    image_size = 128              # the family's settings (agegender.models.registry.Family.settings)
    epochs = 30
    seed = 42

    [params]                      # the family's parameters (metadata.json's params)
    learning_rate = 0.0003
    age_head = "dex"

A run's parameters: the family's defaults, then the recipe, then a --params file (tune's output), then flags
given on the command line. A key the family does not know, a value of the wrong type or a recipe of another
family is one sentence and a non-zero exit before anything is read or trained.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agegender.cli import UserError, console
from agegender.data.datasets import UTKFACE, dataset_name
from agegender.data.manifest import (
    UTKFACE_CROPS,
    crops_dir,
    data_state,
    prepared_crops,
    prepared_extras,
    same_preparation,
)
from agegender.data.paths import REPO_ROOT
from agegender.models.registry import FAMILIES, Family

RECIPE_KEYS = ("family", "description", "params", "data")  # besides the family's settings
DATA_KEYS = ("utkface_crops", "extra_sources")  # what a recipe's [data] table may say about its training data
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 512


@dataclass(frozen=True)
class Recipe:
    path: Path
    family: str
    settings: dict[str, Any]
    params: dict[str, Any]
    text: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def shown(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def check_value(path: Path, key: str, value: Any, default: Any) -> None:
    """A recipe value must have its default's type (numbers: int or float; None: any scalar)."""
    numeric = isinstance(default, int | float) and not isinstance(default, bool)
    if isinstance(default, bool):
        fits = isinstance(value, bool)
    elif numeric:
        fits = isinstance(value, int | float) and not isinstance(value, bool)
    elif default is None:
        fits = isinstance(value, int | float | str) and not isinstance(value, bool)
    else:
        fits = isinstance(value, type(default))
    if not fits:
        wanted = "a number" if numeric else type(default).__name__ if default is not None else "a number or text"
        raise UserError(f"Recipe {path}: {key} = {value!r} should be {wanted}.")
    if key == "image_size" and not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        raise UserError(f"Recipe {path}: image_size = {value} is outside {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE}.")
    if numeric and value < 0:
        raise UserError(f"Recipe {path}: {key} = {value} is negative.")


def read_recipe(path: Path, family: str | None = None) -> Recipe:
    """A recipe file, checked against its family (and against `family` when given)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Recipe {path} does not exist.")
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"Recipe {path} is not valid TOML ({error}).") from error
    name = data.get("family")
    if name not in FAMILIES:
        raise UserError(f"Recipe {path} names {'no family' if name is None else f'the unknown family {name!r}'}; "
                        f"expected family = one of {', '.join(FAMILIES)}.")
    if family is not None and name != family:
        raise UserError(f"Recipe {path} is for the {name} family, not {family}: run it with "
                        f"{FAMILIES[name].script}.")
    spec = FAMILIES[name]
    unknown = sorted(set(data) - set(RECIPE_KEYS) - set(spec.settings))
    if unknown:
        raise UserError(f"Recipe {path} has unknown key(s) {', '.join(unknown)}; the {name} family takes "
                        f"{', '.join([*RECIPE_KEYS, *spec.settings])}.")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise UserError(f"Recipe {path}: params must be a table ([params]).")
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        raise UserError(f"Recipe {path} has unknown parameter(s) {', '.join(unknown)}; the {name} family's are "
                        f"{', '.join(spec.defaults) or 'none'}.")
    for key, value in params.items():
        check_value(path, key, value, spec.defaults[key])
    settings = {key: value for key, value in data.items() if key in spec.settings}
    for key, value in settings.items():
        check_value(path, key, value, spec.settings[key])
    return Recipe(path, name, settings, params, text, check_data(path, data.get("data", {})))


def check_data(path: Path, data: Any) -> dict[str, Any]:
    """A recipe's [data] table: utkface_crops = "original" (the default) or "detected", and extra_sources = a list
    of labelled datasets (prepare_data --extra-source: a folder or archive, relative to the repository root or
    absolute) trained on beside UTKFace."""
    if not isinstance(data, dict):
        raise UserError(f"Recipe {path}: data must be a table ([data]).")
    for key in data:
        if key not in DATA_KEYS:
            raise UserError(f"Recipe {path} has the unknown data key {key!r}; [data] takes {', '.join(DATA_KEYS)}.")
    crops = data.get("utkface_crops", "original")
    if crops not in UTKFACE_CROPS:
        raise UserError(f"Recipe {path}: data utkface_crops = {crops!r} should be one of {', '.join(UTKFACE_CROPS)}.")
    extras = data.get("extra_sources", [])
    if not isinstance(extras, list) or not all(isinstance(item, str) and item for item in extras):
        raise UserError(f"Recipe {path}: data extra_sources should be a list of dataset paths, like "
                        '["../shared/data/celeba/celeba-10k.tar.gz"].')
    names = [dataset_name(item) for item in extras]
    if len(set(names)) < len(names) or UTKFACE in names:
        raise UserError(f"Recipe {path}: two of its datasets would have the same name ({', '.join(names)}).")
    return dict(data)


def recipe_crops(data: dict[str, Any]) -> str:
    """The UTKFace crops a recipe's [data] table (Recipe.data, RunPlan.data) trains on."""
    return data.get("utkface_crops", "original")


def recipe_sources(data: dict[str, Any]) -> list[Path]:
    """The extra datasets a recipe's [data] table trains on, as paths (relative ones from the repository root)."""
    return [(REPO_ROOT / item).resolve() for item in data.get("extra_sources", [])]  # an absolute item stays itself


def recipe_extras(data: dict[str, Any]) -> list[str]:
    """The names of those datasets, as prepare_data records them."""
    return sorted(dataset_name(item) for item in data.get("extra_sources", []))


def recipe_data_text(data: dict[str, Any]) -> str:
    """What a recipe trains on, in words: "UTKFace's detected crops with celeba-10k"."""
    extras = recipe_extras(data)
    return f"UTKFace's {recipe_crops(data)} crops" + (f" with {', '.join(extras)}" if extras else "")


def holds_recipe_data(folder: Path, data: dict[str, Any]) -> bool:
    """Whether a prepared folder holds the UTKFace crops and exactly the extra datasets a recipe trains on."""
    return (folder / "prepare.json").exists() and prepared_crops(folder) == recipe_crops(data) \
        and prepared_extras(folder) == recipe_extras(data)


def recipe_data_dir(data_dir: Path, data: dict[str, Any]) -> Path:
    """Where that data is prepared beside a data folder (agegender.data.manifest.crops_dir)."""
    return crops_dir(data_dir, recipe_crops(data), recipe_extras(data))


def prepare_arguments(data_dir: Path, data: dict[str, Any], limit: int | None) -> list[str]:
    """prepare_data's arguments (all but --image-size) that prepare a recipe's data beside data_dir from its
    source with its split settings, as prepared_sibling then accepts it; `limit`: --limit. Its summary and plots
    go into the sibling's own results/ folder, so the data folder's (results/data by default) stay as they are."""
    state = data_state(data_dir)
    splits = [flag for key in ("test_size", "val_size") if state.get(key) is not None
              for flag in (f"--{key.replace('_', '-')}", str(state[key]))]
    folder = recipe_data_dir(data_dir, data)
    return ["--source", str(state["source"]), "--data-dir", str(folder), "--results-dir", str(folder / "results"),
            *splits, "--utkface-crops", recipe_crops(data),
            *[flag for source in recipe_sources(data) for flag in ("--extra-source", str(source))],
            *(["--limit", str(limit)] if limit else [])]


def prepared_sibling(data_dir: Path, data: dict[str, Any], limit: int | None) -> Path | None:
    """data_dir's sibling folder holding a recipe's data, prepared from data_dir's source with the same split
    settings and --limit `limit` (so its UTKFace split is data_dir's or that subset's); None when there is none."""
    folder = recipe_data_dir(data_dir, data)
    return folder if holds_recipe_data(folder, data) and same_preparation(folder, data_dir, limit) else None


def prepared_data(plan: RunPlan, data_dir: Path) -> Path:
    """The prepared data a run trains on: data_dir when it holds the UTKFace crops and the extra datasets the
    recipe asks for (any, for a run without a recipe), else its sibling <data_dir>-<crops>[+<extra>...] when that
    was prepared with them from the same source and split settings."""
    if plan.recipe is None or holds_recipe_data(data_dir, plan.data):
        return data_dir
    wanted, limit = recipe_data_text(plan.data), data_state(data_dir)["limit"]
    sibling = prepared_sibling(data_dir, plan.data, limit)
    if sibling is not None:
        console.print(f"The recipe trains on {wanted}: reading them from {sibling}.")
        return sibling
    raise UserError(f"Recipe {plan.recipe['file']} trains on {wanted}, but {data_dir} holds other data: "
                    f"prepare it once with `python tasks/prepare_data.py "
                    f"{' '.join(prepare_arguments(data_dir, plan.data, limit))}`.")


# ---------------------------------------------------------------- a run's parameters


def load_params(path: Path | None) -> dict[str, Any]:
    """best_params from a tune result file (or a plain JSON object of parameters)."""
    if path is None:
        return {}
    if not Path(path).exists():
        raise UserError(f"Parameter file {path} does not exist.")
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error.msg}).") from error
    params = data.get("best_params", data)
    if not isinstance(params, dict):
        raise UserError(f"{path} holds no parameters.")
    return params


def merge_params(defaults: dict[str, Any], from_file: dict[str, Any], overrides: dict[str, Any]) -> dict:
    """Defaults, then the --params file, then flags given on the command line (not None)."""
    unknown = set(from_file) - set(defaults)
    if unknown:
        raise UserError(f"Unknown parameter(s) in the --params file: {', '.join(sorted(unknown))}.")
    params = {**defaults, **from_file}
    params.update({k: v for k, v in overrides.items() if v is not None})
    return params


@dataclass
class RunPlan:
    """What one training run uses: parameters, settings and the recipe record metadata.json keeps."""

    family: Family
    params: dict[str, Any]
    settings: dict[str, Any]
    recipe: dict[str, Any] | None
    data: dict[str, Any] = field(default_factory=dict)  # the recipe's [data] table

    def metadata(self) -> dict[str, Any]:
        return {"family": self.family.name, "recipe": self.recipe}


def plan_run(family: str, recipe: Path | None = None, params_file: Path | None = None,
             param_flags: dict[str, Any] | None = None, setting_flags: dict[str, Any] | None = None) -> RunPlan:
    """Defaults < recipe < --params file < flags (None: not given), for parameters and settings alike."""
    spec = FAMILIES[family]
    found = read_recipe(recipe, family) if recipe is not None else None
    param_flags = {k: v for k, v in (param_flags or {}).items() if v is not None}
    setting_flags = {k: v for k, v in (setting_flags or {}).items() if v is not None}
    from_file = load_params(params_file)
    params = merge_params({**spec.defaults, **(found.params if found else {})}, from_file, param_flags)
    settings = {**spec.settings, **(found.settings if found else {}), **setting_flags}
    record = None
    if found is not None:
        overrides = {**setting_flags, **param_flags, **({"params_file": shown(params_file)} if params_file else {})}
        record = {"file": shown(found.path), "sha256": found.sha256, "text": found.text, "overrides": overrides}
    return RunPlan(spec, params, settings, record, found.data if found else {})
