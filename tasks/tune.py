"""Tune a model's own training code with Optuna: TPE search, pruning on a validation metric, shared storage.

    python tasks/tune.py --model gender --trials 20
    python tasks/tune.py --model age --trials 8 --epochs 3 --limit 3000 --image-size 64
    python tasks/tune.py --model multitask --storage postgresql://user:secret@db-host/optuna --seed 1

Each trial trains through the family's own trainer (agegender.training.trainers: the CNN trainers' loop,
agegender.training.finetune for transfer) with the sampled parameters and scores it on the validation split only,
by the family's goal (agegender.models.registry). The study lives in an RDB storage (SQLite by
default), so running the command again continues it and several processes can work on it at once.
Writes results/tuning/<study>.json (read by `train_* --params`) and two PNG plots.
"""

from __future__ import annotations

import gc
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from agegender.cli import UserError, console, user_errors, write_json
from agegender.data.paths import DATA_DIR, REPO_ROOT, RESULTS_DIR, SEED
from agegender.models.registry import FAMILIES, TRAINABLE, TUNING_BACKBONE, Choice, Goal, SearchSpace
from agegender.reporting.plots import plot_importances, plot_study_history
from agegender.reporting.tables import rich_table
from agegender.training.trainers import TRAINERS

TUNING_DIR = RESULTS_DIR / "tuning"
STARTUP_TRIALS = 5  # random trials before TPE models the results
TOP_TRIALS = 5
WORKER = f"{socket.gethostname()}-{os.getpid()}"  # which process ran a trial, when several share a study

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


# ---------------------------------------------------------------- what a trial is scored on (the family's goal)


def monitor_goal(goal: Goal, monitor: str) -> Goal:
    """The same objective, pruned on one named Keras metric (sign-flipped when it runs the other way)."""
    lower_is_better = any(word in monitor for word in ("loss", "mae", "mse", "error"))
    sign = 1.0 if lower_is_better == (goal.direction == "minimize") else -1.0
    return Goal(goal.metric, goal.direction, (monitor,), goal.score, lambda logs: sign * logs[monitor])


# ---------------------------------------------------------------- the search space (the family's, from the registry)


def distributions(space: SearchSpace) -> dict[str, Any]:
    """A family's search space as Optuna distributions, in the registry's order."""
    import optuna

    return {name: optuna.distributions.CategoricalDistribution(dimension.values) if isinstance(dimension, Choice)
            else optuna.distributions.FloatDistribution(dimension.low, dimension.high, log=dimension.log)
            for name, dimension in space.items()}


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    import optuna

    params = {}
    for name, dist in space.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            params[name] = trial.suggest_categorical(name, dist.choices)
        else:
            params[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    return params


def defaults_in_space(space: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer's defaults restricted to the space, or None when one falls outside it."""
    import optuna

    chosen = {name: defaults[name] for name in space}
    for name, dist in space.items():
        value = chosen[name]
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            if value not in dist.choices:
                return None
        elif not dist.low <= float(value) <= dist.high:
            return None
    return chosen


# ---------------------------------------------------------------- the family's own training code


@dataclass
class Trainer:
    """What a study needs from a family: its defaults and goal, and its builder and training loop from the
    registry (never copied)."""

    defaults: dict[str, Any]
    goal: Goal
    build: Callable[[], Any]  # the model at the trial's image size with default parameters
    train: Callable[[dict[str, Any], list], Any]  # (params, callbacks) -> TrainResult, validation only
    budget: dict[str, Any]


def family_trainer(model: str, image_size: int, epochs: int, data_dir: Path, limit: int | None, verbose: int,
                   backbone: str | None = None, weights: str = "pretrained") -> Trainer:
    """The family's train() with out_dir=None and no test evaluation, with the family's tuning settings (the
    registry's: a transfer trial trains one backbone, half the epochs frozen and half fine-tuning)."""
    family = FAMILIES[model]
    settings = family.tuning_settings(backbone, weights, epochs) if family.tuning_settings else {}
    # trials are comparable only under one budget: the backbone and its starting weights are part of it
    budget: dict[str, Any] = {"epochs": epochs, "limit": limit, "image_size": image_size,
                              **{key: settings[key] for key in ("backbone", "weights") if key in settings}}
    first_epochs = epochs - settings.get("fine_tune_epochs", 0)

    def train(params, callbacks):
        return TRAINERS[family.name](params, image_size, first_epochs, data_dir, limit, None, evaluate_test=False,
                            verbose=verbose, extra_callbacks=callbacks, **settings)

    return Trainer(dict(family.defaults), family.goal, lambda: family.build(image_size, family.defaults, **settings),
                   train, budget)


def check_monitors(trainer: Trainer, image_size: int, monitors: tuple[str, ...]) -> None:
    """Build the model, run one tiny evaluation so Keras names its metrics, then check what we will watch."""
    import keras

    model = trainer.build()
    images = np.zeros((2, image_size, image_size, 3), np.float32)
    targets = {name: np.zeros((2, 1), np.float32) for name in model(images, training=False)}
    model.evaluate(images, targets, verbose=0)
    try:
        for monitor in monitors:
            require_metric(model, monitor)
    finally:
        del model
        keras.backend.clear_session()


def logged_metrics(model) -> set[str]:
    """What Keras 3 will put in the epoch logs, e.g. "val_age_mae" for the "age" output's MAE.

    After one evaluation, get_metrics_result() holds the flattened names (model.metrics_names only says
    "compile_metrics" for all compiled metrics)."""
    names = {"loss", *model.get_metrics_result()}
    return names | {f"val_{name}" for name in names}


def require_metric(model, monitor: str) -> None:
    logged = logged_metrics(model)
    if monitor not in logged:
        raise UserError(f"Metric {monitor!r} is not logged by the {model.name} model, so pruning could never "
                        f"see it; it logs {', '.join(sorted(logged))}.")


class TrialFailed(Exception):
    """A trial that could not produce a score (NaN loss, out of memory, a crash); the study goes on."""


def pruning_callback(trial, goal: Goal):
    """Report the goal's per-epoch value to Optuna and stop the trial when the pruner says so.

    Unlike a callback that only warns, it checks at the start of training that every metric it reads is
    logged under that name by Keras 3, and raises UserError otherwise."""
    import keras
    import optuna

    class Pruning(keras.callbacks.Callback):
        step = 0  # counts epochs across several fit() calls (transfer trains in two phases)

        def on_train_begin(self, logs=None):
            for monitor in goal.monitors:
                require_metric(self.model, monitor)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            missing = [m for m in goal.monitors if m not in logs]
            if missing:
                raise UserError(f"Metric {missing[0]!r} was not logged at the end of epoch {epoch + 1}.")
            value = float(goal.intermediate(logs))
            if not math.isfinite(value):
                return  # TerminateOnNaN ends the epoch loop; the trial is then marked failed
            trial.report(value, step=self.step)
            self.step += 1
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {self.step} ({value:.4f})")

    return Pruning()


def make_objective(trainer: Trainer, goal: Goal, space: dict[str, Any]):
    """One trial: sample, train with the trainer's own code, score on validation (never on test)."""
    import keras
    import optuna

    def objective(trial) -> float:
        params = suggest(trial, space)
        trial.set_user_attr("worker", WORKER)
        callbacks = [keras.callbacks.TerminateOnNaN(), pruning_callback(trial, goal)]
        try:
            result = trainer.train(params, callbacks)
            loss = result.history["loss"].to_numpy(float)
            if not np.all(np.isfinite(loss)):
                raise TrialFailed("the training loss became NaN")
            value = goal.score(result.val_metrics)
            if not math.isfinite(value):
                raise TrialFailed("the validation score is not a number")
            trial.set_user_attr("epochs_run", len(result.history))
            trial.set_user_attr("seconds_per_epoch", round(result.seconds_per_epoch, 2))
            return value
        except (optuna.TrialPruned, UserError):
            raise
        except Exception as error:  # out of memory, NaN, a crash: record it, let the study go on
            reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            trial.set_user_attr("error", f"{type(error).__name__}: {reason}")
            console.print(f"[yellow]Trial {trial.number} failed:[/] {type(error).__name__}: {reason}")
            raise TrialFailed(reason) from error
        finally:
            keras.backend.clear_session()
            gc.collect()

    return objective


# ---------------------------------------------------------------- the study and its storage


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def open_storage(url: str):
    """An RDB storage; SQLite waits for its lock instead of failing when several workers write at once.

    A heartbeat marks the trials of a worker that died as failed, so the study never waits on them."""
    import optuna
    import sqlalchemy

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the heartbeat
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 120}} if sqlite else {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=60,
                                              grace_period=240)
        except ModuleNotFoundError as error:
            raise UserError(f"Storage {shown_url(url)} needs the database driver {error.name!r}; install it "
                            f"(e.g. pip install psycopg2-binary for PostgreSQL).") from error
        except sqlalchemy.exc.ArgumentError as error:
            raise UserError(f"{shown_url(url)} is not a storage URL (e.g. sqlite:///results/tuning/optuna.db "
                            f"or postgresql://user:password@host/db).") from error
        # two workers creating the tables of a new database at once (the slower one's insert of the schema
        # version fails as a duplicate), or no server yet
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as error:
            if attempt == 4:
                first = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
                raise UserError(f"Cannot open storage {shown_url(url)}: {first}.") from error
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def shown_url(url: str) -> str:
    """The storage URL without its password, and with the repository's own path made relative."""
    url = re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
    prefix = f"sqlite:///{REPO_ROOT.resolve()}/"
    return "sqlite:///" + url.removeprefix(prefix) if url.startswith(prefix) else url


def open_study(storage, study_name: str, goal: Goal, budget: dict[str, Any], seed: int, pruner):
    """Create the study or continue it; trials are only comparable under one budget, so a change fails."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=study_name, direction=goal.direction,
                                pruner=pruner, load_if_exists=True)
    if study.direction.name.lower() != goal.direction:
        raise UserError(f"Study {study_name!r} was created to {study.direction.name.lower()}, "
                        f"but {goal.metric} must be {goal.direction}d; pick another --study-name.")
    recorded = study.user_attrs.get("budget")
    if recorded is None:
        study.set_user_attr("budget", budget)
        study.set_user_attr("metric", goal.metric)
    elif recorded != budget:
        raise UserError(f"Study {study_name!r} was run with {describe(recorded)}, not {describe(budget)}; "
                        f"use the same budget or another --study-name.")
    # a fresh seed per call: resuming must not replay the random start of the previous call
    study.sampler = optuna.samplers.TPESampler(seed=seed + 1000 * len(study.trials),
                                               n_startup_trials=STARTUP_TRIALS)
    return study


def describe(budget: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in budget.items())


def make_pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(f"Unknown pruner {name!r}; expected median or none.")


def tune(model: str, trials: int | None = 20, timeout: float | None = None, epochs: int = 4,
         limit: int | None = 4000, image_size: int = 64, data_dir: Path = DATA_DIR,
         storage: str | None = None, study_name: str | None = None, monitor: str | None = None,
         pruner: str | Any = "median", seed: int = SEED, defaults_first: bool = True,
         backbone: str | None = None, weights: str = "pretrained", verbose: int = 2):
    """Run `trials` more trials (or until `timeout` seconds) of the model's study; returns the study."""
    if model not in TRAINABLE:
        raise UserError(f"Unknown model {model!r}; expected one of {', '.join(TRAINABLE)}.")
    if backbone is not None and FAMILIES[model].tuning_settings is None:
        with_backbone = [name for name in TRAINABLE if FAMILIES[name].tuning_settings is not None]
        raise UserError(f"--backbone only applies to --model {' or '.join(with_backbone)}.")
    if not (Path(data_dir) / "manifest.csv").exists():
        raise UserError(f"No prepared data in {data_dir}: run tasks/prepare_data.py first.")
    trainer = family_trainer(model, image_size, epochs, Path(data_dir), limit, verbose, backbone, weights)
    goal = trainer.goal if monitor is None else monitor_goal(trainer.goal, monitor)
    check_monitors(trainer, image_size, goal.monitors)
    space = distributions(FAMILIES[model].search_space)
    storage_url = storage or sqlite_url(TUNING_DIR / "optuna.db")
    default_name = f"{model}-{trainer.budget['backbone']}" if "backbone" in trainer.budget else model
    study = open_study(open_storage(storage_url), study_name or default_name, goal, trainer.budget, seed,
                       make_pruner(pruner) if isinstance(pruner, str) else pruner)
    study.set_user_attr("storage", shown_url(storage_url))
    console.print(f"[bold]Tuning {model}[/] (study {study.study_name!r}, {len(study.trials)} trials so far) "
                  f"on {goal.metric}, {goal.direction}; pruning on {', '.join(goal.monitors)}; "
                  f"{describe(study.user_attrs['budget'])}.")
    if trials == 0:
        return study  # only rewrite the results from what the storage holds
    baseline = defaults_in_space(space, trainer.defaults)
    if defaults_first and baseline is not None:  # the trainer's defaults, scored under the same budget
        study.enqueue_trial(baseline, user_attrs={"defaults": True}, skip_if_exists=True)
    study.optimize(make_objective(trainer, goal, space), n_trials=trials, timeout=timeout,
                   catch=(TrialFailed,), callbacks=[announce], gc_after_trial=True)
    return study


def announce(study, trial) -> None:
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    best = f"{study.best_value:.4f}" if any(t.state.name == "COMPLETE" for t in study.trials) else "-"
    console.print(f"Trial {trial.number} {trial.state.name.lower()}: {value} (best {best}) "
                  f"{trial.params}")


# ---------------------------------------------------------------- results: JSON, table, plots


def summarise(study, model: str) -> dict[str, Any]:
    """The best-parameter file: best_params (trainer keys), best_value, metric, direction, counts, storage."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    summary: dict[str, Any] = {
        "model": model, "study_name": study.study_name, "metric": study.user_attrs.get("metric"),
        "direction": study.direction.name.lower(), "best_value": None, "best_params": None,
        "best_trial": None, "n_trials": len(trials), "counts": counts,
        "storage": study.user_attrs.get("storage"), "budget": study.user_attrs.get("budget"),
    }
    if not complete:
        return summary
    best = study.best_trial
    summary.update(best_value=best.value, best_params=best.params, best_trial=best.number)
    defaults = [t for t in complete if t.user_attrs.get("defaults")]
    if defaults:  # the latest: a trainer whose defaults changed gets a new defaults trial when resumed
        default_value = defaults[-1].value
        gain = best.value - default_value
        if summary["direction"] == "minimize":
            gain = -gain
        summary["defaults_value"] = default_value
        summary["improvement_over_defaults"] = gain
    reverse = summary["direction"] == "maximize"
    ranked = sorted(complete, key=lambda t: t.value, reverse=reverse)[:TOP_TRIALS]
    summary["top_trials"] = [{"number": t.number, "value": t.value, "params": t.params,
                              "defaults": bool(t.user_attrs.get("defaults"))} for t in ranked]
    return summary


SHORT_NAMES = {"learning_rate": "lr", "batch_size": "batch", "dropout": "drop", "weight_decay": "wd",
               "augment": "aug", "age_loss_weight": "age w", "age_head": "head",
               "fine_tune_learning_rate": "ft lr"}


def trials_table(summary: dict[str, Any]) -> Table:
    names = list(summary["best_params"])
    rows = [[f"{row['number']}{'*' if row['defaults'] else ''}", f"{row['value']:.4f}",
             *(format_value(row["params"][n]) for n in names)] for row in summary["top_trials"]]
    return rich_table(f"{summary['study_name']}: best trials ({summary['metric']}, {summary['direction']})",
                      ["trial", "value", *(SHORT_NAMES.get(name, name) for name in names)], rows, left=[],
                      caption="* the trainer's defaults")


def format_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def importances(study) -> dict[str, float] | None:
    """fANOVA parameter importances; None with fewer than three complete trials or nothing to attribute."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 3:
        return None
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=SEED))
    except RuntimeError:  # e.g. every trial scored the same: nothing to attribute
        return None
    return found or None


def write_results(study, model: str, out_dir: Path) -> dict[str, Any]:
    """<study>.json, <study>_history.png and <study>_importances.png; fails when no trial completed."""
    summary = summarise(study, model)
    if summary["best_params"] is None:
        counts = summary["counts"]
        raise UserError(f"No trial of study {study.study_name!r} has completed yet ({counts['pruned']} "
                        f"pruned, {counts['fail']} failed, {counts['running']} running), so there is "
                        f"nothing to write.")
    stem = study.study_name
    plot_study_history(study, out_dir / f"{stem}_history.png")  # atomic: workers may finish at once
    summary["plots"] = [f"{stem}_history.png"]
    found = importances(study)
    if found is not None:
        complete = summary["counts"]["complete"]
        plot_importances(found, f"Parameter importances: {stem} ({complete} trials)",
                         out_dir / f"{stem}_importances.png")
        summary["plots"].append(f"{stem}_importances.png")
    write_json(out_dir / f"{stem}.json", summary)
    return summary


def report(summary: dict[str, Any], path: Path) -> None:
    console.print(trials_table(summary))
    counts = summary["counts"]
    console.print(f"Best {summary['metric']}: {summary['best_value']:.4f} (trial {summary['best_trial']}); "
                  f"{summary['n_trials']} trials: {counts['complete']} complete, {counts['pruned']} pruned, "
                  f"{counts['fail']} failed.")
    if "defaults_value" in summary:
        console.print(f"Trainer defaults under the same budget: {summary['defaults_value']:.4f} "
                      f"(tuned is better by {summary['improvement_over_defaults']:.4f}).")
    console.print(f"Wrote {path} and {', '.join(summary['plots'])}.")


@app.command()
def main(
    model: Annotated[str, typer.Option(help=f"Model family to tune: {', '.join(TRAINABLE)}.")],
    trials: Annotated[int, typer.Option(
        min=0, help="Trials this process runs (fewer if --timeout ends it; 0: only rewrite results).")] = 20,
    timeout: Annotated[float | None, typer.Option(min=1, help="Start no new trial after this many seconds.")]
    = None,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per trial.")] = 4,
    limit: Annotated[int | None, typer.Option(min=16, help="Training images per trial (validation: 1/4).")]
    = 4000,
    image_size: Annotated[int, typer.Option(min=32, max=512, help="Input side in pixels.")] = 64,
    storage: Annotated[str | None, typer.Option(
        help="Optuna RDB storage URL shared by all workers (default: <out-dir>/optuna.db).")] = None,
    study_name: Annotated[str | None, typer.Option(
        help="Study name (default: the model name; transfer-BACKBONE for transfer).")] = None,
    monitor: Annotated[str | None, typer.Option(
        help="Prune on this Keras validation metric instead of the model's score, e.g. val_loss.")] = None,
    pruner: Annotated[str, typer.Option(help="median (stop trials below the median) or none.")] = "median",
    seed: Annotated[int, typer.Option(help="Sampler seed; give each parallel worker its own.")] = SEED,
    defaults_first: Annotated[bool, typer.Option(
        help="First trial of a new study: the trainer's defaults, as the baseline.")] = True,
    backbone: Annotated[str | None, typer.Option(
        help=f"Backbone for --model transfer (default {TUNING_BACKBONE}).")] = None,
    weights: Annotated[str, typer.Option(
        help="Starting weights for --model transfer: pretrained, imagenet, none or PATH.")] = "pretrained",
    data_dir: Annotated[Path, typer.Option(help="Folder prepare_data wrote.")] = DATA_DIR,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON, the plots and the default SQLite file go.")]
    = TUNING_DIR,
) -> None:
    """Tune one model's training parameters on the validation split and write its best-parameter file."""
    with user_errors():
        study = tune(model, trials, timeout, epochs, limit, image_size, data_dir,
                     storage or sqlite_url(out_dir / "optuna.db"), study_name, monitor, pruner, seed,
                     defaults_first, backbone, weights)
        summary = write_results(study, model, out_dir)
        report(summary, out_dir / f"{study.study_name}.json")


if __name__ == "__main__":
    app()
