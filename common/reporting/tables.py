"""Tables: one writer for the markdown tables in results files and model cards, and the rich tables printed on
the console. Cells arrive formatted as text; a column is right-aligned when its header is in `right` (rich) or
its alignment says so (markdown)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

NA = "–"  # an undefined value (NaN) or a metric the model does not have


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right_after: int | None = None) -> str:
    """A GitHub markdown table; columns after the first `right_after` are right-aligned when it is given."""
    rule = ["---" if right_after is None or index < right_after else "---:" for index in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def rich_table(title: str | None, headers: Sequence[str], rows: Sequence[Sequence[Any]],
               left: Sequence[str] | None = None, caption: str | None = None, fold: bool = False) -> Table:
    """A rich table: the columns named in `left` (default: the first) left-aligned, the others right-aligned;
    `fold` wraps long cells instead of cutting them."""
    left = [headers[0]] if left is None else left
    table = Table(title=title, caption=caption)
    for header in headers:
        table.add_column(header, justify="left" if header in left else "right",
                         overflow="fold" if fold else "ellipsis")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    return table


def is_missing(value: Any) -> bool:
    """Whether a cell's value is absent: None (an object column with no value at all) or a float NaN."""
    return value is None or (isinstance(value, float) and value != value)


def number(value: Any, fmt: str = "{:.4f}") -> str:
    """A value as a cell: NA for None or NaN, `fmt` for numbers, str() for anything else."""
    if is_missing(value):
        return NA
    return fmt.format(value) if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def best_values(rows: list[dict], columns) -> dict[str, float]:
    """Per column (key, header, format, better), the best value among the rows; better is "max", "min" or None."""
    best = {}
    for key, _, _, better in columns:
        values = [row[key] for row in rows if key in row and row[key] == row[key] and row[key] is not None]
        if values and better:
            best[key] = max(values) if better == "max" else min(values)
    return best


def render(rows: list[dict], columns, title: str, markdown: bool = False,
           lead=(("model", "model"), ("image_size", "px"))) -> Table | str:
    """Dict rows as a rich table (or a markdown table) with the best value of each column marked: `lead` is
    (key, header) of the leading text columns, `columns` (key, header, format, better) of the figures."""
    rows = [row for row in rows if any(key in row for key, *_ in columns)]
    best = best_values(rows, columns)
    headers = [header for _, header in lead] + [header for _, header, _, _ in columns]
    body = []
    for row in rows:
        cells = [str(row.get(key, "")) for key, _ in lead]
        for key, _, fmt, _ in columns:
            text = number(row.get(key), fmt)
            if key in best and row.get(key) == best[key] and len(rows) > 1:
                text = f"**{text}**" if markdown else f"[bold green]{text} ★[/]"
            cells.append(text)
        body.append(cells)
    if markdown:
        return markdown_table(headers, body)
    return rich_table(title, headers, body)


def frame_cells(frame, formats: dict[str, str]) -> list[list[str]]:
    """A data frame's rows as cells: floats through formats[column] (default 4 decimals), NaN as NA."""
    return [[number(value, formats.get(column, "{:.4f}")) if isinstance(value, float) else str(value)
             for column, value in row.items()] for _, row in frame.iterrows()]


def frame_markdown(frame, formats: dict[str, str]) -> str:
    return markdown_table(list(frame.columns), frame_cells(frame, formats))


def frame_rich(frame, title: str, formats: dict[str, str], short: dict[str, str] | None = None) -> Table:
    """A compact rich table of a data frame: headers shortened through `short`, text columns left-aligned,
    long cells folded instead of cut."""
    import pandas as pd

    short = short or {}
    headers = [short.get(column, column) for column in frame.columns]
    left = [short.get(c, c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    return rich_table(title, headers, frame_cells(frame, formats), left=left, fold=True)
