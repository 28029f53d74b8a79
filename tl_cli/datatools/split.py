"""`tl data split`: a stratified, reproducible train/val/test layout from a pile of images.

The source is either a folder of class sub-folders, or a flat folder named like Kaggle's
dogs-vs-cats ``train/`` (``cat.123.jpg``, ``dog.456.jpg``: the class is the part before the
first dot, written as a plural folder, ``cats/``). Originals are hard-linked (or copied where
links cannot be made, or with ``--copy``), never moved; nothing in the output folder is
overwritten.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

from tl_cli.errors import TLError

FLAT_NAME = re.compile(r"^([A-Za-z][A-Za-z_-]*)\.\d+\.[A-Za-z0-9]+$")


def _images(folder: Path) -> list[Path]:
    from tl_cli.data.folders import IMAGE_SUFFIXES, is_ignored

    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(is_ignored(Path(x)) for x in p.relative_to(folder).parts)
    )


def discover(src: Path) -> dict[str, list[Path]]:
    """``{class: [images]}`` from class sub-folders, or from flat ``<class>.<n>.<ext>`` names."""
    if not src.is_dir():
        raise TLError(f"{src} is not a folder of images.")
    subdirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = {d.name: _images(d) for d in subdirs}
    classes = {k: v for k, v in classes.items() if v}
    if classes:
        return classes
    flat: dict[str, list[Path]] = {}
    unmatched = []
    for path in _images(src):
        match = FLAT_NAME.match(path.name)
        if match is None:
            unmatched.append(path.name)
            continue
        name = match.group(1).lower()
        flat.setdefault(name if name.endswith("s") else f"{name}s", []).append(path)
    if not flat:
        raise TLError(
            f"{src} has neither class sub-folders with images nor files named like "
            "'cat.123.jpg' (class.number.ext). Put each class's images in SRC/<class>/."
        )
    if unmatched:
        raise TLError(
            f"{len(unmatched)} file(s) in {src} are not named <class>.<number>.<ext> "
            f"(e.g. {unmatched[0]}), so their class is unknown. Move them out or sort them into class folders."
        )
    return {k: sorted(v, key=_natural) for k, v in sorted(flat.items())}


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def split_dataset(
    src: str | Path, out: str | Path, counts: dict[str, int], seed: int = 0, copy: bool = False
) -> dict[str, dict[str, int]]:
    """Write ``out/{split}/{class}/`` with ``counts[split]`` images per class; return the counts."""
    src, out = Path(src), Path(out)
    if any(n < 0 for n in counts.values()):
        raise TLError("Image counts must be >= 0.")
    if out.exists() and any(out.iterdir()):
        raise TLError(f"{out} exists and is not empty; tl does not write over files. Choose a new folder.")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise TLError(f"The output {out} must not be inside the source {src}.")
    classes = discover(src)
    wanted = sum(counts.values())
    short = {c: len(files) for c, files in classes.items() if len(files) < wanted}
    if short:
        detail = ", ".join(f"{c} has {n}" for c, n in short.items())
        raise TLError(
            f"Not enough images: the split asks {wanted} per class "
            f"({' + '.join(f'{n} {s}' for s, n in counts.items())}), but {detail}. "
            "Lower --train/--val/--test; tl does not silently give fewer."
        )
    written: dict[str, dict[str, int]] = {s: {} for s in counts}
    for cls, files in classes.items():
        order = list(files)
        random.Random(f"{seed}:{cls}").shuffle(order)
        start = 0
        for split, n in counts.items():
            dest = out / split / cls
            dest.mkdir(parents=True, exist_ok=True)
            for path in order[start : start + n]:
                rel = path.relative_to(src / cls) if (src / cls).is_dir() else Path(path.name)
                target = dest / "_".join(rel.parts)
                _place(path, target, copy)
            written[split][cls] = n
            start += n
    return written


def _place(path: Path, target: Path, copy: bool) -> None:
    if target.exists():
        raise TLError(f"{target} already exists (two source files map to one name); nothing was overwritten.")
    if not copy:
        try:
            os.link(path, target)
            return
        except OSError:  # another file system, or links not allowed: copy instead
            pass
    shutil.copy2(path, target)
