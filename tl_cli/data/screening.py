"""Screening images before they crash a run: one file (`inspect_image`) or many in processes.

Used by ``data.on_bad_image`` during the first pass and by `tl data check`.

Every file is decoded fully (a truncated JPEG only fails at its last bytes) and converted the
way training converts it. What would break training is an *error*; what tl converts on the fly
(grayscale, palette, alpha, CMYK, 16-bit) or what deserves a look (EXIF rotation, very small
images, duplicates) is reported but does not stop anything.
"""

from __future__ import annotations

import functools
import hashlib
import io
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from tl_cli.data.images import draft_for, note_reduced, to_rgb
from tl_cli.errors import described

HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def inspect_image(
    path: str | Path,
    image_suffixes: frozenset[str] | None = None,
    *,
    digest: bool = True,
    keep: bool = False,
    shrink_to: int | None = None,
) -> dict[str, Any]:
    """Decode one file fully; return what tl needs to know about it.

    Keys: ``path``, ``bytes``, ``sha256`` (with `digest`), ``error`` (None if the file is
    usable), ``width``, ``height``, ``mode``, ``converted`` (list of: grayscale, palette, alpha,
    cmyk, 16-bit), ``exif_rotated``, and with `keep` ``image``: the RGB image as training sees
    it (so the screening pass and the cache build share one decode; with `shrink_to`, the
    short side it is about to be resized to, a large JPEG decodes smaller, as `load_rgb` does it
    for training: every byte is still decoded, so a truncated file still fails).
    """
    path = Path(path)
    info: dict[str, Any] = {"path": str(path), "error": None, "converted": [], "exif_rotated": False}
    try:
        data = path.read_bytes()
    except OSError as exc:
        info["error"] = f"cannot be read: {exc.strerror or exc}"
        return info
    info["bytes"] = len(data)
    if digest:
        info["sha256"] = hashlib.sha256(data).hexdigest()
    if image_suffixes is not None and path.suffix.lower() not in image_suffixes:
        info["error"] = f"not an image (extension {path.suffix or 'none'})"
        return info
    if not data:
        info["error"] = "empty file (0 bytes)"
        return info
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # the file's, before any reduced-scale decode
            box = draft_for(img, shrink_to)
            img.load()
            mode = img.mode
            info["mode"], info["width"], info["height"] = mode, width, height
            orientation = img.getexif().get(0x0112)
            info["exif_rotated"] = orientation not in (None, 0, 1)
            if mode in ("L", "LA", "1"):
                info["converted"].append("grayscale")
            if mode in ("P", "PA"):
                info["converted"].append("palette")
            if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
                info["converted"].append("alpha")
            if mode == "CMYK":
                info["converted"].append("cmyk")
            if mode in HIGH_BIT_MODES:
                info["converted"].append("16-bit")
            rgb = note_reduced(to_rgb(ImageOps.exif_transpose(img)), box, (width, height), orientation)
            if orientation in (5, 6, 7, 8):  # a quarter turn: the picture a person sees
                info["width"], info["height"] = height, width
            if keep:
                info["image"] = rgb
    except UnidentifiedImageError:
        info["error"] = "not an image (no image format recognises it)"
    except Image.DecompressionBombError as exc:
        info["error"] = too_large(exc)
    except Exception as exc:  # truncated data, bad huffman tables...
        info["error"] = f"corrupt or truncated ({described(exc, 120)})"
    return info


def too_large(exc: Exception) -> str:
    """Pillow's refusal of a huge image, said as what it is: the file may well be fine."""
    pixels = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(pixels.group(1)) / 1e6:,.0f} megapixels, " if pixels else ""
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
    return (
        f"too large to decode ({size}over the {limit:,.0f} that Pillow decodes: it refuses larger "
        "images as a possible decompression bomb; the file itself may be fine, so shrink it)"
    )


def _ignore_preemption_signal() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def inspect_all(
    paths: Sequence[Path], workers: int, suffixes: frozenset[str] | None = None, progress: bool = False
) -> Iterator[dict[str, Any]]:
    """`inspect_image` over `paths` in `workers` processes, in order, optionally with progress.

    A process pool of the standard library rather than a DataLoader: `tl data check` then
    starts without importing torch.
    """
    total, last = len(paths), 0.0
    tty = sys.stderr.isatty()
    inspect = functools.partial(inspect_image, image_suffixes=suffixes)
    pool = ProcessPoolExecutor(workers, initializer=_ignore_preemption_signal) if workers > 0 else None
    try:
        results = pool.map(inspect, paths, chunksize=8) if pool else map(inspect, paths)
        for done, info in enumerate(results, 1):
            if progress and (time.monotonic() - last > (0.5 if tty else 5.0) or done == total):
                last = time.monotonic()
                text = f"tl: checked {done}/{total} files ({100 * done // max(total, 1)} %)"
                end = "\n" if done == total or not tty else ""
                print(f"\r{text}" if tty else text, end=end, file=sys.stderr, flush=True)
            yield info
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
