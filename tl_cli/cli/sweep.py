"""`tl sweep`: a grid of `tl fit` runs over any config keys, one after the other here or as one
SLURM job array, and `tl sweep gather`: the finished (and failed) runs as a leaderboard.

A sweep lives in one folder: ``sweep.json`` (the plan: configs, arguments, grid points),
``point_<i>/`` (each point's `trainer.default_root_dir`, so its run folder, checkpoints and
a requeued job's ``hpc_ckpt_*.ckpt`` are its own: ``point_<i>/array_<job>_<task>/`` under
SLURM, ``point_<i>/version_<n>/`` here) and ``logs/`` (each run's output, which is where a
failed run's error is found when the sweep is gathered).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tl_cli.cli.compare import Entry, leaderboard
from tl_cli.errors import TLError

PLAN = "sweep.json"


def split_values(text: str) -> list[str]:
    """``1e-3,1e-4`` -> two values; commas inside brackets or braces do not split
    (``{0: 2, 1: 4},{0: 4}`` is two schedules)."""
    out, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    out.append(current.strip())
    return [v for v in out if v != ""]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``KEY=V1,V2`` items -> {key: values}, in the order given."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or not split_values(values):
            raise TLError(
                f"--grid {item!r}: write KEY=V1,V2,... (e.g. --grid model.lr=1e-3,1e-4 "
                "--grid model.backbone=timm:resnet18,timm:efficientnet_b0)."
            )
        if not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise TLError(f"--grid {item!r}: {key!r} is not a config key (e.g. model.lr, data.augment).")
        if key in grid:
            raise TLError(f"--grid names {key} twice: give all its values in one --grid {key}=V1,V2.")
        grid[key] = split_values(values)
    if not grid:
        raise TLError("tl sweep needs at least one --grid KEY=V1,V2,...")
    return grid


def points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def label(point: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in point.items())


def fit_arguments(plan: dict[str, Any], index: int) -> list[str]:
    """The `tl fit` arguments of grid point `index`."""
    args = [a for c in plan["configs"] for a in ("--config", c)] + list(plan["extra"])
    for key, value in plan["points"][index].items():
        args += [f"--{key}", value]
    return args + ["--trainer.default_root_dir", str(Path(plan["folder"]) / f"point_{index}")]


def make_plan(
    configs: list[Path], runs: list[dict[str, str]], folder: Path, extra: list[str], runs_per_task: int = 1
) -> dict[str, Any]:
    """Write ``sweep.json`` in `folder` for `runs` (each a {key: value} of `tl fit` settings);
    refused if the folder holds another sweep."""
    for config in configs:
        if not Path(config).is_file():
            raise TLError(f"--config {config}: no such file.")
    plan = {
        "configs": [str(Path(c).resolve()) for c in configs],
        "extra": extra,
        "points": runs,
        "runs_per_task": runs_per_task,
        "folder": str(folder.resolve()),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    existing = folder / PLAN
    if existing.is_file():
        old = json.loads(existing.read_text())
        if [old.get(k) for k in ("configs", "extra", "points")] != [plan[k] for k in ("configs", "extra", "points")]:
            raise TLError(f"{folder} holds another sweep ({existing}). Choose another -o folder, or remove that one.")
        plan["created"] = old.get("created", plan["created"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    existing.write_text(json.dumps(plan, indent=1) + "\n")
    return plan


def run_here(plan: dict[str, Any]) -> int:
    """Every grid point as a `tl fit` here, one after the other; a failed run does not stop the
    others. Returns how many failed."""
    failed = 0
    total = len(plan["points"])
    for i, point in enumerate(plan["points"]):
        log = Path(plan["folder"]) / "logs" / f"point_{i}.log"
        print(f"tl sweep: [{i + 1}/{total}] {label(point)}", flush=True)
        start = time.perf_counter()
        with open(log, "w") as out:
            done = subprocess.run(
                [sys.executable, "-m", "tl_cli.cli", "fit", *fit_arguments(plan, i)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, TL_SWEEP_POINT=str(i)),
            )
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode}, see {log})"
        failed += done.returncode != 0
        print(f"tl sweep: [{i + 1}/{total}] {status} in {time.perf_counter() - start:.0f} s", flush=True)
    return failed


def render_array_script(
    plan: dict[str, Any],
    *,
    runs_per_task: int = 1,
    max_concurrent: Optional[int] = None,
    cpu: bool = False,
    cpus_per_task: int = 10,
    **header: Any,
) -> str:
    """One SLURM job array for the sweep: task t runs grid points t*K .. t*K+K-1 (K =
    `runs_per_task`) side by side on the task's GPU and cores, each writing
    ``logs/point_<i>.log``; at most `max_concurrent` tasks run at once."""
    from tl_cli.cluster.slurm import job_header

    n, k = len(plan["points"]), max(1, runs_per_task)
    tasks = (n + k - 1) // k
    array = f"0-{tasks - 1}" + (f"%{max_concurrent}" if max_concurrent else "")
    logs = Path(plan["folder"]) / "logs"
    lines = job_header(
        f"a sweep of {n} runs, {k} per array task.",
        nodes=1,
        tasks_per_node=1,
        gpus_per_node=0 if cpu else 1,
        cpus_per_task=cpus_per_task,
        output=str(logs / "%A_%a.out"),
        array=array,
        **header,
    )
    accelerator = ["--trainer.accelerator", "cpu" if cpu else "gpu", "--trainer.devices", "1"]
    cases = []
    for i in range(n):
        args = " ".join(shlex.quote(a) for a in ["fit", *fit_arguments(plan, i), *accelerator])
        cases.append(f"    {i}) ARGS=({args}) ;;")
    # each run its own job step (SLURM's SIGUSR1 reaches it; --overlap: the K runs share the
    # task's GPU and cores); a requeued task appends to the same per-point logs
    srun = f"srun --overlap --ntasks=1 --cpus-per-task={max(1, cpus_per_task // k)} --kill-on-bad-exit=1"
    lines += [
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"POINTS={n}",
        f"PER_TASK={k}",
        "run_point() {",
        '  case "$1" in',
        *cases,
        "  esac",
        f'  {srun} tl "${{ARGS[@]}}" >> {shlex.quote(str(logs))}/point_"$1".log 2>&1',
        "}",
        "pids=()",
        "for k in $(seq 0 $((PER_TASK - 1))); do",
        "  i=$((SLURM_ARRAY_TASK_ID * PER_TASK + k))",
        '  [ "$i" -lt "$POINTS" ] || break',
        '  echo "tl sweep: task $SLURM_ARRAY_TASK_ID runs point $i"',
        '  run_point "$i" &',
        "  pids+=($!)",
        "done",
        "status=0",
        'for pid in "${pids[@]}"; do wait "$pid" || status=$?; done',
        "exit $status",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- gather


def _marker(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / ".tl-run.json").read_text())
    except (OSError, ValueError):
        return {}


def point_runs(root: Path) -> list[Path]:
    """The run folders of one grid point, oldest first (not the ``latest`` link to one of them)."""
    found = [p for p in root.glob("*") if p.is_dir() and not p.is_symlink() and (p / ".tl-run.json").is_file()]
    return sorted(found, key=lambda p: (_marker(p).get("started", ""), p.name))


def _error_of(logs: list[Path]) -> str:
    """The last error a run printed: tl's one-paragraph message, else the last exception line."""
    for log in sorted(logs, key=lambda p: p.stat().st_mtime, reverse=True):
        text = log.read_text(errors="replace")
        found = re.findall(r"^tl: error(?: [^:]*)?: (.+)$", text, flags=re.M)
        if found:
            return found[-1][:300]
        parser = re.search(r"^error: (.+)$((?:\n[ \t].*)*)", text, flags=re.M)
        if parser:  # the argument parser's: its most specific line
            detail = [line.strip() for line in parser.group(2).splitlines() if "Got value" in line]
            return f"{parser.group(1)} {detail[-1] if detail else ''}".strip()[:300]
        found = re.findall(r"^(\w*(?:Error|Exception)\b.*)$", text, flags=re.M)
        if found:
            return found[-1][:300]
        cancelled = [line for line in text.splitlines() if "CANCELLED" in line]
        if cancelled:
            return cancelled[-1][:300]
    return ""


def _logs_of(folder: Path, index: int, per_task: int) -> list[Path]:
    """The point's own log, and its array task's SLURM output (a job killed before the run
    started, for a time limit or a bad node, says so only there)."""
    logs = list((folder / "logs").glob(f"point_{index}.log"))
    return logs + list((folder / "logs").glob(f"*_{index // max(1, per_task)}.out"))


def gather(folder: Path) -> list[Entry]:
    """One leaderboard row per grid point of the sweep in `folder`: its best run's validation
    and test accuracy, or why it has none (failed with its error, running, not started)."""
    import torch

    from tl_cli.cli.compare import best_val_acc

    plan_file = folder / PLAN
    if not plan_file.is_file():
        raise TLError(f"{folder} is not a sweep folder (no {PLAN}): pass the -o folder of `tl sweep`.")
    plan = json.loads(plan_file.read_text())
    per_task = int(plan.get("runs_per_task", 1))
    entries = []
    for i, point in enumerate(plan["points"]):
        root = folder / f"point_{i}"
        runs = point_runs(root)
        run = runs[-1] if runs else None
        entry = Entry(backbone=point.get("model.backbone", ""), weights=point.get("model.weights", ""))
        entry.settings = label(point)
        marker = _marker(run) if run else {}
        best = run / "checkpoints" / "best.ckpt" if run else None
        latest = root / "latest"
        finished = run is not None and latest.is_symlink() and os.readlink(latest) == run.name
        restarts = int(marker.get("restarts", 0))
        if finished and best and best.is_file():
            ckpt = torch.load(best, map_location="cpu", weights_only=False, mmap=True)
            entry.val_acc = best_val_acc(run, ckpt)
            hparams = ckpt.get("hyper_parameters", {})
            entry.backbone = entry.backbone or str(hparams.get("backbone", ""))
            entry.weights = entry.weights or str(hparams.get("weights", ""))
            entry.checkpoint = str(best)
            tested = run / "test" / "latest" / "metrics.json"
            if tested.is_file():
                entry.test_acc = json.loads(tested.read_text()).get("accuracy")
            entry.note = f"requeued {restarts}x, resumed" if restarts else ""
        else:
            logs = _logs_of(folder, i, per_task)
            error = _error_of(logs)
            if error:
                entry.status, entry.note = "failed", error
            elif run is not None or logs:
                entry.status, entry.note = "unfinished", "no error in its log: still running, or killed"
            else:
                entry.status, entry.note = "not started", "no run folder and no log yet (pending in the queue?)"
            if restarts:
                entry.note = f"requeued {restarts}x; {entry.note}"
        entry.checkpoint = entry.checkpoint or (str(run) if run else "")
        entries.append(entry)
    return leaderboard(entries)
