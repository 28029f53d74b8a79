"""`tl slurm`: a SLURM batch script rendered from a tl config, consistent by construction.

DDP starts one process per device; SLURM starts ``--ntasks-per-node`` processes on each of
``--nodes`` nodes. If the two disagree, the processes that do start wait forever for the
others. So the script takes both numbers from one place and passes them to `tl fit` too.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from tl_cli.errors import TLError


def _merged_trainer(configs: list[Path]) -> dict[str, Any]:
    trainer: dict[str, Any] = {}
    for path in configs:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise TLError(f"Cannot read config {path}: {exc}") from None
        trainer.update(data.get("trainer") or {})
    return trainer


def _given(args: list[str], names: tuple[str, ...]) -> dict[str, int]:
    """trainer.<name> values among `tl fit` arguments (``--trainer.devices 4`` or ``=4``)."""
    found: dict[str, int] = {}
    for i, arg in enumerate(args):
        for name in names:
            key = f"--trainer.{name}"
            value = (
                arg.split("=", 1)[1]
                if arg.startswith(key + "=")
                else (args[i + 1] if arg == key and i + 1 < len(args) else None)
            )
            if value is not None:
                try:
                    found[name] = int(value)
                except ValueError:
                    raise TLError(f"{key} {value}: tl slurm needs a number of devices/nodes here.") from None
    return found


def _without(args: list[str], names: tuple[str, ...]) -> list[str]:
    """`args` minus the trainer.<name> options (the script passes them itself, consistently)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if any(arg == f"--trainer.{n}" for n in names):
            skip = True
            continue
        if any(arg.startswith(f"--trainer.{n}=") for n in names):
            continue
        out.append(arg)
    return out


def _resolve(name: str, configured: Any, asked: Optional[int], default: int) -> int:
    fixed = configured if isinstance(configured, int) and configured > 0 else None
    if fixed is not None and asked is not None and fixed != asked:
        raise TLError(
            f"The config (or the arguments after --) sets trainer.{name}={fixed} but the job asks for {asked}: SLURM would start a "
            "different number of processes than DDP waits for, and the job would hang. Make them equal."
        )
    return fixed or asked or default


def job_shape(
    configs: list[Path], nodes: Optional[int], devices: Optional[int], extra: Optional[list[str]]
) -> tuple[int, int]:
    """(nodes, processes a node) of the job: the configs' trainer.num_nodes / devices, the `tl fit`
    arguments', or the ones asked for, which must agree."""
    if not configs:
        raise TLError("tl slurm needs at least one --config.")
    trainer = _merged_trainer(configs)
    trainer.update(_given(extra or [], ("devices", "num_nodes")))  # `-- --trainer.devices 4` wins over configs
    return _resolve("num_nodes", trainer.get("num_nodes"), nodes, 1), _resolve(
        "devices", trainer.get("devices"), devices, 1
    )


def environment(venv: Optional[str]) -> list[str]:
    """The marked block of a batch script that sets up the software, the offline weights and
    node-local caches; `venv` (or the active venv / conda environment) is activated."""
    active = venv or os.environ.get("VIRTUAL_ENV") or (sys.prefix if sys.prefix != sys.base_prefix else None)
    conda = os.environ.get("CONDA_DEFAULT_ENV") if not active else None
    if active:
        activate = f"source {shlex.quote(str(Path(active).resolve()))}/bin/activate"
    elif conda:
        activate = f"conda activate {shlex.quote(conda)}          # the environment tl slurm ran in"
    else:
        activate = "source .venv/bin/activate           # CHANGE: the environment tl is installed in"
    home = Path.home()
    hf_home = os.environ.get("HF_HOME", str(home / ".cache" / "huggingface"))
    torch_home = os.environ.get("TORCH_HOME", str(home / ".cache" / "torch"))
    return [
        "# ---- environment (edit for your cluster) ----------------------------------------",
        "# module purge; module load ...      # if your site's Python or CUDA comes from modules",
        activate,
        "# offline compute nodes: weights come from the cache `tl weights fetch` filled on the login node",
        f"export HF_HUB_OFFLINE=1 HF_HOME={shlex.quote(hf_home)} TORCH_HOME={shlex.quote(torch_home)}",
        "# caches on node-local scratch (data.stage auto copies the images there, once per node)",
        'if [ -z "${TL_CACHE_DIR:-}" ]; then',
        '  for d in "${SLURM_TMPDIR:-}" "/scratch/${USER:-}/job_${SLURM_JOB_ID:-}"; do',
        '    if [ -n "$d" ] && [ -d "$d" ]; then export TL_CACHE_DIR="$d/tl-cache"; break; fi',
        "  done",
        "fi",
        "# -----------------------------------------------------------------------------------",
    ]


def job_header(
    what: str,
    *,
    job_name: str,
    account: Optional[str],
    partition: str,
    nodes: int,
    tasks_per_node: int,
    gpus_per_node: int,
    cpus_per_task: int,
    mem: str,
    time_limit: str,
    venv: Optional[str],
    output: str = "slurm-%x-%j.out",
    array: Optional[str] = None,
) -> list[str]:
    """The ``#SBATCH`` lines and the environment set-up every tl batch script starts with."""
    lines = [
        "#!/usr/bin/env bash",
        f"# Rendered by `tl` on {time.strftime('%Y-%m-%d %H:%M')}: {what}",
        f"#SBATCH --job-name={job_name}",
    ]
    if account:
        lines.append(f"#SBATCH --account={account}")
    lines += [
        f"#SBATCH --partition={partition}",
        f"#SBATCH --nodes={nodes}                    # = trainer.num_nodes",
        f"#SBATCH --ntasks-per-node={tasks_per_node}          # = trainer.devices",
    ]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    if array:
        lines.append(f"#SBATCH --array={array}")
    lines += [
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --mem={mem}",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --signal=SIGUSR1@90          # Lightning saves hpc_ckpt_N.ckpt and requeues the job",
        "#SBATCH --requeue",
        f"#SBATCH --output={output}",
        "#SBATCH --open-mode=append           # a requeued job's log continues the first one's",
        "",
        "set -euo pipefail",
        *environment(venv),
    ]
    return lines


def render_job_script(
    configs: list[Path],
    *,
    partition: str = "gpu-shared",
    account: Optional[str] = None,
    nodes: Optional[int] = None,
    devices: Optional[int] = None,
    cpu: bool = False,
    cpus_per_task: int = 10,
    mem: str = "92G",
    time_limit: str = "04:00:00",
    job_name: str = "tl-fit",
    venv: Optional[str] = None,
    extra: Optional[list[str]] = None,
) -> str:
    """The batch script text for ``tl fit --config CONFIGS [EXTRA]``."""
    n_nodes, n_devices = job_shape(configs, nodes, devices, extra)
    accelerator = "cpu" if cpu else "gpu"
    lines = job_header(
        f"{n_nodes} node(s) x {n_devices} {'process(es)' if cpu else 'GPU(s)'}, one DDP process per device.",
        job_name=job_name,
        account=account,
        partition=partition,
        nodes=n_nodes,
        tasks_per_node=n_devices,
        gpus_per_node=0 if cpu else n_devices,
        cpus_per_task=cpus_per_task,
        mem=mem,
        time_limit=time_limit,
        venv=venv,
    )
    # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): DataLoader workers
    # would share one core; --kill-on-bad-exit: a rank that dies takes the others with it
    # instead of leaving them waiting in a collective until the time limit
    command = ["srun", f"--cpus-per-task={cpus_per_task}", "--kill-on-bad-exit=1", "tl", "fit"]
    for path in configs:
        command += ["--config", str(path)]
    command += [
        "--trainer.accelerator",
        accelerator,
        "--trainer.devices",
        str(n_devices),
        "--trainer.num_nodes",
        str(n_nodes),
    ]
    if n_devices * n_nodes > 1:
        command += ["--trainer.strategy", "ddp"]
    command += [a for a in _without(extra or [], ("devices", "num_nodes"))]
    lines.append(" ".join(shlex.quote(c) for c in command))
    return "\n".join(lines) + "\n"


def submit(script: str, job_name: str) -> str:
    """Write the script under runs/slurm/ and pass it to sbatch; return sbatch's answer."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise TLError(
            "sbatch is not on PATH: run `tl slurm` on a SLURM login node, or add --dry-run to print the script."
        )
    folder = Path("runs/slurm")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    done = subprocess.run([sbatch, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise TLError(f"sbatch refused {path}: {done.stderr.strip() or done.stdout.strip()}")
    return f"{done.stdout.strip()} ({path})"
