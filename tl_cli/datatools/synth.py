"""The embedded default dataset: shapes on textured backgrounds, in the ImageFolder layout.

Each image shows one large filled shape (the class) over a random colour gradient with noise,
a few thin lines and a few smaller shapes, each any of the four (distractors, at most two
thirds of the class shape's radius, also in a set of fewer classes). Shape colour, background
colour, size, aspect, rotation and position are drawn independently of the class, so the mean
colour and brightness of an image say nothing about its class; a classifier has to find the
largest outline. Every image is a function of (seed, split, class, index) alone: the same
command writes the same bytes.

Why distractors: without them frozen ImageNet features already separate the shapes, and the
demo could not show what fine-tuning adds. Pooled frozen features mix the small shapes in with
the large one; fine-tuning learns to tell them apart (figures: bench/README.md).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tl_cli.errors import TLError

CLASSES = ("ellipses", "rectangles", "triangles", "stars")


def image_rng(seed: int, *key: object) -> np.random.Generator:
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _polygon(kind: str, cx: float, cy: float, rx: float, ry: float, angle: float) -> list[tuple[float, float]]:
    if kind == "ellipses":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 64, endpoint=False)]
    elif kind == "rectangles":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "triangles":
        pts = [(math.cos(t), math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:
        pts = [
            (
                (1.0 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                (1.0 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5),
            )
            for i in range(10)
        ]
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + rx * x * cos - ry * y * sin, cy + rx * x * sin + ry * y * cos) for x, y in pts]


DISTRACTORS = 3


def _colour(rng: np.random.Generator) -> tuple[int, ...]:
    return tuple(int(v) for v in rng.uniform(0, 255, 3))


def render_shape(kind: str, rng: np.random.Generator, size: int, distractors: int = DISTRACTORS) -> Image.Image:
    """One image of class `kind`, with `distractors` small shapes of random classes behind it."""
    width = int(size * rng.uniform(0.85, 1.25))
    height = int(size * rng.uniform(0.75, 1.0))
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ramp = np.linspace(0, 1, width)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, height)[:, None, None]
    background = c0 + (c1 - c0) * ramp
    background = np.broadcast_to(background, (height, width, 3)) + rng.normal(0, 18, (height, width, 3))
    img = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, x1 = rng.uniform(0, width, 2)
        y0, y1 = rng.uniform(0, height, 2)
        draw.line(
            [(x0, y0), (x1, y1)], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)), width=int(rng.integers(1, 4))
        )
    short = min(width, height)
    for _ in range(distractors):
        other = CLASSES[int(rng.integers(len(CLASSES)))]
        r = short * rng.uniform(0.06, 0.12)
        x, y = rng.uniform(r, width - r), rng.uniform(r, height - r)
        draw.polygon(
            _polygon(other, x, y, r, r * rng.uniform(0.6, 1.0), rng.uniform(0, 2 * math.pi)), fill=_colour(rng)
        )
    radius = short * rng.uniform(0.18, 0.36)
    aspect = rng.uniform(0.6, 1.0)
    rx, ry = (radius, radius * aspect) if rng.random() < 0.5 else (radius * aspect, radius)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    colour = rng.uniform(0, 255, 3)
    if np.abs(colour - background.mean(axis=(0, 1))).sum() < 120:  # keep the shape visible
        colour = 255 - colour
    draw.polygon(_polygon(kind, cx, cy, rx, ry, rng.uniform(0, 2 * math.pi)), fill=tuple(int(v) for v in colour))
    return img


def synthesize(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_classes: int = 4,
    per_split: dict[str, int] | None = None,
    size: int = 256,
    distractors: int = DISTRACTORS,
    force: bool = False,
) -> dict[str, dict[str, int]]:
    """Write ``out_dir/{split}/{class}/{class}.{i}.jpg``; return the counts written.

    Raises:
        TLError: `out_dir` is not empty (and `force` is false), or arguments are out of range.
    """
    out = Path(out_dir)
    per_split = per_split or {"train": 60, "val": 20, "test": 40}
    if not 2 <= num_classes <= len(CLASSES):
        raise TLError(f"--classes {num_classes}: tl data synth makes 2 to {len(CLASSES)} classes.")
    if size < 32:
        raise TLError(f"--size {size}: use at least 32 pixels.")
    if distractors < 0:
        raise TLError(f"--distractors {distractors}: the number of small shapes must be >= 0.")
    if out.exists() and any(out.iterdir()) and not force:
        raise TLError(
            f"{out} already exists and is not empty; tl does not write over your files. Choose "
            "another folder, or pass --force to add the generated images to it."
        )
    counts: dict[str, dict[str, int]] = {}
    for split, n in per_split.items():
        if n < 0:
            raise TLError(f"--{split} {n}: the number of images must be >= 0.")
        counts[split] = {}
        for kind in CLASSES[:num_classes]:
            folder = out / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                render_shape(kind, image_rng(seed, split, kind, i), size, distractors).save(
                    folder / f"{kind}.{i}.jpg", quality=90
                )
            counts[split][kind] = n
    return counts
