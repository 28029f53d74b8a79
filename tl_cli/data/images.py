"""Decoding any image file into the 8-bit RGB picture a person would see (no torch here:
`tl data check` and `tl data split` start without it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully into 8-bit RGB, the way a person would see it.

    EXIF orientation is applied; transparency (RGBA, LA, palette with alpha) is composited on
    white; CMYK, grayscale and 16-bit images are converted with their full range mapped onto
    0-255 (a plain ``convert("RGB")`` clips 16-bit images to white).
    """
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


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
