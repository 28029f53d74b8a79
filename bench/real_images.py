"""Small sets of real images, built offline from Debian packages, for the accuracy benchmarks.

- ``openclipart-png`` (Open Clip Art Library, public domain): clip art sorted into folders.
- ``tuxpaint-stamps-default`` (Tux Paint's stamps, GPL/CC): mostly photographs of objects cut
  out on transparent backgrounds, sorted into folders.

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

# A domain pair for domain adaptation: the same four classes as photographs and as clip art.
PAIR_CLASSES = {
    "birds": ([TUXPAINT / "animals/birds"], [OPENCLIPART / "animals/birds"]),
    "fruit": ([TUXPAINT / "food/fruit"], [OPENCLIPART / "food/fruit"]),
    "mammals": ([TUXPAINT / "animals/mammals"], [OPENCLIPART / "animals/mammals"]),
    "vehicles": ([TUXPAINT / "vehicles"], [OPENCLIPART / "transportation/vehicles"]),
}


def unpack() -> None:
    """Download and unpack the two packages once (apt-get download works as any user)."""
    for name, package in (("openclipart", "openclipart-png"), ("tuxpaint", "tuxpaint-stamps-default")):
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


def _shrink(job: tuple[Path, Path]) -> None:
    """A JPEG copy of `src` at most MAX_SIDE px a side, as tl would see it (alpha on white)."""
    from PIL import Image

    from tl_cli.data.images import load_rgb

    Image.MAX_IMAGE_PIXELS = None  # the package's own files, not user input
    src, dst = job
    img = load_rgb(src)
    img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
    img.save(dst, quality=92)


def _pool(classes: dict[str, list[Path]], dest: Path) -> Path:
    """One folder per class of shrunk JPEG copies of the package's pictures; a picture the
    package files under two names (symbolic links) or in two classes is used once, or not at
    all. Built in a temporary folder and renamed, so an interrupted build leaves no pool."""
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
        jobs += [(path, tmp / name / f"{i:04d}_{path.stem}.jpg") for i, path in enumerate(sorted(fs - shared))]
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_shrink, jobs, chunksize=8))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def _split(pool: Path, out: Path, counts: tuple[int, int, int], seed: int) -> Path:
    if (out / "train").is_dir():
        return out
    train, val, test = counts
    cmd = [sys.executable, "-m", "tl_cli.cli", "data", "split", str(pool), str(out), "--train", str(train)]
    cmd += ["--val", str(val), "--test", str(test), "--seed", str(seed)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def build(name: str, seed: int = 0) -> Path:
    """``runs/bench/real/<name>_s<seed>/{train,val,test}/<class>/``."""
    unpack()
    _, classes, counts = SETS[name]
    pool = WORK / "real" / f"{name}_pool"
    if not pool.is_dir():
        _pool(classes, pool)
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
    for name in SETS:
        root = build(name)
        n = {s: sum(1 for _ in (root / s).rglob("*.*")) for s in ("train", "val", "test")}
        print(f"{name}: {SETS[name][0]}, {len(SETS[name][1])} classes, {n} images in {root}")
    photos, clipart = build_pair()
    print(f"pair: {photos} / {clipart}")
