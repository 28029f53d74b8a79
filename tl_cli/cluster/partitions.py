"""What a batch job may ask of a partition, checked on the login node before the queue.

A job that asks for 8 GPUs of a 4-GPU node, two nodes of a one-node partition, a time SLURM
cannot read, or no account where the cluster charges one is rejected only after it waited in
the queue, or (worse) starts and fails. The node shape comes from ``sinfo`` where there is one
(the login node), else from the profile of a cluster tl knows (SDSC Expanse, from its user
guide). Each check either adjusts the request and says so, or refuses with the fix.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, replace
from typing import Optional

from tl_cli.errors import TLError


@dataclass(frozen=True)
class Partition:
    """A partition's nodes, as a job sees them.

    Attributes:
        cores: CPU cores a node has.
        mem_gb: memory a job may ask for on one node, in GiB.
        gpus: GPUs a node has.
        whole_nodes: jobs get (and are charged for) whole nodes.
        max_nodes: the most nodes one job may have; None if not limited.
    """

    name: str
    cores: int
    mem_gb: int
    gpus: int
    whole_nodes: bool
    max_nodes: Optional[int] = None


# SDSC Expanse (user guide): GPU nodes with 4 V100, 40 cores, 374 GB for jobs; CPU nodes with
# 128 cores, 249 GB. gpu/compute give whole nodes; the -shared and debug ones share nodes.
EXPANSE = {
    p.name: p
    for p in (
        Partition("gpu", 40, 374, 4, True),
        Partition("gpu-shared", 40, 374, 4, False, 1),
        Partition("gpu-debug", 40, 374, 4, False, 2),
        Partition("gpu-preempt", 40, 374, 4, False),
        Partition("compute", 128, 249, 0, True),
        Partition("shared", 128, 249, 0, False, 1),
        Partition("debug", 128, 249, 0, False, 2),
        Partition("large-shared", 128, 1999, 0, False, 1),
    )
}
PROFILES = {"expanse": EXPANSE}
ACCOUNT_REQUIRED = {"expanse"}

_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")


def check_time(text: str) -> str:
    """A ``--time`` SLURM reads (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)."""
    if not _TIME.match(text.strip()):
        raise TLError(
            f"--time {text}: SLURM reads minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS "
            "(four hours: --time 04:00:00; a day and a half: --time 1-12:00:00)."
        )
    return text.strip()


def mem_gb(text: str) -> Optional[float]:
    """GiB of a ``--mem`` value (``92G``, ``500M``, ``1T``, a bare number is MiB); None for 0 (all)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)B?", text.strip().upper())
    if not match:
        raise TLError(f"--mem {text}: write a size such as 92G or 500M (or 0 for all of a node's memory).")
    value = float(match.group(1)) * {"K": 1 / 2**20, "M": 1 / 1024, "": 1 / 1024, "G": 1, "T": 1024}[match.group(2)]
    return None if value == 0 else value


def detect_cluster() -> Optional[str]:
    """``expanse`` on SDSC Expanse's login nodes, else None."""
    return "expanse" if "expanse" in socket.getfqdn().lower() else None


def from_sinfo(name: str) -> Optional[Partition]:
    """The shape of partition `name` as this cluster's ``sinfo`` reports it; None without sinfo.

    Raises:
        TLError: the partition does not exist here.
    """
    if shutil.which("sinfo") is None:
        return None
    done = subprocess.run(["sinfo", "-h", "-o", "%R|%c|%m|%G|%h"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return None
    rows = [line.split("|") for line in done.stdout.splitlines() if line.count("|") == 4]
    names = sorted({r[0] for r in rows})
    mine = [r for r in rows if r[0] == name]
    if not mine:
        raise TLError(f"--partition {name} does not exist on this cluster; sinfo lists: {', '.join(names)}.")
    cores = min(int(re.sub(r"\D", "", r[1]) or 0) for r in mine)
    mem = min(int(re.sub(r"\D", "", r[2]) or 0) for r in mine) // 1024
    gpus = min(int(m.group(1)) if (m := re.search(r"gpu(?::[\w-]+)?:(\d+)", r[3])) else 0 for r in mine)
    whole = all(r[4].strip().upper().startswith("EXCLUSIVE") for r in mine)
    max_nodes = None
    shown = subprocess.run(["scontrol", "show", "partition", name], capture_output=True, text=True, timeout=30)
    if found := re.search(r"MaxNodes=(\d+)", shown.stdout):
        max_nodes = int(found.group(1))
    return Partition(name, cores, mem, gpus, whole, max_nodes)


@dataclass
class Request:
    """What a job asks for; `fit_request` returns it adjusted, with notes."""

    partition: str
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: int
    mem: Optional[str]
    time: str
    account: Optional[str]


def fit_request(request: Request, cluster: Optional[str], use_sinfo: bool = True) -> tuple[Request, list[str]]:
    """Check `request` against the partition's nodes; return it (adjusted) and what was changed.

    The nodes are `cluster`'s profile (``expanse``) if named, else what ``sinfo`` here reports
    (`use_sinfo`), else unchecked.

    Raises:
        TLError: what cannot be fixed here (no account where one is required, more GPUs than a
            node has, more memory than a node has, a time SLURM cannot read).
    """
    notes: list[str] = []
    r = replace(request, time=check_time(request.time))
    if cluster in ACCOUNT_REQUIRED and not r.account:
        raise TLError(
            f"{cluster.capitalize()} charges every job to an allocation: add --account PROJECT (your "
            "project's name: `sacctmgr show assoc user=$USER format=account` lists yours)."
        )
    profile = PROFILES.get(cluster or "", {})
    shape = profile.get(r.partition) if profile else (from_sinfo(r.partition) if use_sinfo else None)
    if profile and shape is None:
        raise TLError(f"--partition {r.partition} is not one of {cluster}'s: {', '.join(profile)}.")
    if shape is None:
        notes.append(f"partition {r.partition} not checked: no sinfo here and no known profile (run on the login node)")
        return r, notes
    if r.gpus_per_node > shape.gpus:
        nodes = -(-r.gpus_per_node * r.nodes // max(shape.gpus, 1))
        fix = (
            f"--nodes {nodes} --gpus-per-node {shape.gpus}"
            if shape.gpus
            else "a GPU partition, or --cpu for CPU processes"
        )
        raise TLError(
            f"--partition {r.partition} has {shape.gpus} GPU(s) a node, and the job asks for "
            f"{r.gpus_per_node} a node: use {fix}."
        )
    if shape.max_nodes is not None and r.nodes > shape.max_nodes:
        whole = [p for p in profile.values() if p.whole_nodes and p.gpus == shape.gpus]
        if not whole:
            raise TLError(
                f"--partition {r.partition} runs jobs of at most {shape.max_nodes} node(s); this job asks "
                f"for {r.nodes}: choose a partition for whole nodes (sinfo lists them)."
            )
        notes.append(
            f"--partition {r.partition} runs one-node jobs; {r.nodes} nodes need whole nodes: "
            f"--partition {whole[0].name}"
        )
        r.partition, shape = whole[0].name, whole[0]
    if r.tasks_per_node * r.cpus_per_task > shape.cores:
        fitted = max(1, shape.cores // r.tasks_per_node)
        notes.append(
            f"--cpus-per-task {r.cpus_per_task} x {r.tasks_per_node} tasks is more than a node's "
            f"{shape.cores} cores: --cpus-per-task {fitted}"
        )
        r.cpus_per_task = fitted
    asked = mem_gb(r.mem) if r.mem is not None else None
    if asked is not None and asked > shape.mem_gb:
        raise TLError(
            f"--mem {r.mem} is more than a node of {r.partition} has for jobs ({shape.mem_gb}G): ask for "
            f"at most --mem {shape.mem_gb}G."
        )
    if shape.whole_nodes:
        if r.mem is None or asked is None or asked < shape.mem_gb:
            if r.mem is not None and r.mem != "0":
                notes.append(f"--partition {r.partition} gives whole nodes: --mem {shape.mem_gb}G (was {r.mem})")
            r.mem = f"{shape.mem_gb}G"
        if shape.gpus and r.gpus_per_node and r.gpus_per_node < shape.gpus and r.nodes == 1:
            shared = [p for p in profile.values() if not p.whole_nodes and p.gpus == shape.gpus and p.max_nodes == 1]
            if shared:
                notes.append(
                    f"--partition {r.partition} charges all {shape.gpus} GPUs of a node; for "
                    f"{r.gpus_per_node}, --partition {shared[0].name} costs less (kept as asked)"
                )
    elif r.mem is None:
        share = (
            r.gpus_per_node / shape.gpus
            if shape.gpus and r.gpus_per_node
            else r.cpus_per_task * r.tasks_per_node / shape.cores
        )
        r.mem = f"{max(1, int(shape.mem_gb * share))}G"
    return r, notes
