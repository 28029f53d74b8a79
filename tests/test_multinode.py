"""Two "nodes" on this machine: two torchrun agents (one process each) with a shared rendezvous,
each with a node-local folder of its own for caches and temporary files, as a cluster user
puts them on node-local scratch. Ranks on different nodes share no local disk."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from typing_extensions import override

from tests.helpers import (
    CONFIGS,
    TINY_DDP,
    assert_cached_as_decoded,
    compare_ranks,
    large_photos,
    subprocess_env,
    tl,
)

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


def test_two_nodes_cache_large_photos_as_the_uncached_loader_decodes_them(tmp_path):
    """Photographs large enough to decode at a reduced scale, node-local caches, 2 workers a
    rank: each node's decoded-image cache holds, image by image, the uncached loader's pixels,
    so both nodes hold the same bytes; the ranks end identical."""
    photos = large_photos(tmp_path / "photos")
    nodes = ["--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.strategy", "ddp"]
    args = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY_DDP, *nodes, "--data.root", photos]
    args += ["--data.num_workers", "2", "--data.cache_features", "false", "--data.cache_images", "true"]
    two_nodes([*args, "--trainer.max_epochs", "1", "--trainer.callbacks+", "tests.helpers.SaveRankState"], tmp_path)
    assert compare_ranks(Path("rankstate"))[0] == 0
    best = torch.load("runs/feature_extract/latest/checkpoints/best.ckpt", weights_only=False)
    for node in ("node0", "node1"):
        drafted = assert_cached_as_decoded(tmp_path / node / "cache", photos, best["tl"]["preprocessing"])
        assert drafted >= 12, (node, drafted)


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


class RecordPlacement(pl.Callback):
    """Writes what each rank sees of its place in the job: SLURM's variables and Lightning's."""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seen = {k: os.environ.get(k) for k in ("SLURM_NODEID", "SLURM_LOCALID", "SLURM_PROCID", "SLURM_NTASKS")}
        seen.update(
            node_rank=trainer.node_rank,
            local_rank=trainer.local_rank,
            global_rank=trainer.global_rank,
            world_size=trainer.world_size,
            environment=type(trainer.strategy.cluster_environment).__name__,
        )
        Path(f"placement{trainer.global_rank}.json").write_text(json.dumps(seen))


def slurm_nodes(args: list, tmp_path: Path, job: str, restarts: int = 0, timeout: float = 420) -> list[str]:
    """`tl ARGS` as srun starts it on two nodes with one task each (SLURM_NODEID 0 and 1), each
    node with its own scratch ($SLURM_TMPDIR), TL_CACHE_DIR and TMPDIR; Lightning's
    SLURMEnvironment places the ranks. `restarts` > 0: the job was requeued."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        local = tmp_path / f"node{node}"
        for sub in ("tmp", "scratch"):
            (local / sub).mkdir(parents=True, exist_ok=True)
        env = dict(
            subprocess_env(),
            TL_CACHE_DIR=str(local / "cache"),
            TMPDIR=str(local / "tmp"),
            SLURM_TMPDIR=str(local / "scratch"),
            SLURM_JOB_ID=job,
            SLURM_JOB_NAME="tl-two-nodes",
            SLURM_NTASKS="2",
            SLURM_NTASKS_PER_NODE="1",
            SLURM_NNODES="2",
            SLURM_JOB_NUM_NODES="2",
            SLURM_NODELIST="127.0.0.1",
            SLURM_PROCID=str(node),
            SLURM_LOCALID="0",
            SLURM_NODEID=str(node),
            SLURM_RESTART_COUNT=str(restarts),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PATH=f"{tmp_path / 'no-scontrol'}{os.pathsep}{os.environ['PATH']}",
        )
        command = [sys.executable, "-m", "tl_cli.cli", *[str(a) for a in args]]
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for node, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"node {node}:\n{out[-4000:]}"
    return outs


def _fit_only(args: list) -> list:
    """`args` after ``fit --config X`` without the process counts (tl slurm sets them)."""
    out, skip = [], 0
    for a in args[3:]:
        if skip:
            skip -= 1
        elif a in ("--trainer.devices", "--trainer.num_nodes", "--trainer.strategy"):
            skip = 1
        else:
            out.append(a)
    return out


def test_two_slurm_nodes_place_ranks_by_node_id_and_a_preempted_job_resumes_exactly(tiny_data, tmp_path, capsys):
    """Lightning's SLURM environment on two nodes (node ids 0 and 1, one task each) with
    node-local scratch and caches, data staged per node: the ranks are placed as SLURM says,
    end identical, and a job preempted mid-epoch (SIGUSR1 to every process) and requeued ends
    with the weights and step count of an uninterrupted one."""
    fake = tmp_path / "no-scontrol"  # `scontrol requeue` of a job SLURM does not know: answer no
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    (fake / "scontrol").chmod(0o755)
    shared = tmp_path / "shared" / "data"
    shutil.copytree(tiny_data, shared)
    args = ["fit", "--config", CONFIGS / "finetune.yaml", *TINY_DDP, "--data.root", shared, "--data.num_workers", "2"]
    args += ["--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.strategy", "ddp"]
    args += ["--data.augment", "flip", "--unfreeze.schedule", "{1: 2}", "--trainer.max_epochs", "3"]
    args += ["--model.init_from", "null", "--early_stopping", "null"]
    record = ["--trainer.callbacks+", "tests.test_multinode.RecordPlacement"]
    # the uninterrupted job is the one `tl slurm` renders for 2 nodes: its srun line, run under
    # the variables srun sets for its #SBATCH lines
    rendered = tl(
        "slurm",
        "--cpu",
        "--nodes",
        "2",
        "--devices",
        "1",
        "--partition",
        "debug",
        "--cluster",
        "none",
        "--no-check",
        "--dry-run",
        "-c",
        CONFIGS / "finetune.yaml",
        "--",
        *_fit_only(args),
        *record,
        "--trainer.default_root_dir",
        "straight",
    )
    assert rendered == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    srun = shlex.split([line for line in script.splitlines() if line.startswith("srun ")][0])
    slurm_nodes(srun[srun.index("tl") + 1 :], tmp_path, job="901")
    for rank in (0, 1):
        seen = json.loads(Path(f"placement{rank}.json").read_text())
        assert seen == {
            "SLURM_NODEID": str(rank),
            "SLURM_LOCALID": "0",
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "2",
            "node_rank": rank,
            "local_rank": 0,
            "global_rank": rank,
            "world_size": 2,
            "environment": "SLURMEnvironment",
        }, seen

    signal = ["--trainer.callbacks+", "tests.helpers.SignalSelf", "--trainer.callbacks.epoch", "1"]
    outs = slurm_nodes([*args, "--trainer.default_root_dir", "pre", *signal], tmp_path, job="902")
    assert "preemption signal: training state saved" in outs[0], outs[0][-3000:]
    assert list(Path("pre").glob("hpc_ckpt_*.ckpt")) and not Path("pre/latest").exists()
    os.environ["TL_TEST_RESUMED"] = "1"
    try:  # the requeued job: same job id, a restart, no --ckpt_path (Lightning finds hpc_ckpt)
        save = ["--trainer.callbacks+", "tests.helpers.SaveRankState"]
        outs = slurm_nodes([*args, "--trainer.default_root_dir", "pre", *save], tmp_path, job="902", restarts=1)
    finally:
        del os.environ["TL_TEST_RESUMED"]
    assert "Restored all states from the checkpoint" in outs[0], outs[0][-3000:]
    assert compare_ranks(Path("rankstate"))[0] == 0
    a = torch.load("straight/latest/checkpoints/last.ckpt", weights_only=True)
    b = torch.load("pre/latest/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] > 0
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
    assert [p.name for p in Path("pre").glob("version_*")] == ["version_0"]  # the requeue continued it
