"""Two "nodes" on this machine: two torchrun agents (one process each) with a shared rendezvous,
each with a node-local folder of its own for caches and temporary files, as a cluster user
puts them on node-local scratch. Ranks on different nodes share no local disk."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import CONFIGS, TINY_DDP, compare_ranks, subprocess_env

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(node: int, port: int, args: list) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--node_rank",
        str(node),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "tl_cli.cli",
        *[str(a) for a in args],
    ]


def two_nodes(args: list, tmp_path: Path, timeout: float = 420, env: Callable[[int], dict] | None = None) -> list[str]:
    """`tl ARGS` on two torchrun agents (node ranks 0 and 1); each node's TL_CACHE_DIR, TMPDIR
    and scratch folder ($SLURM_TMPDIR) are its own, plus `env(node)`. Returns each node's
    output; fails if either fails."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        local = tmp_path / f"node{node}"
        for sub in ("tmp", "scratch"):
            (local / sub).mkdir(parents=True, exist_ok=True)
        node_env = dict(
            subprocess_env(),
            TL_CACHE_DIR=str(local / "cache"),
            TMPDIR=str(local / "tmp"),
            SLURM_TMPDIR=str(local / "scratch"),
            **(env(node) if env else {}),
        )
        procs.append(
            subprocess.Popen(
                _torchrun(node, port, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=node_env
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"node {node}:\n{out[-4000:]}"
    return outs


def _entries(node: Path, kind: str) -> list[str]:
    folder = node / "cache" / kind
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_two_nodes_with_node_local_caches_build_them_once_per_node_and_end_identical(tiny_data, tmp_path):
    nodes = ["--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.strategy", "ddp"]
    save = ["--trainer.callbacks+", "tests.helpers.SaveRankState", "--trainer.callbacks.folder"]
    fe = [
        "fit",
        "--config",
        CONFIGS / "feature_extract.yaml",
        *TINY_DDP,
        *nodes,
        "--data.root",
        tiny_data,
        "--data.num_workers",
        "2",
        "--trainer.max_epochs",
        "2",
    ]
    outs = two_nodes([*fe, *save, "fe_state"], tmp_path)
    assert "GLOBAL_RANK: 1" in "".join(outs)
    assert compare_ranks(Path("fe_state"))[0] == 0
    # each node built the feature cache of both splits in its own folder: whole entries, no parts
    for node in (tmp_path / "node0", tmp_path / "node1"):
        entries = _entries(node, "features")
        assert len(entries) == 2 and all(e.endswith(".pt") for e in entries), (node, entries)
    assert _entries(tmp_path / "node0", "features") == _entries(tmp_path / "node1", "features")
    for e in _entries(tmp_path / "node0", "features"):
        a = torch.load(tmp_path / "node0" / "cache" / "features" / e, weights_only=False)
        b = torch.load(tmp_path / "node1" / "cache" / "features" / e, weights_only=False)
        assert torch.equal(a["features"], b["features"])
    # a second run finds both nodes' caches and decodes nothing
    outs = two_nodes([*fe, "--trainer.max_epochs", "1"], tmp_path)
    assert "bottleneck features of 12 images loaded" in outs[0], outs[0][-3000:]


def test_a_cache_folder_shared_by_both_nodes_is_built_once(tiny_data, tmp_path):
    """The other layout: one cache folder on the shared filesystem, seen by both nodes."""
    nodes = ["--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.strategy", "ddp"]
    shared = tmp_path / "shared_cache"
    args = [
        "fit",
        "--config",
        CONFIGS / "feature_extract.yaml",
        *TINY_DDP,
        *nodes,
        "--data.root",
        tiny_data,
        "--data.cache_dir",
        shared,
        "--trainer.max_epochs",
        "1",
        "--trainer.callbacks+",
        "tests.helpers.SaveRankState",
    ]
    two_nodes(args, tmp_path)
    assert compare_ranks(Path("rankstate"))[0] == 0
    entries = sorted(os.listdir(shared / "features"))
    assert len(entries) == 2 and all(e.endswith(".pt") for e in entries), entries


def _reads(log: Path) -> Counter:
    """How often each file under the audited root was opened by the processes of one node."""
    counts: Counter = Counter()
    for part in log.parent.glob(f"{log.name}.*"):
        counts.update(part.read_text().split())
    return counts


def test_staging_reads_each_shared_file_once_per_node_and_trains_from_the_node_local_copy(tiny_data, tmp_path):
    """``data.stage auto`` on two nodes with node-local scratch ($SLURM_TMPDIR): each node copies
    the data once, checks it, and trains from its copy; the next job on the node reuses it."""
    shared = tmp_path / "shared" / "data"
    shutil.copytree(tiny_data, shared)
    files = sorted(str(p) for p in shared.rglob("*") if p.is_file())
    nodes = ["--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.strategy", "ddp"]
    args = [
        "fit",
        "--config",
        CONFIGS / "finetune.yaml",
        *TINY_DDP,
        *nodes,
        "--data.root",
        shared,
        "--data.stage",
        "auto",
        "--data.num_workers",
        "2",
        "--data.cache_images",  # every epoch reads every file: from the copy, never the source
        "false",
        "--trainer.max_epochs",
        "2",
        "--model.init_from",
        "null",
        "--trainer.callbacks+",
        "tests.helpers.SaveRankState",
    ]
    audit = Path(__file__).parent / "audit"
    counts = []
    for job in (1, 2):
        logs = {n: tmp_path / "logs" / f"job{job}-node{n}" / "opened" for n in (0, 1)}
        for log in logs.values():
            log.parent.mkdir(parents=True)

        def audited(node: int, logs: dict = logs) -> dict:
            return {
                "PYTHONPATH": f"{audit}{os.pathsep}{subprocess_env()['PYTHONPATH']}",
                "TL_AUDIT_ROOT": str(shared),
                "TL_AUDIT_LOG": str(logs[node]),
            }

        two_nodes(args, tmp_path, env=audited)
        counts.append({n: _reads(logs[n]) for n in (0, 1)})
        assert compare_ranks(Path("rankstate"))[0] == 0
    first, second = counts
    for node in (0, 1):
        # the first job: every file read from the shared folder once on each node (the copy)
        assert sorted(first[node]) == files, (node, sorted(first[node])[:5])
        assert max(first[node].values()) == 1, first[node].most_common(3)
        staged = list((tmp_path / f"node{node}" / "scratch" / "tl-stage").iterdir())
        assert len(staged) == 1 and (staged[0] / ".tl-stage.json").is_file()
        copies = sorted(p.relative_to(staged[0]) for p in staged[0].rglob("*") if p.is_file() and p.name[0] != ".")
        assert copies == sorted(Path(f).relative_to(shared) for f in files)
    # the second job on the same nodes: the checked copies are reused, nothing read from shared
    assert second == {0: Counter(), 1: Counter()}, second
