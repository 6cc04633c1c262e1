"""Labelled datasets (agegender.data.datasets): reading labels.csv from a folder or an archive, listing unusable rows;
and the masked losses that let a dataset without some labels train the other heads (agegender.models.cnn)."""

from __future__ import annotations

import shutil
import tarfile
import zipfile

import numpy as np
import pytest

from agegender.cli import UserError
from agegender.data.datasets import dataset_name, open_dataset, read_labels


def reasons(dataset) -> dict[str, str]:
    return {item["file"]: item["reason"] for item in dataset.problems}


def test_a_folder_gives_its_usable_rows_and_lists_the_others(labelled_dataset, tmp_path):
    dataset = open_dataset(labelled_dataset, tmp_path / "staging")
    assert dataset.name == "faces-ds" and dataset.root == labelled_dataset.resolve()
    assert dataset.listed == 34 and len(dataset.rows) == 30
    assert dataset.labels == ["age", "gender", "race"]
    assert dataset.rows["gender"].notna().all()
    assert dataset.rows["age"].notna().sum() == 15 and dataset.rows["race"].notna().sum() == 15
    found = reasons(dataset)
    assert found["images/missing.jpg"] == "missing file"
    assert found["images/broken.jpg"].startswith("unreadable image")
    assert found["images/99.jpg"].startswith("malformed row: age 'abc'")
    assert found["images/00.jpg"].startswith("listed twice")
    assert not (tmp_path / "staging").exists()  # a folder is read where it is


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_an_archive_with_a_top_folder_is_unpacked_once(labelled_dataset, tmp_path, kind):
    archive = tmp_path / f"My Faces.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zipped:
            for path in labelled_dataset.rglob("*"):
                zipped.write(path, "top/" + path.relative_to(labelled_dataset).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(labelled_dataset, arcname="top")
    dataset = open_dataset(archive, tmp_path / "staging")
    assert dataset.name == "my-faces" and dataset.root == (tmp_path / "staging" / "top").resolve()
    assert len(dataset.rows) == 30 and "images/missing.jpg" in reasons(dataset)
    stamp = (tmp_path / "staging" / ".source").stat().st_mtime_ns
    open_dataset(archive, tmp_path / "staging")  # unchanged archive: not unpacked again
    assert (tmp_path / "staging" / ".source").stat().st_mtime_ns == stamp


def test_limit_keeps_a_seeded_subset_before_checking_files(labelled_dataset, tmp_path):
    first = open_dataset(labelled_dataset, tmp_path / "a", limit=10)
    again = open_dataset(labelled_dataset, tmp_path / "b", limit=10)
    assert len(first.rows) <= 10 and first.rows["file"].tolist() == again.rows["file"].tolist()


def test_labels_csv_edge_cases(tmp_path):
    (tmp_path / "labels.csv").write_text("File, Gender ,age\n"
                                         "a.jpg,1,\n"
                                         ",0,20\n"
                                         "../outside.jpg,0,20\n"
                                         "b.jpg,,\n"
                                         "c.jpg,2,20\n"
                                         "d.jpg,0,20.5\n"
                                         "e.jpg,0,121\n")
    rows, problems, listed = read_labels(tmp_path / "labels.csv")
    assert listed == 7 and rows["file"].tolist() == ["a.jpg"]
    assert rows["gender"].tolist() == [1] and rows["age"].isna().all() and rows["race"].isna().all()
    found = {item["file"]: item["reason"] for item in problems}
    assert found["line 3"] == "no file name"
    assert found["../outside.jpg"] == "path outside the dataset folder"
    assert found["b.jpg"] == "no label"
    assert "gender '2'" in found["c.jpg"] and "age '20.5'" in found["d.jpg"] and "age '121'" in found["e.jpg"]


def test_a_dataset_without_labels_csv_or_label_columns_is_one_clear_error(labelled_dataset, tmp_path):
    folder = tmp_path / "nolabels"
    shutil.copytree(labelled_dataset / "images", folder / "images")
    with pytest.raises(UserError, match="has no labels.csv"):
        open_dataset(folder, tmp_path / "staging")
    (folder / "labels.csv").write_text("file,young\nimages/00.jpg,1\n")
    with pytest.raises(UserError, match="none of the label columns"):
        open_dataset(folder, tmp_path / "staging")
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(tmp_path / "nowhere", tmp_path / "staging")


def test_dataset_names():
    assert dataset_name("/x/celeba-10k.tar.gz") == "celeba-10k"
    assert dataset_name("My Faces.zip") == "my-faces"
    assert dataset_name("folder/") == "folder"


@pytest.mark.slow
def test_a_missing_label_adds_nothing_to_the_loss_metrics_or_gradients():
    import keras
    import tensorflow as tf

    from agegender.models.cnn import build_cnn
    from agegender.models.registry import FAMILIES

    model = build_cnn("multitask", 32, {**FAMILIES["multitask"].defaults, "gender_label_smoothing": 0.1})
    images = np.random.default_rng(0).random((8, 32, 32, 3), dtype=np.float32)
    ages = np.full((8, 1), 0.3, np.float32)
    genders = np.array([1, 0, 1, 0, 1, 0, 1, 0], np.float32).reshape(-1, 1)
    gaps = ages.copy()
    gaps[4:] = np.nan  # the last four have no age
    with_gaps = model.evaluate(images, {"age": gaps, "gender": genders}, batch_size=8, return_dict=True, verbose=0)
    labelled = model.evaluate(images[:4], {"age": ages[:4], "gender": genders[:4]}, batch_size=8,
                              return_dict=True, verbose=0)
    everything = model.evaluate(images, {"age": ages, "gender": genders}, batch_size=8, return_dict=True, verbose=0)
    assert with_gaps["age_loss"] == pytest.approx(labelled["age_loss"], rel=1e-5)
    assert with_gaps["age_mae"] == pytest.approx(labelled["age_mae"], rel=1e-5)
    assert with_gaps["gender_loss"] == pytest.approx(everything["gender_loss"], rel=1e-5)
    assert np.isfinite(with_gaps["loss"])

    # gender-only images: the age head gets no gradient, the gender head does
    nothing = np.full((8, 1), np.nan, np.float32)
    with tf.GradientTape() as tape:
        predicted = model(images, training=True)
        loss = sum(model.loss[name](target, predicted[name])
                   for name, target in (("age", nothing), ("gender", genders)))
    weights = {layer: model.get_layer(layer).kernel for layer in ("age", "age_dense", "gender", "gender_dense")}
    gradients = dict(zip(weights, tape.gradient(loss, list(weights.values())), strict=True))
    assert not np.any(keras.ops.convert_to_numpy(gradients["age"]))
    assert not np.any(keras.ops.convert_to_numpy(gradients["age_dense"]))
    assert np.any(keras.ops.convert_to_numpy(gradients["gender"]))
