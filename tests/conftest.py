"""Shared fixtures: a few hundred real UTKFace images, prepared once per test session.

Two tiers: `pytest -m "not slow and not shipped"` (nox -s tests) is the fast one; tests marked `slow` (real
training beyond a few batches, Spaces servers, worker processes, every backbone) run only in the full tier
(nox -s tests_full). tests/shipped (marked `shipped`, nox -s shipped) checks the committed results instead."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach the Hub
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# trainers run through their CLI log TensorBoard runs under results/runs by default: here, a scratch folder
os.environ.setdefault("AGEGENDER_RUNS_DIR", tempfile.mkdtemp(prefix="agegender-test-runs-"))

ARCHIVE = Path(os.environ.get("UTKFACE_SOURCE", REPO.parent / "shared/data/utkface/UTKFace.tar.gz"))
SUBSET_EVERY = 50  # every 50th image: ~430 faces
TEST_IMAGE_SIZE = 64  # small inputs keep the suite fast; the default 128 is used by the real runs
SMALL_LIMIT = 40  # prepared_small's faces


@pytest.fixture(scope="session")
def utkface_subset(tmp_path_factory) -> Path:
    """A folder of ~430 real UTKFace images (every 50th of the shared archive), extracted once."""
    if not ARCHIVE.exists():
        pytest.skip(f"UTKFace archive not found at {ARCHIVE}; set UTKFACE_SOURCE")
    folder = tmp_path_factory.mktemp("utkface") / "UTKFace"
    folder.mkdir()
    with tarfile.open(ARCHIVE) as tar:
        index = 0
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            if index % SUBSET_EVERY == 0:
                (folder / Path(member.name).name).write_bytes(tar.extractfile(member).read())
            index += 1
    return folder


def prepare_subset(utkface_subset: Path, root: Path, limit: int | None = None) -> dict[str, Path]:
    """prepare_data on the subset (at most `limit` faces) at TEST_IMAGE_SIZE into root:
    {"data_dir", "results_dir", "images"}."""
    from tasks.prepare_data import prepare

    data_dir, results_dir = root / "data", root / "results"
    prepare(str(utkface_subset), data_dir, results_dir, [TEST_IMAGE_SIZE], limit=limit)
    return {"data_dir": data_dir, "results_dir": results_dir, "images": utkface_subset}


@pytest.fixture(scope="session")
def prepared(utkface_subset, tmp_path_factory) -> dict[str, Path]:
    """prepare_data run on the whole subset."""
    return prepare_subset(utkface_subset, tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def prepared_small(utkface_subset, tmp_path_factory) -> dict[str, Path]:
    """prepare_data --limit SMALL_LIMIT on the subset, for tests that prepare its data again another way (detected
    crops, an extra dataset)."""
    return prepare_subset(utkface_subset, tmp_path_factory.mktemp("prepared-small"), SMALL_LIMIT)


@pytest.fixture(scope="session")
def trained_runs(prepared, tmp_path_factory) -> dict:
    """Two-epoch gender, age and multitask models on the prepared subset, trained through each family's trainer
    with TensorBoard logging: {name: TrainResult}, each with the model still in memory as it was saved to its
    out_dir (its logs in <models>/runs/<name>). The age model has a DEX head (an age distribution), as the
    shipped age models do; the multi-task one a regression head, so both kinds of age interval are covered."""
    from agegender.training.trainers import TRAINERS

    root = tmp_path_factory.mktemp("models")
    params = {"gender": {}, "age": {"age_head": "dex"}, "multitask": {}}
    return {name: TRAINERS[name]({"batch_size": 16, **params[name]}, TEST_IMAGE_SIZE, 2, prepared["data_dir"],
                                 None, root / name, verbose=0, tensorboard_dir=root.parent / "runs" / name)
            for name in ("gender", "age", "multitask")}


@pytest.fixture(scope="session")
def trained_models(trained_runs) -> dict[str, Path]:
    """The folders of the two-epoch models (shared by several test files)."""
    return {name: run.out_dir for name, run in trained_runs.items()}



@pytest.fixture(scope="session")
def labelled_dataset(utkface_subset, tmp_path_factory) -> Path:
    """A small dataset in the labels.csv format (agegender.data.datasets) built from 30 UTKFace images renamed
    images/NN.jpg: the first 15 with age, gender and race, the other 15 with gender alone; plus four unusable rows
    (a missing file, an image that does not decode, a malformed age, a file listed twice)."""
    from agegender.data.labels import parse_utkface_name

    folder = tmp_path_factory.mktemp("labelled") / "faces-ds"
    (folder / "images").mkdir(parents=True)
    lines = ["file,age,gender,race,note"]
    for index, path in enumerate(sorted(utkface_subset.iterdir())[:30]):
        label = parse_utkface_name(path.name)
        (folder / "images" / f"{index:02d}.jpg").write_bytes(path.read_bytes())
        full = index < 15
        lines.append(f"images/{index:02d}.jpg,{label.age if full else ''},{label.gender},"
                     f"{label.race if full else ''},kept")
    (folder / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    lines += ["images/missing.jpg,30,1,0,gone", "images/broken.jpg,30,1,0,broken", "images/00.jpg,31,0,0,twice",
              "images/99.jpg,abc,1,,malformed"]
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def prepared_extra(utkface_subset, labelled_dataset, tmp_path_factory) -> dict[str, Path]:
    """prepare_data on 120 of the UTKFace subset plus labelled_dataset as an extra source, at 32 px:
    {"data_dir", "results_dir", "summary"}."""
    from tasks.prepare_data import prepare

    root = tmp_path_factory.mktemp("prepared-extra")
    data_dir, results_dir = root / "data", root / "results"
    summary = prepare(str(utkface_subset), data_dir, results_dir, [32], limit=120,
                      extra_sources=[str(labelled_dataset)])
    return {"data_dir": data_dir, "results_dir": results_dir, "summary": summary}


def copy_test_crops(prepared: dict[str, Path], folder: Path, count: int) -> list[str]:
    """The first `count` test-split UTKFace files of the prepared subset copied into folder; their names."""
    import pandas as pd

    names = list(pd.read_csv(prepared["data_dir"] / "manifest.csv").query("split == 'test'").head(count)["file"])
    for name in names:
        (folder / name).write_bytes((prepared["images"] / name).read_bytes())
    return names


def model_trained_on(folder: Path, copy: Path, datasets: list[str], **fields) -> Path:
    """A copy of a saved model whose metadata says it also learned from `datasets` (as prepare_data
    --extra-source records them), with any other metadata `fields` replaced."""
    import json
    import shutil

    shutil.copytree(folder, copy)
    metadata = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps({**metadata, "extra_datasets": datasets, **fields}))
    return copy


def said(result) -> str:
    """A CLI result's output with rich's line wrapping undone."""
    return " ".join(result.output.split())
