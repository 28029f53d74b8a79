"""Datasets and the training sampler.

Items are ``(x, label, index)``: x is a uint8 image ``[3, H, W]`` (normalised later, on the
model's device) or a float feature vector ``[F]`` from the bottleneck-feature cache.

Random augmentation is a function of (seed, epoch, sample) alone: the training sampler hands
each index out with its own seed, and the dataset draws the augmentation from it. So the
result does not depend on how many DataLoader workers there are, which worker gets which
sample, or whether the workers were restarted, and a run resumed mid-epoch continues with
exactly the crops and flips an uninterrupted one would have drawn.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from tl_cli.cluster import distributed
from tl_cli.data.transforms import decode_resized
from tl_cli.errors import TLError

UNREADABLE = -2  # label of a `tolerant` dataset's item whose file could not be decoded

Key = Union[int, tuple[int, int]]  # an index, or (index, augmentation seed) from the sampler


def decode_error(path: Path, exc: Exception) -> TLError:
    return TLError(
        f"Cannot decode image {path}: {type(exc).__name__}: {exc}. Remove or replace the file "
        "(`tl data check ROOT` lists every such file)."
    )


def worker_context(workers: int, world_size: int) -> Optional[multiprocessing.context.BaseContext]:
    """How the DataLoader starts its worker processes: forked from the rank (PyTorch's default)
    in a single process, from a fork server when the run is distributed.

    Why: a ``fork()`` while one of the rank's gloo threads holds the interpreter's thread-list
    lock leaves the child waiting for it forever (CPython gh-112275). A fork server is a fresh
    single-threaded process, so its forks are safe; the dataset is pickled to each worker once
    (`CachedImages` shares its array). Without a fork server (Windows): spawn.
    """
    if workers == 0 or world_size <= 1:
        return None
    server = "forkserver" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if server else "spawn")
    if server:  # imported once in the server, not in every worker: torch, numpy, PIL, the transforms
        context.set_forkserver_preload(["tl_cli.data._forkserver", "tl_cli.data.datasets"])
    # SLURM signals every process of the step (``--signal=SIGUSR1@90``): the fork server and
    # multiprocessing's resource tracker would die of it (the default action) before they could
    # ignore it. Started with it blocked, they keep it blocked (the tracker unblocks only SIGINT
    # and SIGTERM, bpo-33613's method); one arriving meanwhile waits for the rank's handler.
    blockable = hasattr(signal, "pthread_sigmask")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1}) if blockable else None
    try:
        multiprocessing.resource_tracker.ensure_running()
        if server:
            multiprocessing.forkserver.ensure_running()
    finally:
        if before is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
    return context


def worker_options(workers: int) -> dict[str, Any]:
    """The DataLoader keywords that start `workers` worker processes the way every tl loader
    does: from a fork server under DDP (`worker_context`), deaf to SLURM's preemption signal."""
    return {
        "num_workers": workers,
        "worker_init_fn": ignore_preemption_signal,
        "multiprocessing_context": worker_context(workers, distributed.world_size()),
    }


def ignore_preemption_signal(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SLURM signals every process of a job step, workers too;
    SIGUSR1's default action would kill them (and the run). The main process handles it."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class _Augmented(Dataset):
    """Applies `transform` to ``image(index)`` with the sampler's seed, if it sent one."""

    def __init__(self, labels: Sequence[int], transform: Any) -> None:
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = self.image(index)
        if seed is None:
            return self.transform(image), self.labels[index], index
        with torch.random.fork_rng(devices=[]):  # leave the caller's generator alone
            torch.manual_seed(seed)
            return self.transform(image), self.labels[index], index


class ImageFiles(_Augmented):
    """Images decoded from their files.

    A `tolerant` dataset (prediction) answers an undecodable file with a blank image and
    label `UNREADABLE` instead of raising, so one bad file does not stop the others.
    """

    def __init__(
        self, samples: list[tuple[Path, int]], preprocessing: dict[str, Any], transform: Any, tolerant: bool = False
    ) -> None:
        super().__init__([label for _, label in samples], transform)
        self.samples, self.preprocessing, self.tolerant = samples, preprocessing, tolerant

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.samples]

    def image(self, index: int) -> torch.Tensor:
        path = self.samples[index][0]
        try:
            return decode_resized(path, self.preprocessing)
        except Exception as exc:
            if not self.tolerant:
                raise decode_error(path, exc) from None
            side = max(self.preprocessing["image_size"])
            self.labels[index] = UNREADABLE
            return torch.zeros(3, side, side, dtype=torch.uint8)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int, int]:
        x, _, index = super().__getitem__(key)
        return x, self.labels[index], index


class CachedImages(_Augmented):
    """Decoded images from the image cache: one flat uint8 array, offsets and shapes (HWC, C 3
    or 1 for grayscale).
    `file` is the cache file the array was read from, if any (what fork-server workers map)."""

    def __init__(
        self,
        data: np.ndarray,
        offsets: np.ndarray,
        shapes: np.ndarray,
        labels: Sequence[int],
        transform: Any,
        file: Optional[Path] = None,
    ) -> None:
        super().__init__(labels, transform)
        self.data, self.offsets, self.shapes = data, offsets, shapes
        if file is None and isinstance(data, np.memmap) and data.filename is not None and data.offset == 0:
            file = Path(data.filename)
        # absolute: a worker maps it whatever its working directory
        self.file = Path(file).resolve() if file is not None else None

    def __getstate__(self) -> dict[str, Any]:
        """What a worker started by a fork server (`worker_context`) receives instead of a copy
        of the images: the cache file, which each worker maps (the OS keeps one copy of its
        pages for all processes); without a file, the array moved once to shared memory (torch's
        pickler hands the workers a descriptor)."""
        state = {k: v for k, v in self.__dict__.items() if k != "_shared"}
        if self.file is not None and self.data.size:  # (an empty file cannot be mapped)
            state["data"] = ("file", str(self.file), int(self.data.size))
            return state
        if getattr(self, "_shared", None) is None:
            self._shared = torch.from_numpy(np.ascontiguousarray(self.data)).share_memory_()
            self.data = self._shared.numpy()  # the rank reads the shared copy too: one in RAM
        state["data"] = ("shared", self._shared)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        kind, where, *size = state["data"]
        if kind == "file":
            state["data"] = np.memmap(where, dtype=np.uint8, mode="r", shape=(size[0],))
        else:
            state["_shared"], state["data"] = where, where.numpy()
        self.__dict__.update(state)

    def image(self, index: int) -> torch.Tensor:
        h, w, c = (int(v) for v in self.shapes[index])
        start = int(self.offsets[index])
        arr = np.asarray(self.data[start : start + h * w * c]).reshape(h, w, c)
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        return image.repeat(3, 1, 1) if c == 1 else image  # grayscale is stored as one channel


class FeatureDataset(Dataset):
    """Cached backbone features with labels; items ``(features, label, index)``."""

    def __init__(self, features: torch.Tensor, labels: Sequence[int]) -> None:
        self.features = features
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, int]:
        index = key[0] if isinstance(key, tuple) else key
        return self.features[index], self.labels[index], index

    def __getitems__(self, keys: list[Key]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        indices = [k[0] if isinstance(k, tuple) else k for k in keys]
        feats, labels = self.features[indices], self.labels[indices]
        return [(feats[i], labels[i], idx) for i, idx in enumerate(indices)]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-(seed, epoch, sample) augmentation seed (splitmix64-style mixing)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


class ResumableSampler(DistributedSampler):
    """The training order: a seeded permutation per epoch, sharded over the ranks, that can
    start part-way into an epoch; each index comes with its augmentation seed.

    Epoch e's order is a function of (seed, e) alone, so a run resumed from a mid-epoch
    checkpoint (a preempted SLURM job) skips exactly the samples it had trained on and sees
    the rest in the same order, under DDP too (Lightning leaves a `DistributedSampler` as it
    is rather than wrapping it in one that reshuffles).

    `passes` > 1 makes an epoch that many passes over the data, each in an order of its own and
    with augmentation seeds of its own (`data.min_steps_per_epoch`: small sets get enough steps an
    epoch for schedules that count in epochs, as TLlib's ``iters_per_epoch``).
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0, passes: int = 1) -> None:
        # DistributedSampler's own shuffling is not used: __iter__ below replaces it
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.n, self.passes = n, max(1, passes)
        self._skip: tuple[int, int] = (-1, 0)

    def skip_at(self, epoch: int, count: int) -> None:
        """In `epoch` (however often it is iterated), start after this rank's first `count` samples."""
        self._skip = (epoch, count)

    def resume_at(self, epoch: int, batches: int, batch_size: int) -> None:
        """Continue `epoch` after its first `batches` batches (of a loader cycled, as the
        shorter one of domain adaptation is: after that many modulo its length)."""
        per_epoch = max(1, math.ceil(len(self) / batch_size))
        self.set_epoch(epoch)
        self.skip_at(epoch, (batches % per_epoch) * batch_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = math.ceil(self.n / self.num_replicas) * self.num_replicas
        mine: list[tuple[int, int]] = []
        for p in range(self.passes):
            order = torch.randperm(self.n, generator=generator).tolist()
            order += order[: total - len(order)]  # pad like DistributedSampler: equal shards
            # pass 0 keeps the seeds of a one-pass epoch; later passes draw new augmentations
            mine += [
                (i, sample_seed(self.seed, self.epoch, i + p * self.n))
                for i in order[self.rank : total : self.num_replicas]
            ]
        start = self._skip[1] if self._skip[0] == self.epoch else 0
        return iter(mine[start:])

    def __len__(self) -> int:
        return math.ceil(self.n / self.num_replicas) * self.passes


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's share of `indices` for work spread over the ranks (every world-th)."""
    return list(indices[rank::world])


def as_is(item: Any) -> Any:
    """collate_fn for loaders that yield one item at a time."""
    return item
