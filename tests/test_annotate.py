"""predict --annotate and --heatmaps as a user runs them: annotated copies of every photo (any mode and size),
never over the photos themselves, and a Grad-CAM heatmap per face and output, from CNNs, a transfer model with
a nested backbone, and bad input."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from tasks import predict
from tests.conftest import copy_test_crops, said

runner = CliRunner()


def digest(folder) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def photos(prepared, tmp_path_factory):
    """Three real UTKFace test photos, and the same face as grey, RGBA, palette, tiny and large files."""
    folder = tmp_path_factory.mktemp("photos")
    names = copy_test_crops(prepared, folder, 3)
    source = Image.open(prepared["images"] / names[0])
    variants = {"grey.png": source.convert("L"), "rgba.png": source.convert("RGBA"), "palette.png": source.convert("P"),
                "tiny.jpg": source.resize((24, 24)), "large.jpg": source.resize((1200, 900))}
    for name, image in variants.items():
        image.save(folder / name)
    return folder


def test_annotated_copies_and_heatmaps_for_every_photo_and_face(trained_models, photos, tmp_path):
    before = digest(photos)
    out, annotated, heatmaps = tmp_path / "p.csv", tmp_path / "annotated", tmp_path / "heatmaps"
    result = runner.invoke(predict.app, [str(trained_models["multitask"]), str(photos), "--out", str(out),
                                         "--annotate", str(annotated), "--heatmaps", str(heatmaps)])
    assert result.exit_code == 0, result.output
    assert digest(photos) == before  # the photos are untouched
    for path in photos.iterdir():
        copy = annotated / path.name
        with Image.open(path) as original, Image.open(copy) as drawn:
            assert drawn.size == original.size and drawn.format == original.format
    frame = pd.read_csv(out).dropna(subset=["face"])
    assert len(frame) >= 5
    expected = {f"{name.rsplit('.', 1)[0]}-face{face:.0f}-{output}.png"
                for name, face in zip(frame["file"].map(lambda f: f.split("/")[-1]), frame["face"], strict=True)
                for output in ("age", "gender")}
    assert {path.name for path in heatmaps.iterdir()} == expected
    with Image.open(heatmaps / sorted(expected)[0]) as heatmap:
        assert heatmap.size == (256, 256)
    assert f"Wrote {len(before)} annotated photo(s)" in said(result)


def test_a_box_is_drawn_where_the_face_was_found(trained_models, photos, tmp_path):
    name = sorted(p.name for p in photos.iterdir() if p.name.endswith(".chip.jpg"))[0]
    out = tmp_path / "p.csv"
    result = runner.invoke(predict.app, [str(trained_models["age"]), str(photos / name), "--out", str(out),
                                         "--annotate", str(tmp_path)])
    assert result.exit_code == 0, result.output
    row = pd.read_csv(out).iloc[0]
    original = np.asarray(Image.open(photos / name).convert("RGB"), dtype=int)
    drawn = np.asarray(Image.open(tmp_path / name).convert("RGB"), dtype=int)
    changed = np.abs(drawn - original).sum(axis=2) > 60
    x, y, w, h = (int(row[key]) for key in ("x", "y", "width", "height"))
    assert changed[y + h // 2, x - 1:x + 2].any() and changed[y + h // 2, x + w - 2:x + w + 1].any()  # box sides
    assert not changed[y + h // 3:y + 2 * h // 3, x + w // 3:x + 2 * w // 3].any()  # the face itself is left alone


def test_heatmaps_with_no_detect_and_a_chosen_layer(trained_models, photos, tmp_path):
    faces = sorted(p for p in photos.iterdir() if p.name.endswith(".chip.jpg"))
    result = runner.invoke(predict.app, [str(trained_models["gender"]), *map(str, faces), "--no-detect",
                                         "--heatmaps", str(tmp_path), "--heatmap-layer", "stage2_conv1"])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        f"{path.name.rsplit('.', 1)[0]}-face1-gender.png" for path in faces)


@pytest.mark.slow  # MobileNetV2's gradient graph takes ~20 s to trace on 2 cores
def test_heatmaps_of_a_transfer_model_whose_backbone_is_nested(prepared, photos, tmp_path):
    """A saved MobileNetV2 transfer model: the default layer is the last convolution inside the backbone."""
    from agegender.inference.gradcam import load_gradcam
    from agegender.models.backbones import BACKBONES
    from agegender.models.folders import make_metadata, save_model
    from agegender.models.registry import FAMILIES
    from agegender.models.transfer import build_model

    model = build_model(BACKBONES["mobilenetv2"], 32, {**FAMILIES["transfer"].defaults, "age_head": "dex"},
                        "multitask", weights="none")
    folder = tmp_path / "transfer"
    save_model(model, folder, make_metadata("multitask", 32, {}, "0" * 64, backbone="mobilenetv2"))
    assert load_gradcam(folder).layer_paths == ["mobilenetv2_1.00_32/Conv_1"]
    face = next(p for p in photos.iterdir() if p.name.endswith(".chip.jpg"))
    result = runner.invoke(predict.app, [str(folder), str(face), "--no-detect", "--heatmaps", str(tmp_path / "maps")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "maps").glob("*-face1-*.png"))) == 2


@pytest.mark.parametrize("flags, words", [
    (["--heatmaps", "MAPS", "--heatmap-layer", "no_such_layer"], "has no layer named 'no_such_layer'"),
    (["--heatmaps", "MAPS", "--heatmap-layer", "gender_dense"], "gives no spatial map"),
    (["--heatmap-layer", "stage3_conv2"], "give --heatmaps DIR too"),
])
def test_a_bad_heatmap_layer_is_one_sentence(trained_models, photos, tmp_path, flags, words):
    flags = [str(tmp_path / "maps") if flag == "MAPS" else flag for flag in flags]
    result = runner.invoke(predict.app, [str(trained_models["multitask"]), str(photos), *flags])
    assert result.exit_code == 1 and words in said(result)
    assert "Traceback" not in result.output and not (tmp_path / "maps").exists()


def test_the_photos_own_folder_or_a_file_is_refused(trained_models, photos, tmp_path):
    before = digest(photos)
    result = runner.invoke(predict.app, [str(trained_models["gender"]), str(photos), "--annotate", str(photos)])
    assert result.exit_code == 1 and "holds the input photos" in said(result)
    assert digest(photos) == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    result = runner.invoke(predict.app, [str(trained_models["gender"]), str(photos), "--annotate", str(a_file)])
    assert result.exit_code == 1 and "is a file, not a folder" in said(result)
    assert digest(photos) == before
