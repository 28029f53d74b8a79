"""The ImageFolder layout on disk: ``root/{train,val,test}/<class>/<image>``.

Listing only, no decoding: what is an image file, which files the operating system drops
into folders, and the one-paragraph errors for folders that do not fit the layout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from tl_cli.errors import TLError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
# Files that operating systems drop into folders; they are not the user's images.
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini"})


def is_ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.name in IGNORED_NAMES


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: Path, others_too: bool = False) -> list[Path]:
    """Image files under `folder`, recursively, sorted; other files are an error, not skipped.

    With `others_too`, every file is returned: the ones that are not images become error rows in
    predictions.csv (prediction) or skipped files (``data.on_bad_image skip``).
    """
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_ignored(path):
                continue
            (images if others_too or is_image_name(path) else others).append(path)
    if others:
        shown = "\n  ".join(str(p) for p in others[:10])
        more = f"\n  ... and {len(others) - 10} more" if len(others) > 10 else ""
        raise TLError(
            f"{len(others)} file(s) under {folder} are not images (by extension; tl reads "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}):\n  {shown}{more}\n"
            "Move them out of the image folders, or pass --data.on_bad_image skip to train without "
            "them (each is named as it is skipped)."
        )
    return images


@contextlib.contextmanager
def named_as(read_root: Path, root: Path) -> Iterator[None]:
    """Layout errors raised inside name `root`'s files (the user's data.root), not those of
    `read_root` (its staged copy)."""
    try:
        yield
    except TLError as exc:
        if read_root == root:
            raise
        exc.args = (str(exc).replace(str(read_root), str(root)), *exc.args[1:])  # its class kept
        raise


def class_folders(split_dir: Path) -> list[str]:
    """The class folder names of one split, sorted: the label order of a new run."""
    if not split_dir.is_dir():
        raise TLError(
            f"Split folder {split_dir} does not exist. data.root must hold train/ and val/ "
            "(and test/ for `tl test`), each with one sub-folder per class; see data/README.md."
        )
    loose = [p for p in split_dir.iterdir() if p.is_file() and not is_ignored(p)]
    if loose:
        raise TLError(
            f"{split_dir} holds files directly ({loose[0].name}, ...); images must sit in one "
            f"sub-folder per class, e.g. {split_dir}/cats/{loose[0].name}."
        )
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not is_ignored(p))
    if not names:
        raise TLError(f"{split_dir} has no class folders; put each class's images in {split_dir}/<class>/.")
    return names


def scan_split(split_dir: Path, others_too: bool = False) -> dict[str, list[Path]]:
    """``{class name: [image paths]}`` for one split folder, classes sorted by name.

    With `others_too` (``data.on_bad_image skip``) files that are not images by extension are
    listed too: screening names and skips each, as it does with images that do not decode.
    """
    classes = {name: list_images(split_dir / name, others_too) for name in class_folders(split_dir)}
    empty = [name for name, files in classes.items() if not any(is_image_name(f) for f in files)]
    if empty:
        raise TLError(
            f"Class folder(s) {', '.join(str(split_dir / e) for e in empty)} contain no images. "
            "Add images or remove the folder."
        )
    return classes


def check_same_classes(reference: list[str], found: list[str], where: Path, reference_name: str) -> None:
    missing = sorted(set(reference) - set(found))
    extra = sorted(set(found) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing class folder(s) {', '.join(missing)}")
        if extra:
            parts.append(f"class folder(s) {', '.join(extra)} not in {reference_name}")
        raise TLError(
            f"{where} does not have the classes of {reference_name} ({', '.join(reference)}): "
            f"{'; '.join(parts)}. Every split needs the same class folders."
        )


def labelled_samples(
    split_dir: Path, classes: list[str], reference_name: str, others_too: bool = False
) -> list[tuple[Path, int]]:
    """``(path, label)`` for every image of a split (with `others_too`, every file), labels in
    the order of `classes`."""
    found = scan_split(split_dir, others_too)
    check_same_classes(classes, sorted(found), split_dir, reference_name)
    index = {name: i for i, name in enumerate(classes)}
    return [(path, index[name]) for name in sorted(found) for path in found[name]]


def predict_images(folder: Optional[Path]) -> list[Path]:
    """Every file under ``data.predict_dir`` (those that are no images become error rows)."""
    if folder is None:
        raise TLError("`tl predict` needs --data.predict_dir DIR, a folder of images to classify.")
    if not folder.is_dir():
        raise TLError(f"data.predict_dir={str(folder)!r} is not a folder.")
    paths = list_images(folder, others_too=True)
    if not paths:
        raise TLError(f"data.predict_dir={str(folder)!r} holds no images.")
    return paths


def target_train_images(target_root: Optional[Path], others_too: bool = False) -> list[Path]:
    """Domain adaptation's unlabelled target images: ``target_root/train/`` (sub-folder names
    ignored) or, without one, every image outside ``val/`` and ``test/``; with `others_too`
    (``data.on_bad_image skip``) the other files too, for screening to name and skip."""
    if target_root is None or not target_root.is_dir():
        raise TLError(f"data.target_root={str(target_root)!r} does not exist.")
    if (target_root / "train").is_dir():
        paths = list_images(target_root / "train", others_too)
    else:
        paths = [
            p
            for p in list_images(target_root, others_too)
            if p.relative_to(target_root).parts[0] not in ("val", "test")
        ]
    if not any(is_image_name(p) for p in paths):
        raise TLError(f"data.target_root={str(target_root)!r} holds no training images.")
    return paths
