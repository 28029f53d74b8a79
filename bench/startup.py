"""startup: wall time of `tl --help` vs `python -c "import lightning.pytorch"`.

Both as fresh processes with the same interpreter, alternated, REPEATS each after one
untimed warm-up (so .pyc files and the page cache are warm for both); medians compared.
`tl fit --help` (which builds the full parser: Trainer, model and data arguments) is reported
alongside. Target: `tl --help` at most 1.3x the import.
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
    "import lightning.pytorch": [sys.executable, "-c", "import lightning.pytorch"],
    "tl --help": [TL, "--help"],
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
    base = med["import lightning.pytorch"]
    print(f"startup: tl fit --help / import = {med['tl fit --help'] / base:.2f}x")
    result("startup", med["tl --help"] / base, 1.3, f"{med['tl --help']:.2f} s vs {base:.2f} s", higher_is_better=False)


if __name__ == "__main__":
    main()
