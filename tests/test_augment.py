"""The augment presets do what they say, on the uint8 tensors the pipeline carries."""

from __future__ import annotations

import torch

from tl_cli.data.transforms import RRC_SCALE, crop_pipeline

PREP = {"image_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear", "crop_pct": 1.0}


def _coordinates(h: int = 64, w: int = 64) -> torch.Tensor:
    """R encodes x, G encodes y: a crop's pixel values say where it came from."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    r = (xs * 255 / (w - 1)).round().to(torch.uint8)
    g = (ys * 255 / (h - 1)).round().to(torch.uint8)
    return torch.stack([r, g, torch.zeros_like(r)])


def test_none_is_the_centre_crop_and_deterministic():
    img = _coordinates(40, 64)
    out = crop_pipeline("none", PREP)(img)
    assert torch.equal(out, img[:, 4:36, 16:48]) and torch.equal(out, crop_pipeline("none", PREP)(img))


def test_flip_flips_half_the_time_and_nothing_else():
    img = _coordinates(32, 32)
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = crop_pipeline("flip", PREP)(img)
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
        out = crop_pipeline("standard", PREP)(img).float()
        assert out.shape == (3, 32, 32)
        width = (out[0].max() - out[0].min()) / 255 * 64 / 63  # the fraction of x it spans
        height = (out[1].max() - out[1].min()) / 255 * 64 / 63
        areas.append(float(width * height))
    assert min(areas) >= RRC_SCALE[0] - 0.08 and max(areas) <= 1.0 + 1e-6
    assert max(areas) - min(areas) > 0.2  # it really varies


def test_randaugment_runs_on_uint8_tensors_and_changes_pixels():
    img = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    prep = dict(PREP, interpolation="bicubic")  # EfficientNet's: RandAugment warps bilinear
    changed = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out = crop_pipeline("randaugment", prep)(img)
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
        torch.manual_seed(seed)
        changed += not torch.equal(out, crop_pipeline("standard", prep)(img))
    assert changed >= 5
