"""Two "nodes" on this machine: two torchrun agents (one process each) with a shared rendezvous,
each with a node-local folder of its own for caches and temporary files, as a cluster user
puts them on node-local scratch. Ranks on different nodes share no local disk."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS
from tests.test_ddp import TINY, _env, compare_ranks

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list, tmp_path: Path, timeout: float = 420) -> list[str]:
    """`tl ARGS` on two torchrun agents (node ranks 0 and 1); each node's TL_CACHE_DIR and
    TMPDIR are its own. Returns each node's output; fails if either fails."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        local = tmp_path / f"node{node}"
        (local / "tmp").mkdir(parents=True, exist_ok=True)
        env = dict(_env(), TL_CACHE_DIR=str(local / "cache"), TMPDIR=str(local / "tmp"))
        command = [
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
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
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
        *TINY,
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
        *TINY,
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
