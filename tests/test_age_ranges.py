"""Ages known only as ranges (FairFace's age groups): labels.csv's age_min/age_max and named group columns, the
range loss and metrics, and a range-labelled dataset through prepare_data -> train_multitask -> evaluate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agegender.data.datasets import open_dataset, read_labels
from agegender.models.cnn import MASKED_METRICS, MaskedLoss
from agegender.reporting.metrics import range_metrics
from agegender.training.loop import age_range_targets
from tasks import evaluate, prepare_data, train_multitask

runner = CliRunner()
DECADES = [(0, 2), (3, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69)]


def write_labels(folder, lines: list[str]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder / "labels.csv"


def test_range_labels_are_read_and_bad_ranges_listed_in_one_sentence(tmp_path):
    path = write_labels(tmp_path, [
        "file,age_min,age_max,age,gender,race_fairface,note",
        "a.jpg,20,29,,1,White,x",
        "b.jpg,70,,,0,Black,y",  # open-ended
        "c.jpg,30,20,,0,Black,z",
        "d.jpg,30,39,33,0,Indian,z",
        "e.jpg,,39,,1,Indian,z",
        "f.jpg,x,39,,1,Indian,z",
        "g.jpg,20,130,,1,Indian,z",
        "h.jpg,,,25,1,Indian,z",  # an exact age, no range
    ])
    rows, problems, listed = read_labels(path)
    assert listed == 8 and rows["file"].tolist() == ["a.jpg", "b.jpg", "h.jpg"]
    assert rows["age_min"].tolist()[:2] == [20, 70] and pd.isna(rows["age_max"][1]) and rows["age"][2] == 25
    assert rows["race_fairface"].tolist() == ["White", "Black", "Indian"] and "note" not in rows
    found = {item["file"]: item["reason"] for item in problems}
    assert found == {
        "c.jpg": "malformed row: age range 30-20 ends before it starts",
        "d.jpg": "malformed row: both an age and an age range (give one)",
        "e.jpg": "malformed row: age_max '39' without an age_min",
        "f.jpg": "malformed row: age_min 'x' is not a whole number from 0 to 120",
        "g.jpg": "malformed row: age_max '130' is not a whole number from 0 to 120",
    }


def test_range_targets_hold_the_ages_that_round_into_the_range():
    rows = pd.DataFrame({"age": [30.0, np.nan, np.nan, np.nan], "age_min": [np.nan, 20, 70, np.nan],
                         "age_max": [np.nan, 29, np.nan, np.nan]})
    targets = age_range_targets(rows) * 120
    np.testing.assert_allclose(targets[:3], [[30, 30], [19.5, 29.5], [69.5, 120]], atol=1e-4)
    assert np.isnan(targets[3]).all()  # no age: masked


def test_the_range_loss_is_zero_inside_the_range_and_grows_outside():
    loss = MaskedLoss("mae")
    target = np.array([[20.0, 30.0]], np.float32) / 120
    losses = [float(loss(target, np.array([[age / 120]], np.float32))) * 120 for age in (10, 19, 20, 25, 30, 31, 40)]
    np.testing.assert_allclose(losses, [10, 1, 0, 0, 0, 1, 10], atol=1e-4)
    # an exact age (low == high, or one value) is the plain absolute error; a row without an age adds nothing
    exact = np.array([[0.25, 0.25], [0.5, 0.5], [np.nan, np.nan]], np.float32)
    predicted = np.array([[0.3], [0.4], [0.9]], np.float32)
    assert float(loss(exact, predicted)) == pytest.approx(0.075, abs=1e-6)
    assert float(loss(exact[:, 0], predicted)) == pytest.approx(0.075, abs=1e-6)
    metric = MASKED_METRICS["mae"](name="mae")
    metric.update_state(np.array([[0.2, 0.3], [0.5, 0.5]], np.float32), np.array([[0.25], [0.6]], np.float32))
    assert float(metric.result()) == pytest.approx(0.05, abs=1e-6)


def test_range_metrics_count_the_rounded_age_inside_and_the_years_outside():
    found = range_metrics([20, 20, 20, 70], [29, 29, 29, np.nan], [29.4, 29.6, 15.0, 95.0])
    assert found["age_group_accuracy"] == pytest.approx(0.5)  # 29.4 rounds into 20-29, 29.6 does not; 70+ is open
    assert found["years_outside"] == pytest.approx((0 + 0.1 + 4.5 + 0) / 4)


@pytest.fixture(scope="module")
def range_dataset(utkface_subset, tmp_path_factory):
    """60 UTKFace faces labelled as FairFace labels them: each age replaced by its age group (70+ open-ended),
    gender, and a named group column (race_name)."""
    from agegender.data.labels import RACE_LABELS, parse_utkface_name

    folder = tmp_path_factory.mktemp("ranges") / "groups-ds"
    (folder / "images").mkdir(parents=True)
    lines = ["file,age_min,age_max,gender,race_name"]
    for index, path in enumerate(sorted(utkface_subset.iterdir())[:60]):
        label = parse_utkface_name(path.name)
        low, high = next(((lo, hi) for lo, hi in DECADES if lo <= label.age <= hi), (70, ""))
        (folder / "images" / f"{index:02d}.jpg").write_bytes(path.read_bytes())
        lines.append(f"images/{index:02d}.jpg,{low},{high},{label.gender},{RACE_LABELS[label.race]}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.slow  # a real prepare, one epoch and an evaluation: the full tier
def test_a_range_labelled_dataset_is_prepared_trained_on_and_evaluated(utkface_subset, range_dataset, tmp_path):
    opened = open_dataset(range_dataset, tmp_path / "staging")
    assert opened.labels == ["age", "gender"] and opened.has_age_ranges and opened.groups == ["race_name"]

    data_dir = tmp_path / "data"
    result = runner.invoke(prepare_data.app, ["--source", str(utkface_subset), "--data-dir", str(data_dir),
                                              "--results-dir", str(tmp_path / "results"), "--limit", "40",
                                              "--image-size", "32", "--extra-source", str(range_dataset)])
    assert result.exit_code == 0, result.output
    manifest = pd.read_csv(data_dir / "manifest.csv")
    ranged = manifest[manifest["dataset"] == "groups-ds"]
    assert ranged["age"].isna().all() and ranged["age_min"].notna().all() and set(ranged["split"]) == {
        "train", "val", "test"}
    assert manifest.loc[manifest["dataset"] == "utkface", "age_min"].isna().all()
    assert "race_name" not in manifest  # named groups stay in labels.csv

    model = tmp_path / "model"
    result = runner.invoke(train_multitask.app, ["--data-dir", str(data_dir), "--image-size", "32", "--epochs", "1",
                                                 "--batch-size", "16", "--out", str(model), "--no-tensorboard",
                                                 "--no-backup", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    metadata = json.loads((model / "metadata.json").read_text())
    assert metadata["train_images"] == int((manifest["split"] == "train").sum())  # the ranged faces train too
    validation = json.loads((model / "metrics.json").read_text())["validation"]["datasets"]["groups-ds"]
    assert 0 <= validation["age_range"]["age_group_accuracy"] <= 1 and validation["age_range"]["years_outside"] >= 0

    result = runner.invoke(evaluate.app, [str(model), "--dataset", str(range_dataset), "--split", "test",
                                          "--no-detect", "--data-dir", str(data_dir), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "groups-ds-test" / "evaluation.json").read_text())
    found = summary["models"]["model"]["metrics"]
    assert found["n_age_range"] == summary["faces_found"] == int((ranged["split"] == "test").sum())
    assert "mae" not in found and 0 <= found["age_group_accuracy"] <= 1
    predictions = pd.read_csv(tmp_path / "eval" / "groups-ds-test" / "predictions.csv")
    truth = ranged.set_index("file").loc[predictions["file"]]
    expected = range_metrics(truth["age_min"], truth["age_max"], predictions["age"])
    assert found["age_group_accuracy"] == pytest.approx(expected["age_group_accuracy"])
    assert found["years_outside"] == pytest.approx(expected["years_outside"], abs=1e-3)
    groupings = {record["grouping"] for record in summary["groups"]}
    assert {"race_name", "race_name, age 13+", "age band", "gender"} <= groupings
    certainty = summary["gender_certainty"]["model"]  # certain answers by named group too
    assert "race_name" in {record["grouping"] for record in certainty["groups"]}
