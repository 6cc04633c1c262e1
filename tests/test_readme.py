"""The README's headline results table is generated from a comparison by tasks/readme.py (that the committed
README holds what the committed comparison gives: tests/shipped)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from tasks import readme
from tests.conftest import said

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def table_rows(block: str) -> dict[str, dict[str, str]]:
    """{model: {header: cell}} of the one markdown table in a block."""
    lines = [line for line in block.splitlines() if line.startswith("|")]
    headers = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(headers, row, strict=True)) for row in rows}


def number(cell: str) -> float:
    return float(cell.strip("*").replace(",", ""))


def test_the_table_carries_the_comparison_numbers():
    summary = json.loads((REPO / "results" / "comparison.json").read_text())
    rows = table_rows(readme.headline(summary))
    for model in summary["models"]:
        row = rows[model["model"]]
        assert row["task"] == model["task"] and number(row["px"]) == model["image_size"]
        for key, header in readme.HEADLINE:
            value = model.get(key)
            if value is None:
                assert row[header] == "–", (model["model"], header)
            elif isinstance(value, str):
                assert row[header] == value
            else:  # shown rounded to at most 4 decimals
                assert number(row[header]) == pytest.approx(value, abs=5e-3 if value < 10 else 0.05)
    best = min(summary["models"], key=lambda model: model.get("mae") or float("inf"))
    assert rows[best["model"]]["age MAE (years)"].startswith("**")  # the best value per column in bold


@pytest.fixture
def stale(tmp_path) -> Path:
    """A README whose results block is out of date, with text around it."""
    path = tmp_path / "README.md"
    path.write_text(f"# title\n\nbefore\n\n{readme.START}\nold table\n{readme.END}\n\nafter\n")
    return path


def test_check_fails_on_a_stale_table_and_writing_fixes_only_the_block(stale):
    comparison = str(REPO / "results" / "comparison.json")
    result = runner.invoke(readme.app, ["--check", "--readme", str(stale), "--comparison", comparison])
    assert result.exit_code == 1 and "is not what" in said(result) and "python tasks/readme.py" in said(result)
    assert "old table" in stale.read_text()  # --check changes nothing

    result = runner.invoke(readme.app, ["--readme", str(stale), "--comparison", comparison])
    assert result.exit_code == 0, said(result)
    text = stale.read_text()
    assert text.startswith(f"# title\n\nbefore\n\n{readme.START}\n") and text.endswith(f"{readme.END}\n\nafter\n")
    assert "old table" not in text and "| multitask |" in text
    assert runner.invoke(readme.app, ["--check", "--readme", str(stale), "--comparison", comparison]).exit_code == 0


def test_a_new_comparison_changes_the_table(stale, tmp_path):
    summary = json.loads((REPO / "results" / "comparison.json").read_text())
    summary["models"] = [row for row in summary["models"] if row["model"] == "gender"]
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(summary))
    assert runner.invoke(readme.app, ["--readme", str(stale), "--comparison", str(path)]).exit_code == 0
    assert list(table_rows(stale.read_text())) == ["gender"]


@pytest.mark.parametrize("case, message", [
    ("no markers", "needs one `<!-- results:start -->` line"),
    ("no comparison", "run `python tasks/compare.py` first"),
    ("not a comparison", "is not a comparison written by tasks/compare.py"),
])
def test_bad_input_is_one_sentence(stale, tmp_path, case, message):
    comparison = tmp_path / "comparison.json"
    shutil.copy(REPO / "results" / "comparison.json", comparison)
    if case == "no markers":
        stale.write_text("# title\n\nno table here\n")
    elif case == "no comparison":
        comparison.unlink()
    else:
        comparison.write_text(json.dumps({"rows": []}))
    before = stale.read_text()
    result = runner.invoke(readme.app, ["--readme", str(stale), "--comparison", str(comparison)])
    assert result.exit_code == 1 and message in said(result) and "Traceback" not in result.output
    assert stale.read_text() == before
    assert said(result).startswith("Error: ") and said(result).count("Error") == 1


def transfer_csv(path: Path, faces: tuple[int, int]) -> Path:
    frame = pd.DataFrame({"model": ["transfer-wrn16-8-imdbwiki", "transfer-efficientnetb0-scratch"],
                          "weights": ["imdb-wiki", "no pretrained weights (reference)"],
                          "train images": [13646, 2000], "age MAE": [5.5, 13.5], "gender accuracy": [0.93, 0.74],
                          "test faces": list(faces)})
    frame.to_csv(path, index=False)
    return path


def test_the_pretraining_block_shows_the_gain_on_the_same_faces(tmp_path):
    """Where the README has transfer markers, the block between them is filled from the transfer comparison,
    and a comparison whose rows were scored on different faces is refused."""
    path = tmp_path / "README.md"
    path.write_text(f"{readme.START}\nold\n{readme.END}\n\n{readme.TRANSFER_START}\nold\n{readme.TRANSFER_END}\n")
    comparison = str(REPO / "results" / "comparison.json")
    same = transfer_csv(tmp_path / "same.csv", (4265, 4265))
    result = runner.invoke(readme.app, ["--readme", str(path), "--comparison", comparison, "--transfer", str(same)])
    assert result.exit_code == 0, said(result)
    _, block, _ = readme.split(path.read_text(), path, readme.TRANSFER_START, readme.TRANSFER_END)
    assert "same 4,265 UTKFace test faces" in block and "| transfer-efficientnetb0-scratch |" in block
    assert "gain: 8.00 years of age MAE and 19.0 points" in block

    mixed = transfer_csv(tmp_path / "mixed.csv", (4265, 1000))
    result = runner.invoke(readme.app, ["--readme", str(path), "--comparison", comparison, "--transfer", str(mixed)])
    assert result.exit_code == 1 and "different test faces" in said(result)
