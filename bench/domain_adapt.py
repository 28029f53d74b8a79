"""domain_adapt: the DANN paper's three rows on a domain pair built here without downloads.

Source: scikit-learn's handwritten digits (8x8, upscaled to 32 px), white on black. Target:
the same digits made the way MNIST-M was made from MNIST: binarised and difference-blended
(|patch - digit| per channel) into random patches of the colour photographs scikit-image
ships. 70 % / 15 % / 15 % of the digit instances are train / val / test in both domains. All
three rows run through `tl fit --config configs/domain_adapt.yaml` with the same backbone
(default tl:lenet, the paper's digit network, from scratch; TL_BENCH_DANN_BACKBONE picks
another), SGD with momentum as in the paper, the same schedule and epochs (no model selection
on target labels: the last epoch's model is scored), and are scored by `tl test` on the target test split:

  source only      model.dann false, trained on source labels
  DANN             model.dann true, source labels + unlabelled target images
  train on target  model.dann false, trained on target labels (the upper bound)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from common import WORK
from PIL import Image

EPOCHS = int(os.environ.get("TL_BENCH_DANN_EPOCHS", 15))
BACKBONE = os.environ.get("TL_BENCH_DANN_BACKBONE", "tl:lenet")
SEEDS = [int(s) for s in os.environ.get("TL_BENCH_DANN_SEEDS", "42").split(",")]
ROOT = WORK / "dann"


PHOTOS = (  # the colour photographs scikit-image ships (no download)
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
    "color.png",
)


def make_domains() -> tuple:
    """MNIST -> MNIST-M, rebuilt from what is installed: the source is scikit-learn's digits;
    the target holds the same digit instances, each binarised and difference-blended into its
    own random patch of a colour photograph (``|patch - digit|``), as MNIST-M was made from
    MNIST and BSDS500 patches. Train/val/test are split by digit instance, so no test digit
    (in either domain) was seen in training."""
    import skimage.data
    from sklearn.datasets import load_digits

    source, target = ROOT / "source", ROOT / "target"
    if (ROOT / "done").exists():
        return source, target
    shutil.rmtree(ROOT, ignore_errors=True)
    folder = Path(skimage.data.__file__).parent
    photos = [np.asarray(Image.open(folder / name).convert("RGB")) for name in PHOTOS]
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
            photo = photos[rng.integers(len(photos))]
            size = int(rng.integers(32, 96))  # a patch of 32-96 px, scaled to 32
            y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
            patch = Image.fromarray(photo[y : y + size, x : x + size]).resize((32, 32), Image.BILINEAR)
            stroke = (digit > 127) * 255.0
            for domain, pixels in (
                ("source", np.repeat(digit[:, :, None], 3, axis=2)),
                ("target", np.abs(np.asarray(patch, dtype=np.float64) - stroke[:, :, None])),
            ):
                out = ROOT / domain / split / str(digits.target[i])
                out.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(out / f"{i}.png")
    (ROOT / "done").touch()
    return source, target


def run(name: str, data_root, target_root, dann: bool, seed: int) -> float:
    from tl_cli.cli.main import main

    out = ROOT / "runs" / f"{name}_seed{seed}"
    common = [
        "--config",
        "../configs/domain_adapt.yaml",
        "--seed_everything",  # after --config, which sets it too
        str(seed),
        "--model.backbone",
        BACKBONE,
        "--model.optimizer",
        "sgd",
        "--model.weights",
        "none",
        "--model.backbone_lr_ratio",
        "1.0",
        "--model.lr",
        "0.01",
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
    source, target = make_domains()
    shutil.rmtree(ROOT / "runs", ignore_errors=True)
    settings = {
        "source only": ("source_only", source, False),
        "DANN": ("dann", source, True),
        "train on target": ("target_only", target, False),
    }
    runs = {
        row: [run(name, root, target, dann, seed) for seed in SEEDS] for row, (name, root, dann) in settings.items()
    }
    rows = {row: float(np.mean(accs)) for row, accs in runs.items()}
    print(
        "\ndomain_adapt: target test accuracy (digits -> digits blended into photo patches, "
        f"{EPOCHS} epochs, {BACKBONE} from scratch, seeds {SEEDS})"
    )
    for name, acc in rows.items():
        print(f"domain_adapt:   {name:<16} {acc:.4f}   (" + ", ".join(f"{a:.4f}" for a in runs[name]) + ")")
    gap = rows["train on target"] - rows["source only"]
    closed = (rows["DANN"] - rows["source only"]) / gap if gap > 0 else float("nan")
    print(
        f"RESULT domain_adapt: DANN closes {100 * closed:.0f} % of the source-only -> train-on-target gap "
        f"({rows['source only']:.4f} -> {rows['DANN']:.4f} of {rows['train on target']:.4f}) "
        f"{'PASS' if closed >= 0.25 else 'MISS'}"
    )


if __name__ == "__main__":
    main()
