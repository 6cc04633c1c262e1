"""The committed reports agree with the code that writes them: the README's tables are what tasks/readme.py
makes of results/comparison.json and results/transfer/comparison.csv, each committed benchmark table is what its
task writes from the JSON beside it, and the default detector is the one the detector benchmark favours.
Rerunning a task without committing its output turns these red; `nox -s shipped` runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agegender.inference.detectors import DEFAULT_DETECTOR
from tasks import bench, bench_detectors, readme
from tests.conftest import said
from tests.test_readme import table_rows

pytestmark = pytest.mark.shipped

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_the_committed_readme_tables_are_what_the_committed_comparisons_give():
    result = runner.invoke(readme.app, ["--check"])
    assert result.exit_code == 0, said(result)
    _, block, _ = readme.split((REPO / "README.md").read_text(), REPO / "README.md")
    summary = json.loads((REPO / "results" / "comparison.json").read_text())
    assert sorted(table_rows(block)) == sorted(row["model"] for row in summary["models"])


SPEED_REPORTS = [path for path in sorted(bench.BENCH_DIR.glob("*.json"))  # other benchmarks write there too
                 if {"machine", "training", "ratios", "inference"} <= set(json.loads(path.read_text()))]


def test_the_speed_report_is_committed():
    assert SPEED_REPORTS, f"no bench.py report in {bench.BENCH_DIR}"


@pytest.mark.parametrize("report", SPEED_REPORTS, ids=lambda path: path.name)
def test_committed_speed_tables_are_what_bench_writes_from_the_committed_report(report):
    """results/bench/<device>.md, which the docs link to, is bench's own output for the JSON beside it."""
    expected = bench.markdown(json.loads(report.read_text()), report.name).rstrip() + "\n"
    assert report.with_suffix(".md").read_text() == expected, f"rerun bench or rewrite {report.with_suffix('.md')}"


DETECTOR_REPORT = bench_detectors.OUT_DIR / "detectors.json"
DETECTOR_REPORTS = sorted(bench_detectors.OUT_DIR.rglob("detectors.json"))  # --out folders too (predict-defaults)


@pytest.mark.parametrize("report", DETECTOR_REPORTS, ids=lambda path: str(path.parent.relative_to(REPO)))
def test_committed_detector_tables_are_what_the_benchmark_writes_from_its_report(report):
    expected = bench_detectors.markdown(json.loads(report.read_text()))
    assert report.with_suffix(".md").read_text() == expected, "rerun tasks/bench_detectors.py"


def test_the_default_detector_is_the_one_the_committed_report_favours():
    """Within the time target, no detector finds more faces than the default, which finds them at least as
    often as MTCNN."""
    assert DETECTOR_REPORT.exists(), f"no {DETECTOR_REPORT}: run python tasks/bench_detectors.py"
    overall = {row["detector"]: row for row in json.loads(DETECTOR_REPORT.read_text())["overall"]}
    default = overall[DEFAULT_DETECTOR]
    assert default["meets_time_target"] and default["finds_as_often_as_mtcnn"]
    assert all(row["found_rate"] <= default["found_rate"] for row in overall.values() if row["meets_time_target"])
