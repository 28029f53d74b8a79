"""Which training processes see the same folder: one node-local scratch disk per node, one
shared folder for all, or anything between.

Ranks on different nodes share no local disk, so a cache (or a staged copy of the data) on
node-local scratch must be built once in each folder, by the ranks that see it. The groups are
found by looking, not assumed from hostnames or ``SLURM_NODEID``: every rank drops a marker
file, and each reports which markers it can see.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from tl_cli.cluster import distributed


@dataclass(frozen=True)
class FolderGroup:
    """The ranks that see one folder, as seen from one of them.

    Attributes:
        ranks: the global ranks that see this folder, in increasing order.
        index: this rank's position in `ranks` (its share of the group's work).
    """

    ranks: tuple[int, ...]
    index: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def leader(self) -> bool:
        """Whether this rank joins the group's parts and writes what the group shares."""
        return self.index == 0


def folder_group(folder: Path, timeout: float = 1800.0) -> FolderGroup:
    """The group of ranks that see `folder` (created if need be); one rank alone off DDP."""
    if distributed.world_size() == 1:
        return FolderGroup((0,), 0)
    folder.mkdir(parents=True, exist_ok=True)
    token = distributed.broadcast(uuid.uuid4().hex, timeout)
    rank = distributed.rank()
    marker = folder / f".tl-sharing-{token}-{rank}"
    marker.touch()
    try:
        distributed.on_every_rank(lambda: None, timeout)  # every marker is written
        prefix = f".tl-sharing-{token}-"
        seen = sorted(int(name[len(prefix) :]) for name in os.listdir(folder) if name.startswith(prefix))
        views = distributed.on_every_rank(lambda: seen, timeout)
    finally:
        distributed.on_every_rank(lambda: marker.unlink(missing_ok=True), timeout)
    if views[rank] != [r for r, view in enumerate(views) if view == views[rank]]:
        raise RuntimeError(f"ranks disagree on who sees {folder}: {views}")
    return FolderGroup(tuple(views[rank]), views[rank].index(rank))
