"""Boxes and labels on a photo: what `predict --annotate`, the Spaces and the live webcam draw, with one code
path so a face reads the same everywhere ("1: female 97%, 31 (26-37)"; "1: uncertain (52% female), 31 (26-37)" for a
gender below the model's certainty threshold)."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLOURS = {"female": (214, 51, 132), "male": (13, 110, 253), None: (25, 135, 84)}  # box colour by gender


def gender_probability(row: dict[str, Any]) -> float:
    """The probability of the gender the model chose."""
    return row["p_female"] if row["gender"] == "female" else 1.0 - row["p_female"]


def is_uncertain(row: dict[str, Any]) -> bool:
    """Whether the row's gender is below the model's certainty threshold (gender_certain false; a row without
    the column, or with it empty, counts as certain)."""
    certain = row.get("gender_certain")
    return certain is not None and certain == certain and not bool(certain)


def gender_text(row: dict[str, Any]) -> str:
    """The gender with its probability, "female 97%", or when the answer is not certain (below the model's
    threshold) "uncertain (52% female)"."""
    if is_uncertain(row):
        return f"uncertain ({row['p_female']:.0%} female)"
    return f"{row['gender']} {gender_probability(row):.0%}"


def age_text(row: dict[str, Any]) -> str:
    """The age with its interval when the model has one: "31 (26–37)", else "31"."""
    text = f"{row['age']:.0f}"
    if row.get("age_low") is not None and row.get("age_high") is not None:
        text += f" ({row['age_low']:.0f}–{row['age_high']:.0f})"
    return text


def face_label(number: int, row: dict[str, Any]) -> str:
    parts = []
    if "gender" in row:
        parts.append(gender_text(row))
    if "age" in row:
        parts.append(age_text(row))
    return f"{number}: " + ", ".join(parts)


def label_font(side: int):
    try:
        return ImageFont.load_default(size=max(12, round(side / 40)))
    except (TypeError, OSError):  # Pillow built without FreeType
        return ImageFont.load_default()


def draw_faces(image: Image.Image, rows: list[dict[str, Any]], numbers: list[int] | None = None) -> Image.Image:
    """An RGB copy of the image with a numbered box and label per face (numbered from 1 unless `numbers`
    says otherwise), lines and text sized to the photo."""
    out = image.convert("RGB")  # a copy, whatever the mode
    draw = ImageDraw.Draw(out)
    side = max(image.size)
    width = max(2, round(side / 300))
    font = label_font(side)
    for number, row in zip(numbers or range(1, len(rows) + 1), rows, strict=True):
        x, y, w, h = row["box"]
        colour = COLOURS[None] if is_uncertain(row) else COLOURS.get(row.get("gender"), COLOURS[None])
        draw.rectangle((x, y, x + w, y + h), outline=colour, width=width)
        text = face_label(number, row)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y - th - 2 * width if y - th - 2 * width >= 0 else y + h  # above the box, else below it
        draw.rectangle((x, ty, x + tw + 2 * width, ty + th + 2 * width), fill=colour)
        draw.text((x + width - left, ty + width - top), text, fill=(255, 255, 255), font=font)
    return out
