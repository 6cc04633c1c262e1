"""Batch inference: age and gender for every face in image files and folders, with any saved model.

    python tasks/predict.py results/models/multitask photos/ --out predictions.csv
    python tasks/predict.py results/models/gender face_crop.jpg --no-detect
    python tasks/predict.py results/models/multitask photos/ --detector mtcnn
    python tasks/predict.py results/models/multitask photos/ --annotate annotated/ --heatmaps heatmaps/
    python tasks/predict.py results/models/multitask photos/ --out part-1.csv --shard 1/4 --resume

Each face gets its age band and, when the model's interval is calibrated (tasks/calibrate.py), age_low and
age_high: whole years holding the true age 80% of the time on the validation split. --annotate writes a copy of
each photo with a numbered box and label per face; --heatmaps the aligned crop of each face with a Grad-CAM
heatmap per output (computed from model.keras whatever the backend).

A folder with exports from tasks/export.py runs the fastest that matches model.keras (model-int8.tflite, else
model.tflite; int8 is about 4x faster per face than Keras on a 2-core CPU); --backend keras|tflite|tflite-int8 chooses.

At scale (docs/scaling.md): with --out, rows are appended to <out>.partial a few photos at a time and it is
renamed to <out> when every file is done, so memory stays bounded however many photos there are; --resume
continues an interrupted run's <out>.partial (or adds new files to a finished <out>) without repeating a
file; --shard I/N keeps the I-th of N deterministic parts of the inputs, so N jobs' CSVs concatenate to the
whole; --files-from reads a list of paths; images are decoded on --workers threads while the model runs.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Annotated

import pandas as pd
import typer
from PIL import Image
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from agegender.cli import UserError, check_choice, console, err_console, user_errors
from agegender.data.images import read_image
from agegender.inference.detectors import DEFAULT_DETECTOR, DETECTORS
from agegender.inference.drawing import gender_text
from agegender.inference.gender_calibration import check_min_confidence
from agegender.inference.gradcam import load_gradcam
from agegender.inference.photos import AnnotatedCopies, HeatmapFiles, collect_images, each, predict_files
from agegender.inference.predictor import Predictor
from agegender.inference.runtime import BACKENDS
from agegender.reporting.tables import is_missing, rich_table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
FLOAT_FORMAT = "%.4f"


def cell(column: str, value) -> str:
    if is_missing(value):
        return ""
    if column == "file":
        return Path(value).name
    if column == "age":
        return f"{value:.1f}" if isinstance(value, float) else str(value)
    if column in ("p_female", "confidence"):
        return f"{value:.3f}"
    return f"{value:.0f}" if isinstance(value, float) else str(value)


def print_table(frame: pd.DataFrame) -> None:
    """The rows on the console, narrower than the CSV: the interval beside the age, the box in one cell."""
    shown = frame.copy()
    if "gender_certain" in shown:
        shown["gender"] = ["" if is_missing(p_female) else gender_text(row) for row, p_female in
                           zip(shown.to_dict("records"), shown["p_female"], strict=True)]
        shown = shown.drop(columns="gender_certain")
    if "age_low" in shown:
        interval = ["" if is_missing(low) else f" ({low:.0f}–{high:.0f})" for low, high in
                    zip(shown["age_low"], shown["age_high"], strict=True)]
        shown["age"] = [cell("age", age) + ("" if is_missing(age) else extra) for age, extra in
                        zip(shown["age"], interval, strict=True)]
        shown = shown.drop(columns=["age_low", "age_high"]).rename(columns={"age_band": "band"})
    if "x" in shown:
        shown.insert(shown.columns.get_loc("x"), "box", [
            "" if is_missing(x) else f"{x:.0f},{y:.0f} {w:.0f}x{h:.0f}"
            for x, y, w, h in shown[["x", "y", "width", "height"]].itertuples(index=False)])
        shown = shown.drop(columns=["x", "y", "width", "height"])
    rows = [[cell(column, row[column]) for column in shown.columns] for _, row in shown.iterrows()]
    console.print(rich_table(f"{len(frame)} prediction(s)", list(shown.columns), rows,
                             left=("file", "gender", "band", "reason")))


# ---------------------------------------------------------------- the inputs: listed, sharded


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """'I/N' (1 <= I <= N) as (I, N)."""
    if spec is None:
        return None
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        index, count = 0, 0
    if not 1 <= index <= count:
        raise UserError(f"--shard takes I/N with 1 <= I <= N, e.g. 1/4 for the first of four parts; got {spec!r}.")
    return index, count


def in_shard(path: Path, index: int, count: int) -> bool:
    """Whether a file belongs to part `index` of `count`: a hash of its path as the CSV writes it, so the split
    does not depend on the order the files are listed in, and the parts of the same command never overlap."""
    return zlib.crc32(str(path).encode()) % count == index - 1


def list_files(paths: list[Path], files_from: Path | None) -> list[Path]:
    """The images given (folders searched), then those named in the --files-from list, one path a line."""
    listed: list[Path] = []
    if files_from is not None:
        if not files_from.is_file():
            raise UserError(f"The file list {files_from} does not exist.")
        with files_from.open(encoding="utf-8") as lines:
            listed = [Path(line.strip()) for line in lines if line.strip()]
        if not listed:
            raise UserError(f"The file list {files_from} names no files.")
    if not paths and not listed:
        raise UserError("Give image files or folders, or --files-from a list of them.")
    return [*collect_images(paths), *listed] if paths else listed


# ---------------------------------------------------------------- decoding ahead of the model


class DecodeAhead:
    """A `read` for predict_files that decodes the next `ahead` files on a thread pool while the model works on
    the current one (PIL releases the GIL while it decodes). It must be called in the order of `files`; each
    call advances `progress`, so the rate counts files as they reach the model."""

    def __init__(self, files: list[Path], workers: int, ahead: int, progress: Progress | None = None,
                 task=None):
        self.files, self.progress, self.task = iter(files), progress, task
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="decode") if workers > 0 else None
        self.queued: deque[tuple[Path, Future]] = deque()
        for _ in range(ahead if self.pool else 0):
            self._queue_next()

    def _queue_next(self) -> None:
        path = next(self.files, None)
        if path is not None:
            self.queued.append((path, self.pool.submit(read_image, path)))

    def __call__(self, path: Path) -> Image.Image:
        if self.progress is not None:
            self.progress.advance(self.task)
        if self.pool is None:
            return read_image(path)
        queued, future = self.queued.popleft()
        if queued != path:
            raise RuntimeError(f"DecodeAhead read {path} out of order (expected {queued}).")
        self._queue_next()
        return future.result()

    def close(self) -> None:
        if self.pool is not None:
            for _, future in self.queued:
                future.cancel()
            self.pool.shutdown(wait=True)


def chunks(files: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(files), size):
        yield files[start:start + size]


# ---------------------------------------------------------------- the output CSV, written as rows come


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def done_files(partial: Path, columns: list[str], finished: bool = False) -> set[str]:
    """The files an earlier run finished in `partial`, after cutting off what a kill may have left unfinished:
    a partly written last line, and every row of the last file (whose other faces may be missing), which is
    then predicted again; unless the run `finished`, so its last file is whole."""
    with partial.open("rb+") as handle:
        data = handle.read()
        header_end = data.find(b"\n") + 1
        if header_end == 0:  # killed before the header was out: start the file again
            handle.seek(0)
            handle.truncate()
            handle.write((",".join(columns) + "\n").encode())
            return set()
        if data[:header_end].decode().rstrip("\r\n").split(",") != columns:
            raise UserError(f"{partial} was written with other columns than this model and --detect setting "
                            "give; delete it or use another --out.")
        end = data.rfind(b"\n") + 1
        handle.truncate(end)  # a partly written last line goes
    names = pd.read_csv(partial, usecols=["file"], dtype=str)["file"].tolist()
    if len(names) != data.count(b"\n", header_end, end):
        raise UserError(f"{partial} has rows that span lines (a file name with a line break?); delete it to "
                        "start over.")
    last_rows = 0
    while not finished and last_rows < len(names) and names[-1 - last_rows] == names[-1]:
        last_rows += 1
    cut = end
    for _ in range(last_rows):
        cut = data.rfind(b"\n", 0, cut - 1) + 1
    with partial.open("rb+") as handle:
        handle.truncate(cut)
    return set(names[:len(names) - last_rows])


def append_rows(handle: IO[str], frame: pd.DataFrame) -> None:
    """A chunk's rows, flushed to disk, so a kill loses at most the chunk being predicted."""
    if "gender_certain" in frame:
        frame = frame.assign(gender_certain=frame["gender_certain"].map({True: "true", False: "false"}))
    frame.to_csv(handle, header=False, index=False, float_format=FLOAT_FORMAT)
    handle.flush()
    os.fsync(handle.fileno())


class RateColumn(ProgressColumn):
    """Files per second over rich's recent window."""

    def render(self, task: Task) -> Text:
        return Text("? files/s" if task.speed is None else f"{task.speed:.1f} files/s", style="progress.data.speed")


@app.command()
def main(
    model_dir: Annotated[Path, typer.Argument(help="A saved model folder, e.g. results/models/multitask.")],
    paths: Annotated[list[Path] | None, typer.Argument(
        help="Image files and/or folders of images.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        help="Write the predictions to this CSV (streamed through <out>.partial) instead of a table.")] = None,
    detect: Annotated[bool, typer.Option(
        "--detect/--no-detect", help="Find and align faces (default), or treat each image as an aligned face crop.")]
    = True,
    batch_size: Annotated[int, typer.Option(min=1, help="Faces per model call.")] = 64,
    backend: Annotated[str, typer.Option(
        help="auto (the fastest checked export the folder has: tflite-int8, tflite, else keras), keras, tflite "
             "or tflite-int8.")] = "auto",
    detector: Annotated[str, typer.Option(
        help=f"Face detector: {', '.join(DETECTORS)} (tasks/bench_detectors.py compares them).")]
    = DEFAULT_DETECTOR,
    annotate: Annotated[Path | None, typer.Option(
        help="Write a copy of each photo into this folder with a numbered box and label per face.")] = None,
    heatmaps: Annotated[Path | None, typer.Option(
        help="Write each face's aligned crop with a Grad-CAM heatmap per output into this folder.")] = None,
    heatmap_layer: Annotated[str | None, typer.Option(
        help="Layer the heatmaps are taken at (its name, or path through nested models); default the last "
             "convolutional layer.")] = None,
    files_from: Annotated[Path | None, typer.Option(
        help="A text file of image paths, one a line (for lists too long for the command line).")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue an interrupted run of the same command from <out>.partial (or add files that a finished "
             "<out> lacks): files already written are skipped.")] = False,
    shard: Annotated[str | None, typer.Option(
        help="I/N: predict only the I-th of N deterministic parts of the inputs (N jobs, one CSV each, "
             "concatenate to the whole).")] = None,
    workers: Annotated[int, typer.Option(
        min=0, help="Threads decoding the next images while the model runs (0: decode in turn).")]
    = min(4, os.cpu_count() or 1),
    chunk: Annotated[int, typer.Option(
        min=1, help="Photos predicted between two writes of --out (a kill loses at most this many).")] = 64,
    min_gender_confidence: Annotated[float | None, typer.Option(
        help="Confidence max(p_female, 1 - p_female), from 0.5 to 1, at and above which a gender is certain "
             "(gender_certain); default the model's threshold, chosen on validation by tasks/calibrate.py.")]
    = None,
) -> None:
    """Predict age and/or gender for every face in the given images."""
    check_choice(backend, BACKENDS, "--backend")
    check_choice(detector, tuple(DETECTORS), "--detector")
    with user_errors():
        check_min_confidence(min_gender_confidence)
        if heatmap_layer is not None and heatmaps is None:
            raise UserError("--heatmap-layer chooses the layer of --heatmaps; give --heatmaps DIR too.")
        if resume and out is None:
            raise UserError("--resume continues the CSV of --out; give --out too.")
        parts = parse_shard(shard)
        files = list_files(list(paths or []), files_from)
        mine = [path for path in files if in_shard(path, *parts)] if parts else files
        predictor = Predictor.load(model_dir, backend)
        predictor.min_gender_confidence = min_gender_confidence
        # output names over every input, so that shards and resumed runs name the same photo alike
        copies = AnnotatedCopies(annotate, files) if annotate is not None else None
        maps = HeatmapFiles(heatmaps, files, load_gradcam(model_dir, heatmap_layer), detect) if heatmaps else None
        columns = list(predict_files(predictor, [], detect)[0].columns)

        handle, done = None, set()
        if out is not None:
            partial = partial_path(out)
            if partial.exists() and not resume:
                raise UserError(f"{partial} holds the rows of an interrupted run; add --resume to continue it, "
                                "or delete it to start over.")
            finished = resume and not partial.exists() and out.exists()
            if finished:
                out.replace(partial)  # a finished run: its rows stay, files it lacks are added
            if resume and partial.exists():
                done = done_files(partial, columns, finished)
            else:
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(",".join(columns) + "\n")
            handle = partial.open("a", encoding="utf-8", newline="")
        todo = [path for path in mine if str(path) not in done]
        if done:
            console.print(f"Resuming: {len(mine) - len(todo)} file(s) already in {partial}, {len(todo)} to go.")

        frames, skipped, written = [], [], 0
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
                      transient=True) as progress:
            task = progress.add_task("predicting", total=len(todo))
            reader = DecodeAhead(todo, workers, 2 * workers, progress, task)
            try:
                for part in chunks(todo, chunk):
                    frame, unreadable = predict_files(predictor, part, detect, batch_size, None, detector,
                                                      on_photo=each(copies, maps), read=reader)
                    skipped += unreadable
                    written += len(frame)
                    if handle is not None:
                        append_rows(handle, frame)
                    else:
                        frames.append(frame)
            finally:
                reader.close()
                if handle is not None:
                    handle.close()
        for handler, what in ((copies, "annotated photo(s)"), (maps, "heatmap(s)")):
            if handler is not None:
                console.print(f"Wrote {handler.written} {what} to {handler.folder}.")
        for message in skipped:
            err_console.print(f"[yellow]skipped[/] {message}")
        if written == 0 and not done and mine:
            if out is not None:
                partial.unlink(missing_ok=True)
            raise UserError(f"None of the {len(mine)} file(s) could be read as an image.")
        if out is not None:
            partial.replace(out)
            console.print(f"Wrote {written} row(s) to {out}"
                          + (f" (after the {len(done)} file(s) already there)." if done else "."))
        else:
            print_table(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns))


if __name__ == "__main__":
    app()
