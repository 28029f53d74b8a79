"""Copies of training images in val/ and test/: the same bytes under another name.

A copy in val/ makes validation (and what it selects: best.ckpt, early stopping) overstate
accuracy; a copy in test/ does the same to the reported result. `tl data check` lists every
duplicate; `tl fit` warns about the copies that leak, before training starts.

Only files whose size matches a training file's are read (and hashed), so a folder of JPEGs
costs a ``stat`` per file; the result is remembered per file set in the cache folder.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from tl_cli.data.cache import atomic_write, files_fingerprint, make_key
from tl_cli.errors import TLError

Samples = list[tuple[Path, int]]
Pairs = list[tuple[str, str]]  # (copy in val/ or test/, the training file it repeats)


def copies_of_training_files(
    train: list[Path], others: list[Path], sizes: Optional[list[int]] = None
) -> list[tuple[Path, Path]]:
    """(file of `others`, file of `train`) for every file of `others` byte-identical to one of
    `train`, in the order of `others`; `sizes`: those of train + others, if known."""
    sizes = sizes if sizes is not None else [p.stat().st_size for p in train + others]
    by_size: dict[int, list[Path]] = defaultdict(list)
    for path, size in zip(train, sizes, strict=False):
        by_size[size].append(path)
    digests: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in digests:
            digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return digests[path]

    found = []
    for path, size in zip(others, sizes[len(train) :], strict=True):
        same_size = by_size.get(size)
        if same_size:
            match = next((t for t in same_size if digest(t) == digest(path)), None)
            if match is not None:
                found.append((path, match))
    return found


def warn_about_leaks(
    train: Samples,
    val: Samples,
    test: Callable[[], Samples],
    read_root: Path,
    root: Path,
    cache_dir: Path,
    say: Callable[[str], None],
) -> Pairs:
    """Say which files of val/ and test/ copy a training file. `test` lists test/ (a layout
    problem there waits for `tl test`: test/ is not needed to fit); the files are read under
    `read_root` (a staged copy, or `root`) and named under `root`; the answer is remembered in
    `cache_dir` per file set."""
    try:
        test_samples = test()
    except TLError:
        test_samples = []
    staged = None if read_root == root else (read_root.resolve(), root.resolve())
    fingerprint = files_fingerprint(train + val + test_samples, staged)
    entry = cache_dir / "checks" / f"leaks-{make_key('leaks', files=fingerprint)}.json"
    try:
        pairs = [tuple(p) for p in json.loads(entry.read_text())["copies"]]
    except (OSError, ValueError, KeyError, TypeError):
        sizes = [size for _, size, _, _ in fingerprint]  # stat once
        found = copies_of_training_files([p for p, _ in train], [p for p, _ in val + test_samples], sizes)
        pairs = [
            (str(c).replace(str(read_root), str(root), 1), str(o).replace(str(read_root), str(root), 1))
            for c, o in found
        ]
        try:
            atomic_write(entry, lambda tmp: tmp.write_text(json.dumps({"copies": pairs})))
        except OSError:
            pass  # a read-only cache folder: the check runs again next time
    if pairs:
        shown = "\n  ".join(f"{copy} = {original}" for copy, original in pairs[:10])
        more = f"\n  ... and {len(pairs) - 10} more" if len(pairs) > 10 else ""
        say(
            f"warning: {len(pairs)} file(s) in val/ or test/ are byte-identical copies of training images, "
            f"so the scores on them overstate accuracy:\n  {shown}{more}\n"
            "Remove the copies from val/ and test/ (or the originals from train/); "
            "`tl data check` lists every duplicate."
        )
    return pairs
