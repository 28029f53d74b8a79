"""tl's own channel between ranks (2 gloo processes): rank-0 work may outlast the process
group's timeout, a failure on one rank stops the others at once with its message, and the
preemption agreement costs no collective on most steps."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tl_cli.cluster import distributed
from tl_cli.errors import TLError


def _init(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # the default group gives up after 2 s, as NCCL's would after its 30 minutes
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=2))


def _slow_rank_zero(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    try:
        value = distributed.on_rank_zero(lambda: (time.sleep(4), "built")[1], timeout=60)
        parts = distributed.on_every_rank(lambda: (time.sleep(3 * rank), rank)[1], timeout=60)
        with open(f"{out}.{rank}", "w") as fh:
            fh.write(f"{value} {parts}")
    finally:
        distributed.reset()
        dist.destroy_process_group()


def _failing_rank_zero(rank: int, port: int, out: str) -> None:
    _init(rank, port)
    start = time.monotonic()
    try:
        distributed.on_rank_zero(lambda: (_ for _ in ()).throw(TLError("disk full: /cache")), timeout=600)
    except TLError as exc:
        with open(f"{out}.{rank}", "w") as fh:
            fh.write(f"{type(exc).__name__}|{exc}|{time.monotonic() - start:.1f}|{getattr(exc, 'quiet', False)}")
    finally:
        distributed.reset()
        dist.destroy_process_group()


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_zero_work_outlasts_the_default_timeout(tmp_path):
    out = str(tmp_path / "out")
    mp.spawn(_slow_rank_zero, args=(_port(), out), nprocs=2)
    assert [open(f"{out}.{r}").read() for r in (0, 1)] == ["built [0, 1]"] * 2


def test_a_failure_on_rank_zero_stops_every_rank_with_its_message(tmp_path):
    out = str(tmp_path / "out")
    mp.spawn(_failing_rank_zero, args=(_port(), out), nprocs=2)
    kind0, msg0, _, quiet0 = open(f"{out}.0").read().split("|")
    kind1, msg1, seconds1, quiet1 = open(f"{out}.1").read().split("|")
    assert kind0 == "TLError" and msg0 == "disk full: /cache" and quiet0 == "False"
    assert kind1 == "RankFailed" and "rank 0 failed: disk full: /cache" in msg1
    assert quiet1 == "True"  # printed once, by rank 0
    assert float(seconds1) < 30  # at once, not after the 600 s wait


def test_timeouts_fit_the_work():
    assert distributed.timeout_for(100) == 3600  # at least 30 minutes, in whole hours
    assert distributed.timeout_for(1_000_000, 0.05) >= 50_000  # a million images on one rank


class _Work:
    def wait(self):
        return True


def test_preemption_agreement_is_asynchronous_and_spaced(monkeypatch):
    """With a group, the flag is exchanged about every check_seconds, never waited for."""
    from tl_cli.callbacks.preemption import PreemptionCheckpoint

    calls = []

    def fake_all_reduce(tensor, op=None, group=None, async_op=False):
        assert async_op, "the agreement must not block the step"
        calls.append(tensor.clone())
        return _Work()

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    cb = PreemptionCheckpoint(check_seconds=2.0)
    cb._group, cb._started = object(), 0.0
    decisions = []
    for _ in range(100):  # 100 steps of 0.1 s
        clock[0] += 0.1
        cb._batches += 1
        decisions.append(cb._agreed_to_stop())
    assert 3 <= len(calls) <= 8  # about every 20 steps (2 s), not every step
    assert not any(decisions)
    cb.requested = True  # the signal: seen at the next exchange, acted on at the one after
    steps = 0
    while not cb._agreed_to_stop():
        clock[0] += 0.1
        cb._batches += 1
        steps += 1
        calls[-1][0] = calls[-1][0]  # (values are this rank's; MAX over one rank)
    assert steps <= 45


@pytest.mark.parametrize("cuda", [False, True])
def test_rng_state_of_every_generator_is_checkpointed_and_restored(monkeypatch, cuda):
    from tl_cli.callbacks import resume

    fake_cuda = torch.tensor([1, 2, 3], dtype=torch.uint8)
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: fake_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.setdefault("cuda", s))
    state = resume.ExactResume().state_dict()
    assert ("cuda" in state["rng"][0]) == cuda
    cb = resume.ExactResume()
    cb.load_state_dict(state)
    trainer = type("T", (), {"global_rank": 0, "train_dataloader": []})()
    torch.rand(5)  # move the CPU generator on
    cb._position = None
    cb.on_train_start(trainer, None)
    assert torch.equal(torch.get_rng_state(), state["rng"][0]["cpu"])
    assert ("cuda" in restored) == cuda
