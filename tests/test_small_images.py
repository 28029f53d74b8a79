"""Small images stay small: the decoded-image cache keeps an image smaller than the eval resize
at its own size and enlarges it on the fly, with the pixels the uncached road gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tl_cli.data.cache import ImageStore, make_key
from tl_cli.data.datasets import CachedImages, ImageFiles
from tl_cli.data.transforms import crop_pipeline, decode_resized, resize_side

# a 64 px network: eval resize 73 px; the images below are 28x28 (product photos) and 500x375
PREP = {"image_size": [64, 64], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic", "crop_pct": 0.875}


def _images(folder, sizes, colour_last=False):
    """Grayscale PNGs of these sizes; with `colour_last`, the last one in colour."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = folder / f"{i}.png"
        colour = colour_last and i == len(sizes) - 1
        Image.fromarray(rng.integers(0, 255, (h, w, 3) if colour else (h, w), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("augment", ["none", "flip", "standard", "randaugment"])
def test_small_images_are_cached_at_their_own_size_and_give_the_uncached_pixels(tmp_path, augment):
    sizes = [(28, 28)] * 6 + [(20, 40), (500, 375), (73, 90), (30, 24)]
    paths = _images(tmp_path / "imgs", sizes, colour_last=True)
    store = ImageStore(tmp_path / "cache", make_key("images", test=augment))
    store.build(decode_resized(p, PREP).permute(1, 2, 0).numpy() for p in paths)
    stored = store.load(len(paths), 10**9)
    side = resize_side(PREP)
    expected = [(h, w) if min(w, h) <= side else (side, round(w * side / h)) for w, h in sizes]
    assert [tuple(int(v) for v in shape[:2]) for shape in stored[2]] == expected
    # grayscale: one channel at its own size, 28x28x1, not 73x73x3 (20x); colour keeps three
    channels = [1] * (len(sizes) - 1) + [3]
    assert [int(shape[2]) for shape in stored[2]] == channels
    assert stored[0].nbytes == sum(h * w * c for (h, w), c in zip(expected, channels, strict=True))
    cached = CachedImages(*stored, [0] * len(paths), crop_pipeline(augment, PREP))
    files = ImageFiles([(p, 0) for p in paths], PREP, crop_pipeline(augment, PREP))
    for i in range(len(paths)):
        for seed in (1, 2):
            a, b = cached[(i, seed)][0], files[(i, seed)][0]
            assert a.shape == (3, 64, 64) and torch.equal(a, b), (sizes[i], seed)


def test_a_small_image_reaches_the_network_enlarged_to_the_eval_resize_then_cropped(tmp_path):
    from torchvision.transforms import v2

    (path,) = _images(tmp_path / "imgs", [(28, 28)])
    x = crop_pipeline("none", PREP)(decode_resized(path, PREP))
    # the classic PIL eval transform: resize the short side to 73 px (bicubic), centre-crop 64
    classic = v2.Compose([v2.Resize(73, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(64)])
    reference = v2.functional.pil_to_tensor(classic(Image.open(path).convert("RGB")))
    assert torch.equal(x, reference)
