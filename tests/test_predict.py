"""predict.py as a user runs it: real face crops, photos with and without faces, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from agegender.data.images import OVERSAMPLED_INPUT, face_crop, input_crop, read_image
from agegender.data.manifest import load_split
from agegender.inference.detectors import detect_faces
from agegender.inference.predictor import Predictor
from tasks import predict
from tests.conftest import TEST_IMAGE_SIZE, copy_test_crops, said

runner = CliRunner()


@pytest.fixture(scope="module")
def faces(prepared, tmp_path_factory):
    """Six real UTKFace crops from the test split in a folder of their own."""
    folder = tmp_path_factory.mktemp("faces")
    copy_test_crops(prepared, folder, 6)
    return folder


def test_predict_with_detection_finds_one_face_per_crop(trained_models, faces, tmp_path):
    out = tmp_path / "predictions.csv"
    result = runner.invoke(predict.app, [str(trained_models["multitask"]), str(faces), "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert list(frame.columns[:4]) == ["file", "age", "gender", "p_female"]
    assert {"x", "y", "width", "height", "confidence", "reason"} <= set(frame.columns)
    assert frame["file"].nunique() == 6
    found = frame.dropna(subset=["age"])
    assert found["file"].nunique() >= 5  # MTCNN finds the face in (nearly) every aligned crop
    assert found["age"].between(0, 150).all() and found["p_female"].between(0, 1).all()
    assert set(found["gender"]) <= {"male", "female"}
    assert (found["width"] > 60).all()  # the face fills most of a 200 px crop


def test_no_detect_treats_each_image_as_a_crop_and_matches_the_cache(trained_models, faces, prepared, tmp_path):
    out = tmp_path / "p.csv"
    result = runner.invoke(predict.app, [str(trained_models["gender"]), str(faces), "--no-detect", "--out", str(out),
                                         "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["file", "gender", "p_female", "gender_certain"]  # only what the model predicts
    assert len(frame) == 6
    # the same numbers as the model gives on prepare_data's cache of the test split (the arrays training and
    # evaluation read): one preprocessing path from file to model input
    cached, rows = load_split("test", TEST_IMAGE_SIZE, prepared["data_dir"])
    position = {name: index for index, name in enumerate(rows["file"])}
    from_cache = cached[[position[Path(path).name] for path in frame["file"]]]
    expected = Predictor.load(trained_models["gender"]).predict_arrays(from_cache)["p_female"]
    np.testing.assert_allclose(frame["p_female"], expected, atol=1e-4)


def test_any_image_mode_and_size_works(trained_models, faces, tmp_path):
    source = Image.open(next(faces.iterdir()))
    variants = {"grey.png": source.convert("L"), "rgba.png": source.convert("RGBA"),
                "tiny.jpg": source.resize((24, 24)), "large.jpg": source.resize((2400, 2400))}
    for name, image in variants.items():
        image.save(tmp_path / name)
    out = tmp_path / "modes.csv"
    result = runner.invoke(predict.app, [str(trained_models["age"]), *(str(tmp_path / n) for n in variants),
                                         "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    assert set(frame["file"].map(lambda f: f.split("/")[-1])) == set(variants)
    assert frame.dropna(subset=["age"])["age"].between(0, 150).all()
    assert frame.loc[frame["file"].str.endswith("large.jpg"), "age"].notna().all()


def test_a_16_bit_greyscale_png_is_read_scaled_to_8_bits(trained_models, faces, tmp_path):
    # PIL turns a 16-bit greyscale image (mode I;16) white when it converts it to RGB: no face was found in it
    source = Image.open(next(faces.iterdir())).convert("L")
    Image.fromarray(np.asarray(source).astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    read = np.asarray(read_image(tmp_path / "grey16.png"))
    np.testing.assert_array_equal(read[..., 0], np.asarray(source))
    out = tmp_path / "grey16.csv"
    result = runner.invoke(predict.app, [str(trained_models["age"]), str(tmp_path / "grey16.png"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out)["age"].notna().all()  # a face was found and read


def test_an_image_without_a_face_gets_a_row_with_the_reason(trained_models, tmp_path):
    rng = np.random.default_rng(0)
    sky = np.zeros((240, 320, 3), np.uint8)
    sky[..., 2] = 200
    sky[120:] = rng.integers(40, 90, size=(120, 320, 3))  # blue sky over rough ground
    Image.fromarray(sky).save(tmp_path / "landscape.png")
    out = tmp_path / "p.csv"
    result = runner.invoke(predict.app, [str(trained_models["multitask"]), str(tmp_path / "landscape.png"),
                                         "--out", str(out)])
    assert result.exit_code == 0, result.output
    row = pd.read_csv(out).iloc[0]
    assert row["reason"] == "no face found" and np.isnan(row["age"])
    shown = runner.invoke(predict.app, [str(trained_models["multitask"]), str(tmp_path / "landscape.png")])
    assert shown.exit_code == 0, shown.output  # the console table of a run where no image has a face
    assert "1 prediction(s)" in shown.output and "no face" in shown.output


def test_bad_inputs_end_in_one_sentence(trained_models, faces, tmp_path):
    model = str(trained_models["gender"])
    result = runner.invoke(predict.app, [model, str(tmp_path / "missing.jpg")])
    assert result.exit_code == 1 and "does not exist" in said(result)

    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(predict.app, [model, str(empty)])
    assert result.exit_code == 1 and "holds no images" in said(result)

    fake = tmp_path / "notes.jpg"
    fake.write_text("this is a text file, not a photo")
    result = runner.invoke(predict.app, [model, str(fake)])
    assert result.exit_code == 1 and "not a readable image" in said(result)

    out = tmp_path / "mixed.csv"  # an unreadable file among good ones is reported and skipped
    result = runner.invoke(predict.app, [model, str(fake), str(faces), "--no-detect", "--out", str(out)])
    assert result.exit_code == 0 and "skipped" in said(result)
    assert len(pd.read_csv(out)) == 6

    result = runner.invoke(predict.app, [str(tmp_path), str(faces)])
    assert result.exit_code == 1 and "not a model folder" in said(result)
    for output in (result.output,):
        assert "Traceback" not in output


def test_detector_choice_finds_the_faces_and_a_wrong_name_fails(trained_models, faces, tmp_path):
    model = str(trained_models["multitask"])
    boxes = {}
    for detector in ("mtcnn", "blazeface-short"):
        out = tmp_path / f"{detector}.csv"
        result = runner.invoke(predict.app, [model, str(faces), "--detector", detector, "--out", str(out)])
        assert result.exit_code == 0, result.output
        frame = pd.read_csv(out).dropna(subset=["age"])
        assert frame["file"].nunique() >= 5 and (frame["width"] > 60).all()
        boxes[detector] = frame.groupby("file")[["x", "y", "width", "height"]].first()
    # two different detectors, the same faces: their boxes' centres agree within a fifth of the face
    both = boxes["mtcnn"].join(boxes["blazeface-short"], rsuffix="_other", how="inner")
    centre = both[["x", "y"]].to_numpy() + both[["width", "height"]].to_numpy() / 2
    other = both[["x_other", "y_other"]].to_numpy() + both[["width_other", "height_other"]].to_numpy() / 2
    assert len(both) >= 4 and (np.abs(centre - other) < both[["width"]].to_numpy() / 5).all()

    result = runner.invoke(predict.app, [model, str(faces), "--detector", "retina"])
    assert result.exit_code == 2 and "--detector" in said(result) and "must be one of" in said(result)
    assert "Traceback" not in result.output


def test_a_small_model_reads_each_face_aligned_at_twice_its_input_then_halved(trained_models, faces, tmp_path):
    # a model whose input is 64 px or less (the WideResNet's, these test models') gets the face aligned at twice
    # its side and averaged 2 x 2: what its validation faces favoured over a warp straight to 64 px
    model = trained_models["multitask"]
    out = tmp_path / "p.csv"
    result = runner.invoke(predict.app, [str(model), str(faces), "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out).dropna(subset=["age"]).groupby("file").first()
    predictor = Predictor.load(model)
    assert predictor.image_size == TEST_IMAGE_SIZE <= OVERSAMPLED_INPUT
    checked = 0
    for path, row in frame.iterrows():
        image = read_image(path)
        face = detect_faces(image)[0]
        crop = input_crop(image, face, predictor.image_size)
        assert crop.size == (TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
        np.testing.assert_array_equal(np.asarray(crop), np.asarray(face_crop(image, face, 2 * TEST_IMAGE_SIZE)
                                                                   .reduce(2)))
        expected = predictor.predict_arrays(np.asarray(crop)[None])
        assert row["age"] == pytest.approx(float(expected["age"][0]), abs=1e-3)
        assert row["p_female"] == pytest.approx(float(expected["p_female"][0]), abs=1e-4)
        checked += 1
    assert checked >= 5
    # a larger input is aligned straight to its side, as before (the last face above)
    np.testing.assert_array_equal(np.asarray(input_crop(image, face, 128)), np.asarray(face_crop(image, face, 128)))
