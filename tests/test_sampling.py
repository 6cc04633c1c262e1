"""How often each training image is drawn (agegender.training.sampling) and the draws themselves
(agegender.data.pipeline)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from agegender.cli import UserError
from agegender.training.sampling import (
    check_dataset_weights,
    group_keys,
    parse_balance,
    parse_dataset_weights,
    sampling_probabilities,
)


def rows() -> pd.DataFrame:
    """90 White and 10 Asian UTKFace faces (half of each female), and 50 gender-only faces of another dataset."""
    utkface = pd.DataFrame({"race": [0] * 90 + [2] * 10, "gender": [0, 1] * 50, "age": [30.0] * 100,
                            "dataset": "utkface"})
    extra = pd.DataFrame({"race": [np.nan] * 50, "gender": [1] * 30 + [0] * 20, "age": [np.nan] * 50,
                          "dataset": "celeba"})
    return pd.concat([utkface, extra], ignore_index=True)


def shares(frame: pd.DataFrame, probabilities: np.ndarray, keys: pd.Series) -> dict[str, float]:
    return pd.Series(probabilities, index=frame.index).groupby(keys).sum().to_dict()


def test_without_balance_or_weights_training_shuffles_as_before():
    assert sampling_probabilities(rows()) is None
    assert sampling_probabilities(rows(), (), {"utkface": 1.0, "celeba": 1.0}) is None


def test_balance_gives_each_group_an_equal_share_within_its_dataset():
    frame = rows()
    probabilities = sampling_probabilities(frame, ("race", "gender"))
    assert probabilities.sum() == pytest.approx(1.0)
    keys = frame["dataset"] + ":" + group_keys(frame, ("race", "gender"))
    found = shares(frame, probabilities, keys)
    # each dataset keeps its share of the rows (100 and 50 of 150), split evenly over the groups it has
    for group in ("White|male", "White|female", "Asian|male", "Asian|female"):
        assert found[f"utkface:{group}"] == pytest.approx(100 / 150 / 4)
    assert found["celeba:unknown|female"] == pytest.approx(50 / 150 / 2)
    assert found["celeba:unknown|male"] == pytest.approx(50 / 150 / 2)
    asian = frame.index[(frame["race"] == 2) & (frame["gender"] == 1)]
    white = frame.index[(frame["race"] == 0) & (frame["gender"] == 1)]
    assert probabilities[asian[0]] == pytest.approx(9 * probabilities[white[0]])  # 5 faces against 45


def test_age_band_groups_and_dataset_weights():
    frame = rows()
    frame.loc[:9, "age"] = 5.0
    keys = group_keys(frame, ("age_band",))
    assert keys.iloc[0] == "3-9" and keys.iloc[50] == "30-39" and keys.iloc[120] == "unknown"
    probabilities = sampling_probabilities(frame, (), {"celeba": 0.5})
    assert probabilities[frame["dataset"] == "celeba"].sum() == pytest.approx(25 / 125)
    assert probabilities[0] == pytest.approx(2 * probabilities[120])
    left_out = sampling_probabilities(frame, (), {"celeba": 0.0})
    assert left_out[frame["dataset"] == "celeba"].sum() == 0


def test_flags_are_checked():
    assert parse_balance("race, gender,age-band") == ("race", "gender", "age_band")
    assert parse_balance(None) == ()
    with pytest.raises(UserError, match="Cannot balance over 'colour'"):
        parse_balance("race,colour")
    assert parse_dataset_weights(["celeba=0.5", "utkface=2"]) == {"celeba": 0.5, "utkface": 2.0}
    assert parse_dataset_weights(None) is None
    for bad in ("celeba", "celeba=x", "celeba=-1", "=1"):
        with pytest.raises(UserError, match="NAME=WEIGHT"):
            parse_dataset_weights([bad])
    assert check_dataset_weights({"celeba": 0.5}, ["utkface", "celeba"]) == {"utkface": 1.0, "celeba": 0.5}
    with pytest.raises(UserError, match="'imdb', which the manifest lacks"):
        check_dataset_weights({"imdb": 1.0}, ["utkface"])
    with pytest.raises(UserError, match="nothing is left to train on"):
        check_dataset_weights({"utkface": 0}, ["utkface"])


@pytest.mark.slow
def test_a_sampled_epoch_draws_by_the_probabilities_and_changes_each_epoch():
    from agegender.data.pipeline import make_dataset

    probabilities = np.array([0.5] + [0.5 / 38] * 38 + [0.0])  # image 0 half the draws, image 39 none
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1).repeat(3, axis=-1)

    def epoch(dataset) -> np.ndarray:
        return np.concatenate([np.round(batch[:, 0, 0, 0].numpy() * 255).astype(int) for batch, _ in dataset])

    dataset = make_dataset(images, {"gender": np.zeros(40)}, 16, training=True, sampling=probabilities)
    epochs = [epoch(dataset) for _ in range(20)]
    assert all(len(drawn) == 39 for drawn in epochs)  # as many draws as images that can be drawn
    counts = np.bincount(np.concatenate(epochs), minlength=40) / (20 * 39)
    assert counts[39] == 0 and counts[0] == pytest.approx(0.5, abs=0.08)
    assert len({tuple(drawn) for drawn in epochs}) == 20
    again = make_dataset(images, {"gender": np.zeros(40)}, 16, training=True, sampling=probabilities)
    assert epoch(again).tolist() == epochs[0].tolist()  # reproducible from the seed


@pytest.mark.slow
def test_the_trainer_trains_on_every_dataset_with_balance_and_weights(prepared_extra, tmp_path):
    import json

    from typer.testing import CliRunner

    from tasks import train_multitask

    out = tmp_path / "multitask"
    result = CliRunner().invoke(train_multitask.app, [
        "--data-dir", str(prepared_extra["data_dir"]), "--out", str(out), "--epochs", "1", "--image-size", "32",
        "--batch-size", "16", "--balance", "race,gender", "--dataset-weight", "faces-ds=2", "--no-tensorboard"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # rich wraps titles at 80 columns
    assert "Training draws (race, gender)" in output and "test split, faces-ds" in output
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["sampling"] == {"balance": ["race", "gender"], "dataset_weights": {"utkface": 1.0,
                                                                                       "faces-ds": 2.0}}
    manifest = pd.read_csv(prepared_extra["data_dir"] / "manifest.csv")
    assert metadata["train_images"] == (manifest["split"] == "train").sum()
    metrics = json.loads((out / "metrics.json").read_text())
    extra_test = manifest[(manifest["dataset"] == "faces-ds") & (manifest["split"] == "test")]
    assert metrics["datasets"]["faces-ds"]["gender"]["n"] == len(extra_test)
    assert metrics["datasets"]["faces-ds"]["age"]["n"] == extra_test["age"].notna().sum()
    assert metrics["gender"] == metrics["datasets"]["utkface"]["gender"]  # the top level stays UTKFace's
    assert np.isfinite(metrics["age"]["mae"])

    bad = CliRunner().invoke(train_multitask.app, ["--data-dir", str(prepared_extra["data_dir"]), "--out",
                                                   str(tmp_path / "x"), "--balance", "colour"])
    assert bad.exit_code != 0 and "Cannot balance over 'colour'" in " ".join(bad.output.split())
    from tasks import train_age

    for flags, message in ((["utkface=0", "faces-ds=0"], "nothing is left to train on"),
                           (["imdb=1"], "'imdb', which the manifest lacks")):
        bad = CliRunner().invoke(train_age.app, ["--data-dir", str(prepared_extra["data_dir"]), "--out",
                                                 str(tmp_path / "x"), "--image-size", "32", "--epochs", "1",
                                                 *(part for flag in flags for part in ("--dataset-weight", flag))])
        assert bad.exit_code != 0 and message in " ".join(bad.output.split()), bad.output
