"""The feature and decoded-image caches: same results, reuse, invalidation, corruption, and
one decode per image on a first run."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

import tl_cli.data.cache as cache_mod
from tests.helpers import PREP, fit_model, tiny_datamodule
from tl_cli.callbacks import UnfreezeSchedule
from tl_cli.data.cache import ImageStore, make_key
from tl_cli.data.datasets import CachedImages, ImageFiles
from tl_cli.data.module import ImageFolderData
from tl_cli.data.transforms import Normalize, crop_pipeline, decode_resized
from tl_cli.errors import TLError
from tl_cli.models import Classifier, FeatureExtraction, FineTune


def _fit(
    root, epochs=2, test=False, seed=0, precision="32-true", model_cls=FeatureExtraction, callbacks=(), **data_kwargs
):
    pl.seed_everything(seed)
    # head_init random: the same start with and without cached features (the probe needs them)
    extra = {"head_init": "random"} if model_cls is FeatureExtraction else {}
    model = model_cls(
        backbone="timm:test_efficientnet", weights="none", lr=0.01, dropout=0.0, scheduler="none", **extra
    )
    dm = tiny_datamodule(root, **data_kwargs)
    trainer = fit_model(model, dm, epochs, precision=precision, enable_checkpointing=False, callbacks=list(callbacks))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if test:
        metrics.update({k: float(v) for k, v in trainer.test(model, dm, verbose=False)[0].items()})
    return model, dm, metrics


def _count_extracted(monkeypatch):
    """How many images went through the backbone for the feature cache, per run."""
    counts = []
    original = Classifier.extract_features

    def spy(self, images):
        counts[-1] += len(images)
        return original(self, images)

    monkeypatch.setattr(Classifier, "extract_features", spy)
    return counts


def _count_decoded(monkeypatch):
    decoded = []
    import tl_cli.data.datasets
    import tl_cli.data.first_pass

    original = tl_cli.data.transforms.decode_resized

    def spy(image, prep):
        decoded.append(1)
        return original(image, prep)

    monkeypatch.setattr(tl_cli.data.first_pass, "decode_resized", spy)
    monkeypatch.setattr(tl_cli.data.datasets, "decode_resized", spy)
    return decoded


def test_cached_features_give_the_same_metrics_as_recomputing(data, monkeypatch):
    counts = _count_extracted(monkeypatch)
    counts.append(0)
    model_a, dm_a, cached = _fit(data, test=True)
    assert type(dm_a.dataset_for("train")).__name__ == "FeatureDataset"
    assert counts == [36]  # 24 train + 12 val images, once, for two epochs
    _, dm_b, plain = _fit(data, test=True, cache_features=False, cache_images=False)
    assert type(dm_b.dataset_for("train")).__name__ == "ImageFiles"
    for key in ("val/acc", "test/acc"):
        assert cached[key] == plain[key], key
    for key in ("val/loss", "test/loss", "train/loss_epoch"):
        assert cached[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
    # the checkpointable model still holds the whole backbone
    assert any(k.startswith("backbone.") for k in model_a.state_dict())


def test_features_are_reused_and_invalidated_by_every_input_they_depend_on(data, monkeypatch):
    counts = _count_extracted(monkeypatch)
    for _ in ("first", "again"):
        counts.append(0)
        _fit(data, epochs=1)
    assert counts == [36, 0]  # the second run loaded both splits
    victim = next((data / "train" / "ellipses").iterdir())
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    counts.append(0)
    _fit(data, epochs=1)
    assert counts[-1] == 24  # train changed, val did not
    counts.append(0)
    _fit(data, epochs=1, image_size=None)  # other preprocessing: both recomputed
    assert counts[-1] == 36
    counts.append(0)
    _fit(data, epochs=1, seed=1)  # other backbone weights (another random init): recomputed
    assert counts[-1] == 36
    counts.append(0)
    _fit(data, epochs=1, precision="bf16-mixed")  # other numeric precision: recomputed
    assert counts[-1] == 36
    counts.append(0)
    _fit(data, epochs=1, seed=1)  # and every earlier entry is still there
    assert counts[-1] == 0


def test_a_second_model_with_other_weights_never_trains_on_the_first_ones_features(data):
    """The weights hash is in the key: same everything else, different weights, different features."""
    model_a, dm_a, _ = _fit(data, epochs=1, seed=0)
    model_b, dm_b, _ = _fit(data, epochs=1, seed=1)
    assert not torch.equal(dm_a.dataset_for("train").features, dm_b.dataset_for("train").features)
    images = crop_pipeline("none", dm_b.preprocessing)(decode_resized(dm_b.paths("train")[0], dm_b.preprocessing))
    assert torch.allclose(dm_b.dataset_for("train").features[0], model_b.extract_features(images[None])[0], atol=1e-5)


def test_first_run_decodes_each_image_once(data, monkeypatch):
    decoded = _count_decoded(monkeypatch)
    _fit(data, epochs=2)  # screening and the feature cache share one pass
    assert len(decoded) == 36
    _fit(data, epochs=1)  # remembered: nothing decoded
    assert len(decoded) == 36
    _fit(data, epochs=2, augment="flip", model_cls=FineTune, callbacks=[UnfreezeSchedule({0: 1})])
    assert len(decoded) == 36 + 36  # the image cache: one more pass (screening remembered), then no decode
    _fit(data, epochs=1, augment="flip", model_cls=FineTune, callbacks=[UnfreezeSchedule({0: 1})])
    assert len(decoded) == 72


def test_corrupt_feature_cache_is_recomputed_with_a_warning(data, monkeypatch):
    counts = _count_extracted(monkeypatch)
    counts.append(0)
    _fit(data, epochs=1)
    for entry in (Path(os.environ["TL_CACHE_DIR"]) / "features").glob("*.pt"):
        entry.write_bytes(entry.read_bytes()[:100])
    counts.append(0)
    with pytest.warns(UserWarning, match="unreadable"):
        _fit(data, epochs=1)
    assert counts == [36, 36]


def test_feature_cache_off_when_it_cannot_be_right(data, monkeypatch):
    counts = _count_extracted(monkeypatch)
    counts.append(0)
    _, dm, _ = _fit(data, epochs=1, augment="flip")  # auto: train augmented -> images; val: features
    assert type(dm.dataset_for("train")).__name__ == "CachedImages"
    assert type(dm.dataset_for("val")).__name__ == "FeatureDataset" and counts == [12]
    with pytest.raises(TLError, match="data.augment=flip changes every training image"):
        _fit(data, epochs=1, augment="flip", cache_features=True)
    with pytest.raises(TLError, match="not frozen for the whole run"):
        _fit(data, epochs=1, cache_features=True, model_cls=FineTune, callbacks=[UnfreezeSchedule({0: 1})])
    _, dm, _ = _fit(data, epochs=1, model_cls=FineTune, callbacks=[UnfreezeSchedule({0: 1})])
    assert type(dm.dataset_for("train")).__name__ == "CachedImages"  # auto: the backbone trains


# --------------------------------------------------------------------------- decoded images

# the checkpoint's preprocessing at 48 px with a mean and std of its own in each channel
PREP48 = dict(PREP, image_size=[48, 48], mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])


def _awkward_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 255, (70, 90), dtype=np.uint8)))
    rgba.save(folder / "alpha.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png", transparency=3)
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    exif = rgb.getexif()
    exif[0x0112] = 8
    rgb.save(folder / "rotated.jpg", exif=exif)
    Image.fromarray((rng.integers(0, 65535, (70, 90))).astype(np.uint16)).save(folder / "deep.png")
    rgb.convert("L").save(folder / "gray.jpg")
    return sorted(folder.iterdir())


def test_cached_images_give_the_pixels_of_the_classic_eval_transform(tmp_path):
    from torchvision import transforms as T

    from tl_cli.data.images import load_rgb

    paths = _awkward_images(tmp_path / "imgs")
    store = ImageStore(tmp_path / "cache", make_key("images", test=1))
    store.build(decode_resized(p, PREP48).permute(1, 2, 0).numpy() for p in paths)
    cached = CachedImages(*store.load(len(paths), 10**9), [0] * len(paths), crop_pipeline("none", PREP48))
    files = ImageFiles([(p, 0) for p in paths], PREP48, crop_pipeline("none", PREP48))
    classic = T.Compose(
        [
            T.Resize(54, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(48),
            T.ToTensor(),
            T.Normalize(PREP48["mean"], PREP48["std"]),
        ]
    )
    normalize = Normalize(PREP48["mean"], PREP48["std"])
    for i, path in enumerate(paths):
        assert torch.equal(cached[i][0], files[i][0]), path.name  # one pipeline: identical bytes
        got = normalize(cached[i][0][None])[0]
        assert torch.allclose(got, classic(load_rgb(path)), atol=1e-5), path.name


def test_image_cache_memory_map_and_corruption(tmp_path):
    paths = _awkward_images(tmp_path / "imgs")
    store = ImageStore(tmp_path / "cache", make_key("images", test=2))
    store.build(decode_resized(p, PREP48).permute(1, 2, 0).numpy() for p in paths)
    in_ram, _, _ = store.load(len(paths), ram_budget=10**9)
    assert not isinstance(in_ram, np.memmap)
    mapped, _, _ = store.load(len(paths), ram_budget=0)  # "does not fit": memory-map it
    assert isinstance(mapped, np.memmap) and np.array_equal(np.asarray(mapped), in_ram)
    with open(store.data_path, "r+b") as fh:
        fh.truncate(100)
    with pytest.warns(UserWarning, match="unreadable"):
        assert store.load(len(paths), 10**9) is None


def test_ram_budget_follows_the_job_memory_limit(monkeypatch):
    monkeypatch.setattr(cache_mod, "_cgroup_room", lambda: 8 * 2**30)
    assert cache_mod.available_memory() <= 8 * 2**30
    assert cache_mod.image_ram_budget(4) == pytest.approx(cache_mod.available_memory() / 16, rel=0.01)
    monkeypatch.setattr(cache_mod, "_cgroup_room", lambda: None)
    assert cache_mod.available_memory() > 0


def test_image_cache_serves_training_and_is_reused(data, capsys):
    cb = [UnfreezeSchedule({0: 1})]
    _, dm, metrics = _fit(data, epochs=1, augment="standard", model_cls=FineTune, callbacks=cb)
    assert type(dm.dataset_for("train")).__name__ == "CachedImages"
    assert "train: 24 decoded images prepared in" in capsys.readouterr().out
    _fit(data, epochs=1, augment="standard", model_cls=FineTune, callbacks=cb)
    assert "train: 24 decoded images loaded" in capsys.readouterr().out


# --------------------------------------------------------------------------- GPU-path code on CPU


def test_channels_last_is_the_cpu_default_and_changes_no_result(data):
    """null means on for the CPU too (faster convolutions there); false keeps the contiguous
    layout; both train to the same weights, to float32 rounding."""
    runs = {}
    for setting in (None, False):
        pl.seed_everything(0)
        model = FineTune(backbone="timm:test_efficientnet", weights="none", channels_last=setting, dropout=0.0)
        dm = ImageFolderData(root=str(data), batch_size=8, num_workers=0, image_size=64)
        fit_model(model, dm, 1, enable_checkpointing=False, callbacks=[UnfreezeSchedule({0: 1})])
        runs[setting] = model
        x, _, _ = model.on_after_batch_transfer((torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0, 0], [0, 1]), 0)
        on = setting is None
        assert model.use_channels_last() is on
        assert x.is_contiguous(memory_format=torch.channels_last) is on and x.is_contiguous() is not on
        assert model.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last) is on
    # without a trainer (export checks, scripts) the default is the contiguous layout
    assert FineTune(backbone="timm:test_efficientnet", weights="none").use_channels_last() is False
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        logits = [m.eval()(m.prepare_input(images)) for m in runs.values()]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(runs[None].state_dict().items(), runs[False].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_channels_last_and_true_half_precision_paths_run_on_cpu(data):
    pl.seed_everything(0)
    model = FineTune(backbone="timm:test_efficientnet", weights="none", channels_last=True)
    dm = ImageFolderData(root=str(data), batch_size=8, num_workers=0, image_size=64)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[UnfreezeSchedule({0: 1})]
    )
    trainer.fit(model, dm)
    assert model.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    x, y, i = model.on_after_batch_transfer(
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2), torch.zeros(2)), 0
    )
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
    # bf16-true: uint8 batches are normalised in float32, then converted to the model's type
    pl.seed_everything(0)
    model = FineTune(backbone="timm:test_efficientnet", weights="none")
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        precision="bf16-true",
        logger=False,
        enable_progress_bar=False,
        callbacks=[UnfreezeSchedule({0: 1})],
    )
    trainer.fit(model, ImageFolderData(root=str(data), batch_size=8, num_workers=0, image_size=64, augment="flip"))
    assert model.backbone.conv_stem.weight.dtype == torch.bfloat16
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])


@pytest.mark.slow
def test_compile_option_trains_on_cpu(data):
    pl.seed_everything(0)
    model = FineTune(backbone="timm:test_efficientnet", weights="none", compile=True)
    dm = ImageFolderData(root=str(data), batch_size=8, num_workers=0, image_size=64)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[UnfreezeSchedule({0: 1})]
    )
    trainer.fit(model, dm)
    assert model._compiled and torch.isfinite(trainer.callback_metrics["val/loss"])
    assert "backbone.conv_stem.weight" in model.state_dict()  # keys unchanged by compiling
