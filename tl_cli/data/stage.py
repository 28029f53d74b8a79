"""``data.stage``: the job's images copied to node-local scratch once per node, checked, and read
from there for the rest of the job.

Shared cluster filesystems are slow for many small files; cluster guides ask jobs to copy
their data to the node's local disk first. One rank per folder copies (the ranks that see the
stage folder are found by `sharing.folder_group`, so two nodes with node-local scratch copy
once each, and ranks on one node once); the others wait. Every copy is checked against the
source (size, and a SHA-256 of the bytes read from the shared filesystem against one of the
bytes read back from the copy), and a manifest lets the next task of a job array on the same
node reuse the copy after checking it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from tl_cli.cluster import distributed
from tl_cli.data.folders import is_ignored
from tl_cli.data.sharing import folder_group
from tl_cli.errors import TLError

MANIFEST = ".tl-stage.json"
STAGE_FORMAT = 1
CHUNK = 1 << 20
COPY_THREADS = 8  # shared filesystems answer many requests at once far faster than one by one
_READY: set[Path] = set()  # stages this process made or checked already (fit, then test)


def scratch_folder(environ: Optional[dict[str, str]] = None) -> Optional[Path]:
    """The node-local scratch folder of this job, or None off a cluster.

    In order: ``$SLURM_TMPDIR`` (set by several clusters' SLURM), SDSC Expanse's
    ``/scratch/$USER/job_$SLURM_JOB_ID``, then ``$TMPDIR`` inside a SLURM job when the job set it
    to a folder of its own (not ``/tmp``).
    """
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_TMPDIR") and Path(env["SLURM_TMPDIR"]).is_dir():
        return Path(env["SLURM_TMPDIR"])
    if not job:
        return None
    expanse = Path("/scratch") / env.get("USER", "") / f"job_{job}"
    if env.get("USER") and expanse.is_dir():
        return expanse
    tmp = env.get("TMPDIR")
    if tmp and Path(tmp).is_dir() and Path(tmp).resolve() not in (Path("/tmp"), Path("/var/tmp")):
        return Path(tmp)
    return None


def stage_folder(setting: str, root: Path) -> Optional[Path]:
    """Where `root` is staged for a ``data.stage`` setting (``auto``, ``none`` or a folder), or
    None when it is read in place."""
    if setting == "none":
        return None
    base = scratch_folder() if setting == "auto" else Path(setting).expanduser()
    if base is None:
        return None
    source = root.resolve()
    name = hashlib.sha256(str(source).encode()).hexdigest()[:16]
    return base / "tl-stage" / f"{source.name}-{name}"


def _listing(root: Path, splits: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of every file under `root`'s `splits`, sorted."""
    out = []
    for split in splits:
        top = root / split
        if not top.is_dir():
            continue
        for folder, dirs, files in os.walk(top, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not is_ignored(Path(d)))
            for name in files:
                path = Path(folder) / name
                if is_ignored(path):
                    continue
                st = path.stat()
                out.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _copy_one(source: Path, target: Path, mtime_ns: int) -> str:
    """Copy reading the source once; return the SHA-256 of the bytes read."""
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    tmp = target.with_name(f".{target.name}.part")
    with open(source, "rb") as src, open(tmp, "wb") as dst:
        while block := src.read(CHUNK):
            h.update(block)
            dst.write(block)
    os.utime(tmp, ns=(mtime_ns, mtime_ns))  # the cache keys see the source's size and time
    os.replace(tmp, target)
    return h.hexdigest()


def _verified(target: Path, listing: list[tuple[str, int, int]], digests: dict[str, str]) -> list[str]:
    """Problems of the copy at `target` against the source's listing and digests."""
    problems = []
    for rel, size, _ in listing:
        copy = target / rel
        if not copy.is_file():
            problems.append(f"{rel}: missing")
        elif copy.stat().st_size != size:
            problems.append(f"{rel}: {copy.stat().st_size} bytes, the source has {size}")
        elif _digest(copy) != digests.get(rel):
            problems.append(f"{rel}: its content differs from the source's")
    return problems


def _reusable(target: Path, listing: list[tuple[str, int, int]]) -> Optional[dict[str, str]]:
    """The digests of an earlier copy at `target` if it matches the source's listing."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != STAGE_FORMAT or [tuple(f) for f in manifest.get("files", [])] != listing:
        return None
    return manifest.get("digests")


def _build(source: Path, target: Path, splits: tuple[str, ...], say: Callable[[str], None]) -> tuple[int, str]:
    """Copy (or reuse) the stage of `source` at `target`; return (files, what was done)."""
    listing = _listing(source, splits)
    digests = _reusable(target, listing)
    if digests is not None and not _verified(target, listing, digests):
        return len(listing), "reused"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(COPY_THREADS) as pool:
        found = pool.map(lambda f: (f[0], _copy_one(source / f[0], target / f[0], f[2])), listing)
        digests = dict(found)
    problems = _verified(target, listing, digests)
    if problems:
        shutil.rmtree(target, ignore_errors=True)
        raise TLError(
            f"Staging {source} to {target} failed: {len(problems)} file(s) differ from the source after "
            f"copying ({'; '.join(problems[:5])}). The node-local disk may be full or failing: check "
            "`df -h` there, or pass --data.stage none to read the data in place."
        )
    manifest = {"format": STAGE_FORMAT, "source": str(source), "files": listing, "digests": digests}
    (target / f"{MANIFEST}.tmp").write_text(json.dumps(manifest))
    os.replace(target / f"{MANIFEST}.tmp", target / MANIFEST)
    size = sum(f[1] for f in listing)
    return len(listing), f"copied ({size / 2**20:.0f} MiB in {time.perf_counter() - start:.1f} s)"


def stage_data(root: Path, setting: str, splits: tuple[str, ...], say: Callable[[str], None] = lambda _: None) -> Path:
    """The folder to read `root`'s `splits` from: `root` itself, or its checked copy on
    node-local scratch (made once per folder, by one rank of the ranks that see it)."""
    target = stage_folder(setting, root)
    if target is None:
        return root
    if target in _READY:
        return target
    if target.resolve() == root.resolve() or root.resolve() in target.resolve().parents:
        raise TLError(f"data.stage={setting} resolves to {target}, inside data.root={root}: choose another folder.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TLError(
            f"data.stage={setting}: cannot create {target.parent} ({exc}). Pass a writable node-local "
            "folder (--data.stage /path/on/local/disk), or --data.stage none to read data.root in place."
        ) from exc
    group = folder_group(target.parent)
    count = len(_listing(root, splits)) if group.leader else 0
    timeout = distributed.timeout_for(distributed.broadcast(count), 0.05)
    done = distributed.on_every_rank(lambda: _build(root, target, splits, say) if group.leader else None, timeout)
    files, how = next(d for d in done if d is not None)
    say(f"data staged to {target}: {files} files {how}")
    _READY.add(target)
    return target
