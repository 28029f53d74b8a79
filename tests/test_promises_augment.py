"""Random augmentation changes every epoch, follows the run's seed, and survives a preemption.

The preemption tests compare an interrupted run with an uninterrupted one: augmentation that
never changed from epoch to epoch would break both alike. These tests look at the pictures
the model trains on (the batches as `training_step` receives them) and compare them with what
augmentation means: another view of each file every epoch, the same views for the same seed,
other views for another seed, and every training image once an epoch with its folder's label.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from typing_extensions import override

from tests.helpers import SignalSelf
from tl_cli.cli.trainer import TLTrainer
from tl_cli.data.module import ImageFolderData
from tl_cli.models import FeatureExtraction

EPOCHS = 2


class SeenImages(pl.Callback):
    """Every training image as the model receives it: ``seen[epoch][index]`` (normalised
    float ``[3, H, W]``) and ``labels[index]``."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
        self.counts: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.labels: dict[int, int] = {}

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y, index = batch
        epoch = trainer.current_epoch
        for image, label, i in zip(x, y.tolist(), index.tolist(), strict=True):
            self.seen[epoch][i] = image.detach().cpu().clone()
            self.counts[epoch][i] += 1
            self.labels[i] = label


def _fit(data: Path, workdir: Path, seed: int = 7, workers: int = 0, resume: bool = False, signal_at=None, **data_kw):
    """Feature extraction with ``standard`` augmentation (the backbone sees images, not cached
    features); returns the recorder and the DataModule."""
    pl.seed_everything(seed)
    model = FeatureExtraction(backbone="timm:test_efficientnet", weights="none", lr=0.01, head_init="random")
    dm = ImageFolderData(
        root=str(data), batch_size=4, num_workers=workers, image_size=48, augment="standard", **data_kw
    )
    seen = SeenImages()
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=workdir / "ckpt", monitor="val/loss"), seen]
    if signal_at is not None:
        callbacks.append(SignalSelf(*signal_at))
    trainer = TLTrainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(workdir),
        callbacks=callbacks,
    )
    trainer.fit(model, dm, ckpt_path="hpc" if resume else None)
    return seen, dm


def _differing(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> int:
    assert a.keys() == b.keys()
    return sum(not torch.equal(a[i], b[i]) for i in a)


def test_training_images_change_every_epoch_follow_the_seed_and_not_the_workers(tiny_data, tmp_path):
    inline, _ = _fit(tiny_data, tmp_path / "inline", seed=7, workers=0)
    workers, dm = _fit(tiny_data, tmp_path / "workers", seed=7, workers=2)
    other, _ = _fit(tiny_data, tmp_path / "other", seed=8, workers=2)
    n = len(dm.paths("train"))
    for run in (inline, workers, other):
        # an epoch is one pass: every training image once, with the label of its folder
        for epoch in range(EPOCHS):
            assert dict(run.counts[epoch]) == dict.fromkeys(range(n), 1)
        folders = {i: p.parent.name for i, p in enumerate(dm.paths("train"))}
        assert {i: dm.class_names[label] for i, label in run.labels.items()} == folders
        # another random crop of every file in epoch 1 than in epoch 0
        changed = _differing(run.seen[0], run.seen[1])
        assert changed == n
    for epoch in range(EPOCHS):
        # the same seed draws the same views, with workers or without
        unlike = _differing(inline.seen[epoch], workers.seen[epoch])
        assert unlike == 0
        # another seed draws other views of (nearly) every file
        unlike = _differing(workers.seen[epoch], other.seen[epoch])
        assert unlike >= n - 1


def test_a_resumed_run_sees_the_epoch_1_views_of_an_uninterrupted_one(tiny_data, tmp_path):
    straight, dm = _fit(tiny_data, tmp_path / "straight")
    # interrupted after epoch 1's first batch (4 of 12 images), resumed with workers this time
    first, _ = _fit(tiny_data, tmp_path / "cut", signal_at=(1, 0))
    resumed, _ = _fit(tiny_data, tmp_path / "cut", workers=2, resume=True)
    n = len(dm.paths("train"))
    assert len(first.seen[1]) == 4 and 0 not in resumed.seen and len(resumed.seen[1]) == n - 4
    assert first.seen[1].keys().isdisjoint(resumed.seen[1].keys())
    both = {**first.seen[1], **resumed.seen[1]}
    unlike = _differing(both, straight.seen[1])
    assert unlike == 0
    # and those are epoch 1's views, not epoch 0's again
    changed = _differing(both, straight.seen[0])
    assert changed == n


def test_files_and_the_decoded_image_cache_give_the_same_views(tiny_data, tmp_path):
    cached, dm = _fit(tiny_data, tmp_path / "cached", cache_images=True)
    files, _ = _fit(tiny_data, tmp_path / "files", cache_images=False)
    for epoch in range(EPOCHS):
        unlike = _differing(cached.seen[epoch], files.seen[epoch])
        assert unlike == 0
    changed = _differing(files.seen[0], files.seen[1])
    assert changed == len(dm.paths("train"))
