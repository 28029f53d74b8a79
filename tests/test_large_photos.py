"""Large photographs decode smaller: a JPEG several times the eval resize is decoded at a reduced
DCT scale (Pillow's draft, with the reducing gap of its `thumbnail`), never below twice the
resize, and alike on every road: the screening first pass, the cache, the uncached loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import photo
from tl_cli.data.datasets import CachedImages, ImageFiles
from tl_cli.data.first_pass import screen_and_cache
from tl_cli.data.folders import IMAGE_SUFFIXES
from tl_cli.data.images import load_rgb
from tl_cli.data.screening import inspect_image
from tl_cli.data.transforms import crop_pipeline, decode_resized, resize_side, shorter_side_to

# a 64 px network: eval resize 73 px, so a JPEG whose short side passes 4 x 73 may decode at 1/2
PREP = {"image_size": [64, 64], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic", "crop_pct": 0.875}
SIDE = resize_side(PREP)


@pytest.mark.parametrize(
    ("size", "decoded"),
    [
        ((1200, 900), (300, 225)),  # 1/4: 225 >= 2 x 73, and 1/8 would give 112
        ((600, 450), (300, 225)),  # 1/2
        ((4000, 300), (2000, 150)),  # a panorama: its short side rules
        ((587, 585), (147, 147)),  # 1/4: the long side's rounding must not cost a scale
        ((400, 292), (200, 146)),  # exactly 4 x 73: halving leaves exactly twice the resize
        ((300, 291), (300, 291)),  # just under: halving would leave less than twice the resize
    ],
)
def test_a_large_jpeg_decodes_at_a_reduced_scale_never_below_twice_the_eval_resize(tmp_path, size, decoded):
    path = photo(tmp_path / "p.jpg", *size)
    assert load_rgb(path, shrink_to=SIDE).size == decoded
    assert min(decoded) >= 2 * SIDE
    assert load_rgb(path).size == size  # asked for nothing: the full picture
    png = photo(tmp_path / "p.png", *size)
    assert load_rgb(png, shrink_to=SIDE).size == size  # only JPEGs have DCT scales


def test_every_size_decodes_at_the_smallest_scale_that_keeps_twice_the_eval_resize(tmp_path):
    path = tmp_path / "p.jpg"
    for short in (145, 146, 291, 292, 293, 583, 584, 585, 1167, 1168, 1169, 1500):
        for w, h in ((short, short), (short * 4 // 3 + 1, short), (short, short * 3), (short * 2 + 7, short)):
            Image.new("RGB", (w, h), (90, 120, 30)).save(path)
            got = min(load_rgb(path, shrink_to=SIDE).size)
            scale = round(short / got) if got < short else 1
            assert got >= 2 * SIDE or got == short, (w, h, got)  # never below twice the resize
            # and no smaller scale keeps it (whole multiples, as libjpeg's scales go), or 1/8 is the last
            assert scale == 8 or short // (2 * SIDE) < 2 * scale, (w, h, got)


@pytest.mark.parametrize("orientation", [None, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("size", [(1200, 900), (1201, 899), (1203, 905), (587, 585), (999, 1333), (4003, 301)])
def test_a_reduced_scale_decode_gives_the_full_decodes_size_within_a_grey_level(tmp_path, size, orientation):
    """Sizes that are not whole multiples of the scale too: libjpeg rounds the reduced size up,
    and the resize takes only the file's picture from it (Pillow's box), turned as EXIF says."""
    from torchvision.transforms import v2

    path = photo(tmp_path / "p.jpg", *size, orientation=orientation)
    assert load_rgb(path, shrink_to=SIDE).size != load_rgb(path).size  # it does decode smaller
    fast = decode_resized(path, PREP)
    full = v2.Resize(SIDE, interpolation=v2.InterpolationMode.BICUBIC)(load_rgb(path))
    full = v2.functional.pil_to_tensor(full)
    assert fast.shape == full.shape
    difference = (fast.float() - full.float()).abs()
    assert difference.mean() < 0.5 and difference.max() <= 4, (difference.mean(), difference.max())


def test_the_size_rule_is_torchvisions():
    from torchvision.transforms import v2

    for w, h in [(97, 73), (73, 97), (1201, 899), (899, 1201), (1000, 1000), (4003, 301), (333, 1000), (74, 5000)]:
        resized = v2.Resize(SIDE)(Image.new("L", (w, h)))
        assert shorter_side_to((w, h), SIDE) == resized.size, (w, h)


@pytest.mark.parametrize(
    ("orientation", "mode", "save"),
    [
        *[(o, "RGB", {}) for o in (None, 1, 2, 3, 4, 5, 6, 7, 8)],
        (None, "RGB", {"progressive": True}),
        (6, "RGB", {"progressive": True}),
        (None, "L", {}),
        (None, "CMYK", {}),
    ],
)
@pytest.mark.parametrize("size", [(1200, 900), (1201, 899)])
def test_the_screening_decode_gives_the_training_pixels_and_reports_the_files_own_size(
    tmp_path, orientation, mode, save, size
):
    path = photo(tmp_path / "p.jpg", *size, orientation, mode=mode, **save)
    info = inspect_image(path, IMAGE_SUFFIXES, digest=False, keep=True, shrink_to=SIDE)
    assert info["error"] is None
    assert max(info["image"].size) < max(size)  # it did decode smaller
    assert torch.equal(decode_resized(info["image"], PREP), decode_resized(path, PREP))
    # the size reported is the picture's, as a person sees it, not the reduced decode's; and
    # what the screening says of the file is what it says without the reduced decode
    quarter_turn = orientation in (5, 6, 7, 8)
    assert (info["width"], info["height"]) == (size[::-1] if quarter_turn else size)
    full = inspect_image(path, IMAGE_SUFFIXES, digest=False)
    assert {k: info[k] for k in full} == full
    assert info["exif_rotated"] is (orientation not in (None, 1))


@pytest.mark.parametrize("save", [{}, {"progressive": True}])
@pytest.mark.parametrize("cut", [2, 500, 0.5])
def test_a_truncated_large_jpeg_still_fails_when_it_decodes_smaller(tmp_path, save, cut):
    data = photo(tmp_path / "p.jpg", 1200, 900, **save).read_bytes()
    keep = int(len(data) * cut) if isinstance(cut, float) else len(data) - cut
    (tmp_path / "cut.jpg").write_bytes(data[:keep])
    info = inspect_image(tmp_path / "cut.jpg", IMAGE_SUFFIXES, digest=False, keep=True, shrink_to=SIDE)
    assert info["error"] is not None and info["error"].startswith("corrupt or truncated"), info["error"]
    with pytest.raises(OSError, match="truncated"):  # the loader's own road
        load_rgb(tmp_path / "cut.jpg", shrink_to=SIDE)


def test_the_first_pass_caches_large_photos_with_the_uncached_pixels_and_skips_a_truncated_one(tmp_path):
    root = tmp_path / "train"
    paths = [
        photo(root / "a" / "0.jpg", 1200, 900),
        photo(root / "a" / "1.jpg", 900, 1200, orientation=8),
        photo(root / "b" / "0.jpg", 640, 480, progressive=True),
        photo(root / "b" / "1.png", 1200, 900),
    ]
    broken = root / "b" / "2.jpg"
    broken.write_bytes(photo(tmp_path / "whole.jpg", 1200, 900).read_bytes()[:-300])
    samples = [(p, 0 if p.parent.name == "a" else 1) for p in [*paths, broken]]
    said: list[str] = []

    def first_pass():
        return screen_and_cache(
            root,
            samples,
            PREP,
            cache_dir=tmp_path / "cache",
            on_bad_image="skip",
            images=True,
            extractor=None,
            batch_size=4,
            workers=0,
            ram_budget=10**9,
            say=said.append,
        )

    prepared = first_pass()
    assert [p for p, _ in prepared.samples] == paths
    assert any("2.jpg" in s and "truncated" in s for s in said), said
    crop = crop_pipeline("none", PREP)
    labels = [label for _, label in prepared.samples]
    cached = CachedImages(*prepared.images, labels, crop)
    files = ImageFiles(prepared.samples, PREP, crop)
    for i, path in enumerate(paths):
        assert torch.equal(cached[i][0], files[i][0]), path.name
    # and a build from the known screen (no inspection) stores the same bytes
    for entry in (tmp_path / "cache" / "images").iterdir():
        entry.unlink()
    again = first_pass()
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(prepared.images[0]))
