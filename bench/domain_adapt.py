"""domain_adapt: the DANN paper's three rows on a domain pair built here without downloads.

Source: scikit-learn's handwritten digits (8x8, upscaled to 32 px), white on black. Target:
the same digits blended over random colour textures the way MNIST-M was made from MNIST
(|texture - digit| per channel). 70 % / 15 % / 15 % of the digit instances are train / val /
test in both domains. All three rows run through `tl fit --config configs/domain_adapt.yaml` with the
same backbone (timm:resnet10t from scratch), schedule and epochs, and are scored by
`tl test` on the target test split:

  source only      model.dann false, trained on source labels
  DANN             model.dann true, source labels + unlabelled target images
  train on target  model.dann false, trained on target labels (the upper bound)
"""

from __future__ import annotations

import json
import os

import numpy as np
from common import WORK
from PIL import Image

EPOCHS = int(os.environ.get("TL_BENCH_DANN_EPOCHS", 30))
ROOT = WORK / "dann"


def make_domains() -> tuple:
    """Like MNIST -> MNIST-M: the target holds the same digit instances as the source, each
    blended over its own random texture; train/val/test are split by digit instance, so no
    test digit (in either domain) was seen in training."""
    from sklearn.datasets import load_digits

    source, target = ROOT / "source", ROOT / "target"
    if (target / "test").exists():
        return source, target
    digits = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.images))
    n = len(order)
    splits = {
        "train": order[: int(0.7 * n)],
        "val": order[int(0.7 * n) : int(0.85 * n)],
        "test": order[int(0.85 * n) :],
    }
    for split, ids in splits.items():
        for i in ids:
            small = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            digit = np.asarray(Image.fromarray(small).resize((32, 32), Image.BILINEAR), dtype=np.float64)
            # a smooth colour field, like a patch of a photo: a random colour, varied by up to
            # +-70 over a 3x3 grid, plus a little grain
            base = rng.uniform(40, 215, 3)
            coarse = np.clip(base + rng.uniform(-70, 70, (3, 3, 3)), 0, 255).astype(np.uint8)
            texture = np.asarray(Image.fromarray(coarse).resize((32, 32), Image.BICUBIC), dtype=np.float64)
            texture = np.clip(texture + rng.normal(0, 8, texture.shape), 0, 255)
            for domain, pixels in (
                ("source", np.repeat(digit[:, :, None], 3, axis=2)),
                ("target", np.abs(texture - digit[:, :, None])),
            ):
                folder = ROOT / domain / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return source, target


def run(name: str, data_root, target_root, dann: bool) -> float:
    from tl_cli.cli import main

    out = ROOT / "runs" / name
    common = [
        "--config",
        "../configs/domain_adapt.yaml",
        "--model.backbone",
        "timm:resnet10t",
        "--model.weights",
        "none",
        "--model.backbone_lr_ratio",
        "1.0",
        "--model.lr",
        "0.002",
        "--data.image_size",
        "32",
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "64",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_checkpointing",
        "true",
    ]
    assert (
        main(
            [
                "fit",
                *common,
                "--data.root",
                str(data_root),
                "--data.target_root",
                str(target_root),
                "--model.dann",
                str(dann).lower(),
                "--trainer.max_epochs",
                str(EPOCHS),
                "--trainer.default_root_dir",
                str(out),
            ]
        )
        == 0
    )
    ckpt = next((out / "latest" / "checkpoints").glob("*.ckpt"))
    assert (
        main(
            [
                "test",
                "--ckpt_path",
                str(ckpt),
                "--data.root",
                str(ROOT / "source"),
                "--data.target_root",
                str(ROOT / "target"),
                "--data.num_workers",
                "0",
                "--trainer.default_root_dir",
                str(out / "test"),
                "--trainer.enable_progress_bar",
                "false",
            ]
        )
        == 0
    )
    return json.loads((out / "test" / "latest" / "target" / "metrics.json").read_text())["accuracy"]


def main() -> None:
    import shutil

    source, target = make_domains()
    shutil.rmtree(ROOT / "runs", ignore_errors=True)
    rows = {
        "source only": run("source_only", source, target, dann=False),
        "DANN": run("dann", source, target, dann=True),
        "train on target": run("target_only", target, target, dann=False),
    }
    print(
        "\ndomain_adapt: target test accuracy (digits -> digits on colour textures, "
        f"{EPOCHS} epochs, timm:resnet10t from scratch)"
    )
    for name, acc in rows.items():
        print(f"domain_adapt:   {name:<16} {acc:.4f}")
    gap = rows["train on target"] - rows["source only"]
    closed = (rows["DANN"] - rows["source only"]) / gap if gap > 0 else float("nan")
    print(
        f"RESULT domain_adapt: DANN closes {100 * closed:.0f} % of the source-only -> train-on-target gap "
        f"({rows['source only']:.4f} -> {rows['DANN']:.4f} of {rows['train on target']:.4f}) "
        f"{'PASS' if closed >= 0.25 else 'MISS'}"
    )


if __name__ == "__main__":
    main()
