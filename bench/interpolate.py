"""interpolate: would fine-tuning's best.ckpt gain from mixing the start's and the end's weights?

WiSE-FT (Wortsman et al., 2022) interpolates a fine-tuned network's weights with the ones it
started from, ``(1 - alpha) * start + alpha * end``, and reports gains over either end point.
tl's fine-tuning starts from the feature-extraction model (LP-FT) and keeps the end of its
schedule unless the start is better on validation beyond the noise (``checkpoint.select:
last``). This bench asks whether an interpolated model would be the better default, on the
runs `accuracy.py` left (it needs them: run that first, same sets and seeds):

    python bench/accuracy.py --sets clipart4 clipart6 photos4 --seeds 0 1 2 3 4
    python bench/interpolate.py --sets clipart4 clipart6 photos4 --seeds 0 1 2 3 4

For each run and alpha in 0, 0.25, 0.5, 0.75, 1 (0 = the feature-extraction best.ckpt,
1 = fine-tuning's last.ckpt): ``tl validate`` and ``tl test`` on the interpolated checkpoint
(BatchNorm statistics are the same in both: fine-tuning keeps ImageNet's, ``update_unfrozen_bn_stats: false``).
Prints test accuracy per alpha, and with alpha chosen on validation (calibrated loss), as means
over the seeds per set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from common import WORK, tl
from real_images import SETS

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def interpolate(start: Path, end: Path, alpha: float, out: Path) -> None:
    """end's checkpoint with every floating-point tensor of its state mixed with start's."""
    a = torch.load(start, weights_only=False, map_location="cpu")["state_dict"]
    ckpt = torch.load(end, weights_only=False, map_location="cpu")
    ckpt["state_dict"] = {
        k: (1 - alpha) * a[k] + alpha * v if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()
    }
    torch.save(ckpt, out)


def one(name: str, seed: int, tmp: Path) -> dict[float, tuple[float, float]]:
    """alpha -> (val/calibrated_loss, test accuracy)"""
    runs, root = WORK / "accuracy" / f"{name}_s{seed}", WORK / "real" / f"{name}_s{seed}"
    start = runs / "fe" / "latest" / "checkpoints" / "best.ckpt"
    end = runs / "ft" / "latest" / "checkpoints" / "last.ckpt"
    if not (start.exists() and end.exists() and root.exists()):
        raise SystemExit(f"interpolate: no accuracy.py run for {name} seed {seed} under {runs}: run accuracy.py first")
    scores = {}
    for alpha in ALPHAS:
        ckpt = tmp / f"{name}_s{seed}_{alpha}.ckpt"
        interpolate(start, end, alpha, ckpt)
        common = ["--ckpt_path", ckpt, "--data.root", root, "--trainer.accelerator", "cpu"]
        out = tl("validate", *common, "-o", tmp / "validate")
        # Lightning's results table: "│  val/calibrated_loss  │  0.4326...  │"
        row = next(line for line in out.splitlines() if "val/calibrated_loss" in line)
        cal = float(row.replace("│", " ").replace("|", " ").split()[-1])
        tl("test", *common, "-o", tmp / "test")
        acc = json.loads((tmp / "test" / "latest" / "metrics.json").read_text())["accuracy"]
        scores[alpha] = (cal, acc)
        print(
            f"interpolate: {name} seed {seed} alpha {alpha}: val/calibrated_loss {cal:.4f}, test {acc:.3f}", flush=True
        )
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    header = " | ".join(f"alpha {a}" for a in ALPHAS)
    lines = [f"| set | {header} | alpha chosen on val |", "|" + " --- |" * (len(ALPHAS) + 2)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            per_seed = [one(name, seed, Path(tmp)) for seed in args.seeds]
            means = [statistics.mean(s[a][1] for s in per_seed) for a in ALPHAS]
            chosen = statistics.mean(s[min(s, key=lambda a: s[a][0])][1] for s in per_seed)
            lines.append(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {chosen:.3f} |")
    print(f"\ninterpolate: test accuracy, mean over seeds {args.seeds}\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
