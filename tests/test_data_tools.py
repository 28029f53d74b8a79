"""`tl data check` and `tl data split` on messy folders, and the generated dataset of `tl data synth`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.helpers import CONFIGS, TINY, tl
from tl_cli.datatools.synth import CLASSES, synthesize
from tl_cli.errors import TLError


def _messy(root):
    """A dataset with one of every kind of file `tl data check` must recognise."""
    from tl_cli.datatools.synth import synthesize

    synthesize(root, seed=2, num_classes=2, per_split={"train": 6, "val": 3, "test": 3}, size=64)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    t = root / "train" / "ellipses"
    good = (t / "ellipses.0.jpg").read_bytes()
    (t / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (t / "zero.jpg").write_bytes(b"")
    (t / "notes.txt").write_text("a text file")
    (t / "fake.jpg").write_text("text with an image extension")
    rgb.convert("L").save(t / "gray.png")
    rgb.convert("P").save(t / "palette.png")
    rgb.convert("RGBA").save(t / "alpha.png")
    rgb.convert("CMYK").save(t / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 50)).astype(np.uint16)).save(t / "deep.png")
    exif = rgb.getexif()
    exif[0x0112] = 6
    rgb.save(t / "rotated.jpg", exif=exif)
    rgb.resize((8, 8)).save(t / "tiny.png")
    shutil.copy(root / "train" / "rectangles" / "rectangles.0.jpg", root / "train" / "rectangles" / "copy.jpg")
    shutil.copy(root / "train" / "rectangles" / "rectangles.1.jpg", root / "test" / "rectangles" / "leak.jpg")
    (root / "val" / "triangles").mkdir()
    return t


def test_data_check_reports_every_kind_of_problem(tmp_path, capsys):
    t = _messy(tmp_path / "messy")
    before = {p: p.read_bytes() for p in (tmp_path / "messy").rglob("*") if p.is_file()}
    assert tl("data", "check", tmp_path / "messy", "--json", "--workers", "0") == 1
    report = json.loads(capsys.readouterr().out)
    errors = {os.path.basename(e["path"]): e["problem"] for e in report["errors"]}
    assert "truncated" in errors["truncated.jpg"]
    assert errors["zero.jpg"] == "empty file (0 bytes)"
    assert errors["notes.txt"].startswith("not an image")
    assert errors["fake.jpg"].startswith("not an image")
    assert any("not in train" in p for p in errors.values())  # val/triangles
    conv = {k: {os.path.basename(p) for p in v} for k, v in report["converted"].items()}
    assert "gray.png" in conv["grayscale"] and "palette.png" in conv["palette"] and "alpha.png" in conv["alpha"]
    assert "cmyk.jpg" in conv["cmyk"] and "deep.png" in conv["16-bit"]
    assert [os.path.basename(p) for p in report["exif_rotated"]] == ["rotated.jpg"]
    assert any("tiny.png (8x8)" in s for s in report["small"])
    within = [sorted(os.path.basename(p) for p in g) for g in report["duplicates"]["within_split"]]
    assert ["copy.jpg", "rectangles.0.jpg"] in within
    across = [sorted(os.path.basename(p) for p in g) for g in report["duplicates"]["across_splits"]]
    assert ["leak.jpg", "rectangles.1.jpg"] in across
    assert report["splits"]["train"]["ellipses"] == 6 + 7  # six generated + seven convertible files
    assert report["imbalance"]["train"] == pytest.approx(13 / 7, abs=0.01)
    assert t.exists()
    assert {p: p.read_bytes() for p in (tmp_path / "messy").rglob("*") if p.is_file()} == before  # nothing touched


def test_data_check_reports_what_stops_tl_fit_outside_class_folders(tmp_path, capsys):
    from tl_cli.datatools.synth import synthesize

    root = tmp_path / "d"
    synthesize(root, seed=1, num_classes=2, per_split={"train": 4, "val": 2}, size=48)
    (root / "train" / "README.txt").write_text("about this set\n")
    (root / "test").mkdir()
    assert tl("data", "check", root, "--json", "--workers", "0") == 1
    errors = {e["path"]: e["problem"] for e in json.loads(capsys.readouterr().out)["errors"]}
    assert "move it into a class folder" in errors[str(root / "train" / "README.txt")]
    assert errors[str(root / "test")].startswith("no class folders (tl test needs them")
    assert len(errors) == 2
    # and tl fit stops on the same file
    assert tl("fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", root) == 2
    assert "holds files directly (README.txt" in capsys.readouterr().err


def test_data_check_human_report_and_clean_exit(tmp_path, capsys):
    from tl_cli.datatools.synth import synthesize

    synthesize(tmp_path / "clean", seed=1, num_classes=2, per_split={"train": 4, "val": 2}, size=48)
    assert tl("data", "check", tmp_path / "clean", "--workers", "0") == 0
    out = capsys.readouterr().out
    assert "No errors" in out and "train/: 8 usable images, 2 classes" in out
    _messy(tmp_path / "messy")
    assert tl("data", "check", tmp_path / "messy", "--workers", "0") == 1
    out = capsys.readouterr().out
    assert "ERRORS: would stop training" in out and "leaks evaluation data" in out and "Fix:" in out


def _kaggle(folder, n):
    folder.mkdir(parents=True)
    for kind in ("cat", "dog"):
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{kind}.{i}.jpg")


def test_data_split_from_kaggle_flat_names_links_and_is_reproducible(tmp_path, capsys):
    _kaggle(tmp_path / "kaggle", 12)
    args = ["--train", "6", "--val", "3", "--test", "2", "--seed", "4"]
    assert tl("data", "split", tmp_path / "kaggle", tmp_path / "a", *args) == 0
    assert tl("data", "split", tmp_path / "kaggle", tmp_path / "b", *args) == 0
    listing = {d: sorted(str(p.relative_to(tmp_path / d)) for p in (tmp_path / d).rglob("*.jpg")) for d in "ab"}
    assert listing["a"] == listing["b"] and len(listing["a"]) == 2 * 11
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        for cls in ("cats", "dogs"):
            assert len(list((tmp_path / "a" / split / cls).iterdir())) == n
    names = [p.name for p in (tmp_path / "a").rglob("*.jpg")]
    assert len(set(names)) == len(names)  # no image in two splits
    some = next((tmp_path / "a" / "train" / "cats").iterdir())
    assert some.stat().st_nlink == 3  # hard-linked from the source by a and b: nothing copied or moved
    assert len(list((tmp_path / "kaggle").iterdir())) == 24
    assert tl("data", "split", tmp_path / "kaggle", tmp_path / "c", *args[:-2], "--seed", "5") == 0
    other = sorted(str(p.relative_to(tmp_path / "c")) for p in (tmp_path / "c").rglob("*.jpg"))
    assert other != listing["a"]


def test_data_split_refuses_to_give_less_or_overwrite(tmp_path, capsys):
    _kaggle(tmp_path / "kaggle", 5)
    assert tl("data", "split", tmp_path / "kaggle", tmp_path / "out", "--train", "4", "--val", "1", "--test", "1") == 2
    err = capsys.readouterr().err
    assert "asks 6 per class" in err and "cats has 5" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert tl("data", "split", tmp_path / "kaggle", tmp_path / "full", "--train", "2", "--val", "1") == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_data_split_from_class_folders_with_copy(tmp_path):
    for cls in ("birds", "fish"):
        (tmp_path / "src" / cls / "nested").mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8)).save(tmp_path / "src" / cls / "nested" / f"{i}.png")
    assert tl("data", "split", tmp_path / "src", tmp_path / "out", "--train", "3", "--val", "2", "--copy") == 0
    files = sorted((tmp_path / "out" / "train" / "birds").iterdir())
    assert len(files) == 3 and files[0].name.startswith("nested_") and files[0].stat().st_nlink == 1


def test_data_check_strict_fails_on_leaks_and_min_size_sets_small(tmp_path, capsys):
    from tl_cli.datatools.synth import synthesize

    root = tmp_path / "d"
    synthesize(root, seed=3, num_classes=2, per_split={"train": 3, "val": 2, "test": 2}, size=64)
    assert tl("data", "check", root, "--workers", "0") == 0
    assert tl("data", "check", root, "--workers", "0", "--strict") == 0  # clean: strict passes too
    capsys.readouterr()
    shutil.copy(root / "train" / "ellipses" / "ellipses.0.jpg", root / "test" / "ellipses" / "leak.jpg")
    assert tl("data", "check", root, "--workers", "0") == 0  # a leak is reported, not fatal...
    assert "leaks evaluation data" in capsys.readouterr().out
    assert tl("data", "check", root, "--workers", "0", "--strict") == 1  # ...unless --strict
    capsys.readouterr()
    assert tl("data", "check", root, "--workers", "0", "--json", "--min-size", "1000") == 0
    assert len(json.loads(capsys.readouterr().out)["small"]) == 15  # every image is under 1000 px now
    assert tl("data", "check", root, "--workers", "0", "--json", "--min-size", "16") == 0
    assert json.loads(capsys.readouterr().out)["small"] == []


# --------------------------------------------------------------------------- synth


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.jpg")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_synth_is_deterministic_and_refuses_to_overwrite(tmp_path):
    per = {"train": 3, "val": 2, "test": 1}
    synthesize(tmp_path / "a", seed=3, per_split=per, size=48)
    synthesize(tmp_path / "b", seed=3, per_split=per, size=48)
    synthesize(tmp_path / "c", seed=4, per_split=per, size=48)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    with pytest.raises(TLError, match="not empty"):
        synthesize(tmp_path / "a", seed=3, per_split=per, size=48)


def test_synth_classes_are_not_separable_by_colour_or_brightness(tmp_path):
    synthesize(tmp_path / "s", seed=0, num_classes=2, per_split={"train": 60}, size=64)
    means = {
        c: np.array(
            [
                np.asarray(Image.open(p), dtype=float).mean(axis=(0, 1))
                for p in sorted((tmp_path / "s" / "train" / c).iterdir())
            ]
        )
        for c in ("ellipses", "rectangles")
    }
    a, b = means["ellipses"], means["rectangles"]
    spread = np.concatenate([a, b]).std(axis=0)
    # per channel, the class means differ by well under half a standard deviation
    assert np.all(np.abs(a.mean(0) - b.mean(0)) < 0.5 * spread)
    # and the best brightness threshold is close to chance
    brightness = np.concatenate([a.mean(1), b.mean(1)])
    labels = np.r_[np.zeros(len(a)), np.ones(len(b))]
    best = max(max(((brightness > t) == labels).mean(), ((brightness <= t) == labels).mean()) for t in brightness)
    assert best < 0.75


def test_synth_command_defaults_are_the_demo_set(tmp_path):
    """`tl data synth DIR` (what `make demo` runs): 4 classes x (60, 20, 40), small shapes in each."""
    assert tl("data", "synth", tmp_path / "cli", "--size", "32") == 0
    counts = {
        s: sorted(len(list(c.iterdir())) for c in (tmp_path / "cli" / s).iterdir()) for s in ("train", "val", "test")
    }
    assert counts == {"train": [60] * 4, "val": [20] * 4, "test": [40] * 4}
    assert sorted(p.name for p in (tmp_path / "cli" / "train").iterdir()) == sorted(CLASSES)
    synthesize(tmp_path / "py", size=32)  # the function's defaults are the same, byte for byte
    assert _digest(tmp_path / "py") == _digest(tmp_path / "cli")
    synthesize(tmp_path / "bare", size=32, distractors=0)
    assert _digest(tmp_path / "bare") != _digest(tmp_path / "py")
    with pytest.raises(TLError, match="--distractors -1"):
        synthesize(tmp_path / "neg", distractors=-1)
