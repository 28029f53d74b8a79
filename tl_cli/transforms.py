"""Image decoding and the train / eval transform presets.

Every preset is built from the backbone's preprocessing (size, mean, std, interpolation,
crop_pct), never from hard-coded ImageNet numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

AUGMENTS = ("none", "flip", "standard", "randaugment")

# Random-resized-crop scale range. ImageNet's (0.08, 1) is too aggressive for a few thousand
# images of mostly centred objects; (0.35, 1) keeps the object in the crop.
RRC_SCALE = (0.35, 1.0)


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


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(name)
    except ValueError:
        return InterpolationMode.BILINEAR


def _normalize(preprocessing: dict[str, Any]) -> list[Callable]:
    from torchvision import transforms as T

    return [T.ToTensor(), T.Normalize(preprocessing["mean"], preprocessing["std"])]


def eval_transform(preprocessing: dict[str, Any]) -> Callable:
    """Resize the short side to ``size / crop_pct``, centre-crop ``size``, normalise."""
    from torchvision import transforms as T

    height, width = preprocessing["image_size"]
    scale = int(math.floor(min(height, width) / preprocessing.get("crop_pct", 1.0)))
    interp = _interpolation(preprocessing["interpolation"])
    return T.Compose([T.Resize(scale, interpolation=interp), T.CenterCrop((height, width)), *_normalize(preprocessing)])


def train_transform(augment: str, preprocessing: dict[str, Any]) -> Callable:
    """The training preset named by `augment` (one of `AUGMENTS`).

    - ``none``: exactly the eval transform (deterministic: bottleneck features can be cached).
    - ``flip``: eval transform plus a random horizontal flip.
    - ``standard``: random resized crop (scale 0.35-1) plus horizontal flip.
    - ``randaugment``: ``standard`` plus RandAugment (2 ops, magnitude 9).
    """
    from torchvision import transforms as T

    if augment not in AUGMENTS:
        raise ValueError(f"data.augment={augment!r}; choose one of {', '.join(AUGMENTS)}")
    if augment == "none":
        return eval_transform(preprocessing)
    height, width = preprocessing["image_size"]
    interp = _interpolation(preprocessing["interpolation"])
    if augment == "flip":
        scale = int(math.floor(min(height, width) / preprocessing.get("crop_pct", 1.0)))
        geometric = [T.Resize(scale, interpolation=interp), T.CenterCrop((height, width)), T.RandomHorizontalFlip()]
    else:
        geometric = [
            T.RandomResizedCrop((height, width), scale=RRC_SCALE, interpolation=interp),
            T.RandomHorizontalFlip(),
        ]
    if augment == "randaugment":
        geometric.append(T.RandAugment(num_ops=2, magnitude=9, interpolation=interp))
    return T.Compose([*geometric, *_normalize(preprocessing)])


def is_deterministic(augment: str) -> bool:
    """Whether the train transform gives the same tensor for the same image every time."""
    return augment == "none"


# --------------------------------------------------------------------------- decoded-image cache
#
# The cache keeps each image decoded and resized once, to the eval resize (short side =
# image_size / crop_pct), as uint8. The tensor presets below then do on that tensor what the
# PIL presets do on the decoded file: the eval path gives identical pixels (same resize, same
# centre crop, same /255 scaling); random resized crops are taken from the resized image
# instead of the full-resolution one.


def cache_side(preprocessing: dict[str, Any]) -> int:
    """Short side, in pixels, of a cached image: the eval transform's resize."""
    height, width = preprocessing["image_size"]
    return int(math.floor(min(height, width) / preprocessing.get("crop_pct", 1.0)))


def decode_for_cache(path: str | Path, preprocessing: dict[str, Any]) -> np.ndarray:
    """Decode, convert to RGB and resize like the eval transform; HWC uint8."""
    from torchvision import transforms as T

    resize = T.Resize(cache_side(preprocessing), interpolation=_interpolation(preprocessing["interpolation"]))
    return np.asarray(resize(load_rgb(path)), dtype=np.uint8)


def normalize_batch(x: torch.Tensor, preprocessing: dict[str, Any]) -> torch.Tensor:
    """uint8 images ``[B, 3, H, W]`` -> float32 normalised like `eval_transform`'s output.

    The cached-image path keeps batches uint8 through the DataLoader (4x less to copy between
    worker processes and to the GPU) and normalises here, on the model's device.
    """
    mean = torch.tensor(preprocessing["mean"], dtype=torch.float64)
    std = torch.tensor(preprocessing["std"], dtype=torch.float64)
    # (x / 255 - mean) / std as one multiply and one subtract, in place
    scale = (1.0 / (255.0 * std)).to(device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    shift = (mean / std).to(device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    return x.to(torch.float32).mul_(scale).sub_(shift)


def tensor_eval_transform(preprocessing: dict[str, Any]) -> Callable:
    """`eval_transform` for a cached uint8 CHW tensor, minus normalisation (`normalize_batch`)."""
    from torchvision.transforms import v2

    return v2.CenterCrop(tuple(preprocessing["image_size"]))


def tensor_train_transform(augment: str, preprocessing: dict[str, Any]) -> Callable:
    """`train_transform` for a cached uint8 CHW tensor, minus normalisation (`normalize_batch`)."""
    from torchvision.transforms import v2

    if augment not in AUGMENTS:
        raise ValueError(f"data.augment={augment!r}; choose one of {', '.join(AUGMENTS)}")
    if augment == "none":
        return tensor_eval_transform(preprocessing)
    size = tuple(preprocessing["image_size"])
    interp = _interpolation(preprocessing["interpolation"])
    if augment == "flip":
        ops: list[Callable] = [v2.CenterCrop(size), v2.RandomHorizontalFlip()]
    else:
        ops = [
            v2.RandomResizedCrop(size, scale=RRC_SCALE, interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    if augment == "randaugment":
        ops.append(v2.RandAugment(num_ops=2, magnitude=9, interpolation=interp))
    return v2.Compose(ops)
