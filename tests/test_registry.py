"""The family registry drives every trainer, and recipes: each family's script answers --help and trains from a
recipe that metadata.json then records with its hash; bad recipes are one sentence and a non-zero exit."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agegender.cli import UserError
from agegender.models.registry import FAMILIES, RECIPES_DIR, TRAINABLE, Choice
from agegender.training.recipes import read_recipe
from tests.conftest import SMALL_LIMIT, TEST_IMAGE_SIZE, said

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def trainer(family: str):
    return importlib.import_module(FAMILIES[family].script.removesuffix(".py").replace("/", "."))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_has_a_trainer_a_recipe_and_a_space(name):
    family = FAMILIES[name]
    result = runner.invoke(trainer(name).app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "--recipe" in result.output and "--data-dir" in result.output and "--seed" in result.output
    assert family.out_flag in result.output
    assert read_recipe(family.recipe).family == name  # recipes/<its model folder>.toml
    assert (REPO / "spaces" / name / "app.py").exists() and family.title
    assert family.goal.direction in ("minimize", "maximize") and set(family.outputs) <= {"age", "gender"}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_has_a_builder_and_a_trainer(name):
    """Every family's registry entry builds its model and TRAINERS trains (or, for the ensemble, assembles) it;
    the assembled family alone is neither tuned nor benched."""
    from agegender.training.trainers import TRAINERS

    family = FAMILIES[name]
    assert callable(family.build) and callable(TRAINERS[name])
    assert (name in TRAINABLE) != family.assembled


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.toml")), ids=lambda path: path.stem)
def test_committed_recipes_name_every_parameter_of_their_family(path):
    recipe = read_recipe(path)
    family = FAMILIES[recipe.family]
    assert set(recipe.params) == {key for key, value in family.defaults.items() if value is not None}


@pytest.mark.parametrize("name", TRAINABLE)
def test_every_trained_family_has_a_search_space_over_its_own_parameters(name):
    """tune searches what the registry says; a trial's parameters must be ones the family's trainer takes, and
    its defaults (the first trial of a study) must lie inside the space."""
    family = FAMILIES[name]
    assert family.search_space and set(family.search_space) <= set(family.defaults)
    for key, dimension in family.search_space.items():
        default = family.defaults[key]
        assert default in dimension.values if isinstance(dimension, Choice) else \
            dimension.low <= default <= dimension.high, (key, default)


def test_a_cnn_trainer_hides_and_refuses_the_parameters_of_other_families(prepared, tmp_path):
    from tasks import train_gender

    assert "--age-head" not in runner.invoke(train_gender.app, ["--help"], terminal_width=200).output
    result = runner.invoke(train_gender.app, ["--age-head", "dex", "--data-dir", str(prepared["data_dir"]),
                                              "--out", str(tmp_path / "gender")])
    assert result.exit_code == 2 and "no age_head parameter" in said(result)
    assert not (tmp_path / "gender").exists()


BAD_RECIPES = {
    "missing": (None, "does not exist"),
    "unknown key": ('family = "gender"\nepochs = 1\nlearning_rate = 0.1\n', "unknown key(s) learning_rate"),
    "unknown parameter": ('family = "gender"\n[params]\nage_head = "dex"\n', "unknown parameter(s) age_head"),
    "other family": ('family = "age"\n', "is for the age family, not gender"),
    "wrong type": ('family = "gender"\n[params]\nlearning_rate = "fast"\n', "should be a number"),
    "not toml": ('family = gender\n', "is not valid TOML"),
    "no family": ('epochs = 3\n', "names no family"),
    "unknown data key": ('family = "gender"\n[data]\ncrops = "detected"\n', "unknown data key 'crops'"),
    "unknown crops": ('family = "gender"\n[data]\nutkface_crops = "tight"\n', "should be one of original"),
    "crops not prepared": ('family = "gender"\n[data]\nutkface_crops = "detected"\n',
                           "prepare it once with `python tasks/prepare_data.py"),
    "extra sources not a list": ('family = "gender"\n[data]\nextra_sources = "celeba.tar.gz"\n',
                                 "should be a list of dataset paths"),
    "one name twice": ('family = "gender"\n[data]\nextra_sources = ["a/faces.zip", "b/faces"]\n',
                       "the same name"),
    "extra dataset not prepared": ('family = "gender"\n[data]\nextra_sources = ["x/celeba-10k.tar.gz"]\n',
                                   "--extra-source"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_a_bad_recipe_is_one_sentence_and_nothing_is_written(case, prepared, tmp_path):
    from tasks import train_gender

    text, words = BAD_RECIPES[case]
    recipe = tmp_path / "recipe.toml"
    if text is not None:
        recipe.write_text(text)
    result = runner.invoke(train_gender.app, ["--recipe", str(recipe), "--data-dir", str(prepared["data_dir"]),
                                              "--out", str(tmp_path / "gender"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output
    assert said(result).startswith("Error: Recipe") and words in said(result) and "Traceback" not in said(result)
    assert not (tmp_path / "gender").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow  # keeps the fast tier under 3 minutes
def test_a_recipe_run_is_recorded_with_its_hash_and_logs_tensorboard_events(prepared, tmp_path):
    """A real (one-epoch, 64-image) run from a recipe, one flag on top: metadata.json keeps the recipe's text,
    its sha256 and the override; the run folder gets TensorBoard's losses, metrics and learning rate."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tasks import train_multitask

    recipe = tmp_path / "multitask.toml"
    recipe.write_text(f'family = "multitask"\nimage_size = {TEST_IMAGE_SIZE}\nepochs = 1\nseed = 7\n\n'
                      '[params]\nbatch_size = 16\nage_head = "dex"\ngender_label_smoothing = 0.1\n')
    out, run = tmp_path / "multitask", tmp_path / "run"
    result = runner.invoke(train_multitask.app, ["--recipe", str(recipe), "--learning-rate", "0.002", "--limit", "64",
                                                 "--data-dir", str(prepared["data_dir"]), "--out", str(out),
                                                 "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["family"] == "multitask" and metadata["seed"] == 7 and metadata["image_size"] == TEST_IMAGE_SIZE
    assert metadata["recipe"]["sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()
    assert metadata["recipe"]["text"] == recipe.read_text()
    assert metadata["recipe"]["overrides"] == {"learning_rate": 0.002}
    assert metadata["params"]["age_head"] == "dex" and metadata["params"]["learning_rate"] == 0.002
    assert metadata["params"]["gender_label_smoothing"] == 0.1 and metadata["epochs_run"] == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["validation"]["limit"] == 64
    assert 0 <= metrics["validation"]["gender"]["accuracy"] <= 1 and metrics["validation"]["age"]["n"] == 16

    tags = {}
    for split in ("train", "validation"):
        events = EventAccumulator(str(run / "tensorboard" / split))
        events.Reload()
        tags[split] = set(events.Tags()["tensors"])
    assert {"epoch_loss", "epoch_learning_rate", "epoch_age_mae", "epoch_gender_binary_accuracy"} <= tags["train"]
    assert {"epoch_loss", "epoch_age_mae"} <= tags["validation"]


def test_the_fixture_models_logged_tensorboard_events_through_the_registry(trained_runs):
    runs = next(iter(trained_runs.values())).out_dir.parent.parent / "runs"
    for name in trained_runs:
        assert list((runs / name / "train").glob("events.out.tfevents.*")), name


def test_a_recipe_on_detected_crops_reads_them_from_the_prepared_sibling_folder(prepared_small, tmp_path):
    """The recipe's [data] names the crops; with the default data folder holding UTKFace's own crops, the trainer
    reads <data>-detected when it was prepared, and says so."""
    from agegender.training.recipes import plan_run, prepared_data
    from tasks import prepare_data

    data = tmp_path / "data"
    shutil.copytree(prepared_small["data_dir"], data)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('family = "gender"\n[data]\nutkface_crops = "detected"\n')
    plan = plan_run("gender", recipe)
    with pytest.raises(UserError, match="--utkface-crops detected"):
        prepared_data(plan, data)
    result = runner.invoke(prepare_data.app, ["--source", str(prepared_small["images"]), "--data-dir",
                                              str(tmp_path / "data-detected"), "--results-dir", str(tmp_path / "r"),
                                              "--image-size", "32", "--utkface-crops", "detected", "--limit",
                                              str(SMALL_LIMIT)])
    assert result.exit_code == 0, result.output
    assert prepared_data(plan, data) == tmp_path / "data-detected"
    assert prepared_data(plan_run("gender"), data) == data  # without a recipe, any prepared data
    # a sibling prepared for another split (train_all --quick's subset, say) is not trained on in its place
    result = runner.invoke(prepare_data.app, ["--source", str(prepared_small["images"]), "--data-dir",
                                              str(tmp_path / "data-detected"), "--results-dir", str(tmp_path / "r"),
                                              "--image-size", "32", "--utkface-crops", "detected", "--limit", "30"])
    assert result.exit_code == 0, result.output
    with pytest.raises(UserError, match="--utkface-crops detected"):
        prepared_data(plan, data)


def test_the_prepare_command_a_recipe_asks_for_makes_the_folder_it_then_reads(prepared, tmp_path):
    """A data folder split with other settings than the defaults: the prepare_data command in the error (the one
    train_all runs too) carries them, and the folder it makes is then read."""
    from agegender.training.recipes import plan_run, prepare_arguments, prepared_data
    from tasks import prepare_data

    data = tmp_path / "data"
    result = runner.invoke(prepare_data.app, ["--source", str(prepared["images"]), "--data-dir", str(data),
                                              "--results-dir", str(tmp_path / "r"), "--image-size", "32",
                                              "--test-size", "0.25", "--limit", str(SMALL_LIMIT)])
    assert result.exit_code == 0, result.output
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('family = "gender"\n[data]\nutkface_crops = "detected"\n')
    plan = plan_run("gender", recipe)
    with pytest.raises(UserError, match="--test-size 0.25") as error:
        prepared_data(plan, data)
    arguments = prepare_arguments(data, plan.data, SMALL_LIMIT)
    assert " ".join(arguments) in " ".join(str(error.value).split())
    summary = tmp_path / "r" / "data" / "summary.json"
    before = summary.read_bytes()
    result = runner.invoke(prepare_data.app, [*arguments, "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert prepared_data(plan, data) == tmp_path / "data-detected"
    # the sibling's summary goes into its own folder: the data folder's exploration is not overwritten
    assert summary.read_bytes() == before
    assert json.loads((tmp_path / "data-detected" / "results" / "data" / "summary.json").read_text())["crops"] == \
        "detected"
