"""data.stage against reading a slow shared filesystem in place, in the same run.

The images sit behind a FUSE mount that adds a latency to every call (bench/slowfs.py; a
cluster's network filesystem under load). The same `tl fit` runs with ``--data.stage none``
(read through the mount) and with ``--data.stage LOCAL`` (copied once, then read locally),
with the decoded-image cache off so every epoch reads every file, as a data set too large for
the cache does. Prints seconds and the ratio.

    python bench/stage.py [--images 400] [--epochs 3] [--latency-ms 20]

Needs /dev/fuse, fuse3 (`apt-get install fuse3`) and mfusepy (the dev extra).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_images(root: Path, n: int) -> None:
    sys.path.insert(0, str(REPO))
    from tl_cli.datatools.synth import CLASSES, image_rng, render_shape

    for split, count in (("train", n), ("val", max(8, n // 5))):
        for i in range(count):
            kind = CLASSES[i % 2]
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            render_shape(kind, image_rng(3, split, i), 300).resize((500, 375)).save(folder / f"{i}.jpg", quality=90)


def fit(root: Path, stage: str, epochs: int, cache: Path) -> float:
    args = [sys.executable, "-m", "tl_cli.cli", "fit", "--config", str(REPO / "configs/finetune.yaml")]
    args += ["--model.backbone", "timm:test_efficientnet", "--model.weights", "none", "--model.init_from", "null"]
    args += ["--data.root", str(root), "--data.stage", stage, "--data.cache_images", "false"]
    args += ["--data.image_size", "64", "--data.num_workers", "2", "--data.min_steps_per_epoch", "null"]
    args += ["--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu", "--early_stopping", "null"]
    args += ["--trainer.default_root_dir", str(cache.parent / f"runs-{Path(stage).name}")]
    env = dict(os.environ, TL_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "source", args.images)
        mount = tmp / "shared"
        server = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "bench/slowfs.py"),
                tmp / "source",
                mount,
                "--latency-ms",
                str(args.latency_ms),
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):
                if (mount / "train").is_dir():
                    break
                time.sleep(0.1)
            else:
                raise SystemExit("the FUSE mount did not come up (is /dev/fuse there, fuse3 installed?)")
            files = sum(1 for _ in (tmp / "source").rglob("*.jpg"))
            print(
                f"{files} JPEGs (500x375) behind a FUSE mount adding {args.latency_ms} ms a call; {args.epochs} epochs"
            )
            in_place = fit(mount, "none", args.epochs, tmp / "cache-a")
            staged = fit(mount, str(tmp / "local"), args.epochs, tmp / "cache-b")
            again = fit(mount, str(tmp / "local"), args.epochs, tmp / "cache-c")  # the copy reused
            print(f"read in place     {in_place:7.1f} s   1.00x")
            print(f"staged (copy)     {staged:7.1f} s   {in_place / staged:.2f}x faster")
            print(f"staged (reused)   {again:7.1f} s   {in_place / again:.2f}x faster")
        finally:
            subprocess.run(["fusermount3", "-u", str(mount)], capture_output=True)
            server.wait(timeout=30)
            shutil.rmtree(tmp / "local", ignore_errors=True)


if __name__ == "__main__":
    main()
