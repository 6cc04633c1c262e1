"""prepare_data on real UTKFace images: labels, skips, split, exploration and cache."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from agegender.data.images import load_face_array
from agegender.data.labels import parse_utkface_name
from agegender.data.manifest import SPLITS, load_split
from tasks import prepare_data

runner = CliRunner()


def test_prepare_writes_manifest_summary_plots_and_cache(prepared):
    data_dir, results_dir = prepared["data_dir"], prepared["results_dir"]
    manifest = pd.read_csv(data_dir / "manifest.csv")
    assert list(manifest.columns) == ["file", "age", "gender", "race", "split"]
    assert set(manifest["split"]) == set(SPLITS)
    assert manifest["gender"].isin([0, 1]).all() and manifest["race"].between(0, 4).all()
    for name, age, gender, race in manifest[["file", "age", "gender", "race"]].itertuples(index=False):
        label = parse_utkface_name(name)
        assert (label.age, label.gender, label.race) == (age, gender, race)
    counts = manifest["split"].value_counts()
    total = len(manifest)
    assert abs(counts["test"] / total - 0.20) < 0.02
    assert abs(counts["val"] / total - 0.16) < 0.02

    summary = json.loads((results_dir / "data" / "summary.json").read_text())
    assert summary["images_labelled"] == total
    assert summary["splits"] == counts.to_dict()
    for plot in ("age_histogram", "gender_race_share", "age_by_gender"):
        assert (results_dir / "data" / f"{plot}.png").stat().st_size > 1000
    assert summary["caches"]["64"]["bytes"] == total * 64 * 64 * 3 + 3 * 128  # three .npy files with headers


def test_cache_round_trips_exactly(prepared):
    data_dir, root = prepared["data_dir"], prepared["images"]
    for split in SPLITS:
        images, rows = load_split(split, 64, data_dir)
        assert images.dtype == np.uint8 and images.shape == (len(rows), 64, 64, 3)
        for index in (0, len(rows) - 1):
            np.testing.assert_array_equal(images[index], load_face_array(root / rows["file"][index], 64))


def test_cache_for_a_new_size_is_built_on_demand(prepared):
    images, rows = load_split("val", 40, prepared["data_dir"])
    assert images.shape == (len(rows), 40, 40, 3)


def test_split_is_identical_across_runs(utkface_subset, prepared, tmp_path):
    prepare_data.prepare(str(utkface_subset), tmp_path / "data", tmp_path / "results", [32])
    again = pd.read_csv(tmp_path / "data" / "manifest.csv")
    first = pd.read_csv(prepared["data_dir"] / "manifest.csv")
    pd.testing.assert_frame_equal(first, again)


def test_malformed_names_and_corrupt_images_are_skipped_and_listed(utkface_subset, tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    for path in sorted(utkface_subset.iterdir())[:80]:
        shutil.copy(path, folder)
    shutil.copy(next(utkface_subset.iterdir()), folder / "39_1_20170116174525125.jpg.chip.jpg")  # no race
    (folder / "25_0_1_20170116174525125.jpg.chip.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = runner.invoke(prepare_data.app, ["--source", str(folder), "--data-dir", str(tmp_path / "data"),
                                              "--results-dir", str(tmp_path / "results"), "--image-size", "32"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "results" / "data" / "summary.json").read_text())
    reasons = {item["file"]: item["reason"] for item in summary["skipped"]}
    assert reasons["39_1_20170116174525125.jpg.chip.jpg"] == "malformed file name"
    assert reasons["25_0_1_20170116174525125.jpg.chip.jpg"].startswith("unreadable image")
    assert summary["images_labelled"] == 80
    assert "39_1_20170116174525125.jpg.chip.jpg" in result.output


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archives_are_accepted(utkface_subset, tmp_path, kind):
    files = sorted(utkface_subset.iterdir())[:40]
    archive = tmp_path / f"UTKFace.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zipped:
            for path in files:
                zipped.write(path, f"UTKFace/{path.name}")
    else:
        with tarfile.open(archive, "w:gz") as tar:
            for path in files:
                tar.add(path, f"UTKFace/{path.name}")
    summary = prepare_data.prepare(str(archive), tmp_path / "data", tmp_path / "results", [32])
    assert summary["images_labelled"] == 40
    assert len(list((tmp_path / "data" / "images").glob("*.jpg"))) == 40


def test_limit_builds_a_stratified_subset(utkface_subset, tmp_path):
    summary = prepare_data.prepare(str(utkface_subset), tmp_path / "data", tmp_path / "results", [32], limit=100)
    assert summary["images_labelled"] == 100
    assert sum(summary["splits"].values()) == 100


def test_missing_source_is_one_clear_error(tmp_path):
    result = runner.invoke(prepare_data.app, ["--source", str(tmp_path / "nowhere.tar.gz"),
                                              "--data-dir", str(tmp_path / "data")])
    assert result.exit_code != 0
    assert "does not exist" in " ".join(result.output.split())  # rich wraps at 80 columns
    assert "Traceback" not in result.output
    assert not (tmp_path / "data" / "manifest.csv").exists()


def test_unreachable_hub_says_to_pass_a_source(tmp_path, monkeypatch):
    monkeypatch.delenv("UTKFACE_SOURCE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(prepare_data.app, ["--data-dir", str(tmp_path / "data")])
    assert result.exit_code != 0
    output = " ".join(result.output.split())
    assert "Hugging Face Hub" in output and "--source" in output and "UTKFACE_SOURCE" in output
    assert "Traceback" not in result.output


def test_an_extra_source_gets_tagged_rows_its_own_split_summary_and_aligned_cache(prepared_extra, labelled_dataset):
    from agegender.data.images import load_aligned_face
    from agegender.data.manifest import cache_file, load_manifest, read_faces

    data_dir, results_dir = prepared_extra["data_dir"], prepared_extra["results_dir"]
    manifest = pd.read_csv(data_dir / "manifest.csv")
    assert list(manifest.columns) == ["file", "age", "gender", "race", "split", "dataset"]
    extra = manifest[manifest["dataset"] == "faces-ds"]
    assert len(manifest) - len(extra) == 120
    assert set(extra["split"]) == set(SPLITS) and extra["gender"].notna().all()
    assert extra["age"].isna().sum() == len(extra) - extra["age"].notna().sum() > 0  # gaps stay empty
    summary = json.loads((results_dir / "data" / "summary.json").read_text())
    assert summary["images_labelled"] == 120 and sum(summary["splits"].values()) == 120
    found = summary["datasets"]["faces-ds"]
    assert found["rows_listed"] == 34 and found["images_usable"] == len(extra)
    assert found["labels"] == ["age", "gender", "race"]
    assert found["splits"] == extra["split"].value_counts().to_dict()
    reasons = {item["file"]: item["reason"] for item in found["skipped"]}
    assert {"images/missing.jpg", "images/broken.jpg", "images/99.jpg", "images/00.jpg"} <= set(reasons)
    assert len(reasons) == 34 - len(extra)  # every row not in the manifest is listed with its reason
    assert (results_dir / "data" / "faces-ds" / "labels.png").stat().st_size > 1000

    # the default reads UTKFace alone; the extra dataset's cache holds crops aligned on the faces found
    assert set(load_manifest(data_dir)["dataset"]) == {"utkface"}
    assert set(load_manifest(data_dir, None)["dataset"]) == {"utkface", "faces-ds"}
    images, rows = load_split("train", 32, data_dir, datasets=["faces-ds"])
    faces = read_faces(data_dir / "datasets" / "faces-ds" / "faces.csv")
    np.testing.assert_array_equal(images[0], load_aligned_face(labelled_dataset / rows["file"][0],
                                                              faces[rows["file"][0]], 32))
    assert cache_file(32, data_dir, "faces-ds", "train").exists() and cache_file(32, data_dir, "utkface",
                                                                                    "train").name == "train.npy"
    both, both_rows = load_split("val", 32, data_dir, datasets=None)
    assert len(both) == len(both_rows) == (manifest["split"] == "val").sum()


def test_an_extra_dataset_changes_the_manifest_hash_but_not_utkface_split_hash(prepared_extra, utkface_subset,
                                                                               tmp_path):
    """compare matches a model to the test split by utkface_split_sha256: a model trained with an extra dataset has
    another manifest but the same UTKFace split as a UTKFace-only folder prepared alike."""
    from agegender.data.manifest import data_state, utkface_split_sha256
    from tasks.compare import same_split

    alone = tmp_path / "data"
    prepare_data.prepare(str(utkface_subset), alone, tmp_path / "results", [32], limit=120)
    with_extra = prepared_extra["data_dir"]
    manifest, split = data_state(alone)["manifest_sha256"], utkface_split_sha256(alone)
    assert data_state(with_extra)["manifest_sha256"] != manifest
    assert utkface_split_sha256(with_extra) == split
    trained_with_extra = {"manifest_sha256": data_state(with_extra)["manifest_sha256"],
                          "utkface_split_sha256": utkface_split_sha256(with_extra)}
    assert same_split(trained_with_extra, manifest, split)
    assert not same_split({**trained_with_extra, "utkface_split_sha256": "0" * 64}, manifest, split)
    assert not same_split({"manifest_sha256": "0" * 64}, manifest, split)  # older metadata: by the manifest


def test_limit_also_caps_each_extra_dataset(utkface_subset, labelled_dataset, tmp_path):
    """--limit N (a quick check, as train_all --quick prepares) takes a seeded subset of N of an extra dataset's
    usable rows too, so a large extra dataset does not make a quick run slow."""
    from agegender.data.manifest import load_manifest

    summary = prepare_data.prepare(str(utkface_subset), tmp_path / "data", tmp_path / "results", [32], limit=24,
                                   extra_sources=[str(labelled_dataset)])
    manifest = load_manifest(tmp_path / "data", None)
    extra = manifest[manifest["dataset"] == "faces-ds"]
    assert len(manifest) - len(extra) == 24 and len(extra) == summary["datasets"]["faces-ds"]["images_usable"]
    assert len(extra) <= 24 < 30  # 30 usable rows in the dataset


def test_a_second_run_reuses_the_faces_and_the_cache(prepared_extra, utkface_subset, labelled_dataset):
    data_dir = prepared_extra["data_dir"]
    faces = data_dir / "datasets" / "faces-ds" / "faces.csv"
    stamp = faces.stat().st_mtime_ns
    result = runner.invoke(prepare_data.app, ["--source", str(utkface_subset), "--data-dir", str(data_dir),
                                              "--results-dir", str(prepared_extra["results_dir"]),
                                              "--image-size", "32", "--limit", "120",
                                              "--extra-source", str(labelled_dataset)])
    assert result.exit_code == 0, result.output
    assert "(up to date)" in result.output and "(rebuilt)" not in result.output
    assert faces.stat().st_mtime_ns == stamp


def test_extra_sources_cannot_share_a_name(utkface_subset, labelled_dataset, tmp_path):
    result = runner.invoke(prepare_data.app, ["--source", str(utkface_subset), "--data-dir", str(tmp_path / "d"),
                                              "--extra-source", str(labelled_dataset),
                                              "--extra-source", str(labelled_dataset)])
    assert result.exit_code != 0 and "both be named 'faces-ds'" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_detected_crops_go_through_the_inference_path_and_keep_the_split(utkface_subset, tmp_path):
    """--utkface-crops detected: the same manifest as UTKFace's own crops, each cached face found and aligned as
    predict aligns it, and an image with no face kept as its crop and listed."""
    from PIL import Image

    from agegender.data.images import load_aligned_face
    from agegender.data.manifest import read_faces

    source = tmp_path / "source"
    source.mkdir()
    for path in sorted(utkface_subset.iterdir())[:40]:
        shutil.copy(path, source / path.name)
    blank = "30_1_0_20170109150557335.jpg.chip.jpg"  # a UTKFace name on an image without a face
    Image.new("RGB", (200, 200), (128, 128, 128)).save(source / blank)
    runs = {}
    for crops in ("original", "detected"):
        runs[crops] = runner.invoke(prepare_data.app, [
            "--source", str(source), "--data-dir", str(tmp_path / crops), "--results-dir", str(tmp_path / "r"),
            "--image-size", "32", "--utkface-crops", crops])
        assert runs[crops].exit_code == 0, runs[crops].output
    original, detected = tmp_path / "original", tmp_path / "detected"
    assert (original / "manifest.csv").read_text() == (detected / "manifest.csv").read_text()
    state = json.loads((detected / "prepare.json").read_text())
    assert state["crops"] == "detected" and state["detector"] == prepare_data.DEFAULT_DETECTOR
    summary = json.loads((tmp_path / "r" / "data" / "summary.json").read_text())
    assert [item["file"] for item in summary["no_face"]] == [blank]
    assert "no face" in runs["detected"].output and blank in " ".join(runs["detected"].output.split())

    faces = read_faces(state["faces"])
    assert len(faces) == 40 and blank not in faces
    changed = 0
    for split in SPLITS:
        images, rows = load_split(split, 32, detected)
        plain, _ = load_split(split, 32, original)
        for index, name in enumerate(rows["file"]):
            if name == blank:
                np.testing.assert_array_equal(images[index], plain[index])
            else:
                np.testing.assert_array_equal(images[index], load_aligned_face(source / name, faces[name], 32))
                changed += not np.array_equal(images[index], plain[index])
    assert changed == 40  # the detector's alignment frames every found face differently from UTKFace's crop


def test_an_unknown_crops_choice_is_refused(tmp_path):
    result = runner.invoke(prepare_data.app, ["--data-dir", str(tmp_path), "--utkface-crops", "tight"])
    assert result.exit_code == 2 and "--utkface-crops" in " ".join(result.output.split())
