"""On-disk caches that make small-data transfer learning fast.

- **Bottleneck features**: the frozen backbone's output for every image of a split, computed
  once and reused by later epochs and later runs (feature extraction without random
  augmentation).
- **Decoded images**: every image decoded, converted to RGB and resized once (short side =
  the eval resize, ``image_size / crop_pct``), kept as uint8; random augmentations then run on
  tensors (fine-tuning, augmented feature extraction).
- **Screening results**: which files of a file set cannot be decoded.

Entries are keyed by a hash of everything that determines their content: the files (path,
size, modification time, label), the preprocessing, and for features the backbone, a hash
of its weight tensors and the numeric precision. Change any of it and the entry is rebuilt.
Files are written to a temporary name and renamed, so a crash never leaves a half-written
entry under a valid name; an entry that is truncated or corrupt anyway is rebuilt with a
warning, never used. Under DDP each rank writes its share as a part; rank 0 joins them.

The cache folder is ``data.cache_dir``, else ``$TL_CACHE_DIR``, else ``~/.cache/tl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

# 4: grayscale images stored as one channel; 5: large JPEGs decoded at a reduced scale; 6: and
# resized from the box of the file's picture, to a full decode's size
CACHE_FORMAT = 6
# In-memory if the decoded images take at most this share of the memory this process may
# use; otherwise memory-mapped from the cache file (the OS page cache keeps what fits).
IMAGE_RAM_SHARE = 0.25


def cache_root(configured: str | None = None) -> Path:
    root = configured or os.environ.get("TL_CACHE_DIR") or Path.home() / ".cache" / "tl"
    return Path(root).expanduser()


def files_fingerprint(
    samples: Sequence[tuple[Path, int]], staged: Optional[tuple[Path, Path]] = None
) -> list[tuple[str, int, int, int]]:
    """(absolute path, size, mtime in ns, label) of each sample: what invalidates an entry.

    Args:
        staged: (copy, source) when the samples are read from a staged copy of `source`
            (``data.stage``): they are named by their source's path, so a cache built from one
            job's copy serves the next job's copy and unstaged runs alike (a copy keeps the
            source's size and modification time).
    """
    out = []
    for path, label in samples:
        st = os.stat(path)
        out.append((source_name(path, staged), st.st_size, st.st_mtime_ns, int(label)))
    return out


def source_name(path: Path, staged: Optional[tuple[Path, Path]] = None) -> str:
    """The absolute path of `path`, or of the file it is a staged copy of."""
    name = Path(path).resolve()
    if staged is not None and staged[0] in name.parents:
        name = staged[1] / name.relative_to(staged[0])
    return str(name)


def make_key(kind: str, **parts: Any) -> str:
    blob = json.dumps({"kind": kind, "format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cgroup_room() -> Optional[int]:
    """Bytes this process's cgroup (a SLURM job's memory limit) still allows, if limited."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(0, int(limit) - usage)
    return None


def available_memory() -> int:
    """Memory available now: the host's MemAvailable, or less where a cgroup limits the job."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    room = _cgroup_room()
    return host if room is None else min(host, room)


def image_ram_budget(processes_on_node: int = 1) -> int:
    """Bytes of decoded images one training process may hold in RAM: a share of what the job
    may still use, divided among the training processes of this node."""
    return int(IMAGE_RAM_SHARE * available_memory() / max(1, processes_on_node))


def _part(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.name}.part{rank}")


# --------------------------------------------------------------------------- screening


class ScreenStore:
    """The files of a file set that cannot be used, with why: ``[{"path", "problem"}]``."""

    def __init__(self, root: Path, key: str) -> None:
        self.path = root / "checks" / f"{key}.json"

    def load(self) -> Optional[list[dict[str, str]]]:
        try:
            return json.loads(self.path.read_text())["bad"]
        except (OSError, ValueError, KeyError):
            return None

    def save(self, bad: list[dict[str, str]]) -> None:
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps({"bad": bad})))


# --------------------------------------------------------------------------- features


class FeatureStore:
    """Bottleneck features of one split: ``features [N, F]``."""

    def __init__(self, root: Path, key: str) -> None:
        self.path = root / "features" / f"{key}.pt"

    def load(self, n: int, dim: int) -> torch.Tensor | None:
        if not self.path.exists():
            return None
        try:
            entry = torch.load(self.path, map_location="cpu", weights_only=True)
            features = entry["features"]
            if entry.get("format") != CACHE_FORMAT or tuple(features.shape) != (n, dim):
                raise ValueError(f"shape {tuple(features.shape)}, expected {(n, dim)}")
            if not torch.isfinite(features).all():
                raise ValueError("non-finite values")
            return features
        except Exception as exc:
            warnings.warn(f"tl: feature cache {self.path} is unreadable ({exc}); recomputing it.", stacklevel=2)
            return None

    def save(self, features: torch.Tensor, part: Optional[int] = None) -> None:
        path = self.path if part is None else _part(self.path, part)
        atomic_write(path, lambda tmp: torch.save({"format": CACHE_FORMAT, "features": features}, tmp))

    def move_to(self, other: FeatureStore) -> None:
        os.replace(self.path, other.path)

    def join_into(self, target: FeatureStore, world: int, drop: set[int]) -> None:
        """Interleave the ranks' parts (rank r holds samples r, r + world, ...) into `target`,
        leaving out the samples at `drop`."""
        parts = [torch.load(_part(self.path, r), weights_only=True)["features"] for r in range(world)]
        total = sum(len(p) for p in parts)
        out = torch.empty(total, parts[0].shape[1], dtype=parts[0].dtype)
        for r, part in enumerate(parts):
            out[r::world] = part
        keep = [i for i in range(total) if i not in drop]
        target.save(out[keep] if drop else out)
        for r in range(world):
            _part(self.path, r).unlink(missing_ok=True)


# --------------------------------------------------------------------------- decoded images


def _one_channel_if_gray(arr: np.ndarray) -> np.ndarray:
    """An HWC image whose three channels are equal (a grayscale source) as one channel:
    a third of the bytes, the same pixels once `CachedImages` repeats it."""
    if arr.ndim == 3 and arr.shape[2] == 3 and arr.size:
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
            return arr[..., :1]
    return arr


class ImageStore:
    """Decoded uint8 RGB images of one split in one flat file, with an index of shapes.

    Layout: ``<key>.u8`` (all images' HWC bytes back to back) and ``<key>.json`` (offsets,
    shapes). The index is written last, so an entry without one is incomplete.
    """

    def __init__(self, root: Path, key: str) -> None:
        self.data_path = root / "images" / f"{key}.u8"
        self.index_path = root / "images" / f"{key}.json"

    def load(self, n: int, ram_budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if not self.index_path.exists():
            return None
        try:
            index = json.loads(self.index_path.read_text())
            offsets = np.asarray(index["offsets"], dtype=np.int64)
            shapes = np.asarray(index["shapes"], dtype=np.int64).reshape(-1, 3)
            total = int(index["total"])
            if index.get("format") != CACHE_FORMAT or len(shapes) != n or self.data_path.stat().st_size != total:
                raise ValueError(
                    f"{len(shapes)} images / {self.data_path.stat().st_size} bytes, expected {n} / {total}"
                )
            if total <= ram_budget:
                data = np.fromfile(self.data_path, dtype=np.uint8)
            else:
                data = np.memmap(self.data_path, dtype=np.uint8, mode="r")
            return data, offsets, shapes
        except Exception as exc:
            warnings.warn(f"tl: image cache {self.data_path} is unreadable ({exc}); rebuilding it.", stacklevel=2)
            return None

    def build(self, arrays: Iterable[np.ndarray], part: Optional[int] = None) -> int:
        """Write the HWC uint8 `arrays` (in sample order); return how many were written."""
        data_path = self.data_path if part is None else _part(self.data_path, part)
        offsets, shapes, total = [], [], 0

        def write(tmp: Path) -> None:
            nonlocal total
            with open(tmp, "wb") as fh:
                for arr in arrays:
                    arr = np.ascontiguousarray(_one_channel_if_gray(arr), dtype=np.uint8)
                    offsets.append(total)
                    shapes.append(list(arr.shape))
                    fh.write(arr.tobytes())
                    total += arr.nbytes

        atomic_write(data_path, write)
        index = {"format": CACHE_FORMAT, "offsets": offsets, "shapes": shapes, "total": total}
        index_path = self.index_path if part is None else _part(self.index_path, part)
        atomic_write(index_path, lambda tmp: tmp.write_text(json.dumps(index)))
        return len(shapes)

    def move_to(self, other: ImageStore) -> None:
        os.replace(self.data_path, other.data_path)
        os.replace(self.index_path, other.index_path)

    def join_into(self, target: ImageStore, world: int, drop: set[int]) -> None:
        """Interleave the ranks' parts (rank r holds samples r, r + world, ...) into `target`,
        leaving out the samples at `drop`."""
        parts = []
        for r in range(world):
            index = json.loads(_part(self.index_path, r).read_text())
            data = np.memmap(_part(self.data_path, r), dtype=np.uint8, mode="r") if index["total"] else None
            parts.append((data, index["offsets"], index["shapes"]))
        n = sum(len(p[2]) for p in parts)

        def ordered() -> Iterable[np.ndarray]:
            for i in range(n):
                if i in drop:
                    continue
                data, offsets, shapes = parts[i % world]
                j = i // world
                size = int(np.prod(shapes[j]))
                yield np.asarray(data[offsets[j] : offsets[j] + size]).reshape(shapes[j])

        target.build(ordered())
        for r in range(world):
            _part(self.data_path, r).unlink(missing_ok=True)
            _part(self.index_path, r).unlink(missing_ok=True)
