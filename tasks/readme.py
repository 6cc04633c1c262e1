"""The README's headline results table, generated from results/comparison.json (written by tasks/compare.py),
its everyday-photos table, from results/evaluations/fairface-18k-test/evaluation.json (`evaluate.py --dataset
fairface-18k.tar.gz --split test`), and its face-pretraining table, from results/transfer/comparison.csv
(`finetune_transfer.py --table-only`).

    python tasks/readme.py            # rewrite the tables between the README's markers
    python tasks/readme.py --check    # exit 1 if the README's tables are not what the results give

Only the lines between `<!-- results:start -->` and `<!-- results:end -->` change (and, where the README has
them, between `<!-- everyday:start -->` and `<!-- everyday:end -->` and between `<!-- transfer:start -->` and
`<!-- transfer:end -->`). `nox -s shipped` runs the check, so new
results committed without rerunning this fail it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer

from agegender.cli import UserError, console, user_errors, write_text
from agegender.data.paths import REPO_ROOT, RESULTS_DIR
from agegender.reporting.metrics import AGE_COLUMNS, COST_COLUMNS, GENDER_COLUMNS
from agegender.reporting.tables import render

README = REPO_ROOT / "README.md"
COMPARISON = RESULTS_DIR / "comparison.json"
TRANSFER = RESULTS_DIR / "transfer" / "comparison.csv"
EVERYDAY = RESULTS_DIR / "evaluations" / "fairface-18k-test" / "evaluation.json"
EVERYDAY_START, EVERYDAY_END = "<!-- everyday:start -->", "<!-- everyday:end -->"
SPREAD_GROUPING = "race_fairface, age 13+"  # the gender spread across FairFace's seven groups among adults
START, END = "<!-- results:start -->", "<!-- results:end -->"
TRANSFER_START, TRANSFER_END = "<!-- transfer:start -->", "<!-- transfer:end -->"
REFERENCE_MARK = "reference"  # the weights label of a model trained from random initialisation
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


def pretraining(frame: pd.DataFrame) -> str:
    """The block between the transfer markers: each transfer model on the same test faces, and the gain of the
    best pretrained one over the best trained from random initialisation."""
    if frame["test faces"].nunique() != 1:
        raise UserError("The transfer comparison scores its models on different test faces: run "
                        "`python tasks/finetune_transfer.py --table-only`.")
    rows = [[row["model"], row["weights"], f"{row['train images']:,}", f"{row['age MAE']:.2f}",
             f"{row['gender accuracy']:.1%}"] for _, row in frame.iterrows()]
    lines = [f"Model 4 on the same {int(frame['test faces'].iloc[0]):,} UTKFace test faces "
             "(`python tasks/finetune_transfer.py --table-only`):", "",
             "| model | starting weights | train images | age MAE (years) | gender accuracy |",
             "|---|---|---|---|---|", *("| " + " | ".join(cells) + " |" for cells in rows)]
    reference = frame["weights"].str.contains(REFERENCE_MARK)
    if reference.any() and (~reference).any():
        best, scratch = frame[~reference].iloc[0], frame[reference].iloc[0]
        lines += ["", f"Face pretraining gain: {scratch['age MAE'] - best['age MAE']:.2f} years of age MAE and "
                      f"{100 * (best['gender accuracy'] - scratch['gender accuracy']):.1f} points of gender "
                      f"accuracy (`{best['model']}` over `{scratch['model']}`)."]
    return "\n".join(lines)


def everyday(summary: dict[str, Any]) -> str:
    """The block between the everyday markers: each model on the held-out FairFace photos through the photo path,
    beside the UTKFace table."""
    spreads = {(gap["model"], gap["grouping"], gap["metric"]): gap for gap in summary.get("gaps", [])}
    rows = []
    for model, found in summary["models"].items():
        metrics, spread = found["metrics"], spreads.get((model, SPREAD_GROUPING, "accuracy"))
        cells = [model, f"{metrics['accuracy']:.1%}" if "accuracy" in metrics else "–",
                 f"{metrics['age_group_accuracy']:.1%}" if "age_group_accuracy" in metrics else "–",
                 f"{metrics['years_outside']:.2f}" if "years_outside" in metrics else "–",
                 f"{100 * spread['gap']:.1f} ({spread['worst_group']} .. {spread['best_group']})" if spread else "–"]
        rows.append("| " + " | ".join(cells) + " |")
    intro = (f"Everyday photos: FairFace's held-out test part ({summary['images']:,} photos of every race and age, "
             f"age groups; {summary['faces_found']:,} faces found) through `predict`'s photo path, from "
             f"`{EVERYDAY.relative_to(REPO_ROOT)}` (`tasks/evaluate.py --split test`).")
    return "\n".join([intro, "", "| model | gender accuracy | age group right | years outside the group | "
                                  "gender spread across 7 groups, 13+ (points) |", "|---|---|---|---|---|", *rows])


def read_json_summary(path: Path, command: str, written_by: str, complete) -> dict[str, Any]:
    """A task's JSON summary, or one sentence saying which command writes it (missing) or that it is not one
    (unreadable, or `complete(summary)` is false)."""
    if not path.exists():
        raise UserError(f"{path} does not exist: run `{command}` first.")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not JSON ({error}).") from error
    if not isinstance(summary, dict) or not complete(summary):
        raise UserError(f"{path} is not {written_by}.")
    return summary


def read_everyday(path: Path) -> dict[str, Any]:
    return read_json_summary(path, "python tasks/evaluate.py MODELS --dataset fairface-18k.tar.gz --split test",
                             "an evaluation written by tasks/evaluate.py",
                             lambda summary: "models" in summary and "faces_found" in summary)


def read_transfer(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise UserError(f"{path} does not exist: run `python tasks/finetune_transfer.py --table-only` first.")
    frame = pd.read_csv(path)
    if not {"model", "weights", "age MAE", "gender accuracy", "test faces"} <= set(frame.columns):
        raise UserError(f"{path} is not a comparison written by tasks/finetune_transfer.py.")
    return frame


def read_comparison(path: Path) -> dict[str, Any]:
    return read_json_summary(path, "python tasks/compare.py",
                             "a comparison written by tasks/compare.py (no models or settings)",
                             lambda summary: "models" in summary and "test_faces" in summary.get("settings", {}))


def split(text: str, path: Path, start: str = START, end: str = END) -> tuple[str, str, str]:
    """(before the start marker, between the markers, from the end marker on)."""
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise UserError(f"{path} needs one `{start}` line and one `{end}` line after it.")
    head, rest = text.split(start, 1)
    block, tail = rest.split(end, 1)
    return head, block, tail


def filled(text: str, block: str, path: Path, start: str = START, end: str = END) -> str:
    head, _, tail = split(text, path, start, end)
    return f"{head}{start}\n{block}\n{end}{tail}"


@app.command()
def main(
    check: Annotated[bool, typer.Option(
        help="Change nothing; exit 1 if the README's table differs from what the comparison gives.")] = False,
    comparison: Annotated[Path, typer.Option(help="compare's JSON summary.")] = COMPARISON,
    transfer: Annotated[Path, typer.Option(help="finetune_transfer's comparison CSV.")] = TRANSFER,
    everyday_photos: Annotated[Path, typer.Option(help="evaluate's JSON summary of FairFace's test part.")]
    = EVERYDAY,
    readme: Annotated[Path, typer.Option(help="The file holding the results markers.")] = README,
) -> None:
    """Fill the README's headline results table from compare's results/comparison.json (and its everyday-photos
    table from evaluate's FairFace test evaluation, its face-pretraining table from
    results/transfer/comparison.csv)."""
    with user_errors():
        if not readme.exists():
            raise UserError(f"{readme} does not exist.")
        text = readme.read_text()
        wanted = filled(text, headline(read_comparison(comparison)), readme)
        if EVERYDAY_START in text or EVERYDAY_END in text:
            wanted = filled(wanted, everyday(read_everyday(everyday_photos)), readme, EVERYDAY_START, EVERYDAY_END)
        if TRANSFER_START in text or TRANSFER_END in text:
            wanted = filled(wanted, pretraining(read_transfer(transfer)), readme, TRANSFER_START, TRANSFER_END)
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
