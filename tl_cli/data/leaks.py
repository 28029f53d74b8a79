"""Copies of training images in val/ and test/: the same bytes under another name.

A copy in val/ makes validation (and what it selects: best.ckpt, early stopping) overstate
accuracy; a copy in test/ does the same to the reported result. `tl data check` lists every
duplicate; `tl fit` warns about the copies that leak, before training starts.

Only files whose size equals a file of the other side are read: their first 16 KiB, and the
whole file only where those match too. Photographs of one camera often share sizes, so at 100k
images this can open tens of thousands of files once; the answer is then remembered per file
set in the cache folder, and later runs read nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from tl_cli.data.cache import atomic_write, files_fingerprint, make_key
from tl_cli.data.folders import is_image_name
from tl_cli.errors import TLError

Samples = list[tuple[Path, int]]
HEAD = 16 * 1024


def copies_of_training_files(
    train: list[Path], others: list[Path], sizes: Optional[list[int]] = None
) -> list[tuple[Path, Path]]:
    """(file of `others`, file of `train`) for every file of `others` byte-identical to one of
    `train`, in the order of `others`; `sizes`: those of train + others, if known. Empty files
    and files that are not images by name are left out (screening names those).

    Each file is looked up once, by (size, digest of its first 16 KiB), not compared with every
    training file of its size: uncompressed images of one resolution all share a size."""
    sizes = sizes if sizes is not None else [p.stat().st_size for p in train + others]
    wanted = [(p, n) for p, n in zip(others, sizes[len(train) :], strict=True) if n and is_image_name(p)]
    needed = {n for _, n in wanted}
    by_head: dict[tuple[int, str], list[Path]] = defaultdict(list)
    for path, size in zip(train, sizes, strict=False):
        if size in needed and is_image_name(path):  # only training files some other file's size
            by_head[size, _digest(path, HEAD)].append(path)
    train_sizes = {n for n, _ in by_head}
    whole: dict[Path, str] = {}
    found = []
    for path, size in wanted:
        candidates = by_head.get((size, _digest(path, HEAD))) if size in train_sizes else None
        if not candidates:
            continue
        if size <= HEAD:  # the first 16 KiB are the whole file
            found.append((path, candidates[0]))
            continue
        mine = _digest(path)
        for original in candidates:
            if original not in whole:
                whole[original] = _digest(original)
            if whole[original] == mine:
                found.append((path, original))
                break
    return found


def _digest(path: Path, limit: Optional[int] = None) -> str:
    """SHA-256 of a file's first `limit` bytes (the whole file if None), read in 1 MiB chunks."""
    sha, left = hashlib.sha256(), limit
    with open(path, "rb") as fh:
        while left is None or left > 0:
            chunk = fh.read(2**20 if left is None else min(2**20, left))
            if not chunk:
                break
            sha.update(chunk)
            left = None if left is None else left - len(chunk)
    return sha.hexdigest()


def warn_about_leaks(
    train: Samples,
    val: Samples,
    test: Callable[[], Samples],
    read_root: Path,
    root: Path,
    cache_dir: Path,
    say: Callable[[str], None],
) -> list[tuple[Path, Path]]:
    """Say which files of val/ and test/ copy a training file; return them, named under `root`.

    `test` lists test/ (a layout problem there waits for `tl test`: test/ is not needed to
    fit). The files are read under `read_root` (a staged copy, or `root` itself); the answer is
    remembered in `cache_dir` per file set, as paths relative to the data root. Advisory: a file
    that cannot be read is said, and the fit goes on.
    """
    try:
        test_samples = test()
    except TLError:
        test_samples = []
    try:
        staged = None if read_root == root else (read_root.resolve(), root.resolve())
        fingerprint = files_fingerprint(train + val + test_samples, staged)
        entry = cache_dir / "checks" / f"leaks-{make_key('leaks', files=fingerprint)}.json"
        try:
            relative = [tuple(pair) for pair in json.loads(entry.read_text())["copies"]]
        except (OSError, ValueError, KeyError, TypeError):
            sizes = [size for _, size, _, _ in fingerprint]  # one stat a file
            found = copies_of_training_files([p for p, _ in train], [p for p, _ in val + test_samples], sizes)
            relative = [(str(c.relative_to(read_root)), str(o.relative_to(read_root))) for c, o in found]
            try:
                atomic_write(entry, lambda tmp: tmp.write_text(json.dumps({"copies": relative})))
            except OSError:
                pass  # a read-only cache folder: the check runs again next time
    except OSError as exc:
        say(f"warning: could not check val/ and test/ for copies of training images ({exc}); training goes on")
        return []
    pairs = [(root / copy, root / original) for copy, original in relative]
    if pairs:
        shown = "\n  ".join(f"{copy} = {original}" for copy, original in pairs[:10])
        more = f"\n  ... and {len(pairs) - 10} more" if len(pairs) > 10 else ""
        say(
            f"warning: {len(pairs)} file(s) in val/ or test/ are byte-identical copies of training images, "
            f"so the scores on them overstate accuracy:\n  {shown}{more}\n"
            "Remove the copies from val/ and test/ (or the originals from train/); "
            f"`tl data check {root}` lists every duplicate."
        )
    return pairs
