"""`make bench`: run every benchmark in its own process and print a summary of the ratios."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    "small_data",
    "feature_cache",
    "loader",
    "overhead",
    "channels_last",
    "startup",
    "linear_probe",
    "domain_adapt",
]


def main() -> int:
    names = sys.argv[1:] or BENCHES
    lines: list[str] = []
    for name in names:
        print(f"\n===== bench {name} =====", flush=True)
        proc = subprocess.Popen(
            [sys.executable, str(HERE / f"{name}.py")],
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in proc.stdout:
            if line.startswith("RESULT") or f"{name}:" in line:
                print(line, end="", flush=True)
            if line.startswith("RESULT") or line.startswith("linear_probe: ratio"):
                lines.append(line.strip())
        if proc.wait() != 0:
            lines.append(f"RESULT {name}: FAILED (exit {proc.returncode})")
    print("\n===== summary =====")
    print("\n".join(lines))
    missed = [line for line in lines if "MISS" in line or "FAILED" in line]
    print(f"bench: {len(lines) - len(missed)} met, {len(missed)} missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
