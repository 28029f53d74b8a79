"""tl's own channel between the training processes: gloo groups on CPU, with timeouts that
fit the work, for the things tl (not Lightning) coordinates.

Why not Lightning's ``strategy.barrier`` / ``broadcast``: they use the default process group,
whose timeout (NCCL: 30 minutes) is too short for rank 0 building a cache of a large data
set, and whose sequence of collectives Lightning itself does not keep identical on every
rank (issue 21264: the progress bar makes rank 0 alone sync metrics). A collective of tl's
interleaved with those would pair with the wrong one and crash or hang. Groups of tl's own
have their own sequence, run on CPU (no host-device synchronisation), and a failure on one
rank reaches the others as that rank's message instead of a hang.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Optional, TypeVar

from tl_cli.errors import TLError

T = TypeVar("T")

# A gloo group per timeout, created on first use (every rank creates it at the same point).
_GROUPS: dict[tuple[str, int], Any] = {}


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def timeout_for(items: int, seconds_per_item: float = 0.05, minimum: float = 1800.0) -> float:
    """A wait that fits `items` units of work done by one rank, in whole hours."""
    return 3600.0 * math.ceil(max(minimum, items * seconds_per_item) / 3600.0)


def group(timeout: float, purpose: str = "work") -> Any:
    """tl's gloo group for `purpose` with (at least) `timeout` seconds; None in one process."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return None
    key = (purpose, int(timeout))
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    return _GROUPS[key]


def reset() -> None:
    """Forget the groups (the process group they belong to was destroyed)."""
    _GROUPS.clear()


def printed_by_rank_zero(exc: TLError) -> TLError:
    """Mark an error that every rank raises alike, so that only rank 0 prints it."""
    exc.quiet = rank() != 0
    return exc


class RankFailed(TLError):
    """Raised on the other ranks when one rank failed; rank 0 prints it, with that rank's message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.quiet = rank() != 0


def _outcome(fn: Callable[[], T]) -> tuple[bool, Any, Optional[BaseException]]:
    try:
        return True, fn(), None
    except TLError as exc:
        return False, str(exc), exc
    except Exception as exc:  # disk full, a bug: the other ranks must not wait for ever
        return False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}", exc


def on_rank_zero(fn: Callable[[], T], timeout: float) -> T:
    """Rank 0 runs `fn`; the other ranks wait up to `timeout` seconds and get its result.

    If `fn` fails, every rank stops at once: rank 0 with its exception, the others with a
    `RankFailed` carrying rank 0's message.
    """
    pg = group(timeout)
    if pg is None:
        return fn()
    dist = _dist()
    outcome = _outcome(fn) if dist.get_rank() == 0 else (None, None, None)
    box = [outcome[:2]]
    dist.broadcast_object_list(box, src=0, group=pg)
    ok, value = box[0]
    if dist.get_rank() == 0 and not ok:
        raise outcome[2]
    if not ok:
        raise RankFailed(f"stopped because rank 0 failed: {value}")
    return value


def on_every_rank(fn: Callable[[], T], timeout: float) -> list[T]:
    """Every rank runs `fn` (its share of some work); all get every rank's result, in rank
    order. A failure on any rank stops all of them with the first failing rank's message."""
    pg = group(timeout)
    ok, value, exc = _outcome(fn)
    if pg is None:
        if not ok:
            raise exc
        return [value]
    dist = _dist()
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (ok, value), group=pg)
    failed = [(r, v) for r, (good, v) in enumerate(parts) if not good]
    if failed:
        if not ok:
            raise exc
        raise RankFailed(f"stopped because rank {failed[0][0]} failed: {failed[0][1]}")
    return [v for _, v in parts]


def broadcast(value: T, timeout: float = 1800.0) -> T:
    """Rank 0's `value` on every rank."""
    return on_rank_zero(lambda: value, timeout)
