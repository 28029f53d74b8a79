"""Helpers shared by the benchmarks: data, timing, the one-line result every bench prints."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("TL_BENCH_DIR", REPO / "runs" / "bench"))
sys.path.insert(0, str(REPO))


def result(name: str, ratio: float, target: float, detail: str, higher_is_better: bool = True) -> bool:
    """Print the machine-readable line `make bench` collects; return whether the target is met."""
    ok = ratio >= target if higher_is_better else ratio <= target
    sign = ">=" if higher_is_better else "<="
    print(f"RESULT {name}: {ratio:.2f}x (target {sign} {target}x) {'PASS' if ok else 'MISS'} -- {detail}", flush=True)
    return ok


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def synth_data(name: str, per_class_train: int, per_class_val: int, size: int = 256, classes: int = 2) -> Path:
    from tl_cli.datatools.synth import synthesize

    root = WORK / name
    if not (root / "train").exists():
        synthesize(
            root, seed=11, num_classes=classes, per_split={"train": per_class_train, "val": per_class_val}, size=size
        )
    return root


def tl(*args: object, tl_lines_of_stderr: bool = False) -> str:
    """Run ``tl ARGS`` in a fresh process from the repository; its stdout (and, if asked, the
    ``tl:`` lines it logged to stderr, such as the expected duration), or an error with its tail."""
    done = subprocess.run(
        [sys.executable, "-m", "tl_cli.cli", *map(str, args)], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"tl {' '.join(map(str, args))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    logged = [line for line in done.stderr.splitlines() if line.startswith("tl: ")] if tl_lines_of_stderr else []
    return done.stdout + "".join(f"{line}\n" for line in logged)
