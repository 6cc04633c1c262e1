"""The face detectors as the inference path uses them: each finds a held-out UTKFace face pasted into a larger
photo, with a box around it and eyes where the alignment needs them; and the detector benchmark's command line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from agegender.cli import UserError
from agegender.data.images import CROP_SIDE, EYE_CENTRE, EYE_DISTANCE, Face, read_image
from agegender.inference.detectors import DEFAULT_DETECTOR, DETECTORS, SecondLook, detect_faces, get_detector
from tasks import bench_detectors

runner = CliRunner()
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "results" / "models" / "multitask"  # no training here
FACE_SIDE, FACE_AT = 200, (150, 70)  # the pasted crop's side and top-left corner in a 520 x 380 photo


def installed(name: str) -> bool:
    return importlib.util.find_spec(DETECTORS[name].package) is not None


@pytest.fixture(scope="module")
def test_faces(prepared) -> list[Image.Image]:
    rows = pd.read_csv(prepared["data_dir"] / "manifest.csv").query("split == 'test'").head(3)
    return [read_image(prepared["images"] / name) for name in rows["file"]]


def photo_with(face: Image.Image) -> Image.Image:
    """The face over a lit gradient with some noise, the way a photo has more around a face than a crop."""
    height, width = 380, 520
    ramp = np.linspace(0, 1, width)[None, :, None] * np.linspace(0.6, 1, height)[:, None, None]
    pixels = 40 + ramp * np.array([150, 170, 190]) + np.random.default_rng(0).normal(0, 4, (height, width, 3))
    photo = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    photo.paste(face.resize((FACE_SIDE, FACE_SIDE)), FACE_AT)
    return photo


def true_eyes() -> tuple[np.ndarray, float]:
    """Where the pasted crop's eyes are (UTKFace's alignment): their midpoint, and their distance."""
    scale = FACE_SIDE / CROP_SIDE
    middle = np.array(FACE_AT) + np.array(EYE_CENTRE) * CROP_SIDE * scale
    return middle, EYE_DISTANCE * CROP_SIDE * scale


@pytest.mark.parametrize("name", list(DETECTORS))
def test_each_detector_boxes_the_face_and_finds_its_eyes(name, test_faces):
    if not installed(name):
        pytest.skip(f"{DETECTORS[name].package} is not installed")
    middle, distance = true_eyes()
    for face in test_faces:
        photo = photo_with(face)
        found = detect_faces(photo, name)
        assert len(found) == 1, (name, found)
        x, y, w, h = found[0].box
        assert x <= middle[0] <= x + w and y <= middle[1] <= y + h
        assert 1.2 * distance <= w <= 3.5 * distance
        eyes = np.array([found[0].left_eye, found[0].right_eye])
        assert eyes[0, 0] < eyes[1, 0]  # the image-left eye first, as face_crop needs
        assert np.linalg.norm(eyes.mean(axis=0) - middle) < 0.25 * distance
        assert 0.8 < np.linalg.norm(eyes[1] - eyes[0]) / distance < 1.25


def test_canvases_have_their_condition_s_size_and_the_others_stay_as_they_were(prepared):
    """The big-photo conditions come last: adding them left every other condition's canvases the same."""
    both = bench_detectors.build_canvases(["small", "big", "big_distant"], 3, prepared["data_dir"], None, 7)
    alone = bench_detectors.build_canvases(["small"], 3, prepared["data_dir"], None, 7)
    assert [c.jpeg for c in both if c.condition == "small"] == [c.jpeg for c in alone]
    for canvas in both:
        sides = bench_detectors.CONDITIONS[canvas.condition][3]
        assert all(sides[0] <= side <= sides[1] for side in canvas.size), (canvas.condition, canvas.size)
    assert min(min(c.size) for c in both if c.condition != "small") >= 1200


def test_a_distant_face_in_a_big_photo_is_aligned_on_a_closer_look(test_faces):
    """A face over a tenth of a 2000 x 1500 photo: the back-camera model's eyes from its view of the whole photo
    are coarse; looked at again in a crop around the face, they land on the true eyes."""
    import copy

    back = get_detector("blazeface-back")
    whole_photo_only = copy.copy(back)
    whole_photo_only.smallest_eyes = None
    side, at = 150, (1100, 700)
    scale = side / CROP_SIDE
    middle = np.array(at) + np.array(EYE_CENTRE) * CROP_SIDE * scale
    distance = EYE_DISTANCE * CROP_SIDE * scale
    errors = {"closer": [], "whole": []}
    for face in test_faces:
        photo = Image.new("RGB", (2000, 1500), (120, 140, 160))
        photo.paste(face.resize((side, side)), at)
        for name, detector in (("closer", back), ("whole", whole_photo_only)):
            found = detector(photo)
            assert len(found) == 1, (name, found)
            eyes = np.array([found[0].left_eye, found[0].right_eye])
            errors[name].append(np.linalg.norm(eyes.mean(axis=0) - middle) / distance
                                + abs(np.linalg.norm(eyes[1] - eyes[0]) / distance - 1))
    assert max(errors["closer"]) < 0.15
    assert np.mean(errors["closer"]) < np.mean(errors["whole"])


def test_a_photo_without_a_face_gives_no_face():
    landscape = read_image(bench_detectors.LANDSCAPE)
    assert detect_faces(landscape) == []
    assert detect_faces(landscape.convert("L")) == []


def test_detectors_are_built_once_and_unknown_names_are_refused():
    assert get_detector(DEFAULT_DETECTOR) is get_detector(DEFAULT_DETECTOR)
    with pytest.raises(UserError, match="Unknown detector 'retina'; expected one of blazeface"):
        get_detector("retina")


def test_the_second_detector_looks_only_where_the_first_finds_no_face(monkeypatch):
    """SecondLook runs the first detector; the second only on photos where the first found nothing."""
    from agegender.inference import detectors

    first_found = [Face((10, 10, 50, 50), 0.9, (20.0, 30.0), (40.0, 30.0))]
    looked: list[str] = []

    def fake(name, found):
        def detector(image):
            looked.append(name)
            return found(image)
        return detector

    monkeypatch.setitem(detectors._detectors, "blazeface-back",
                        fake("first", lambda image: first_found if image.width > 100 else []))
    monkeypatch.setitem(detectors._detectors, "mtcnn", fake("second", lambda image: [Face((1, 1, 8, 8), 0.95)]))
    chain = SecondLook("blazeface-back", "mtcnn")
    assert chain(Image.new("RGB", (200, 200))) == first_found and looked == ["first"]
    looked.clear()
    assert chain(Image.new("RGB", (80, 80)))[0].box == (1, 1, 8, 8) and looked == ["first", "second"]


def test_the_default_detector_finds_a_face_the_fast_one_misses(test_faces):
    """A face too small for the back-camera BlazeFace at its input size is found by the default's second look."""
    if not installed("mtcnn"):
        pytest.skip("mtcnn is not installed")
    photo = Image.new("RGB", (1600, 1200), (96, 110, 124))
    photo.paste(test_faces[0].resize((48, 48)), (776, 576))  # centred on (800, 600)
    assert detect_faces(photo, "blazeface-back") == []
    found = detect_faces(photo)
    assert len(found) == 1
    x, y, w, h = found[0].box
    assert x <= 800 <= x + w and y <= 600 <= y + h and 24 <= w <= 96


@pytest.fixture(scope="module")
def tiny_celeba(prepared, tmp_path_factory):
    """A labelled dataset shaped like ../shared/data/celeba (89 x 109 faces, labels.csv with gender)."""
    folder = tmp_path_factory.mktemp("celeba")
    (folder / "images").mkdir()
    rows = pd.read_csv(prepared["data_dir"] / "manifest.csv").query("split == 'test'").tail(4)
    for index, name in enumerate(rows["file"]):
        read_image(prepared["images"] / name).resize((89, 109)).save(folder / "images" / f"{index:06d}.jpg")
    pd.DataFrame({"file": [f"images/{i:06d}.jpg" for i in range(len(rows))], "gender": rows["gender"].to_numpy(),
                  "young": 1}).to_csv(folder / "labels.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def model() -> str:
    if not (SHIPPED_MODEL / "metadata.json").exists():
        pytest.skip(f"no model at {SHIPPED_MODEL}")
    return str(SHIPPED_MODEL)


def test_benchmark_runs_every_condition_and_writes_its_tables(prepared, model, tiny_celeba, tmp_path):
    result = runner.invoke(bench_detectors.app, [
        "--count", "3", "--detector", "blazeface-back", "--detector", "blazeface-short",
        "--data-dir", str(prepared["data_dir"]), "--model", model,
        "--celeba", str(tiny_celeba), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "detectors.json").read_text())
    assert report["settings"]["count"] == 3 and report["settings"]["detectors"] == ["blazeface-back",
                                                                                    "blazeface-short"]
    rows = {(row["detector"], row["condition"]): row for row in report["by_condition"]}
    assert set(rows) == {(d, c) for d in ("blazeface-back", "blazeface-short") for c in bench_detectors.CONDITIONS}
    for (_, condition), row in rows.items():
        assert row["photos"] == 3 and row["ms_median"] > 0
        if condition == "no_face":
            assert row["found_rate"] is None
        else:
            assert 0 <= row["found_rate"] <= 1
    assert rows["blazeface-back", "medium"]["found_rate"] == 1.0  # a face over a third of the photo is found
    assert rows["blazeface-back", "celeba"]["age_mae"] is None  # CelebA has no ages
    overall = {row["detector"]: row for row in report["overall"]}
    assert set(overall) == {"blazeface-back", "blazeface-short"}
    assert all(row["finds_as_often_as_mtcnn"] is None for row in overall.values())  # MTCNN was not run
    assert report["reference"]["utkface"]["faces"] == 3
    text = (tmp_path / "detectors.md").read_text()
    assert "| blazeface-back |" in text and "## Per condition" in text
    assert "- `big_distant`: UTKFace face over 8-15% of a 1200-2400 px photo" in text
    assert "blazeface-back" in result.output and "Wrote" in result.output


@pytest.mark.parametrize("args, message", [
    (["--detector", "retina"], "retina is not one of"),
    (["--condition", "foggy"], "foggy is not one of"),
    (["--celeba", "/nonexistent/celeba"], "does not exist"),
])
def test_benchmark_bad_input_ends_in_one_sentence(args, message, prepared, model, tmp_path):
    result = runner.invoke(bench_detectors.app, ["--count", "1", "--data-dir", str(prepared["data_dir"]),
                                                 "--model", model, "--out", str(tmp_path), *args])
    assert result.exit_code != 0 and message in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "detectors.json").exists()
