"""The main job: train every shipped model from its recipe into a run folder, and promote a run to
results/models/<name> only when it beats the model there on the validation split.

    python tasks/train_all.py                     # every recipe in recipes/ (nox -s train_all)
    python tasks/train_all.py --only multitask    # one of them
    python tasks/train_all.py --quick             # the whole chain on tiny data, into build/train_all-quick/
    python tasks/train_all.py --dry-run           # the plan and its time estimate only

Before starting it prints what it will train and how long that should take (each recipe's epochs times the
seconds per epoch recorded by the model it may replace, else a stated default). Each recipe's trainer (the
family's script, agegender.models.registry) runs as a user would run it, with --recipe, into
results/runs/<name>/<UTC time>/: model/, its TensorBoard logs and train.log. The run and the current model are
then scored on the validation split by the family's goal and shown side by side; the run replaces the current
model (an atomic folder swap) only when it is strictly better. At the end the promoted models are exported
(TFLite) and compare and the README's results table are rerun.

A train_all that is killed (Ctrl-C, a lost machine) continues when the same command runs again: results/runs/
train_all.json records its plan and each job's run folder and outcome, so the rerun skips the jobs already judged
and sends the interrupted one back to its own run folder, where its trainer resumes from its last finished epoch
(--no-resume starts afresh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from agegender.cli import UserError, console, fail, user_errors, write_json
from agegender.data.datasets import UTKFACE
from agegender.data.manifest import file_sha256
from agegender.data.paths import DATA_DIR, REPO_ROOT, RESULTS_DIR
from agegender.models.folders import METADATA_FILE, METRICS_FILE, is_complete, read_metadata, run_path, staging_dir
from agegender.models.registry import FAMILIES, RECIPES_DIR, Family
from agegender.reporting.tables import number, rich_table
from agegender.training.recipes import Recipe, read_recipe

QUICK_RESULTS_DIR = REPO_ROOT / "build" / "train_all-quick"
QUICK_COMPARE = ("--limit", "200", "--robustness-faces", "50")  # compare on a test subset in a smoke run
QUICK_EXPORT = ("--faces", "50")
STARTUP_SECONDS = 30  # a trainer's start: Python, TensorFlow, the image cache
DEFAULT_EPOCH_SECONDS = 150.0  # a 128 px CNN epoch on 2 cores, when no model has recorded its own
DEFAULT_RUN_SECONDS = 300.0  # a run without epochs (the ensemble), when none has recorded its time
QUICK_RUN_SECONDS = 60.0  # a --quick run when no earlier one has recorded its time
LOG_TAIL = 15  # lines of train.log shown when a trainer fails
SESSION_FILE = "train_all.json"  # in <results>/runs: the last train_all's plan and how far it got
ZERO_SHOT_QUICK_LIMIT = 256  # a --quick run scores a zero-shot model on this many images
QUICK_PREPARE_LIMIT = 1000  # a --quick run prepares other crops for a stratified subset of this many images

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


SETTING_FLAGS = {"--epochs": "epochs", "--fine-tune-epochs": "fine_tune_epochs", "--image-size": "image_size",
                 "--limit": "limit"}


@dataclass
class Job:
    """One recipe's run: the flags given on top of the recipe, the settings they make, what it is expected to
    cost, where it goes and what came of it."""

    recipe: Recipe
    family: Family
    flags: list[str]
    settings: dict[str, Any]  # the recipe's settings with the flags applied, and "limit"
    estimate: float = 0.0
    basis: str = ""  # where the estimate comes from
    run: Path | None = None
    seconds: float = 0.0
    outcome: str = "not run"  # promoted, kept, failed
    scores: dict[str, float | None] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.recipe.name


# ---------------------------------------------------------------- the plan


def planned_epochs(settings: dict[str, Any]) -> int:
    return int(settings.get("epochs") or 0) + int(settings.get("fine_tune_epochs") or 0)


def quick_flags(recipe: Recipe, family: Family) -> tuple[str, ...]:
    """The family's smoke-run flags; a zero-shot model (the Cydral networks: nothing is trained) keeps its recipe's
    weights and size and is scored on a subset only."""
    from agegender.models.backbones import resolve_backbone

    backbone = recipe.settings.get("backbone")
    if backbone and resolve_backbone(backbone).zero_shot:
        return ("--limit", str(ZERO_SHOT_QUICK_LIMIT))
    return family.quick


def make_job(recipe: Recipe, quick: bool, limit: int | None) -> Job:
    """The flags given on top of the recipe (the family's quick ones, then --limit; the last of a flag wins, as
    on a command line) and the settings they make; the run is judged on the validation subset its limit gives."""
    family = FAMILIES[recipe.family]
    flags = [*(quick_flags(recipe, family) if quick else ()), *(["--limit", str(limit)] if limit else [])]
    settings = {**recipe.settings, "limit": None}
    for flag, value in zip(flags, flags[1:], strict=False):
        if flag in SETTING_FLAGS:
            settings[SETTING_FLAGS[flag]] = int(value)
    return Job(recipe, family, flags, settings)


def estimate(job: Job, models_dir: Path, quick: bool) -> tuple[float, str]:
    """Seconds the run should take, and why: its epochs x the seconds per epoch the current model recorded;
    else the current model's recorded training time; else a stated default."""
    folder = models_dir / job.name
    metadata = read_metadata(folder) if (folder / METADATA_FILE).exists() else {}
    epochs, per_epoch = planned_epochs(job.settings), metadata.get("seconds_per_epoch")
    if not quick and epochs and per_epoch:
        return STARTUP_SECONDS + epochs * float(per_epoch), f"{epochs} epochs x {per_epoch:.0f} s (current model)"
    if metadata.get("train_seconds") and (quick or not epochs):
        return STARTUP_SECONDS + float(metadata["train_seconds"]), "the current model's training time"
    if quick:
        return QUICK_RUN_SECONDS, f"default {QUICK_RUN_SECONDS:.0f} s per smoke run"
    if epochs:
        seconds = STARTUP_SECONDS + epochs * DEFAULT_EPOCH_SECONDS
        return seconds, f"{epochs} epochs x {DEFAULT_EPOCH_SECONDS:.0f} s (default)"
    return DEFAULT_RUN_SECONDS, f"default {DEFAULT_RUN_SECONDS:.0f} s"


def plan(recipes_dir: Path, only: list[str] | None, models_dir: Path, quick: bool = False,
         limit: int | None = None) -> list[Job]:
    """One job per recipe (or per recipe named by --only), in the registry's family order, so that an
    ensemble comes after the models it is made of."""
    paths = sorted(Path(recipes_dir).glob("*.toml"))
    if not paths:
        raise UserError(f"No recipes (*.toml) in {recipes_dir}.")
    recipes = {path.stem: path for path in paths}
    unknown = [name for name in only or [] if name not in recipes]
    if unknown:
        raise UserError(f"No recipe {unknown[0]!r} in {recipes_dir}; there are {', '.join(recipes)}.")
    chosen = [read_recipe(recipes[name]) for name in (dict.fromkeys(only) if only else recipes)]
    order = list(FAMILIES)
    chosen.sort(key=lambda recipe: (order.index(recipe.family), recipe.name))
    jobs = [make_job(recipe, quick, limit) for recipe in chosen]
    for job in jobs:
        job.estimate, job.basis = estimate(job, models_dir, quick)
    return jobs


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{max(seconds, 0) / 60:.1f} min"


def print_plan(jobs: list[Job], results_dir: Path) -> None:
    rows = [[job.name, job.family.name, str(planned_epochs(job.settings) or "-"),
             str(job.settings.get("image_size", "-")), str(job.settings["limit"] or "all"), duration(job.estimate),
             job.basis] for job in jobs]
    console.print(rich_table(f"train_all: {len(jobs)} model(s) into {results_dir / 'runs'}",
                             ["recipe", "family", "epochs", "px", "images", "estimate", "from"], rows,
                             left=("recipe", "family", "from"), fold=True))
    console.print(f"Estimated total: {duration(sum(job.estimate for job in jobs))}.")


# ---------------------------------------------------------------- one run


def job_data_dir(job: Job, data_dir: Path, quick: bool) -> Path:
    """The prepared data a recipe trains on: data_dir, or for a recipe whose [data] asks for other UTKFace crops
    or extra datasets the sibling folder <data_dir>-<crops>[+<extra>...], prepared here (from the same source)
    unless it already holds them for the same split (a --quick run: for the same subset)."""
    from agegender.data.manifest import data_state
    from agegender.training.recipes import (
        holds_recipe_data,
        prepare_arguments,
        prepared_sibling,
        recipe_data_dir,
        recipe_data_text,
        recipe_sources,
    )

    data = job.recipe.data
    if holds_recipe_data(data_dir, data):
        return data_dir
    limit = QUICK_PREPARE_LIMIT if quick else data_state(data_dir)["limit"]
    found = prepared_sibling(data_dir, data, limit)
    if found is not None:
        return found
    folder = recipe_data_dir(data_dir, data)
    missing = [source for source in recipe_sources(data) if not source.exists()]
    if missing:
        raise UserError(f"The {job.name} recipe trains on {missing[0]}, which is not here: put the dataset there "
                        "or change the recipe's [data] extra_sources.")
    size = str(job.settings.get("image_size") or 128)
    command = [sys.executable, str(REPO_ROOT / "tasks/prepare_data.py"), *prepare_arguments(data_dir, data, limit),
               "--image-size", size]
    if not run_step(f"prepare {recipe_data_text(data)} for {job.name}", command):
        raise UserError(f"Could not prepare {recipe_data_text(data)} in {folder} for the {job.name} recipe.")
    return folder


def trainer_command(job: Job, data_dir: Path, models_dir: Path) -> list[str]:
    """The family's trainer with the recipe, writing the model to <run>/model (TensorBoard logs beside it)."""
    command = [sys.executable, str(REPO_ROOT / job.family.script), "--recipe", str(job.recipe.path),
               "--data-dir", str(data_dir), job.family.out_flag, str(job.run / "model")]
    if job.family.assembled:  # assembled from saved models (the ensemble): they are in models_dir
        command += ["--models-dir", str(models_dir)]
    else:
        command += ["--run-dir", str(job.run)]
    return command + job.flags


def run_trainer(command: list[str], log_path: Path, on_line) -> int:
    """Run a trainer with its output into log_path, calling on_line(line) for each line; returns its exit code."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    with open(log_path, "a") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, cwd=REPO_ROOT, env=env) as process:
        log.write("$ " + " ".join(command) + "\n")
        for line in process.stdout:
            log.write(line)
            log.flush()
            on_line(line)
        return process.wait()


def validation_metrics(folder: Path, data_dir: Path, limit: int | None) -> dict[str, Any]:
    """A model's validation metrics: those its trainer recorded in metrics.json when they were measured on the
    same validation images (same manifest, same UTKFace crops, same --limit), else measured now."""
    from agegender.data.manifest import data_state, prepared_crops
    from agegender.training.loop import evaluate_folder

    metrics = json.loads((folder / METRICS_FILE).read_text()) if (folder / METRICS_FILE).exists() else {}
    recorded, metadata = metrics.get("validation"), read_metadata(folder)
    same_faces = (metadata.get("manifest_sha256") == data_state(data_dir)["manifest_sha256"]
                  and metadata.get("utkface_crops", "original") == prepared_crops(data_dir))
    if recorded and recorded.get("limit") == limit and same_faces:
        return recorded
    return evaluate_folder(folder, "val", data_dir, limit)


def compare_table(job: Job, current: dict[str, Any] | None, candidate: dict[str, Any]) -> None:
    """The run beside the current model: each output's headline metric and the family's score."""
    goal = job.family.goal
    rows = []
    for output, key, label, fmt in (("gender", "accuracy", "gender accuracy", "{:.4f}"),
                                    ("age", "mae", "age MAE (years)", "{:.2f}")):
        if output in candidate:
            now = None if current is None else current.get(output, {}).get(key)
            rows.append([label, number(now, fmt), number(candidate[output][key], fmt)])
    rows.append([f"score: {goal.metric} ({goal.direction})", number(job.scores.get("current")),
                 number(job.scores.get("run"))])
    for name, found in candidate.get("datasets", {}).items():
        if name != UTKFACE:
            before = headline((current or {}).get("datasets", {}).get(name, {}))
            rows += [[f"{name} {key.replace('_', ' ')}", number(before.get(key, (None,))[0]), number(value)]
                     for key, (value, _) in headline(found).items()]
    count = next((part["n"] for part in candidate.values() if isinstance(part, dict) and "n" in part), "?")
    console.print(rich_table(f"{job.name}: validation split ({count} faces)",
                             ["", "current model", f"this run ({job.run.name})"], rows))


# what a run may lose on UTKFace's validation faces and still be promoted for what it wins on every other dataset
UTKFACE_TOLERANCE = {"age_mae": 0.10, "gender_accuracy": 0.003}


def headline(metrics: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """A dataset's validation figures that a run is judged on: {name: (value, "max" or "min")}."""
    found = {}
    if "gender" in metrics:
        found["gender_accuracy"] = (float(metrics["gender"]["accuracy"]), "max")
    if "age" in metrics:
        found["age_mae"] = (float(metrics["age"]["mae"]), "min")
    if "age_range" in metrics:
        found["age_group_accuracy"] = (float(metrics["age_range"]["age_group_accuracy"]), "max")
    return found


def sign(value: float) -> int:
    return (value > 0) - (value < 0)


def other_datasets(candidate: dict[str, Any], current: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per dataset besides UTKFace that both were validated on, per headline figure: +1 where the run is
    better, -1 where it is worse, 0 on a tie."""
    verdicts = {}
    for name, found in candidate.get("datasets", {}).items():
        if name == UTKFACE or name not in current.get("datasets", {}):
            continue
        before = headline(current["datasets"][name])
        verdicts[name] = {key: sign(value - before[key][0]) * (1 if better == "max" else -1)
                          for key, (value, better) in headline(found).items() if key in before}
    return verdicts


def within_tolerance(candidate: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the run loses no more than UTKFACE_TOLERANCE on UTKFace's validation faces."""
    now, before = headline(candidate), headline(current)
    return all((before[key][0] - now[key][0] if better == "max" else now[key][0] - before[key][0])
               <= UTKFACE_TOLERANCE[key] + 1e-12 for key, (_, better) in now.items()
               if key in UTKFACE_TOLERANCE and key in before)


def promotion(goal, candidate: dict[str, Any], current: dict[str, Any]) -> tuple[bool, str]:
    """Whether a run replaces the current model, and why: it is better on UTKFace's validation faces by the
    family's score and worse on no other dataset's (FairFace's everyday photos, CelebA's), or it is better on
    every other dataset's figures while losing at most UTKFACE_TOLERANCE on UTKFace's."""
    scores = goal.score(candidate), goal.score(current)
    others = other_datasets(candidate, current)
    worse = [f"{name} {key}" for name, found in others.items() for key, sign in found.items() if sign < 0]
    if goal.better(*scores):
        if not worse:
            return True, f"{scores[0]:.4f} beats {scores[1]:.4f}"
        return False, f"it beats {scores[1]:.4f} on UTKFace but is worse on {', '.join(worse)}"
    better = others and all(sign > 0 for found in others.values() for sign in found.values())
    if better and within_tolerance(candidate, current):
        return True, (f"better on every figure of {', '.join(others)}, at a UTKFace cost within the tolerance "
                      f"({goal.metric} {scores[0]:.4f} against {scores[1]:.4f})")
    return False, f"its {goal.metric} {scores[0]:.4f} does not beat {scores[1]:.4f} ({goal.direction})"


def promote(run_model: Path, target: Path) -> None:
    """Copy the run's model folder over the current one in one atomic swap (the run folder keeps its copy)."""
    with staging_dir(target) as staging:
        shutil.copytree(run_model, staging, dirs_exist_ok=True)


def judge(job: Job, models_dir: Path, data_dir: Path) -> None:
    """Score the run and the current model on validation, show them side by side, promote only a better run."""
    target, limit = models_dir / job.name, job.settings["limit"]
    candidate = validation_metrics(job.run / "model", data_dir, limit)
    current = validation_metrics(target, data_dir, limit) if is_complete(target) else None
    goal = job.family.goal
    job.scores = {"run": goal.score(candidate), "current": None if current is None else goal.score(current)}
    compare_table(job, current, candidate)
    promoted, reason = (True, "there was none") if current is None else promotion(goal, candidate, current)
    if promoted:
        promote(job.run / "model", target)
        job.outcome = "promoted"
        console.print(f"[green]Promoted[/] {job.run / 'model'} to {target} ({reason}).")
    else:
        job.outcome = "kept"
        console.print(f"[yellow]Kept the current model[/] {target}: {reason}; the run stays in {job.run}.")


# ---------------------------------------------------------------- after the runs


def run_step(label: str, command: list[str]) -> bool:
    """An export / compare / readme step, its output shown; False when it failed."""
    console.print(f"[bold]{label}[/]: {' '.join(command[1:])}")
    done = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "COLUMNS": "120"})
    if done.returncode != 0:
        console.print(f"[red]{label} failed[/] (exit {done.returncode}).")
    return done.returncode == 0


def refresh(jobs: list[Job], results_dir: Path, data_dir: Path, quick: bool) -> bool:
    """Export the promoted models, rerun compare on every model and the README's table (a copy of the README in
    results_dir unless results_dir is the repository's own results folder)."""
    python, ok = [sys.executable], True
    for job in (job for job in jobs if job.outcome == "promoted"):
        ok &= run_step(f"export {job.name}", [*python, str(REPO_ROOT / "tasks/export.py"),
                                              str(results_dir / "models" / job.name), "--data-dir", str(data_dir),
                                              *(QUICK_EXPORT if quick else ())])
    ok &= run_step("compare", [*python, str(REPO_ROOT / "tasks/compare.py"), "--models-dir",
                               str(results_dir / "models"), "--data-dir", str(data_dir), "--out", str(results_dir),
                               *(QUICK_COMPARE if quick else ())])
    readme = REPO_ROOT / "README.md"
    if Path(results_dir).resolve() != RESULTS_DIR.resolve():
        shutil.copy2(readme, results_dir / "README.md")
        readme = results_dir / "README.md"
    ok &= run_step("readme", [*python, str(REPO_ROOT / "tasks/readme.py"), "--comparison",
                              str(results_dir / "comparison.json"), "--readme", str(readme)])
    return bool(ok)


def print_summary(jobs: list[Job], elapsed: float) -> None:
    rows = [[job.name, job.outcome, number(job.scores.get("current")), number(job.scores.get("run")),
             duration(job.seconds) if job.seconds else "-", job.run.name if job.run else "-"] for job in jobs]
    runs = jobs[0].run.parent.parent if jobs and jobs[0].run else "runs"
    console.print(rich_table(f"train_all: done in {duration(elapsed)} (runs in {runs}/<recipe>/)",
                             ["recipe", "result", "current score", "run score", "took", "run"], rows,
                             left=("recipe", "result", "run"), fold=True))


# ---------------------------------------------------------------- the job


class Tracker:
    """Progress across the jobs: the job and its epoch, elapsed time, and the time left (the estimates still to
    come, scaled by how the actual times compared with the estimates so far)."""

    def __init__(self, progress: Progress, jobs: list[Job]):
        self.progress, self.jobs = progress, jobs
        self.total = sum(job.estimate for job in jobs)
        self.bar = progress.add_task("train_all", total=self.total, eta="")
        self.started = time.perf_counter()
        self.done = 0.0  # estimated seconds of the jobs finished
        self.job, self.index, self.job_start, self.epoch = jobs[0], 0, self.started, 0

    def start(self, index: int, job: Job) -> None:
        self.index, self.job, self.job_start, self.epoch = index, job, time.perf_counter(), 0
        self.line()

    def line(self, text: str = "") -> None:
        """One line of the trainer's output: count epochs (Keras prints "Epoch N/M") and refresh the bar."""
        if text.startswith("Epoch "):
            self.epoch += 1
        now = time.perf_counter()
        finished = self.done + min(now - self.job_start, 0.95 * self.job.estimate)
        pace = (now - self.started) / finished if finished > 0 else 1.0
        planned = planned_epochs(self.job.settings)
        step = f"epoch {self.epoch}/{planned}" if planned else "running"
        self.progress.update(self.bar, completed=finished, eta=f"about {duration((self.total - finished) * pace)} left",
                             description=f"[{self.index}/{len(self.jobs)}] {self.job.name}: {step}")

    def finish(self) -> None:
        self.done += self.job.estimate
        self.progress.update(self.bar, completed=self.done)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class Session:
    """The plan of a train_all run and each job's run folder and outcome, kept in <results>/runs/train_all.json as
    it goes, so that the same command run again after an interruption continues it."""

    def __init__(self, path: Path, plan: dict[str, Any], record: dict[str, Any] | None = None):
        self.path, self.plan = path, plan
        self.record = record or {"plan": plan, "started": datetime.now(UTC).isoformat(timespec="seconds"),
                                 "finished": False, "jobs": {}}

    @classmethod
    def open(cls, jobs: list[Job], results_dir: Path, data_dir: Path, manifest: str, resume: bool) -> Session:
        """The unfinished session of the same plan (same recipes, files, flags and data) when resuming, else a
        new one."""
        plan = {"jobs": [[job.name, file_sha256(job.recipe.path), job.flags] for job in jobs],
                "data_dir": str(Path(data_dir).resolve()), "manifest_sha256": manifest}
        path = Path(results_dir) / "runs" / SESSION_FILE
        if resume and path.exists():
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                record = {}
            if record.get("plan") == plan and not record.get("finished"):
                done = [name for name, job in record["jobs"].items() if job.get("outcome")]
                console.print(f"[bold]Continuing the train_all started {record['started']}[/], which did not "
                              f"finish: {len(done)} of {len(jobs)} job(s) done ({', '.join(done) or 'none'}).")
                return cls(path, plan, record)
        session = cls(path, plan)
        session.save()
        return session

    def save(self) -> None:
        write_json(self.path, self.record)

    def job(self, name: str) -> dict[str, Any]:
        return self.record["jobs"].setdefault(name, {})

    def update(self, job: Job) -> None:
        self.job(job.name).update(run=str(job.run), outcome=None if job.outcome == "not run" else job.outcome,
                                  seconds=job.seconds, scores=job.scores)
        self.save()

    def finish(self) -> None:
        self.record["finished"] = True
        self.save()


def train_all(jobs: list[Job], results_dir: Path, data_dir: Path, session: Session, quick: bool = False) -> None:
    """Run, judge and (maybe) promote each job in turn, with progress and an ETA across all of them; a job the
    session already judged is not run again, and one it started goes back to its run folder."""
    models_dir = results_dir / "models"
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TextColumn("{task.fields[eta]}"))
    with Progress(*columns, console=console) as progress:
        tracker = Tracker(progress, jobs)
        for index, job in enumerate(jobs, start=1):
            earlier = session.job(job.name)
            tracker.start(index, job)
            if earlier.get("outcome"):
                job.run, job.outcome = Path(earlier["run"]), earlier["outcome"]
                job.seconds, job.scores = float(earlier.get("seconds") or 0), earlier.get("scores") or {}
                console.print(f"[bold][{index}/{len(jobs)}] {job.name}[/]: {job.outcome} before the interruption "
                              f"({job.run}); not run again.")
                tracker.finish()
                continue
            if earlier.get("run"):
                job.run = Path(earlier["run"])
                console.print(f"[bold][{index}/{len(jobs)}] {job.name}[/]: resuming its interrupted run in {job.run} "
                              "(the trainer continues from its last finished epoch).")
            else:
                job.run = run_path(job.name, results_dir / "runs")
                console.print(f"[bold][{index}/{len(jobs)}] {job.name}[/] ({job.family.name}; estimate "
                              f"{duration(job.estimate)}): log in {job.run / 'train.log'}")
            session.update(job)
            job_data = job_data_dir(job, data_dir, quick)
            code = run_trainer(trainer_command(job, job_data, models_dir), job.run / "train.log", tracker.line)
            job.seconds = time.perf_counter() - tracker.job_start
            tracker.finish()
            if code != 0:
                job.outcome = "failed"
                session.update(job)
                tail = (job.run / "train.log").read_text().splitlines()[-LOG_TAIL:]
                console.print(f"[red]{job.name}: the trainer failed (exit {code})[/]; the end of its log:\n"
                              + "\n".join(tail))
                continue
            judge(job, models_dir, job_data)
            session.update(job)
            console.print(f"{job.name} took {duration(job.seconds)}; {duration(tracker.elapsed)} so far.")
        progress.update(tracker.bar, description=f"{len(jobs)} run(s)", eta="done")


@app.command()
def main(
    only: Annotated[list[str] | None, typer.Option(
        help="Train only this recipe (recipes/NAME.toml; repeatable); default: every recipe.")] = None,
    quick: Annotated[bool, typer.Option(
        help="A smoke run of the whole chain: tiny data, epochs and images (each family's quick flags), into a "
             f"scratch results folder ({QUICK_RESULTS_DIR.relative_to(REPO_ROOT)}), never over shipped "
             "models.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the plan and its time estimate, train nothing.")] = False,
    limit: Annotated[int | None, typer.Option(
        min=16, help="Train each model on N images (and judge it on a proportional validation subset).")] = None,
    refresh_results: Annotated[bool, typer.Option(
        "--refresh/--no-refresh", help="Afterwards export the promoted models and rerun compare and the README "
        "table.")] = True,
    recipes_dir: Annotated[Path, typer.Option(help="Where the recipes are.")] = RECIPES_DIR,
    results_dir: Annotated[Path | None, typer.Option(
        help="Results folder: runs/ and models/ in it; default: results/, or the scratch folder with "
             "--quick.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Folder prepare_data wrote.")] = DATA_DIR,
    resume: Annotated[bool, typer.Option(
        help="Continue the last train_all of the same plan if it did not finish (skip the jobs it judged, resume "
             "the one it was training); --no-resume starts afresh.")] = True,
) -> None:
    """Train every recipe into a run folder; promote a run only when it beats the current model on validation."""
    results_dir = Path(results_dir or (QUICK_RESULTS_DIR if quick else RESULTS_DIR))
    with user_errors():
        if quick and results_dir.resolve() == RESULTS_DIR.resolve():
            raise UserError("--quick writes to a scratch results folder, never to the shipped models in "
                            f"{RESULTS_DIR}; give another --results-dir.")
        if not (Path(data_dir) / "manifest.csv").exists():
            raise UserError(f"No prepared data in {data_dir}: run `python tasks/prepare_data.py` first.")
        jobs = plan(recipes_dir, only, results_dir / "models", quick, limit)
        print_plan(jobs, results_dir)
        if dry_run:
            return
        from agegender.data.manifest import data_state

        session = Session.open(jobs, results_dir, data_dir, data_state(data_dir)["manifest_sha256"], resume)
        started = time.perf_counter()
        train_all(jobs, results_dir, data_dir, session, quick)
        print_summary(jobs, time.perf_counter() - started)
        refreshed = refresh(jobs, results_dir, data_dir, quick) if refresh_results else True
        session.finish()
    failed = [job.name for job in jobs if job.outcome == "failed"]
    if failed or not refreshed:
        fail(f"{', '.join(failed) or 'a final step'} failed; see the log above (models that were not beaten are "
             "unchanged).")


if __name__ == "__main__":
    app()
