"""What a model's About page (the Spaces) and its model card (publish) say: what it predicts, what it was trained
on, its measured accuracy and biases (read from metrics.json and compare's comparison.json, never hard-coded)
and its limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agegender.data.labels import AGE_BANDS, RACE_LABELS, age_band
from agegender.data.paths import RESULTS_DIR
from agegender.inference.detectors import DEFAULT_DETECTOR, DETECTORS
from agegender.inference.gender_calibration import CALIBRATION_KEY, calibration_label
from agegender.inference.intervals import INTERVAL_KEY, interval_label
from agegender.models.folders import METADATA_FILE, METRICS_FILE, training_datasets
from agegender.reporting.certainty import AGE_MIX_NOTE, spread_over
from agegender.reporting.metrics import GROUPINGS
from agegender.reporting.tables import is_missing, markdown_table

COMPARISON_FILE = "comparison.json"
UTKFACE_URL = "https://susanqq.github.io/UTKFace/"
HEADLINE_BIAS_METRICS = ("accuracy", "f1", "mae", "cs5")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file as a dict, or None when it is missing or unreadable (the page then says so)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_comparison(results_dir: Path = RESULTS_DIR) -> dict[str, Any] | None:
    return read_json(Path(results_dir) / COMPARISON_FILE)


def _fmt(value: Any, digits: int = 4) -> str:
    if is_missing(value):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def metrics_markdown(metrics: dict[str, Any] | None, crops: str = "original") -> str:
    """The test metrics of metrics.json as a table (read when the page is built, never hard-coded); `crops`:
    the UTKFace crops they were measured on (metadata.json's utkface_crops)."""
    if not metrics or not ({"gender", "age"} & set(metrics)):
        return "No `metrics.json` beside this model, so its accuracy is not known here."
    rows = []
    gender, age = metrics.get("gender"), metrics.get("age")
    if gender:
        rows += [["gender accuracy", _fmt(gender.get("accuracy")), "share of faces whose gender is right"],
                 ["gender F1", _fmt(gender.get("f1")), "female taken as the positive class"],
                 ["gender ROC AUC", _fmt(gender.get("roc_auc")), "ranking quality of P(female)"]]
    if age:
        rows += [["age MAE", f"{_fmt(age.get('mae'), 2)} years", "mean absolute error"],
                 ["age RMSE", f"{_fmt(age.get('rmse'), 2)} years", "root mean squared error"],
                 ["age CS@5", _fmt(age.get("cs5"), 3), "share of faces within 5 years"]]
    n = (gender or age or {}).get("n")
    split = metrics.get("split", "test")
    how = (" as the photo path finds and aligns them (the crops this model trained on)" if crops == "detected"
           else "")
    return (f"Measured on the {split} split of UTKFace ({n:,} faces the model never saw in training){how}:\n\n"
            if isinstance(n, int) else f"Measured on the {split} split of UTKFace{how}:\n\n") + markdown_table(
        ["metric", "value", "meaning"], rows)


def bias_markdown(name: str, comparison: dict[str, Any] | None) -> str:
    """Best and worst group per headline metric, and the per-race table, from compare's comparison.json."""
    bias = (comparison or {}).get("bias") or {}
    gaps = [g for g in bias.get("gaps", [])
            if g.get("model") == name and g.get("metric") in HEADLINE_BIAS_METRICS]
    groups = [g for g in bias.get("groups", []) if g.get("model") == name]
    if not gaps and not groups:
        return ("Not measured for this model yet: `python tasks/compare.py` writes the bias analysis to "
                "`results/comparison.json`; publish again afterwards.")
    faces = (comparison or {}).get("settings", {}).get("test_faces", "?")
    parts = [f"From `python tasks/compare.py` on the test split ({faces} faces). UTKFace's labels are the "
             "dataset's own: binary gender and five broad race groups.\n"]
    if gaps:
        parts.append(markdown_table(["grouping", "metric", "best group", "worst group", "gap"], [
            [g["grouping"], g["metric"], f"{g['best_group']} ({_fmt(g.get('best'), 3)})",
             f"{g['worst_group']} ({_fmt(g.get('worst'), 3)})", _fmt(g.get("gap"), 3)] for g in gaps]))
    for grouping in GROUPINGS:
        part = [g for g in groups if g.get("grouping") == grouping]
        columns = [key for key in ("accuracy", "mae", "cs5") if any(key in g for g in part)]
        if part and columns:
            parts.append(f"\nBy {grouping}:\n\n" + markdown_table(["group", "faces", *columns], [
                [g["group"], g.get("n", "?"), *(_fmt(g.get(key), 3) for key in columns)] for g in part]))
    return "\n".join(parts)


def interval_markdown(name: str, metadata: dict[str, Any], comparison: dict[str, Any] | None) -> str:
    """The age interval's calibration (metadata.json) and the coverage compare measured on the test split."""
    record = metadata.get(INTERVAL_KEY)
    if not record:
        return ("This model gives no age interval: it has not been calibrated (`python tasks/calibrate.py "
                "MODEL_DIR`).")
    val = record["validation"]
    parts = [f"Each age comes with an interval in whole years meant to hold the true age "
             f"{record['target_coverage']:.0%} of the time, such as \"about 31 (26–37)\". It was calibrated on the "
             f"validation split ({val['faces']:,} faces: {val['coverage']:.1%} held, mean width "
             f"{val['mean_width']:.1f} years; interval: {interval_label(record)})."]
    test = ((comparison or {}).get("age_interval") or {}).get(name)
    if not test:
        parts.append("Its coverage on the test split is not measured yet: run `python tasks/compare.py`.")
        return "\n".join(parts)
    parts.append(f"On the test split it held the true age of **{test['coverage']:.1%}** of {test['faces']:,} "
                 f"faces (mean width {test['mean_width']:.1f} years); by true age band:\n")
    parts.append(markdown_table(["age band", "faces", "coverage", "mean width (years)"], [
        [band, found["faces"], f"{found['coverage']:.1%}", f"{found['mean_width']:.1f}"]
        for band, found in test["by_band"].items()]))
    return "\n".join(parts)


def _share(value: Any) -> str:
    return "n/a" if is_missing(value) else f"{value:.1%}"


def certainty_markdown(name: str, metadata: dict[str, Any], comparison: dict[str, Any] | None) -> str:
    """The certainty rule with its validation figures (metadata.json), and its coverage and accuracy by group
    and the race spreads compare measured on the test split."""
    record = metadata.get(CALIBRATION_KEY)
    if not record:
        return ("This model's P(female) is not calibrated and every gender it gives counts as certain: run "
                "`python tasks/calibrate.py MODEL_DIR`.")
    val = record["validation"]
    parts = [f"P(female) is calibrated on the validation split ({val['faces']:,} faces, {calibration_label(record)}; "
             f"expected calibration error {val['ece_before']:.3f} before, {val['ece_after']:.3f} after). A gender is "
             f"given as certain when the probability of the gender called is at least **{record['threshold']:.1%}**: "
             f"the smallest confidence whose answers on the validation split were at least "
             f"{record['target_accuracy']:.0%} right. There, {_share(val['coverage'])} of faces were answered with "
             f"certainty and {_share(val['certain_accuracy'])} of those were right. Every other face reads "
             "\"uncertain\" with its probability, e.g. \"uncertain (52% female)\"."]
    shown = ((comparison or {}).get("gender_certainty") or {}).get(name)
    if shown:
        parts.append(f"\nOn the test split ({shown['faces']:,} faces): calibration error {shown['ece_after']:.3f}, "
                     f"{_share(shown['coverage'])} answered with certainty, {_share(shown['certain_accuracy'])} of "
                     "those right. By group (coverage: share answered with certainty; certain accuracy: share of "
                     "those right):\n")
    elif val.get("groups"):
        parts.append("\nIts test figures are not measured yet (`python tasks/compare.py`); on the validation split, "
                     "by group (coverage: share answered with certainty; certain accuracy: share of those right):\n")
        shown = val
    else:
        parts.append("\nIts coverage and accuracy by group are not measured yet: run `python tasks/compare.py`.")
        return "\n".join(parts)
    parts.append(markdown_table(["grouping", "group", "faces", "coverage", "certain accuracy", "accuracy (all)"], [
        [g["grouping"], g["group"], f"{g['faces']:,}", _share(g.get("coverage")), _share(g.get("certain_accuracy")),
         _share(g.get("accuracy"))] for g in shown.get("groups", [])]))
    spreads = shown.get("race_spreads") or []
    if spreads:
        parts.append("\nSpread between the best and worst race:\n")
        parts.append(markdown_table(["over", "figure", "best race", "worst race", "spread"], [
            [spread_over(s["grouping"]), s["figure"].replace("_", " "),
             f"{s['best_group']} {_share(s['best'])}", f"{s['worst_group']} {_share(s['worst'])}",
             f"{s['spread'] * 100:.1f} points"] for s in spreads]))
        parts.append("\n" + AGE_MIX_NOTE)
    return "\n".join(parts)


def detector_text(name: str = DEFAULT_DETECTOR) -> str:
    spec = DETECTORS[name]
    threshold = "" if spec.min_confidence is None else f", confidence {spec.min_confidence} or more"
    return f"`{name}` ({spec.description}{threshold})"



def about_markdown(name: str, folder: Path, comparison: dict[str, Any] | None = None) -> str:
    """What the model is, what it was trained on, how accurate it is and where it is biased, and its limits.

    The Space's "About" tab and the model card (tasks/publish.py) both use this text."""
    metadata = read_json(Path(folder) / METADATA_FILE) or {}
    metrics = read_json(Path(folder) / METRICS_FILE)
    outputs = metadata.get("outputs", [])
    extra_datasets = training_datasets(metadata)
    said = {"age": "age in years", "gender": "gender (probability of female)"}
    predicts = " and ".join(said[o] for o in outputs if o in said) or "unknown outputs"
    races = ", ".join(RACE_LABELS.values())
    bands = ", ".join(age_band(low) for low, _ in AGE_BANDS)
    return "\n".join([
        f"## Model `{name}`",
        f"Predicts {predicts} from a face. Task `{metadata.get('task', '?')}`, backbone "
        f"`{metadata.get('backbone', '?')}` (initial weights: {metadata.get('weights', '?')}), input "
        f"{metadata.get('image_size', '?')} x {metadata.get('image_size', '?')} RGB, trained "
        f"{metadata.get('created', '?')}.",
        "",
        "## Trained on",
        f"[UTKFace]({UTKFACE_URL}): aligned and cropped face photos of people aged 0 to 116, labelled with "
        f"age, binary gender (male/female) and one of five race groups ({races}). The project splits it into "
        "train, validation and test sets (`tasks/prepare_data.py`). **UTKFace is licensed for non-commercial "
        "research only, and so is this model.**",
        *(["", "Each training face was found and aligned by the same detector and eye alignment that predictions "
               "use (`prepare_data --utkface-crops detected`), so the model learnt from what it sees in photos."]
          if metadata.get("utkface_crops") == "detected" else []),
        *(["", "Also trained on " + ", ".join(f"`{name}`" for name in extra_datasets) + " (extra labelled datasets, "
               "`prepare_data --extra-source`; each is used only for the labels it has, and keeps its own licence "
               "terms)."] if extra_datasets else []),
        "",
        "## Measured accuracy",
        metrics_markdown(metrics, metadata.get("utkface_crops", "original")),
        "",
        *(["## Age interval", interval_markdown(name, metadata, comparison), ""] if "age" in outputs else []),
        *(["## Certain or uncertain gender", certainty_markdown(name, metadata, comparison), ""]
          if "gender" in outputs else []),
        "## Known biases",
        bias_markdown(name, comparison),
        "",
        "## Intended use and limits",
        "- A demonstration and research tool. Do not use it to make decisions about people (access, "
        "hiring, age verification, identification) or to infer anyone's gender identity: it predicts the "
        "binary label UTKFace's annotators gave from appearance.",
        "- Age is an estimate: expect errors of several years (see the MAE above), larger for the young, the "
        f"old and groups with few training faces (age bands used above: {bands}).",
        f"- It works best on frontal, well-lit faces like UTKFace's. Faces are found by {detector_text()}, "
        "aligned on the eyes and cropped like UTKFace's crops; small, turned or covered faces may be missed or "
        "predicted badly. The Predict tab offers the other detectors.",
        "- Photos sent to this demo are not stored by the app; Gradio's temporary copies are deleted within "
        "about two hours.",
    ])
