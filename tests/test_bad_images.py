"""Bad images through a run: ``data.on_bad_image skip`` holds on every run over the same cache,
what it keeps trains with its own pixels and its own label, and a file that breaks in a
DataLoader worker is named without a traceback.

The screening result is remembered per file set (a second run decodes nothing), so the first
run and a later one take different roads through the first pass: both must leave the bad
files out, warn with each one's name, and never reach a DataLoader with an undecodable file.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from typing_extensions import override

from tests.helpers import CONFIGS, TINY, fit_model, tiny_datamodule, tl
from tl_cli.cli.trainer import TLTrainer
from tl_cli.data import screening
from tl_cli.models import FeatureExtraction

FAST = ["--model.head_init", "random", "--trainer.max_epochs", "1"]


@pytest.fixture
def messy(tiny_data, tmp_path) -> tuple[Path, list[Path]]:
    """A copy of the tiny data with a truncated JPEG and a text file named .jpg in train/ and
    a text file named .png in val/; returns the root and the bad files."""
    root = tmp_path / "messy"
    shutil.copytree(tiny_data, root)
    truncated = root / "train" / "ellipses" / "ellipses.1.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    notes = root / "train" / "rectangles" / "notes.jpg"
    notes.write_text("remember to label the new batch\n")
    fake = root / "val" / "ellipses" / "fake.png"
    fake.write_text("not a png")
    return root, [truncated, notes, fake]


def _fit(root, *extra: str) -> int:
    return tl("fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", root, *FAST, *extra)


class CountInspections:
    """Counts the full decodes of the screening (`inspect_image`) a run makes."""

    def __init__(self, monkeypatch) -> None:
        self.n = 0
        real = screening.inspect_image

        def counted(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(screening, "inspect_image", counted)


def _warned_each(text: str, bad: list[Path]) -> bool:
    lines = [line for line in text.splitlines() if "warning: skipping" in line]
    return len(lines) == len(bad) and all(any(str(p) in line for line in lines) for p in bad)


def test_skip_holds_on_a_second_run_over_the_same_cache(messy, capsys, monkeypatch):
    root, bad = messy
    kept = {p: p.read_bytes() for p in bad}
    assert _fit(root, "--data.on_bad_image", "skip") == 0
    first = capsys.readouterr()
    assert _warned_each(first.err, bad)
    count = CountInspections(monkeypatch)
    assert _fit(root, "--data.on_bad_image", "skip") == 0  # no OSError from a loader
    second = capsys.readouterr()
    assert count.n == 0  # the screening was remembered, not redone
    assert _warned_each(second.err, bad)  # and the skipped files are named again
    n_train = sum(1 for p in (root / "train").rglob("*") if p.is_file()) - 2
    assert f"bottleneck features of {n_train} images loaded" in second.out
    assert {p: p.read_bytes() for p in bad} == kept  # skipped files are left as they were


def test_skip_after_a_run_that_stopped_on_the_bad_files(messy, capsys):
    root, bad = messy
    assert _fit(root) == 2  # data.on_bad_image error, the default
    stopped = capsys.readouterr().err
    assert all(str(p) in stopped for p in bad if "train" in p.parts) and "on_bad_image skip" in stopped
    assert _fit(root, "--data.on_bad_image", "skip") == 0
    assert _warned_each(capsys.readouterr().err, bad)


@pytest.mark.parametrize("spelling", ["relative then absolute", "through a symlink"])
def test_skip_holds_when_the_second_run_names_the_folder_another_way(messy, capsys, monkeypatch, spelling):
    # the cache key resolves paths, so the second run finds the first run's screening: it must
    # apply it to files however they are named now
    root, bad = messy
    monkeypatch.chdir(root.parent)
    assert _fit(root.name, "--data.on_bad_image", "skip") == 0
    capsys.readouterr()
    if spelling == "through a symlink":
        link = root.parent / "link"
        link.symlink_to(root, target_is_directory=True)
        second, bad = link, [link / p.relative_to(root) for p in bad]
    else:
        second = root.resolve()
    assert _fit(second, "--data.on_bad_image", "skip") == 0  # no OSError from the cache pass
    err = capsys.readouterr().err
    assert _warned_each(err, bad) or _warned_each(err, [p.resolve() for p in bad])


def test_skip_skips_a_text_file_in_a_class_folder(messy, capsys):
    # DESIGN.md 'Bad input': a text file in a class folder stops the run with its name, or, where
    # the user chose to skip bad images, is named in a warning and left out
    root, bad = messy
    readme = root / "train" / "ellipses" / "README.txt"
    readme.write_text("photos from the field trip\n")
    assert _fit(root) == 2
    stopped = capsys.readouterr().err
    assert str(readme) in stopped and "not images" in stopped and "on_bad_image skip" in stopped
    assert _fit(root, "--data.on_bad_image", "skip") == 0
    out, err = capsys.readouterr()
    assert _warned_each(err, bad + [readme])
    assert f"warning: skipping {readme}: not an image (extension .txt)" in err
    n_train = sum(1 for p in (root / "train").rglob("*") if p.is_file()) - 3  # 2 bad + README
    assert f"bottleneck features of {n_train} images prepared" in out


def test_a_class_folder_with_only_a_text_file_has_no_images_even_when_skipping(messy, capsys):
    root, _ = messy
    lonely = root / "train" / "triangles"
    lonely.mkdir()
    (lonely / "notes.txt").write_text("to do\n")
    assert _fit(root, "--data.on_bad_image", "skip") == 2
    err = capsys.readouterr().err
    assert str(lonely) in err and "contain no images" in err


def test_auto_class_weights_count_only_the_images_skip_keeps(messy, capsys, monkeypatch):
    # the weights must not count skipped files, and counting must not cost a second decode
    from tl_cli.data import first_pass

    decoded = []
    real = first_pass.decode_resized
    monkeypatch.setattr(first_pass, "decode_resized", lambda image, *a: decoded.append(1) or real(image, *a))
    root, bad = messy
    extra = [root / "train" / "ellipses" / f"scan{i}.jpg" for i in range(3)]
    for path in extra:
        path.write_bytes(b"")
    (root / "train" / "ellipses" / "README.txt").write_text("notes\n")
    assert _fit(root, "--data.on_bad_image", "skip", "--model.class_weights", "auto") == 0
    out, err = capsys.readouterr()
    good = {
        c: sum(1 for p in (root / "train" / c).iterdir() if p.suffix == ".jpg" and p.stat().st_size > 300)
        for c in ("ellipses", "rectangles")
    }
    total = sum(good.values())
    said = ", ".join(f"{c} {total / (2 * n):.3f}" for c, n in good.items())
    assert f"tl: class weights (auto): {said}" in out
    usable = sum(good.values()) + sum(1 for p in (root / "val").rglob("*.jpg"))  # val's bad one is a .png
    assert len(decoded) == usable  # one decode a usable file: the first pass, weights counted after it
    skipped = [line for line in err.splitlines() if "warning: skipping" in line]
    assert len(skipped) == len(set(skipped)) == len(bad) + len(extra) + 1  # each named once


@pytest.mark.parametrize("staged", [False, True])
def test_skip_stops_when_a_class_has_no_usable_image_left(messy, capsys, monkeypatch, staged):
    # every file of train/triangles is bad: skipping them would train without the class
    from tl_cli.data import stage

    monkeypatch.setattr(stage, "_READY", set())
    root, _ = messy
    good = next((root / "val" / "ellipses").glob("*.jpg"))
    for split in ("val", "train"):
        (root / split / "triangles").mkdir()
    shutil.copy(good, root / "val" / "triangles" / "t.jpg")
    (root / "train" / "triangles" / "b.txt").write_text("no image\n")
    pool = root.parent / "pool"
    pool.mkdir()
    (pool / "a.jpg").write_bytes(good.read_bytes()[:200])
    # listed first, so it names the class: by the folder that lists it, not by its target's
    (root / "train" / "triangles" / "a.jpg").symlink_to(pool / "a.jpg")
    where = ["--data.stage", str(root.parent / "local")] if staged else []
    assert _fit(root, "--data.on_bad_image", "skip", *where) == 2
    err = capsys.readouterr().err
    assert f"class folder(s) {root / 'train' / 'triangles'} have no usable images left" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (root / "train" / "triangles").iterdir()) == ["a.jpg", "b.txt"]  # untouched


def _huge_png(path: Path, width: int = 30000, height: int = 20000) -> None:
    """A small PNG file whose header says width x height: Pillow refuses it on opening."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # and its checksum
    path.write_bytes(bytes(data))


def test_a_huge_image_is_called_too_large_not_corrupt(messy, capsys):
    # DESIGN.md 'Bad input': a PNG that Pillow refuses as a possible decompression bomb is said
    # to be that, not "corrupt", wherever tl names it: the fit's error, skip's warning, data check
    root, _ = messy
    huge = root / "train" / "rectangles" / "scan.png"
    _huge_png(huge)
    said = "too large to decode (600 megapixels, over the 179 that Pillow decodes"
    assert _fit(root) == 2
    stopped = capsys.readouterr().err
    assert f"{huge}: {said}" in stopped and "corrupt" not in stopped.split(str(huge))[1].splitlines()[0]
    assert _fit(root, "--data.on_bad_image", "skip") == 0
    assert f"warning: skipping {huge}: {said}" in capsys.readouterr().err
    assert tl("data", "check", root, "--workers", "0") == 1
    report = capsys.readouterr().out
    line = next(line for line in report.splitlines() if "scan.png" in line)
    assert "too large to decode" in line and "shrink it" in line and "corrupt" not in line
    assert huge.stat().st_size < 200  # the file is left as it was


class SeenImages(pl.Callback):
    """The training batches as the model receives them: ``(image, label, index)`` triples."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, int, int]] = []

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y, index = batch
        self.seen += list(zip(x.detach().cpu().clone(), y.tolist(), index.tolist(), strict=True))


@functools.cache
def _timm_config() -> dict:
    import timm  # here, not at collection: importing huggingface_hub freezes HF_HUB_OFFLINE unset

    return dict(timm.create_model("test_efficientnet", pretrained=False).pretrained_cfg)


def _eval_view(path: Path, size: int) -> torch.Tensor:
    """The classic ImageNet evaluation transform (torchvision's v1 transforms on the PIL image),
    built from timm's own data config for the backbone rather than from tl's preprocessing."""
    from torchvision import transforms

    cfg = _timm_config()
    classic = transforms.Compose(
        [
            transforms.Resize(int(size / cfg["crop_pct"]), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
    assert cfg["interpolation"] == "bicubic"
    return classic(Image.open(path).convert("RGB"))


def test_what_skip_keeps_trains_with_its_own_pixels_and_label_run_after_run(messy):
    root, bad = messy
    size = 80  # test_efficientnet's crop_pct 0.95: the short side goes to 84
    for run in ("screens and caches", "reuses both"):
        pl.seed_everything(0)
        model = FeatureExtraction(backbone="timm:test_efficientnet", weights="none", head_init="random")
        dm = tiny_datamodule(root, image_size=size, cache_features=False, on_bad_image="skip")
        seen = SeenImages()
        fit_model(model, dm, 1, root=root.parent / run.replace(" ", "_"), trainer=TLTrainer, callbacks=[seen])
        good = sorted(p for p in (root / "train").rglob("*") if p.is_file() and p not in bad)
        paths = dm.paths("train")
        assert sorted(paths) == good, run
        assert sorted(i for _, _, i in seen.seen) == list(range(len(good))), run  # each once
        for image, label, index in seen.seen:
            path = paths[index]
            assert dm.class_names[label] == path.parent.name, (run, path)
            gap = float((image - _eval_view(path, size)).abs().max())
            assert gap < 1e-5, f"{run}: {path.name} trained on other pixels (up to {gap:.3g} off)"


def test_corrupt_image_in_a_worker_is_named_without_traceback(data, capsys):
    root = data
    bad = root / "val" / "rectangles" / "rectangles.3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    args = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", root]
    assert tl(*args, "--trainer.max_epochs", "1", "--data.num_workers", "1") == 2
    err = capsys.readouterr().err
    assert "rectangles.3.jpg" in err and "Traceback" not in err


def test_a_decoder_error_without_a_message_is_still_named(tmp_path, monkeypatch):
    # some decoders raise with an empty message (EOFError()); the screening must name the file,
    # not crash on the message
    path = tmp_path / "odd.jpg"
    Image.new("RGB", (8, 8)).save(path)

    def silent(*args, **kwargs):
        raise EOFError()

    monkeypatch.setattr(screening.Image, "open", silent)
    assert screening.inspect_image(path)["error"] == "corrupt or truncated (EOFError)"


def test_tl_test_stops_on_a_bad_test_image_or_scores_without_it(tiny_data, tmp_path, capsys):
    import json

    from tests.helpers import fit_tiny

    best = fit_tiny(tiny_data, 1, "feature_extract.yaml", *FAST[:2])
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    broken = root / "test" / "rectangles" / "rectangles.0.jpg"
    broken.write_bytes(broken.read_bytes()[:250])
    n_test = sum(1 for p in (root / "test").rglob("*.jpg"))
    base = ["test", "--ckpt_path", best, "--data.root", root, "--data.num_workers", "0"]
    assert tl(*base, "-o", tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert f"{broken}: corrupt or truncated" in err and "on_bad_image skip" in err
    assert tl(*base, "--data.on_bad_image", "skip", "-o", tmp_path / "b") == 0
    assert f"warning: skipping {broken}" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "latest" / "metrics.json").read_text())["n_samples"] == n_test - 1
