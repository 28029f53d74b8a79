"""loader: images/second of the training data pipeline (decode + augment + collate), tl's
decoded-image cache vs plain torchvision ImageFolder + PIL transforms.

Same JPEGs (500 x 375, quality 90, like the cats-vs-dogs photos), same augmentation
(random resized crop 224 + flip + normalise), same batch size and workers. The cache is built
at the start of the first epoch (timed separately); target from the second epoch: >= 3x.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from common import WORK, result

N_PER_CLASS = 500
EPOCHS = 4
WORKERS = 2
BATCH = 32


def make_jpegs():
    import numpy as np

    from tl_cli.datatools.synth import CLASSES, image_rng, render_shape

    root = WORK / "loader_data"
    if not (root / "train").exists():
        for kind in CLASSES[:2]:
            folder = root / "train" / kind
            folder.mkdir(parents=True)
            for i in range(N_PER_CLASS):
                img = render_shape(kind, image_rng(5, kind, i), 420).resize((500, 375))
                img.save(folder / f"{kind}.{i}.jpg", quality=90)
            (root / "val" / kind).mkdir(parents=True)
            render_shape(kind, image_rng(6, kind, 0), 420).save(root / "val" / kind / "v.jpg")
        del np
    return root


def images_per_second(loader, epochs: int, finish=None) -> list[float]:
    rates = []
    for _ in range(epochs):
        n, start = 0, time.perf_counter()
        for x, *_ in loader:
            if finish is not None:
                x = finish(x)
            n += len(x)
        rates.append(n / (time.perf_counter() - start))
    return rates


def main() -> None:
    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    from tl_cli.data.module import ImageFolderData
    from tl_cli.data.transforms import RRC_SCALE, Normalize

    root = make_jpegs()
    # The main process only consumes batches here: one intra-op thread, so that it does not
    # spin against the two workers on a small machine (same setting for both pipelines).
    torch.set_num_threads(1)
    prep = {
        "image_size": [224, 224],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
        "crop_pct": 0.875,
    }
    torch.manual_seed(0)
    plain = datasets.ImageFolder(
        str(root / "train"),
        T.Compose(
            [
                T.RandomResizedCrop(224, scale=RRC_SCALE),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(prep["mean"], prep["std"]),
            ]
        ),
    )
    plain_loader = torch.utils.data.DataLoader(
        plain, batch_size=BATCH, shuffle=True, num_workers=WORKERS, persistent_workers=True
    )
    plain_rates = images_per_second(plain_loader, EPOCHS)

    os.environ["TL_CACHE_DIR"] = tempfile.mkdtemp(dir=WORK)
    try:
        dm = ImageFolderData(root=str(root), batch_size=BATCH, num_workers=WORKERS, augment="standard")
        dm.setup("fit")
        dm.preprocessing = prep  # standalone: no model to hand it over
        start = time.perf_counter()
        dm.dataset_for("train")  # builds the cache: the first epoch's extra cost
        build = time.perf_counter() - start
        # batches stay uint8 through the workers; normalising them is part of the pipeline
        normalize = Normalize(prep["mean"], prep["std"])
        tl_rates = images_per_second(dm.train_dataloader(), EPOCHS, normalize)
    finally:
        shutil.rmtree(os.environ["TL_CACHE_DIR"])
    n = len(plain)
    first_tl = n / (build + n / tl_rates[0])
    print(f"loader: {n} JPEGs 500x375, {WORKERS} workers, batch {BATCH}")
    print("loader: plain ImageFolder+PIL img/s per epoch: " + ", ".join(f"{r:.0f}" for r in plain_rates))
    print(
        "loader: tl cached img/s per epoch:             "
        + ", ".join(f"{r:.0f}" for r in tl_rates)
        + f"  (first epoch incl. {build:.1f} s cache build: {first_tl:.0f})"
    )
    later_plain = sum(plain_rates[1:]) / len(plain_rates[1:])
    later_tl = sum(tl_rates[1:]) / len(tl_rates[1:])
    result("loader", later_tl / later_plain, 3, f"{later_tl:.0f} vs {later_plain:.0f} images/s from epoch 2")


if __name__ == "__main__":
    main()
