"""Augmentation: the presets do what they say on the uint8 tensors the pipeline carries, MixUp
and CutMix train on mixed images with soft targets, and random augmentation changes every epoch,
follows the run's seed and survives a preemption.

The preemption tests compare an interrupted run with an uninterrupted one: augmentation that
never changed from epoch to epoch would break both alike. The last tests here look at the
pictures the model trains on (the batches as `training_step` receives them) and compare them
with what augmentation means: another view of each file every epoch, the same views for the
same seed, other views for another seed, and every training image once an epoch with its
folder's label.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from typing_extensions import override

from tests.helpers import PREP, SignalSelf, fit_model, quiet_trainer, tiny_datamodule
from tl_cli.callbacks import FreezeBackbone
from tl_cli.cli.trainer import TLTrainer
from tl_cli.data.transforms import RRC_SCALE, crop_pipeline
from tl_cli.errors import TLError
from tl_cli.models import FeatureExtraction, FineTune

BILINEAR = dict(PREP, interpolation="bilinear", crop_pct=1.0)  # what the presets' tests resample with


def _coordinates(h: int = 64, w: int = 64) -> torch.Tensor:
    """R encodes x, G encodes y: a crop's pixel values say where it came from."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    r = (xs * 255 / (w - 1)).round().to(torch.uint8)
    g = (ys * 255 / (h - 1)).round().to(torch.uint8)
    return torch.stack([r, g, torch.zeros_like(r)])


def test_none_is_the_centre_crop_and_deterministic():
    img = _coordinates(40, 64)
    out = crop_pipeline("none", BILINEAR)(img)
    assert torch.equal(out, img[:, 4:36, 16:48]) and torch.equal(out, crop_pipeline("none", BILINEAR)(img))


def test_flip_flips_half_the_time_and_nothing_else():
    img = _coordinates(32, 32)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = crop_pipeline("flip", BILINEAR)(img)
        if torch.equal(out, img):
            seen.add("same")
        else:
            assert torch.equal(out, img.flip(-1))
            seen.add("flipped")
    assert seen == {"same", "flipped"}


def test_standard_crops_within_its_scale_range():
    img = _coordinates()
    areas = []
    for seed in range(30):
        torch.manual_seed(seed)
        out = crop_pipeline("standard", BILINEAR)(img).float()
        assert out.shape == (3, 32, 32)
        width = (out[0].max() - out[0].min()) / 255 * 64 / 63  # the fraction of x it spans
        height = (out[1].max() - out[1].min()) / 255 * 64 / 63
        areas.append(float(width * height))
    assert min(areas) >= RRC_SCALE[0] - 0.08 and max(areas) <= 1.0 + 1e-6
    assert max(areas) - min(areas) > 0.2  # it really varies


def test_randaugment_runs_on_uint8_tensors_and_changes_pixels():
    img = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    prep = dict(BILINEAR, interpolation="bicubic")  # EfficientNet's: RandAugment warps bilinear
    changed = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out = crop_pipeline("randaugment", prep)(img)
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
        torch.manual_seed(seed)
        changed += not torch.equal(out, crop_pipeline("standard", prep)(img))
    assert changed >= 5


@pytest.mark.parametrize(
    "mix", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}]
)
def test_mixup_and_cutmix_train_on_mixed_images_with_soft_targets(tiny_data, tmp_path, mix):
    """What the model trains on is a blend (MixUp) or a patchwork (CutMix) of two images of
    the batch, and the loss is cross-entropy on the correspondingly mixed labels. A fully
    frozen backbone still sees images (mixing cannot reuse cached features)."""
    import torch.nn.functional as F

    class Spy(FineTune):
        def forward(self, x):
            if self.training:
                self.seen.append(x.detach().clone())
            return super().forward(x)

        def loss(self, logits, y, train):
            if train:
                self.targets.append(y.detach().clone())
            return super().loss(logits, y, train)

    pl.seed_everything(0)
    model = Spy(backbone="timm:test_efficientnet", weights="none", lr=0.01, label_smoothing=0.1, **mix)
    model.seen, model.targets = [], []
    data = tiny_datamodule(tiny_data, augment="none", cache_features="auto")
    batches, kinds = [], set()

    class Batches(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            batches.append((batch[0].clone(), batch[1].clone()))

    quiet_trainer(2, tmp_path, callbacks=[Batches(), FreezeBackbone()]).fit(model, data)
    assert len(model.seen) == len(batches) == len(model.targets) == 6  # 24 images, batch 8, 2 epochs
    for (x, y), seen, soft in zip(batches, model.seen, model.targets, strict=True):
        assert seen.shape == x.shape  # images, not cached features
        assert soft.shape == (len(y), 2) and torch.allclose(soft.sum(1), torch.ones(len(y)))
        # MixUp: every image is x * lam + (the batch rolled by one) * (1 - lam), one lam for the
        # batch. CutMix: one box of every image comes from its neighbour in the rolled batch,
        # labels mixed by the box's area
        rolled = x.roll(1, 0)
        differs = ~torch.isclose(seen, x, atol=1e-6).all(1).all(0)  # [H, W]: pixels any image changed
        rows, cols = differs.any(1).nonzero(), differs.any(0).nonzero()
        box = torch.zeros_like(differs)
        if len(rows):
            box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        if "cutmix_alpha" in mix and torch.equal(seen, torch.where(box, rolled, x)):  # CutMix
            area = (1 - box.float().mean()).expand(len(y))
            kinds.add("cutmix_alpha")
        else:  # MixUp
            lam = ((seen - rolled) / (x - rolled)).nan_to_num()[(x - rolled).abs() > 1e-3].median()
            assert torch.allclose(seen, x * lam + rolled * (1 - lam), atol=1e-4)
            area = lam.expand(len(y))
            kinds.add("mixup_alpha")
        expected = F.one_hot(y, 2) * area[:, None] + F.one_hot(y.roll(1, 0), 2) * (1 - area[:, None])
        assert torch.allclose(soft, expected, atol=1e-4)
        assert not torch.equal(seen, x) or bool((area == 1).all())
    assert any(not torch.equal(s, x) for (x, _), s in zip(batches, model.seen, strict=True))
    assert kinds == set(mix)  # both set: each batch one of the two, both used


def test_mixing_options_are_checked():
    from tl_cli.models import DomainAdaptation

    with pytest.raises(TLError, match="mixup_alpha=-1"):
        FineTune(backbone="timm:test_efficientnet", weights="none", mixup_alpha=-1)
    with pytest.raises(TLError, match="DomainAdaptation does not mix batches"):
        DomainAdaptation(backbone="timm:test_efficientnet", weights="none", cutmix_alpha=1.0)


# --------------------------------------------------------------------------- views over epochs


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
    dm = tiny_datamodule(data, batch_size=4, num_workers=workers, image_size=48, augment="standard", **data_kw)
    seen = SeenImages()
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=workdir / "ckpt", monitor="val/loss"), seen]
    if signal_at is not None:
        callbacks.append(SignalSelf(*signal_at))
    fit_model(model, dm, EPOCHS, "hpc" if resume else None, root=workdir, trainer=TLTrainer, callbacks=callbacks)
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
