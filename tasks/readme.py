"""The README's headline results table, generated from results/comparison.json (written by tasks/compare.py).

    python tasks/readme.py            # rewrite the table between the README's results markers
    python tasks/readme.py --check    # exit 1 if the README's table is not what comparison.json gives

Only the lines between `<!-- results:start -->` and `<!-- results:end -->` change. The test suite runs the
check, so a new comparison committed without rerunning this fails it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from agegender.cli import UserError, console, user_errors, write_text
from agegender.data import REPO_ROOT, RESULTS_DIR
from agegender.metrics import AGE_COLUMNS, COST_COLUMNS, GENDER_COLUMNS
from agegender.tables import render

README = REPO_ROOT / "README.md"
COMPARISON = RESULTS_DIR / "comparison.json"
START, END = "<!-- results:start -->", "<!-- results:end -->"
LEAD = (("model", "model"), ("task", "task"), ("image_size", "px"))
# (key in comparison.json's model rows, README header); formats and which way is better come from compare
HEADLINE = (("accuracy", "gender accuracy"), ("roc_auc", "ROC AUC"), ("mae", "age MAE (years)"),
            ("cs5", "CS@5"), ("backend", "runs"), ("size_mb", "file MB"), ("ms_batch1", "CPU ms/face (batch 1)"))

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def headline(summary: dict[str, Any]) -> str:
    """The block between the markers: one line on what was measured, then the table."""
    known = {key: (fmt, better) for key, _, fmt, better in GENDER_COLUMNS + AGE_COLUMNS + COST_COLUMNS}
    columns = [(key, header, *known[key]) for key, header in HEADLINE]
    settings = summary["settings"]
    faces = f"{settings['test_faces']:,} faces" + (" (a seeded subset)" if settings.get("limit") else "")
    intro = (f"UTKFace test split, {faces}; `runs`: the backend each model ran (its fastest checked export, "
             "else Keras). Written by `python tasks/readme.py` from `results/comparison.json`; best value per "
             "column in **bold**.")
    return f"{intro}\n\n{render(summary['models'], columns, '', markdown=True, lead=LEAD)}"


def read_comparison(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path} does not exist: run `python tasks/compare.py` first.")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not JSON ({error}).") from error
    if not isinstance(summary, dict) or "models" not in summary or "test_faces" not in summary.get("settings", {}):
        raise UserError(f"{path} is not a comparison written by tasks/compare.py (no models or settings).")
    return summary


def split(text: str, path: Path) -> tuple[str, str, str]:
    """(before the start marker, between the markers, from the end marker on)."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise UserError(f"{path} needs one `{START}` line and one `{END}` line after it.")
    head, rest = text.split(START, 1)
    block, tail = rest.split(END, 1)
    return head, block, tail


def filled(text: str, block: str, path: Path) -> str:
    head, _, tail = split(text, path)
    return f"{head}{START}\n{block}\n{END}{tail}"


@app.command()
def main(
    check: Annotated[bool, typer.Option(
        help="Change nothing; exit 1 if the README's table differs from what the comparison gives.")] = False,
    comparison: Annotated[Path, typer.Option(help="compare's JSON summary.")] = COMPARISON,
    readme: Annotated[Path, typer.Option(help="The file holding the results markers.")] = README,
) -> None:
    """Fill the README's headline results table from compare's results/comparison.json."""
    with user_errors():
        if not readme.exists():
            raise UserError(f"{readme} does not exist.")
        text = readme.read_text()
        wanted = filled(text, headline(read_comparison(comparison)), readme)
        if check:
            if wanted != text:
                raise UserError(f"The results table in {readme} is not what {comparison} gives: run "
                                "`python tasks/readme.py`.")
            console.print(f"The results table in {readme} matches {comparison}.")
        elif wanted == text:
            console.print(f"The results table in {readme} is already up to date.")
        else:
            write_text(readme, wanted)
            console.print(f"Wrote the results table in {readme} from {comparison}.")


if __name__ == "__main__":
    app()
