"""Decoding any image file into the 8-bit RGB picture a person would see (no torch here:
`tl data check` and `tl data split` start without it)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

# Pillow's reducing gap (the default of its `Image.thumbnail`): a JPEG far larger than it will
# be shown is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling, never below twice the
# size it is then resized to, so the fair resize after it still has two pixels a pixel to
# average. Pixels within a fraction of a grey level of a full decode, at about half its cost
# for a photograph several times the network's input.
REDUCING_GAP = 2.0


# `Image.info` key of a picture decoded at a reduced scale: where the file's whole picture lies in
# it, for the resize after it (see `note_reduced`)
REDUCED = "tl_reduced"


def draft_for(img: Image.Image, short_side: Optional[int]) -> Optional[tuple[float, ...]]:
    """Ask a not yet loaded JPEG to decode at the smallest DCT scale whose short side stays at
    least ``REDUCING_GAP * short_side`` (other formats, or no `short_side`: nothing). Returns
    Pillow's box of the whole picture in the smaller decode, or None if it is not smaller."""
    if not short_side or short_side <= 0 or not img.size or min(img.size) <= 0:
        return None
    least = math.ceil(REDUCING_GAP * short_side)
    if min(img.size) >= 2 * least:  # at least a halving is possible
        # a square request: Pillow takes the largest scale that keeps both sides at or above it,
        # so the short side alone decides (the long side's rounding cannot cost a scale)
        full = img.size
        drafted = img.draft(None, (least, least))
        if drafted is not None and img.size != full:
            return drafted[1]
    return None


def note_reduced(
    picture: Image.Image, box: Optional[tuple[float, ...]], full: tuple[int, int], orientation: Optional[int]
) -> Image.Image:
    """Record on `picture` (a reduced decode, EXIF orientation applied) the file's own size
    and where its picture lies: libjpeg rounds a reduced size up, so a last row or column may be
    partly outside the picture (a 1001 px side at 1/4 gives 251 px, of which 250.25 are the
    picture). `Image.thumbnail` resizes with this box; `transforms.decode_resized` does too, so
    a reduced decode gives a full decode's size and geometry."""
    if box is None:
        return picture
    w, h = picture.size
    bw, bh, fw, fh = box[2] - box[0], box[3] - box[1], *full
    if orientation in (5, 6, 7, 8):  # a quarter turn swapped the sides
        bw, bh, fw, fh = bh, bw, fh, fw
    # where the file's first pixel went: its box is anchored at that corner
    x0 = w - bw if orientation in (2, 3, 6, 7) else 0.0
    y0 = h - bh if orientation in (3, 4, 7, 8) else 0.0
    picture.info[REDUCED] = {"size": (w, h), "box": (x0, y0, x0 + bw, y0 + bh), "full": (fw, fh)}
    return picture


def load_rgb(path: str | Path, shrink_to: Optional[int] = None) -> Image.Image:
    """Decode an image fully into 8-bit RGB, the way a person would see it.

    EXIF orientation is applied; transparency (RGBA, LA, palette with alpha) is composited on
    white; CMYK, grayscale and 16-bit images are converted with their full range mapped onto
    0-255 (a plain ``convert("RGB")`` clips 16-bit images to white). With `shrink_to`, an image
    about to be resized to that short side may decode smaller (`draft_for`).
    """
    with Image.open(path) as img:
        full = img.size
        box = draft_for(img, shrink_to)
        img.load()
        orientation = img.getexif().get(0x0112)
        img = ImageOps.exif_transpose(img)
    return note_reduced(to_rgb(img), box, full, orientation)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (see `load_rgb`)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            peak = 1.0 if arr.size and arr.max() <= 1.0 else 255.0
        else:
            peak = 65535.0 if mode.startswith("I;16") or (arr.size and arr.max() > 255) else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
