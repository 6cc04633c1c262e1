"""UTKFace's labels: its file names, the gender and race label names, the age scale and bands, and what each
task's model predicts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

AGE_SCALE = 120.0
GENDER_LABELS = {"0": "male", "1": "female"}
RACE_LABELS = {0: "White", 1: "Black", 2: "Asian", 3: "Indian", 4: "Others"}
# the age bands a prediction carries, and that the bias tables and the age interval's coverage group faces by:
# infants, children, then decades (200: open-ended)
AGE_BANDS = [(0, 2), (3, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 200)]
# the coarser age strata prepare_data draws the split within (changing them would change the split)
SPLIT_AGE_STRATA = [(0, 12), (13, 19), (20, 39), (40, 59), (60, 200)]

# AGE_GENDER_RACE_DATETIME.jpg.chip.jpg; the DATETIME part varies in length (and one name lacks its dot)
UTKFACE_NAME = re.compile(r"^(\d{1,3})_([01])_([0-4])_\d+\.?jpg\.chip\.jpg$", re.IGNORECASE)


@dataclass(frozen=True)
class FaceLabel:
    age: int
    gender: int
    race: int


def parse_utkface_name(name: str) -> FaceLabel | None:
    """Labels from a UTKFace file name, or None when the name does not follow the pattern."""
    match = UTKFACE_NAME.match(Path(name).name)
    if match is None:
        return None
    age, gender, race = (int(g) for g in match.groups()[:3])
    if not 0 <= age <= 120:
        return None
    return FaceLabel(age, gender, race)


def band_name(age: float, bands: list[tuple[int, int]] = AGE_BANDS) -> str:
    """The name ("20-29", "70+") of the band holding an age in years, rounded to a whole year first (an age
    below the first band counts in it, one above the last in the last: an untrained regression head can say
    anything)."""
    years = min(max(round(float(age)), bands[0][0]), bands[-1][1])
    for low, high in bands:
        if low <= years <= high:
            return f"{low}+" if high >= 200 else f"{low}-{high}"
    return "unknown"


def age_band(age: float) -> str:
    """The AGE_BANDS band of an age in years (true or predicted)."""
    return band_name(age, AGE_BANDS)

TASK_OUTPUTS = {"gender": ("gender",), "age": ("age",), "multitask": ("age", "gender")}  # task -> model outputs
