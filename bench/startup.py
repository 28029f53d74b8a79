"""startup: tl's own commands and help start without torch or Lightning.

`tl --help`, `tl data synth --help`, `tl data check --help` and `tl slurm --help` against
`python -c "import torch"`, all fresh processes with the same interpreter, alternated,
REPEATS each after one untimed warm-up; medians compared. Target: each at most 0.3x the torch
import (in absolute terms: well under a second). `tl fit --help`, which needs Lightning to
build its parser, is reported against `import lightning.pytorch`.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import result

REPEATS = 5
TL = str(Path(sys.executable).with_name("tl"))
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import lightning.pytorch": [sys.executable, "-c", "import lightning.pytorch"],
    "tl --help": [TL, "--help"],
    "tl data synth --help": [TL, "data", "synth", "--help"],
    "tl data check --help": [TL, "data", "check", "--help"],
    "tl slurm --help": [TL, "slurm", "--help"],
    "tl fit --help": [TL, "fit", "--help"],
}


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    for cmd in COMMANDS.values():
        wall(cmd)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(REPEATS):
        for name, cmd in COMMANDS.items():
            times[name].append(wall(cmd))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, value in med.items():
        print(f"startup: {name:<26} median {value:.2f} s  (" + ", ".join(f"{t:.2f}" for t in times[name]) + ")")
    lightning = med["import lightning.pytorch"]
    print(f"startup: tl fit --help / import lightning.pytorch = {med['tl fit --help'] / lightning:.2f}x")
    torch_import = med["import torch"]
    for name in ("tl --help", "tl data synth --help", "tl data check --help", "tl slurm --help"):
        result(
            f"startup.{name.replace(' --help', '').replace('tl ', '').replace(' ', '_') or 'tl'}",
            med[name] / torch_import,
            0.3,
            f"{name} {med[name]:.2f} s vs import torch {torch_import:.2f} s",
            higher_is_better=False,
        )


if __name__ == "__main__":
    main()
