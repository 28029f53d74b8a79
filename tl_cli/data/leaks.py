"""Copies of training images in val/ and test/: the same bytes under another name.

A copy in val/ makes validation (and what it selects: best.ckpt, early stopping) overstate
accuracy; a copy in test/ does the same to the reported result. `tl data check` lists every
duplicate; `tl fit` warns about the copies that leak, before training starts.

Only files whose size equals a training file's are read: their first 16 KiB, and the whole
file only where those match too. Photographs of one camera often share sizes, so at 100k
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
    and files that are not images by name are left out (screening names those)."""
    sizes = sizes if sizes is not None else [p.stat().st_size for p in train + others]
    by_size: dict[int, list[Path]] = defaultdict(list)
    for path, size in zip(train, sizes, strict=False):
        if size and is_image_name(path):
            by_size[size].append(path)
    digests: dict[tuple[Path, bool], str] = {}

    def digest(path: Path, whole: bool) -> str:
        if (path, whole) not in digests:
            with open(path, "rb") as fh:
                digests[path, whole] = hashlib.sha256(fh.read() if whole else fh.read(HEAD)).hexdigest()
        return digests[path, whole]

    found = []
    for path, size in zip(others, sizes[len(train) :], strict=True):
        if not (size and is_image_name(path) and by_size.get(size)):
            continue
        for original in by_size[size]:
            if digest(original, False) == digest(path, False) and (
                size <= HEAD or digest(original, True) == digest(path, True)
            ):
                found.append((path, original))
                break
    return found


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
