"""Image decoding and the one transform pipeline (torchvision ``transforms.v2``).

Every image takes the same road, whether it comes from its file or from the decoded-image
cache: decoded to 8-bit RGB, shrunk once so its short side is the eval resize
(``image_size / crop_pct``) and kept as a uint8 ``[3, H, W]`` tensor (`decode_resized`, what
the cache stores; an image smaller than that stays at its own size, so a cache of small
images stays small); then brought up to the eval resize if it is smaller, cropped, flipped and
augmented as uint8 by `crop_pipeline`; then
normalised in float on the model's device by `Normalize`. So cached and uncached runs see
identical pixels, batches cross process and device boundaries as uint8 (4x less to copy),
and every preset is built from the backbone's preprocessing (size, mean, std,
interpolation, crop), never from hard-coded ImageNet numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from tl_cli.data.images import REDUCED, load_rgb, to_rgb

Augment = Literal["none", "flip", "standard", "randaugment"]
AUGMENTS: tuple[str, ...] = ("none", "flip", "standard", "randaugment")

# Random-resized-crop scale range. ImageNet's (0.08, 1) is too aggressive for a few thousand
# images of mostly centred objects; (0.35, 1) keeps the object in the crop.
RRC_SCALE = (0.35, 1.0)


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(name)
    except ValueError:
        return InterpolationMode.BILINEAR


def resize_side(preprocessing: dict[str, Any]) -> int:
    """Short side, in pixels, an image is resized to before cropping: the eval resize."""
    height, width = preprocessing["image_size"]
    return int(math.floor(min(height, width) / preprocessing.get("crop_pct", 1.0)))


def decode_resized(image: str | Path | Image.Image, preprocessing: dict[str, Any]) -> torch.Tensor:
    """Decode (a path: a large JPEG at a reduced scale, see `images.draft_for`) or take (a PIL
    image), convert to RGB and shrink the short side to `resize_side`: a uint8 ``[3, H, W]``
    tensor, what the decoded-image cache stores. A smaller image keeps its own size
    (`crop_pipeline` enlarges it, on the fly)."""
    from torchvision.transforms import v2

    side = resize_side(preprocessing)
    picture = to_rgb(image if isinstance(image, Image.Image) else load_rgb(image, shrink_to=side))
    interpolation = _interpolation(preprocessing["interpolation"])
    reduced = picture.info.get(REDUCED)
    if reduced is not None and reduced["size"] == picture.size:
        # decoded smaller: resized from the box of the file's picture to the size its full decode
        # would get (v2.Resize on a PIL image is Image.resize at that size; it takes no box)
        from torchvision.transforms.functional import pil_modes_mapping

        size = shorter_side_to(reduced["full"], side)
        picture = picture.resize(size, resample=pil_modes_mapping[interpolation], box=reduced["box"])
    elif min(picture.size) > side:
        picture = v2.Resize(side, interpolation=interpolation)(picture)
    return v2.functional.pil_to_tensor(picture)


def shorter_side_to(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) of an image of `size` whose short side `v2.Resize(side)` brings to `side`
    (torchvision's rule: the long side scaled and truncated)."""
    w, h = size
    if w <= h:
        return side, int(side * h / w)
    return int(side * w / h), side


class UpToResizeSide(torch.nn.Module):
    """Enlarge a uint8 ``[3, H, W]`` image whose short side is below `side` to `side` (the
    eval resize); larger ones pass untouched. The first step of every `crop_pipeline`, so an
    image cached at its own small size gives the pixels the uncached road gives."""

    def __init__(self, side: int, interpolation: Any) -> None:
        super().__init__()
        self.side, self.interpolation = side, interpolation

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if min(image.shape[-2:]) >= self.side:
            return image
        from torchvision.transforms import v2

        # through PIL, as `decode_resized` shrinks: the pixels of the classic PIL eval transform
        picture = v2.Resize(self.side, interpolation=self.interpolation)(v2.functional.to_pil_image(image))
        return v2.functional.pil_to_tensor(picture)


def crop_pipeline(augment: str, preprocessing: dict[str, Any]) -> Any:
    """From a `decode_resized` tensor to the network's input size, uint8 in, uint8 out.

    - ``none``: centre crop, the evaluation view (deterministic: features can be cached).
    - ``flip``: centre crop plus a random horizontal flip.
    - ``standard``: random resized crop (scale 0.35-1) plus horizontal flip.
    - ``randaugment``: ``standard`` plus RandAugment (2 ops, magnitude 9).
    """
    from torchvision.transforms import v2

    if augment not in AUGMENTS:
        raise ValueError(f"data.augment={augment!r}; choose one of {', '.join(AUGMENTS)}")
    size = tuple(preprocessing["image_size"])
    interp = _interpolation(preprocessing["interpolation"])
    ops: list[Any] = [UpToResizeSide(resize_side(preprocessing), interp)]
    if augment == "none":
        return v2.Compose([*ops, v2.CenterCrop(size)])
    if augment == "flip":
        ops += [v2.CenterCrop(size), v2.RandomHorizontalFlip()]
    else:
        ops.append(v2.RandomResizedCrop(size, scale=RRC_SCALE, interpolation=interp, antialias=True))
        ops.append(v2.RandomHorizontalFlip())
    if augment == "randaugment":
        # its rotations and shears support only nearest/bilinear on tensors; bicubic backbones
        # (EfficientNet) get bilinear there, which for a geometric augmentation is no loss
        warp = (
            interp
            if interp in (v2.InterpolationMode.NEAREST, v2.InterpolationMode.BILINEAR)
            else v2.InterpolationMode.BILINEAR
        )
        ops.append(v2.RandAugment(num_ops=2, magnitude=9, interpolation=warp))
    return v2.Compose(ops)


def is_deterministic(augment: str) -> bool:
    """Whether the training pipeline gives the same tensor for the same image every time."""
    return augment == "none"


class Normalize(torch.nn.Module):
    """uint8 ``[B, 3, H, W]`` -> float ``(x / 255 - mean) / std``, on the batch's device.

    The constants are buffers, so they move with the model once and a step copies nothing
    to the device but the uint8 batch.
    """

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        mean_t, std_t = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        # (x / 255 - mean) / std as one multiply and one subtract
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).float().view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (mean_t / std_t).float().view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).mul_(self.scale).sub_(self.shift)


def preprocess(image: str | Path | Image.Image, preprocessing: dict[str, Any]) -> torch.Tensor:
    """One image as a float ``[3, H, W]`` network input, evaluation view (export checks, ONNX)."""
    x = crop_pipeline("none", preprocessing)(decode_resized(image, preprocessing))
    return Normalize(preprocessing["mean"], preprocessing["std"])(x[None])[0]
