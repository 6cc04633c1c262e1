"""Images as the models see them: any photo read upright in RGB, a face aligned like UTKFace's crops (eyes level,
at UTKFace's position and distance), the one resize, and grey copies.

The training and evaluation caches (agegender.data.manifest) and the photo path (agegender.inference) align and
resize through these same functions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from agegender.cli import UserError

# Where UTKFace's aligned 200x200 crops put the eyes (measured with MTCNN on 60 of them):
# eye midpoint at (0.49, 0.289) of the side, eyes 0.389 of the side apart.
CROP_SIDE = 200
EYE_CENTRE = (0.49, 0.289)
EYE_DISTANCE = 0.389


class UnreadableImage(UserError):
    """The file is not an image PIL can decode."""


WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # 16-bit, 32-bit and float greyscale


def eight_bit(array: np.ndarray) -> np.ndarray:
    """Pixel values as uint8: 8-bit values as they are; wider ones (16-bit PNGs and TIFFs, float arrays) scaled
    from their type's full range (65,535 for 16 bits) when they exceed 255, so a 16-bit photo keeps its
    contrast instead of turning white where PIL would clip it."""
    if array.dtype == np.uint8:
        return array
    values = np.asarray(array, dtype=np.float64)
    top = float(np.nanmax(values)) if values.size else 0.0
    if top > 255:
        values = values * (255.0 / (65535.0 if top <= 65535 else top))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def read_image(source: str | Path | np.ndarray | Image.Image) -> Image.Image:
    """Any file, array or PIL image as an upright RGB PIL image (grayscale, 16-bit, RGBA, palette and EXIF
    handled)."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = Image.fromarray(eight_bit(source))
    else:
        try:
            with Image.open(source) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
        except FileNotFoundError as error:
            raise UserError(f"{source} does not exist.") from error
        except Exception as error:
            raise UnreadableImage(f"{source} is not a readable image ({type(error).__name__}).") from error
    if image.mode in WIDE_MODES:
        image = Image.fromarray(eight_bit(np.asarray(image)))
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


@dataclass
class Face:
    box: tuple[int, int, int, int]  # x, y, width, height in the original image
    confidence: float
    left_eye: tuple[float, float] | None = None
    right_eye: tuple[float, float] | None = None


def face_crop(image: Image.Image, face: Face, side: int = CROP_SIDE) -> Image.Image:
    """A side x side crop aligned like UTKFace's: eyes level, at UTKFace's position and distance.

    Warping straight to the model's input side (rather than to UTKFace's 200 px and resizing) is one PIL call
    instead of two, ~5x less CPU per face; a face more than twice the output's scale is first shrunk with a
    box filter, since a bilinear warp samples only 4 pixels per output pixel and would alias."""
    if face.left_eye is None or face.right_eye is None:
        x, y, w, h = face.box  # no landmarks: a square around the box centre
        half = max(w, h) * 1.1 / 2
        cx, cy = x + w / 2, y + h / 2
        box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
        return image.crop(box).resize((side, side), Image.Resampling.BILINEAR, reducing_gap=3.0)
    (lx, ly), (rx, ry) = face.left_eye, face.right_eye
    distance = max(math.hypot(rx - lx, ry - ly), 1.0)
    scale = distance / (EYE_DISTANCE * side)  # input pixels per output pixel
    shrink = int(scale)
    if shrink >= 2:
        image = image.reduce(shrink)
        lx, ly, rx, ry, scale = lx / shrink, ly / shrink, rx / shrink, ry / shrink, scale / shrink
    angle = math.atan2(ry - ly, rx - lx)
    mx, my = (lx + rx) / 2, (ly + ry) / 2
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    ox, oy = EYE_CENTRE[0] * side, EYE_CENTRE[1] * side
    # output (u, v) samples input (a*u + b*v + c, d*u + e*v + f)
    a, b, d, e = cos, -sin, sin, cos
    c = mx - a * ox - b * oy
    f = my - d * ox - e * oy
    return image.transform((side, side), Image.Transform.AFFINE, (a, b, c, d, e, f),
                           resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))


OVERSAMPLED_INPUT = 64  # models whose input side is at most this read faces aligned at twice it, then halved


def input_crop(image: Image.Image, face: Face, image_size: int) -> Image.Image:
    """The face as a model of image_size px reads it in the photo path: face_crop at image_size, or for an
    input of at most OVERSAMPLED_INPUT px, face_crop at twice the side averaged 2 x 2 down to it (a bilinear
    warp straight to a small side keeps more aliasing than the model's validation faces favour; see
    docs/decisions.md, "Alignment")."""
    if image_size > OVERSAMPLED_INPUT:
        return face_crop(image, face, image_size)
    return face_crop(image, face, 2 * image_size).reduce(2)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_face_array(path: Path | str, image_size: int) -> np.ndarray:
    """Decode one image file to an RGB uint8 array of image_size x image_size (the training resize)."""
    with Image.open(path) as image:
        return resize_face(image, image_size)


def load_aligned_face(path: Path | str, face, image_size: int) -> np.ndarray:
    """One face of a photo (as read_image reads it) aligned by face_crop at image_size: the alignment of the
    training and evaluation caches. The photo path aligns the same way except for inputs of at most 64 px
    (input_crop)."""
    return resize_face(face_crop(read_image(path), face, image_size), image_size)


def resize_face(image: Image.Image, image_size: int) -> np.ndarray:
    """The one resize used for training, evaluation and inference."""
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8)


LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, how old and scanned photos turn grey
GREY_TOLERANCE = 0.01  # mean |R - G| + |G - B| on the [0, 1] scale under which an image counts as grey


def grey_copy(images: np.ndarray) -> np.ndarray:
    """uint8 images (N x H x W x 3) turned grey (ITU-R 601 luma) in all three channels."""
    luma = np.clip(np.rint(images.astype(np.float32) @ LUMA), 0, 255).astype(np.uint8)
    return np.repeat(luma[..., None], 3, axis=-1)


def is_grey(images: np.ndarray, scale: float = 255.0) -> np.ndarray:
    """Per image, whether its three channels are equal to within GREY_TOLERANCE (images on [0, scale]); the
    test the ensemble's GreySwitch layer makes."""
    pixels = np.asarray(images, dtype=np.float32) / scale
    spread = np.abs(pixels[..., 0] - pixels[..., 1]) + np.abs(pixels[..., 1] - pixels[..., 2])
    return spread.mean(axis=(1, 2)) < GREY_TOLERANCE
