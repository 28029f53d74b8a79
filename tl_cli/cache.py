"""On-disk caches that make small-data transfer learning fast.

- **Bottleneck features**: the frozen backbone's output for every image of a split, computed
  once and reused by later epochs and later runs (feature extraction without random
  augmentation).
- **Decoded images**: every image decoded, converted to RGB and resized once (short side =
  the eval resize, ``image_size / crop_pct``), kept as uint8; random augmentations then run on
  tensors (fine-tuning, augmented feature extraction).

Both are keyed by a hash of everything that determines their content: the files (path, size,
modification time, label), the preprocessing, and for features the backbone, its weights (a
weights file by content hash) and the numeric precision. Change any of it and the entry is
rebuilt. Files are written to a temporary name and renamed, so a crash never leaves a
half-written entry under a valid name; an entry that is truncated or corrupt anyway is
rebuilt with a warning, never used.

The cache folder is ``data.cache_dir``, else ``$TL_CACHE_DIR``, else ``~/.cache/tl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

CACHE_FORMAT = 1
# In-memory if the decoded images take at most this share of the memory available now;
# otherwise memory-mapped from the cache file (the OS page cache keeps what fits).
IMAGE_RAM_SHARE = 0.25


def cache_root(configured: str | None = None) -> Path:
    root = configured or os.environ.get("TL_CACHE_DIR") or Path.home() / ".cache" / "tl"
    return Path(root).expanduser()


def files_fingerprint(samples: Sequence[tuple[Path, int]]) -> list[tuple[str, int, int, int]]:
    """(absolute path, size, mtime in ns, label) of each sample: what invalidates an entry."""
    out = []
    for path, label in samples:
        st = os.stat(path)
        out.append((str(Path(path).resolve()), st.st_size, st.st_mtime_ns, int(label)))
    return out


def make_key(kind: str, **parts: Any) -> str:
    blob = json.dumps({"kind": kind, "format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# --------------------------------------------------------------------------- features


class FeatureStore:
    """Bottleneck features of one split: ``features [N, F]`` and ``labels [N]``."""

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

    def save(self, features: torch.Tensor) -> None:
        _atomic_write(self.path, lambda tmp: torch.save({"format": CACHE_FORMAT, "features": features}, tmp))


class FeatureDataset(Dataset):
    """Cached features with labels; items ``(features, label, index)`` like `ImageFiles`."""

    def __init__(self, features: torch.Tensor, labels: Sequence[int]) -> None:
        self.features = features
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.features[index], self.labels[index], index

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        feats, labels = self.features[indices], self.labels[indices]
        return [(feats[i], labels[i], idx) for i, idx in enumerate(indices)]


# --------------------------------------------------------------------------- decoded images


class ImageStore:
    """Decoded uint8 RGB images of one split in one flat file, with an index of shapes.

    Layout: ``<key>.u8`` (all images' HWC bytes back to back) and ``<key>.json`` (offsets,
    shapes). The index is written last, so an entry without one is incomplete.
    """

    def __init__(self, root: Path, key: str) -> None:
        self.data_path = root / "images" / f"{key}.u8"
        self.index_path = root / "images" / f"{key}.json"

    def load(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
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
            if total <= IMAGE_RAM_SHARE * available_memory():
                data = np.fromfile(self.data_path, dtype=np.uint8)
            else:
                data = np.memmap(self.data_path, dtype=np.uint8, mode="r")
            return data, offsets, shapes
        except Exception as exc:
            warnings.warn(f"tl: image cache {self.data_path} is unreadable ({exc}); rebuilding it.", stacklevel=2)
            return None

    def build(self, arrays: Callable[[], Any], n: int) -> None:
        """Write the images yielded by `arrays()` (HWC uint8, in sample order)."""
        offsets, shapes, total = [], [], 0

        def write(tmp: Path) -> None:
            nonlocal total
            with open(tmp, "wb") as fh:
                for arr in arrays():
                    arr = np.ascontiguousarray(arr, dtype=np.uint8)
                    offsets.append(total)
                    shapes.append(list(arr.shape))
                    fh.write(arr.tobytes())
                    total += arr.nbytes

        _atomic_write(self.data_path, write)
        if len(shapes) != n:
            raise RuntimeError(f"image cache got {len(shapes)} images, expected {n}")
        index = {"format": CACHE_FORMAT, "offsets": offsets, "shapes": shapes, "total": total}
        _atomic_write(self.index_path, lambda tmp: tmp.write_text(json.dumps(index)))


class CachedImages(Dataset):
    """Decoded images from an `ImageStore`; items ``(transform(uint8 CHW tensor), label, index)``."""

    def __init__(
        self, data: np.ndarray, offsets: np.ndarray, shapes: np.ndarray, labels: Sequence[int], transform: Any
    ):
        self.data, self.offsets, self.shapes = data, offsets, shapes
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        h, w, c = (int(v) for v in self.shapes[index])
        start = int(self.offsets[index])
        arr = np.asarray(self.data[start : start + h * w * c]).reshape(h, w, c)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.transform(self.image(index)), self.labels[index], index
