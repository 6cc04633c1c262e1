"""Every task script answers --help: a new script in tasks/ is covered without being listed here (each task's
real and bad-input paths are in its own test file)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

TASKS = sorted(path.stem for path in (Path(__file__).resolve().parent.parent / "tasks").glob("*.py")
               if path.stem != "__init__")


def test_the_task_scripts_are_found():
    assert {"prepare_data", "train_gender", "predict", "compare", "readme"} <= set(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_every_task_answers_help(name):
    module = importlib.import_module(f"tasks.{name}")
    result = CliRunner().invoke(module.app, ["--help"], terminal_width=120)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Usage:" in text and "--help" in text
    assert text.count("--") > 1, "a task with no options of its own"
