"""The shipped models (results/models) agree with what describes them: each committed recipe holds the shipped
model's parameters, data and settings, and each Space's README names every dataset its model learned from.
Retraining a model without committing it (or its recipe) turns these red; `nox -s shipped` runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agegender.models.registry import FAMILIES, RECIPES_DIR, family_of
from agegender.training.recipes import read_recipe, recipe_extras
from tasks import publish

pytestmark = pytest.mark.shipped

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.toml")), ids=lambda path: path.stem)
def test_committed_recipes_match_the_shipped_model(path):
    recipe = read_recipe(path)
    metadata_path = REPO / "results" / "models" / recipe.name / "metadata.json"
    if not metadata_path.exists():
        pytest.skip(f"no shipped model {recipe.name} yet")
    metadata = json.loads(metadata_path.read_text())
    assert family_of(metadata) is FAMILIES[recipe.family]
    # a warm restart's own flags (a fine-tune's learning rate, say) belong to that stage, not to the recipe
    staged = set(metadata["recipe"]["overrides"]) if metadata.get("init_from") and metadata.get("recipe") else set()
    assert {key: recipe.params[key] for key in metadata["params"] if key in recipe.params and key not in staged} == \
        {key: value for key, value in metadata["params"].items() if key in recipe.params and key not in staged}
    assert recipe.settings.get("image_size", metadata["image_size"]) == metadata["image_size"]
    assert recipe.data.get("utkface_crops", "original") == metadata.get("utkface_crops", "original")
    assert recipe_extras(recipe.data) == metadata.get("extra_datasets", [])
    if "plain_members" in recipe.settings:  # the ensemble's members without mirror-image averaging
        assert metadata["params"].get("plain_members", []) == recipe.settings["plain_members"]


def test_each_space_names_every_dataset_its_shipped_model_learned_from():
    """A Space's README says what its model was trained on and under which licences: every extra dataset of the
    shipped model (an ensemble's members' too) is named, as the model card names it."""
    from agegender.models.folders import find_model, read_metadata, training_datasets

    learned = {}
    for name in FAMILIES:
        entry = find_model(name, REPO / "results" / "models")
        learned[name] = training_datasets(read_metadata(entry.folder)) if entry else []
    learned[publish.COMBINED] = [dataset for datasets in learned.values() for dataset in datasets]
    for space, datasets in learned.items():
        readme = (REPO / "spaces" / space / "README.md").read_text().lower()
        for dataset in datasets:  # celeba-10k is named as CelebA
            assert dataset.split("-")[0] in readme, (space, dataset)
