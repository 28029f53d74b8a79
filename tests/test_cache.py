"""The feature and decoded-image caches: same results, reuse, invalidation, corruption."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

import tl_cli.cache as cache_mod
from tl_cli.cache import ImageStore, make_key
from tl_cli.data import ImageFolderData
from tl_cli.errors import TLError
from tl_cli.models import TransferClassifier
from tl_cli.transforms import decode_for_cache, eval_transform, load_rgb, normalize_batch, tensor_eval_transform


def _fit(root, epochs=2, test=False, **data_kwargs):
    pl.seed_everything(0)
    model = TransferClassifier(
        backbone="timm:test_efficientnet", weights="none", lr=0.01, dropout=0.0, scheduler="none"
    )
    dm = ImageFolderData(root=str(root), batch_size=8, num_workers=0, **{"image_size": 64, **data_kwargs})
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(Path.cwd()),
    )
    trainer.fit(model, dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if test:
        metrics.update({k: float(v) for k, v in trainer.test(model, dm, verbose=False)[0].items()})
    return model, dm, metrics


@pytest.fixture
def data(tiny_data, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    return root


def _count_extractions(monkeypatch):
    calls = []
    original = TransferClassifier.extract_features

    def spy(self, loader):
        calls.append(len(loader.dataset))
        return original(self, loader)

    monkeypatch.setattr(TransferClassifier, "extract_features", spy)
    return calls


def test_cached_features_give_the_same_metrics_as_recomputing(data, monkeypatch):
    calls = _count_extractions(monkeypatch)
    model_a, dm_a, cached = _fit(data, test=True)
    assert type(dm_a.served("train")).__name__ == "FeatureDataset"
    assert sorted(calls) == [12, 24]  # train and val, once each, for two epochs
    _, dm_b, plain = _fit(data, test=True, cache_features=False, cache_images=False)
    assert type(dm_b.served("train")).__name__ == "ImageFiles"
    for key in ("val/acc", "test/acc"):
        assert cached[key] == plain[key], key
    for key in ("val/loss", "test/loss", "train/loss_epoch"):
        assert cached[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
    # the checkpointable model still holds the whole backbone
    assert any(k.startswith("backbone.") for k in model_a.state_dict())


def test_features_are_reused_across_runs_and_invalidated_by_changes(data, monkeypatch):
    calls = _count_extractions(monkeypatch)
    _fit(data, epochs=1)
    _fit(data, epochs=1)
    assert sorted(calls) == [12, 24]  # the second run loaded both splits
    victim = next((data / "train" / "ellipses").iterdir())
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    _fit(data, epochs=1)
    assert calls[2:] == [24]  # train changed, val did not
    _fit(data, epochs=1, image_size=None)  # other preprocessing: both recomputed
    assert sorted(calls[3:]) == [12, 24]


def test_corrupt_feature_cache_is_recomputed_with_a_warning(data, monkeypatch):
    calls = _count_extractions(monkeypatch)
    _fit(data, epochs=1)
    for entry in (Path(os.environ["TL_CACHE_DIR"]) / "features").glob("*.pt"):
        entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable"):
        _fit(data, epochs=1)
    assert sorted(calls) == [12, 12, 24, 24]


def test_feature_cache_off_when_it_cannot_be_right(data, monkeypatch):
    calls = _count_extractions(monkeypatch)
    _, dm, _ = _fit(data, epochs=1, augment="flip")  # auto: random augmentation -> images
    assert calls == [] and type(dm.served("train")).__name__ == "CachedImages"
    with pytest.raises(TLError, match="data.augment=flip changes every training image"):
        _fit(data, epochs=1, augment="flip", cache_features=True)
    pl.seed_everything(0)
    model = TransferClassifier(backbone="timm:test_efficientnet", weights="none", unfreeze={0: 1})
    dm = ImageFolderData(root=str(data), num_workers=0, image_size=64, cache_features=True)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(TLError, match="model.unfreeze trains backbone stages"):
        trainer.fit(model, dm)


# --------------------------------------------------------------------------- decoded images

PREP = {
    "image_size": [48, 48],
    "mean": [0.4, 0.5, 0.6],
    "std": [0.2, 0.25, 0.3],
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}


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


def test_cached_images_give_the_same_pixels_as_decoding(tmp_path):
    paths = _awkward_images(tmp_path / "imgs")
    store = ImageStore(tmp_path / "cache", make_key("images", test=1))
    store.build(lambda: (decode_for_cache(p, PREP) for p in paths), len(paths))
    data, offsets, shapes = store.load(len(paths))
    dataset = cache_mod.CachedImages(data, offsets, shapes, [0] * len(paths), tensor_eval_transform(PREP))
    for i, path in enumerate(paths):
        expected = eval_transform(PREP)(load_rgb(path))
        got = normalize_batch(dataset[i][0][None], PREP)[0]
        assert got.shape == expected.shape == (3, 48, 48)
        assert torch.allclose(got, expected, atol=1e-5), path.name


def test_image_cache_memory_map_and_corruption(tmp_path, monkeypatch):
    paths = _awkward_images(tmp_path / "imgs")
    store = ImageStore(tmp_path / "cache", make_key("images", test=2))
    store.build(lambda: (decode_for_cache(p, PREP) for p in paths), len(paths))
    in_ram, _, _ = store.load(len(paths))
    assert not isinstance(in_ram, np.memmap)
    monkeypatch.setattr(cache_mod, "IMAGE_RAM_SHARE", 0.0)  # "does not fit": memory-map it
    mapped, _, _ = store.load(len(paths))
    assert isinstance(mapped, np.memmap) and np.array_equal(np.asarray(mapped), in_ram)
    with open(store.data_path, "r+b") as fh:
        fh.truncate(100)
    with pytest.warns(UserWarning, match="unreadable"):
        assert store.load(len(paths)) is None


def test_image_cache_serves_training_and_is_reused(data, capsys):
    _, dm, metrics = _fit(data, epochs=1, augment="standard")
    assert type(dm.served("train")).__name__ == "CachedImages"
    assert metrics["val/acc"] >= 0
    assert "24 images decoded in" in capsys.readouterr().out
    _fit(data, epochs=1, augment="standard")
    assert "24 images loaded decoded" in capsys.readouterr().out


# --------------------------------------------------------------------------- GPU-path code on CPU


def test_channels_last_path_runs_on_cpu(data):
    pl.seed_everything(0)
    model = TransferClassifier(backbone="timm:test_efficientnet", weights="none", unfreeze={0: 1}, channels_last=True)
    dm = ImageFolderData(root=str(data), batch_size=8, num_workers=0, image_size=64)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(model, dm)
    conv = model.backbone.conv_stem.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    x, y, i = model.on_after_batch_transfer((torch.zeros(2, 3, 8, 8), torch.zeros(2), torch.zeros(2)), 0)
    assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_compile_option_trains_on_cpu(data):
    pl.seed_everything(0)
    model = TransferClassifier(backbone="timm:test_efficientnet", weights="none", compile=True, unfreeze={0: 1})
    dm = ImageFolderData(root=str(data), batch_size=8, num_workers=0, image_size=64)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(model, dm)
    assert model._compiled and trainer.callback_metrics["val/acc"] >= 0
    assert "backbone.conv_stem.weight" in model.state_dict()  # keys unchanged by compiling
