"""Labelled datasets besides UTKFace: a folder (or a .tar.gz / .zip of one) of images with a `labels.csv` that has
a `file` column (the image's path relative to the folder) and any of `age` (whole years), `gender` (1 female,
0 male) and `race` (UTKFace's 0-4), empty where unknown. An age known only as a range (FairFace's age groups,
Adience-style labels) goes in `age_min` and `age_max` instead (whole years, both ends included; `age_max` empty
when the range is open-ended, as in "70+"). Columns named `race_<name>` or `group_<name>` are named groups (e.g.
FairFace's `race_fairface`: White, Black, ...), kept as text for the bias tables; other columns are ignored.

prepare_data adds them to the manifest (--extra-source) and evaluate scores models on them (--dataset). Rows
that cannot be used are listed with a reason, never fatal: a malformed value, a file listed twice or outside the
folder, a missing file, an image that does not decode."""

from __future__ import annotations

import re
import shutil
import tarfile
import zipfile
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd
from PIL import Image

from agegender.cli import UserError

LABELS_FILE = "labels.csv"
LABEL_COLUMNS = ("age", "gender", "race")
AGE_RANGE_COLUMNS = ("age_min", "age_max")
GROUP_PREFIXES = ("race_", "group_")  # named group columns, for the bias tables (FairFace's race_fairface)
UTKFACE = "utkface"  # the name UTKFace's rows carry in the manifest's dataset column
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
# each label's whole-number range
LABEL_RANGES = {"age": (0, 120), "gender": (0, 1), "race": (0, 4)}


@dataclass
class LabelledDataset:
    name: str
    source: Path  # what the user gave: a folder or an archive
    root: Path  # the folder holding labels.csv; files are relative to it
    rows: pd.DataFrame  # file, age, gender, race, age_min, age_max (nullable integers), groups; usable rows only
    problems: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"} per unusable row
    listed: int = 0  # rows in labels.csv

    groups: list[str] = field(default_factory=list)  # the named group columns kept in rows

    @property
    def labels(self) -> list[str]:
        """The label columns with at least one value ("age" where any row has an age or an age range)."""
        def has(column: str) -> bool:
            return self.rows[column].notna().any() or (column == "age" and self.rows["age_min"].notna().any())

        return [column for column in LABEL_COLUMNS if has(column)]

    @property
    def has_age_ranges(self) -> bool:
        return bool(self.rows["age_min"].notna().any())


def dataset_name(path: str | Path) -> str:
    """A dataset's name from its folder or archive name: lower case, archive suffix dropped, anything but
    letters, digits, '-' and '_' turned into '-' ("celeba-10k.tar.gz" -> "celeba-10k")."""
    name = Path(path).name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^a-z0-9_-]+", "-", name).strip("-") or "dataset"


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def safe_member(name: str) -> PurePosixPath | None:
    """An archive member's path if it stays inside the target folder (no absolute path, no '..')."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


def unpack(archive: Path, target: Path) -> None:
    """Every regular file of a .tar.gz/.tgz/.tar or .zip into target, relative paths kept (members that would
    land outside it are left out)."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zipped:
                for info in zipped.infolist():
                    path = safe_member(info.filename)
                    if path is not None and not info.is_dir():
                        (target / path).parent.mkdir(parents=True, exist_ok=True)
                        (target / path).write_bytes(zipped.read(info))
        else:
            with tarfile.open(archive) as tar:
                for member in tar:
                    path = safe_member(member.name)
                    if path is not None and member.isfile():
                        (target / path).parent.mkdir(parents=True, exist_ok=True)
                        (target / path).write_bytes(tar.extractfile(member).read())
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise UserError(f"Could not read the archive {archive}: {error}.") from error


def source_signature(path: Path) -> str:
    """What changes when the source does: its resolved path, size and modification time."""
    stat = path.stat()
    return f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}"


def stage(source: Path, staging: Path, force: bool = False) -> Path:
    """The folder to read: the source folder itself, or the archive unpacked into `staging` (reused while the
    archive is unchanged)."""
    if source.is_dir():
        return source.resolve()
    if not is_archive(source):
        raise UserError(f"{source} is not a folder, .tar.gz or .zip.")
    stamp = staging / ".source"
    if not force and stamp.exists() and stamp.read_text() == source_signature(source):
        return staging.resolve()
    shutil.rmtree(staging, ignore_errors=True)
    unpack(source, staging)
    stamp.write_text(source_signature(source))
    return staging.resolve()


def find_labels(folder: Path) -> Path:
    """The folder's labels.csv, or the shallowest one below it (an archive usually wraps a top folder)."""
    if (folder / LABELS_FILE).is_file():
        return folder / LABELS_FILE
    found = sorted(folder.rglob(LABELS_FILE), key=lambda path: (len(path.parts), str(path)))
    if not found:
        raise UserError(f"{folder} has no {LABELS_FILE}: a dataset needs one with a file column and any of "
                        f"{', '.join(LABEL_COLUMNS)}.")
    return found[0]


def parse_label(text: str, column: str) -> tuple[int | None, str | None]:
    """(value, None) for a whole number in the column's range or an empty cell (None), else (None, reason)."""
    text = text.strip()
    if not text:
        return None, None
    low, high = LABEL_RANGES[column]
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if number != number or number != int(number) or not low <= number <= high:
        return None, f"{column} {text!r} is not a whole number from {low} to {high}"
    return int(number), None


def parse_age_range(min_text: str, max_text: str, age_text: str) -> tuple[tuple[int | None, int | None], str | None]:
    """((age_min, age_max), None) for a row's age range: both empty (no range), a whole-year range with
    age_min <= age_max, or age_min alone (open-ended); else ((None, None), reason)."""
    min_text, max_text = min_text.strip(), max_text.strip()
    if not min_text and not max_text:
        return (None, None), None
    low, reason = parse_label(min_text, "age")
    high, high_reason = parse_label(max_text, "age")
    if reason or high_reason:
        return (None, None), "; ".join(r.replace("age ", f"{name} ", 1) for r, name in
                                       ((reason, "age_min"), (high_reason, "age_max")) if r)
    if low is None:
        return (None, None), f"age_max {max_text!r} without an age_min"
    if high is not None and high < low:
        return (None, None), f"age range {low}-{high} ends before it starts"
    if age_text.strip():
        return (None, None), "both an age and an age range (give one)"
    return (low, high), None


def age_range_name(low, high) -> str:
    """An age range as FairFace names its groups: "20-29", or "70+" when open-ended (high missing)."""
    return f"{int(low)}+" if pd.isna(high) else f"{int(low)}-{int(high)}"


def group_columns(raw: pd.DataFrame) -> list[str]:
    """The named group columns of a labels.csv: those named race_<name> or group_<name> (FairFace's
    race_fairface), read as text."""
    return [column for column in raw.columns if column.startswith(GROUP_PREFIXES) and column != "race"]


def check_image(path: Path) -> str | None:
    """None when PIL decodes the file, else the reason it is unusable."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:
        return f"unreadable image ({type(error).__name__})"
    return None


def read_labels(labels_path: Path) -> tuple[pd.DataFrame, list[dict[str, str]], int]:
    """The labelled rows of a labels.csv (file, age, gender, race, age_min, age_max as nullable integers, then
    the named group columns as text), the rows it could not use with their reasons, and how many rows it lists.
    Files are not opened here (see check_files)."""
    try:
        raw = pd.read_csv(labels_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"{labels_path} is not a readable CSV ({str(error).splitlines()[0]}).") from error
    raw.columns = [str(column).strip().lower() for column in raw.columns]
    if "file" not in raw.columns:
        raise UserError(f"{labels_path} has no file column (its columns: {', '.join(raw.columns) or 'none'}).")
    present = [column for column in (*LABEL_COLUMNS, "age_min") if column in raw.columns]
    if not present:
        raise UserError(f"{labels_path} has none of the label columns {', '.join(LABEL_COLUMNS)} "
                        "(or an age range: age_min, age_max).")
    groups = group_columns(raw)
    root = labels_path.parent.resolve()
    rows, problems, seen = [], [], set()
    for line, record in enumerate(raw.to_dict("records"), start=2):  # line 1 is the header
        name = record["file"].strip()
        where = name or f"line {line}"
        if not name:
            problems.append({"file": where, "reason": "no file name"})
            continue
        path = safe_member(name.replace("\\", "/"))
        if path is None or not (root / path).resolve().is_relative_to(root):
            problems.append({"file": where, "reason": "path outside the dataset folder"})
            continue
        if str(path) in seen:
            problems.append({"file": where, "reason": f"listed twice (line {line} ignored)"})
            continue
        values, reasons = {}, []
        for column in LABEL_COLUMNS:
            value, reason = parse_label(record.get(column, ""), column)
            values[column] = value
            if reason:
                reasons.append(reason)
        (values["age_min"], values["age_max"]), reason = parse_age_range(
            record.get("age_min", ""), record.get("age_max", ""), record.get("age", ""))
        if reason:
            reasons.append(reason)
        if reasons:
            problems.append({"file": where, "reason": "malformed row: " + "; ".join(reasons)})
            continue
        if all(value is None for value in values.values()):
            problems.append({"file": where, "reason": "no label"})
            continue
        seen.add(str(path))
        named = {column: record[column].strip() or None for column in groups}
        rows.append({"file": str(path), **values, **named})
    frame = pd.DataFrame(rows, columns=["file", *LABEL_COLUMNS, *AGE_RANGE_COLUMNS, *groups])
    return frame.astype({column: "Int64" for column in (*LABEL_COLUMNS, *AGE_RANGE_COLUMNS)}), problems, len(raw)


def check_files(root: Path, rows: pd.DataFrame, progress=None) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """The rows whose image exists and decodes; the others as problems."""
    keep, problems = [], []
    for name in rows["file"]:
        path = root / name
        reason = "missing file" if not path.is_file() else check_image(path)
        if reason:
            problems.append({"file": name, "reason": reason})
        keep.append(reason is None)
        if progress is not None:
            progress()
    return rows[pd.Series(keep, index=rows.index, dtype=bool)].reset_index(drop=True), problems


def open_dataset(source: str | Path, staging: Path, force: bool = False, name: str | None = None,
                 progress_factory=None, limit: int | None = None, seed: int = 42,
                 only: Collection[str] | None = None) -> LabelledDataset:
    """Read a labelled dataset (a folder, or an archive unpacked into `staging`): its usable rows and the
    problems of the others. progress_factory(description, total) -> a callable advancing a bar, optional.
    `only` keeps the rows of those files; `limit` then a seeded random subset of that many labelled rows (before
    their files are checked)."""
    source = Path(source).expanduser()
    if not source.exists():
        raise UserError(f"Dataset {source} does not exist.")
    folder = stage(source, staging, force)
    labels_path = find_labels(folder)
    rows, problems, listed = read_labels(labels_path)
    if only is not None:
        rows = rows[rows["file"].isin(set(only))].reset_index(drop=True)
    if limit is not None and limit < len(rows):
        rows = rows.sample(n=limit, random_state=seed).sort_values("file").reset_index(drop=True)
    root = labels_path.parent.resolve()
    advance = progress_factory(f"checking {dataset_name(source)} images", len(rows)) if progress_factory else None
    rows, missing = check_files(root, rows, advance)
    groups = [column for column in rows.columns if column not in ("file", *LABEL_COLUMNS, *AGE_RANGE_COLUMNS)]
    return LabelledDataset(name or dataset_name(source), source, root, rows, problems + missing, listed, groups)
