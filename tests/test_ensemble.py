"""The ensemble family: built from saved models through its CLI, it saves, reloads and predicts what its
members predict, mixed with the weights it recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from agegender.models.ensemble import build_ensemble
from agegender.models.folders import training_datasets
from agegender.reporting.cards import about_markdown
from agegender.training.ensemble import load_members, log_loss, member_predictions
from tasks import train_ensemble
from tests.conftest import model_trained_on, said


@pytest.fixture(scope="module")
def ensemble(trained_models, prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble") / "ensemble"
    gender = model_trained_on(trained_models["gender"], out.parent / "members" / "gender", ["celeba-mini"])
    result = CliRunner().invoke(train_ensemble.app, [
        "--member", str(trained_models["multitask"]), "--member", str(gender),
        "--member", str(trained_models["age"]), "--tta", "on", "--plain-member", "age",
        "--data-dir", str(prepared["data_dir"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_the_ensemble_records_its_members_and_weights_chosen_on_validation(ensemble, trained_models):
    meta = json.loads((ensemble / "metadata.json").read_text())
    assert meta["backbone"] == "ensemble" and meta["task"] == "multitask" and meta["outputs"] == ["age", "gender"]
    assert meta["train_images"] == 0  # nothing trains: the training split is not even read
    assert [m["name"] for m in meta["members"]] == ["multitask", "gender", "age"]
    # what the members learned from besides UTKFace is the ensemble's too (evaluate and the model card read it);
    # its own extra_datasets stay those of the data its weights were chosen on, as its recipe says
    assert [m["extra_datasets"] for m in meta["members"]] == [[], ["celeba-mini"], []]
    assert meta["extra_datasets"] == [] and training_datasets(meta) == ["celeba-mini"]
    # and on which manifest each trained (evaluate --split reads it to tell held-out faces)
    assert [m["manifest_sha256"] for m in meta["members"]] == [
        json.loads((folder / "metadata.json").read_text())["manifest_sha256"]
        for folder in (trained_models["multitask"], trained_models["gender"], trained_models["age"])]
    assert "Also trained on `celeba-mini`" in about_markdown("ensemble", ensemble)
    weights = meta["params"]["weights"]
    assert set(weights["age"]) == {"multitask", "age"}  # the gender-only model has no say in the age
    assert set(weights["gender"]) == {"multitask", "gender"}
    for output in ("age", "gender"):
        assert sum(weights[output].values()) == pytest.approx(1.0)
    assert meta["params"]["tta"] is True and meta["params"]["plain_members"] == ["age"]
    metrics = json.loads((ensemble / "metrics.json").read_text())
    assert {"age", "gender"} <= set(metrics)


def test_the_saved_test_metrics_are_the_saved_models_own(ensemble, prepared):
    from agegender.data.manifest import load_split
    from agegender.inference.predictor import Predictor
    from agegender.reporting.metrics import age_metrics, gender_metrics

    meta = json.loads((ensemble / "metadata.json").read_text())
    images, rows = load_split("test", meta["image_size"], prepared["data_dir"])
    predicted = Predictor.load(ensemble, "keras").predict_arrays(images)
    metrics = json.loads((ensemble / "metrics.json").read_text())
    assert metrics["age"]["mae"] == pytest.approx(age_metrics(rows["age"].to_numpy(), predicted["age"])["mae"],
                                                  abs=0.01)
    assert metrics["gender"]["accuracy"] == pytest.approx(
        gender_metrics(rows["gender"].to_numpy(), predicted["p_female"])["accuracy"], abs=1 / len(rows))


def test_the_saved_ensemble_predicts_its_members_mixed_with_the_recorded_weights(ensemble, trained_models, prepared):
    from agegender.data.manifest import load_split
    from agegender.inference.predictor import Predictor

    meta = json.loads((ensemble / "metadata.json").read_text())
    images, _ = load_split("val", meta["image_size"], prepared["data_dir"])
    images = images[:24]
    predicted = Predictor.load(ensemble, "keras").predict_arrays(images)

    def with_mirror(name):  # each member averaged with its view of the mirror image, as recorded, but the plain one
        member = Predictor.load(trained_models[name], "keras")
        plain, mirrored = member.predict_arrays(images), member.predict_arrays(images[:, :, ::-1])
        if name in meta["params"]["plain_members"]:
            return plain
        return {key: (plain[key] + mirrored[key]) / 2 for key in plain}

    members = {name: with_mirror(name) for name in ("multitask", "gender", "age")}
    weights = meta["params"]["weights"]
    expected_age = sum(w * members[name]["age"] for name, w in weights["age"].items())
    # the members' own p_female are mixed; each model's calibration applies to its own output only
    expected_p = sum(w * members[name]["p_female_model"] for name, w in weights["gender"].items())
    np.testing.assert_allclose(predicted["age"], expected_age, atol=0.05)
    np.testing.assert_allclose(predicted["p_female_model"], expected_p, atol=2e-3)


def test_predict_runs_the_ensemble_like_any_model(ensemble, prepared, tmp_path):
    image = next(prepared["images"].glob("*.jpg"))
    out = tmp_path / "rows.csv"
    result = CliRunner().invoke(__import__("tasks.predict", fromlist=["app"]).app,
                                [str(ensemble), str(image), "--no-detect", "--out", str(out)])
    assert result.exit_code == 0, result.output
    import pandas as pd

    rows = pd.read_csv(out)
    assert len(rows) == 1 and 0 <= rows["p_female"][0] <= 1 and 0 < rows["age"][0] < 117


@pytest.mark.parametrize("members, extra, words", [
    (["one"], [], "at least two"),
    (["missing-a", "missing-b"], [], "does not exist"),
    (["one", "age"], ["--plain-member", "gender"], "--plain-member gender is not one of the members"),
])
def test_bad_members_are_one_sentence(members, extra, words, trained_models, tmp_path):
    given = {"one": trained_models["multitask"], "age": trained_models["age"]}
    paths = [str(given.get(m, tmp_path / m)) for m in members]
    args = [arg for path in paths for arg in ("--member", path)] + extra + ["--out", str(tmp_path / "out")]
    result = CliRunner().invoke(train_ensemble.app, args)
    assert result.exit_code != 0 and words in said(result)
    assert not (tmp_path / "out").exists()


def test_an_ensemble_is_not_a_member(ensemble, trained_models, tmp_path):
    result = CliRunner().invoke(train_ensemble.app, ["--member", str(ensemble), "--member",
                                                     str(trained_models["age"]), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "is an ensemble itself" in said(result)


@pytest.mark.slow  # keeps the fast tier under 3 minutes
def test_heatmaps_of_the_ensemble_mix_its_nested_members(ensemble, prepared, tmp_path):
    from agegender.inference.gradcam import load_gradcam

    assert [path.split("/")[-1] for path in load_gradcam(ensemble).layer_paths] == ["stage3_conv2"] * 3
    faces = sorted(prepared["images"].glob("*.jpg"))[:2]
    result = CliRunner().invoke(__import__("tasks.predict", fromlist=["app"]).app,
                                [str(ensemble), *map(str, faces), "--no-detect", "--heatmaps", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("*-face1-age.png"))) == 2 and len(list(tmp_path.glob("*-face1-gender.png"))) == 2


@pytest.mark.slow  # keeps the fast tier under 3 minutes
def test_an_ensemble_of_dex_members_mixes_their_age_distributions(trained_models, prepared, tmp_path):
    """With every age member a DEX head, the ensemble has an age distribution of its own (the members'
    distributions mixed with the age weights) and its age is that distribution's expected value."""
    from agegender.data.manifest import load_split
    from agegender.inference.predictor import Predictor

    out = tmp_path / "ensemble"
    result = CliRunner().invoke(train_ensemble.app, [
        "--member", str(trained_models["age"]), "--member", str(trained_models["gender"]), "--tta", "off",
        "--data-dir", str(prepared["data_dir"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    images, _ = load_split("val", 64, prepared["data_dir"])
    mixed = Predictor.load(out, "keras").predict_arrays(images[:16], age_bins=True)
    member = Predictor.load(trained_models["age"], "keras").predict_arrays(images[:16], age_bins=True)
    np.testing.assert_allclose(mixed["age_bins"], member["age_bins"], atol=1e-5)  # the only age member
    np.testing.assert_allclose(mixed["age"], mixed["age_bins"] @ np.arange(117), atol=0.02)


def test_grey_weights_are_chosen_on_the_validation_faces_turned_grey(trained_models, prepared, tmp_path):
    from agegender.data.images import grey_copy
    from agegender.data.manifest import load_split
    from agegender.inference.predictor import Predictor

    out = tmp_path / "ensemble"
    result = CliRunner().invoke(train_ensemble.app, [
        "--member", str(trained_models["multitask"]), "--member", str(trained_models["gender"]), "--tta", "off",
        "--grey-weights", "--data-dir", str(prepared["data_dir"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "grey photos, gender:" in said(result)
    params = json.loads((out / "metadata.json").read_text())["params"]
    assert {o: set(w) for o, w in params["grey_weights"].items()} == {o: set(w) for o, w in params["weights"].items()}
    # on the grey validation faces, the grey weights' gender log loss is the lowest of the grid's, so no worse
    # than the colour weights'
    images, rows = load_split("val", 64, prepared["data_dir"])
    grey = grey_copy(images)
    p_female = {name: Predictor.load(trained_models[name], "keras").predict_arrays(grey)["p_female_model"]
                for name in ("multitask", "gender")}

    def loss(weights):
        return log_loss(rows["gender"].to_numpy(), sum(w * p_female[n] for n, w in weights.items()))

    assert loss(params["grey_weights"]["gender"]) <= loss(params["weights"]["gender"]) + 1e-4
    # the saved model reads grey photos with the grey weights
    predicted = Predictor.load(out, "keras").predict_arrays(grey[:16])
    np.testing.assert_allclose(predicted["p_female_model"], sum(w * p_female[n][:16] for n, w in
                                                          params["grey_weights"]["gender"].items()), atol=2e-3)
    # and its heatmaps of a grey face mix the members' maps with the grey weights, of a colour face with the others
    from agegender.inference.gradcam import load_gradcam, scaled

    cam = load_gradcam(out)
    faces = np.concatenate([images[:2], grey[:2]])
    for output in ("gender", "age"):
        members = {part.layer_path.split("_", 1)[0]: cam.part_maps(part, faces, output) for part in cam.parts
                   if part.weight(output, np.array([False, True])).any()}
        names = [m["name"] for m in json.loads((out / "metadata.json").read_text())["members"]]
        expected = [sum(params[chosen][output].get(names[int(key[6:])], 0.0) * maps[picked]
                        for key, maps in members.items()) for chosen, picked in (("weights", [0, 1]),
                                                                                 ("grey_weights", [2, 3]))]
        np.testing.assert_allclose(cam.maps(faces)[output], scaled(np.concatenate(expected)), atol=1e-4)


def test_the_grey_switch_picks_the_grey_mix_for_grey_images_only(trained_models, prepared):
    """Two weight sets far apart (all on one member, all on the other): colour images get the first, grey ones
    (all three channels equal) the second."""
    from agegender.data.images import grey_copy
    from agegender.data.manifest import load_split

    members = load_members([trained_models["multitask"], trained_models["age"]])
    chosen = {"age": {"members": [0, 1], "weights": [1.0, 0.0]}}
    grey_chosen = {"age": {"members": [0, 1], "weights": [0.0, 1.0]}}
    model = build_ensemble(members, chosen, 64, False, frozenset(), grey_chosen)
    images, _ = load_split("val", 64, prepared["data_dir"])
    batch = np.concatenate([images[:6], grey_copy(images[6:12])])
    ages = np.asarray(model.predict(batch.astype(np.float32) / 255.0, verbose=0)["age"]).reshape(-1)
    alone = [member_predictions([member], batch, 64, flip=False)[0]["age"] for member in members]
    np.testing.assert_allclose(ages[:6], alone[0][:6], atol=1e-4)
    np.testing.assert_allclose(ages[6:], alone[1][6:], atol=1e-4)
    assert not np.allclose(alone[0][6:], alone[1][6:], atol=1e-3)  # the two sets are told apart
