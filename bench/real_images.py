"""Small sets of real images, built offline from Debian packages, for the accuracy benchmarks.

- ``openclipart-png`` (Open Clip Art Library, public domain): clip art sorted into folders.
- ``tuxpaint-stamps-default`` (Tux Paint's stamps, GPL/CC): mostly photographs of objects cut
  out on transparent backgrounds, sorted into folders.
- ``dataset-fashion-mnist`` (Zalando's Fashion-MNIST, MIT): 70,000 product photographs, 28x28
  grayscale, ten classes; the large photograph set.

The small sets (``SETS``) have tens of images a class; the large ones (``LARGE_SETS``), at least
2,000 training images each, are the scale the course works at (issue 33).

The packages are downloaded with ``apt-get download`` and unpacked with ``dpkg -x`` under
``runs/bench/pkgs`` (no root, nothing installed); each set is a stratified, seeded split made
by `tl data split` (hard links). Nothing here is committed: the images stay the packages'.

    python bench/real_images.py            # build every set, print their sizes
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import WORK

PKGS = WORK / "pkgs"
OPENCLIPART = PKGS / "openclipart" / "usr/share/openclipart/png"
TUXPAINT = PKGS / "tuxpaint" / "usr/share/tuxpaint/stamps"
FASHION = PKGS / "fashion-mnist" / "usr/share/datasets/fashion-mnist"
PACKAGES = {
    "openclipart": "openclipart-png",
    "tuxpaint": "tuxpaint-stamps-default",
    "fashion-mnist": "dataset-fashion-mnist",
}

# name: (kind, {class: [source folders]}, per-class train/val/test)
SETS = {
    # six broad clip-art categories
    "clipart6": (
        "clip art",
        {
            "animals": [OPENCLIPART / "animals"],
            "food": [OPENCLIPART / "food"],
            "people": [OPENCLIPART / "people"],
            "plants": [OPENCLIPART / "plants"],
            "tools": [OPENCLIPART / "tools"],
            "vehicles": [OPENCLIPART / "transportation/vehicles", OPENCLIPART / "transportation/boating"],
        },
        (30, 12, 20),
    ),
    # four finer clip-art classes
    "clipart4": (
        "clip art",
        {
            "beverages": [OPENCLIPART / "food/beverages"],
            "desserts": [OPENCLIPART / "food/desserts"],
            "fruit": [OPENCLIPART / "food/fruit"],
            "vehicles": [OPENCLIPART / "transportation/vehicles"],
        },
        (28, 8, 15),
    ),
    # four classes of photographs
    "photos4": (
        "photographs",
        {
            "birds": [TUXPAINT / "animals/birds"],
            "fruit": [TUXPAINT / "food/fruit"],
            "mammals": [TUXPAINT / "animals/mammals"],
            "vehicles": [TUXPAINT / "vehicles", TUXPAINT / "town"],
        },
        (20, 8, 10),
    ),
}

# At least 2,000 training images each. clipart8: Open Clip Art's eight largest top-level
# categories, at most 540 pictures a class (drawn once, seeded), split 65/10/25 % a class
# (unequal classes, as a lab's own collection is); fashion10: Fashion-MNIST's ten classes,
# 350 product photos a class from its training file, split 200/50/100 a class; shirts2: the
# issue's own set-up (two confusable classes of photographs, 1,000 / 200 / 200 a class), as
# Fashion-MNIST's T-shirts/tops against shirts, its two most confused classes.
LARGE_SETS = {
    "clipart8": (
        "clip art",
        {
            name: [OPENCLIPART / name]
            for name in (
                "animals",
                "computer",
                "food",
                "people",
                "recreation",
                "shapes",
                "signs_and_symbols",
                "transportation",
            )
        },
        (0.65, 0.10, 0.25),
    ),
    "fashion10": ("product photographs, 28x28 grayscale", "fashion-mnist", (200, 50, 100)),
    "shirts2": ("two confusable product photographs, 28x28", "fashion-mnist:tshirt_top,shirt", (1000, 200, 200)),
}
POOL_CAP = {"clipart8": 540, "fashion10": 350, "shirts2": 1400}
FASHION_CLASSES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)

# A domain pair for domain adaptation: the same four classes as photographs and as clip art.
PAIR_CLASSES = {
    "birds": ([TUXPAINT / "animals/birds"], [OPENCLIPART / "animals/birds"]),
    "fruit": ([TUXPAINT / "food/fruit"], [OPENCLIPART / "food/fruit"]),
    "mammals": ([TUXPAINT / "animals/mammals"], [OPENCLIPART / "animals/mammals"]),
    "vehicles": ([TUXPAINT / "vehicles"], [OPENCLIPART / "transportation/vehicles"]),
}


def unpack() -> None:
    """Download and unpack the two packages once (apt-get download works as any user)."""
    for name, package in PACKAGES.items():
        target = PKGS / name
        if (target / "usr").is_dir():
            continue
        PKGS.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=PKGS) as tmp:
            subprocess.run(["apt-get", "download", "-qq", package], cwd=tmp, check=True)
            deb = next(Path(tmp).glob("*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(target)], check=True)


def _images(folders: list[Path]) -> list[Path]:
    out = []
    for folder in folders:
        out += sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return out


MAX_SIDE = 640  # pool copies: some Open Clip Art PNGs are 100+ megapixels (minutes to decode)


BAND = 1024  # rows composited at a time in a transparent picture larger than BAND x BAND


def _shrink(job: tuple[Path, Path]) -> None:
    """A JPEG copy of `src` at most MAX_SIDE px a side, as tl would see it (alpha on white).

    A large transparent picture is put on white a band of rows at a time (`to_rgb` is per
    pixel, so the pixels are those of `load_rgb`): whole, its four full-size copies of a
    169-megapixel RGBA file (Open Clip Art has a dozen) took 3 GB a worker, and two workers
    beside a fine-tuning run were killed by the OOM killer (2026-12-07)."""
    from PIL import Image, ImageOps

    from tl_cli.data.images import to_rgb

    Image.MAX_IMAGE_PIXELS = None  # the package's own files, not user input
    src, dst = job
    with Image.open(src) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    w, h = img.size
    if img.mode in ("RGBA", "LA") and w * h > BAND * BAND:
        flat = Image.new("RGB", img.size)
        for top in range(0, h, BAND):
            flat.paste(to_rgb(img.crop((0, top, w, min(h, top + BAND)))), (0, top))
        img = flat
    else:
        img = to_rgb(img)
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    img.save(dst, quality=92)


def _pool(classes: dict[str, list[Path]], dest: Path, cap: int | None = None) -> Path:
    """One folder per class of shrunk JPEG copies of the package's pictures; a picture the
    package files under two names (symbolic links) or in two classes is used once, or not at
    all; at most `cap` a class, drawn with a fixed seed. Built in a temporary folder and
    renamed, so an interrupted build leaves no pool."""
    import random
    from concurrent.futures import ProcessPoolExecutor

    files = {
        name: {p.resolve() for p in _images(folders) if p.resolve().is_file()} for name, folders in classes.items()
    }
    shared = {f for name, fs in files.items() for f in fs if any(f in other for n, other in files.items() if n != name)}
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    jobs = []
    for name, fs in files.items():
        (tmp / name).mkdir(parents=True)
        kept = sorted(fs - shared)
        if cap is not None and len(kept) > cap:
            kept = sorted(random.Random(0).sample(kept, cap))
        jobs += [(path, tmp / name / f"{i:04d}_{path.stem}.jpg") for i, path in enumerate(kept)]
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_shrink, jobs, chunksize=8))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _fashion_pool(dest: Path, per_class: int, names: tuple[str, ...] = FASHION_CLASSES) -> Path:
    """PNG files of the first `per_class` images of each class in `names` in Fashion-MNIST's
    training file."""
    import gzip

    import numpy as np
    from PIL import Image

    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if unknown := set(names) - set(FASHION_CLASSES):  # a misspelt class would give an empty pool
        raise ValueError(f"not Fashion-MNIST classes: {sorted(unknown)}; they are {', '.join(FASHION_CLASSES)}")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for label, name in enumerate(FASHION_CLASSES):
        if name not in names:
            continue
        (tmp / name).mkdir(parents=True)
        for i in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(images[i]).save(tmp / name / f"{i:05d}.png")
    tmp.rename(dest)
    return dest


def _split_fractions(pool: Path, out: Path, fractions: tuple[float, float, float], seed: int) -> Path:
    """Like `tl data split`, with a fraction of each class per split (hard links)."""
    import os
    import random

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for cls in sorted(p for p in pool.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        random.Random(f"{seed}/{cls.name}").shuffle(files)
        n_train, n_val = round(fractions[0] * len(files)), round(fractions[1] * len(files))
        parts = {"train": files[:n_train], "val": files[n_train : n_train + n_val], "test": files[n_train + n_val :]}
        for split, chosen in parts.items():
            (tmp / split / cls.name).mkdir(parents=True)
            for f in chosen:
                os.link(f, tmp / split / cls.name / f.name)
    tmp.rename(out)
    return out


def _split(pool: Path, out: Path, counts: tuple, seed: int) -> Path:
    if (out / "train").is_dir():
        return out
    if isinstance(counts[0], float):
        return _split_fractions(pool, out, counts, seed)
    train, val, test = counts
    cmd = [sys.executable, "-m", "tl_cli.cli", "data", "split", str(pool), str(out), "--train", str(train)]
    cmd += ["--val", str(val), "--test", str(test), "--seed", str(seed)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def build(name: str, seed: int = 0) -> Path:
    """``runs/bench/real/<name>_s<seed>/{train,val,test}/<class>/``."""
    unpack()
    _, classes, counts = {**SETS, **LARGE_SETS}[name]
    pool = WORK / "real" / f"{name}_pool"
    if not pool.is_dir() and isinstance(classes, str):  # "fashion-mnist[:class,class...]"
        _, _, only = classes.partition(":")
        _fashion_pool(pool, POOL_CAP[name], tuple(only.split(",")) if only else FASHION_CLASSES)
    elif not pool.is_dir():
        _pool(classes, pool, POOL_CAP.get(name))
    return _split(pool, WORK / "real" / f"{name}_s{seed}", counts, seed)


def build_pair(seed: int = 0, counts: tuple[int, int, int] = (20, 8, 10)) -> tuple[Path, Path]:
    """(photographs, clip art) of the same four classes, each split train/val/test."""
    unpack()
    out = []
    for side, label in ((0, "photos"), (1, "clipart")):
        pool = WORK / "real" / f"pair_{label}_pool"
        if not pool.is_dir():
            _pool({c: sources[side] for c, sources in PAIR_CLASSES.items()}, pool)
        out.append(_split(pool, WORK / "real" / f"pair_{label}_s{seed}", counts, seed))
    return out[0], out[1]


if __name__ == "__main__":
    for name, (kind, _, _) in {**SETS, **LARGE_SETS}.items():
        root = build(name)
        n = {s: sum(1 for _ in (root / s).rglob("*.*")) for s in ("train", "val", "test")}
        classes = sum(1 for _ in (root / "train").iterdir())
        print(f"{name}: {kind}, {classes} classes, {n} images in {root}")
    photos, clipart = build_pair()
    print(f"pair: {photos} / {clipart}")
