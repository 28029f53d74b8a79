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

from tl_cli.data.cache import atomic_write, make_key

Pairs = list[tuple[str, str]]  # (copy in val/ or test/, the training file it repeats)


def copies_of_training_files(train: list[Path], others: list[Path]) -> list[tuple[Path, Path]]:
    """(file of `others`, file of `train`) for every file of `others` byte-identical to one of
    `train`, in the order of `others`."""
    by_size: dict[int, list[Path]] = defaultdict(list)
    for path in train:
        by_size[path.stat().st_size].append(path)
    digests: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in digests:
            digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return digests[path]

    found = []
    for path in others:
        same_size = by_size.get(path.stat().st_size)
        if same_size:
            match = next((t for t in same_size if digest(t) == digest(path)), None)
            if match is not None:
                found.append((path, match))
    return found


def warn_about_leaks(
    train: list[Path],
    others: list[Path],
    fingerprint: list,
    cache_dir: Path,
    name: Callable[[Path], str],
    say: Callable[[str], None],
) -> Pairs:
    """Say which files of `others` (val/, test/) copy a training file; `fingerprint` keys the
    remembered result, `name` turns a path read into the one the user knows."""
    entry = cache_dir / "checks" / f"leaks-{make_key('leaks', files=fingerprint)}.json"
    pairs: Optional[Pairs] = None
    try:
        pairs = [tuple(p) for p in json.loads(entry.read_text())["copies"]]
    except (OSError, ValueError, KeyError, TypeError):
        pairs = [(name(copy), name(original)) for copy, original in copies_of_training_files(train, others)]
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
