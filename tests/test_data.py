"""Data: folder layout errors, class handling, bad images, image decoding, DataLoader workers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import PREP
from tl_cli.data.folders import scan_split
from tl_cli.data.module import ImageFolderData
from tl_cli.data.transforms import AUGMENTS, Normalize, crop_pipeline, decode_resized, load_rgb
from tl_cli.errors import TLError


def _dm(root, stage="fit", classes=None, image_size=None, **kwargs):
    """A DataModule set up as a model would: classes (its own order, if any), preprocessing."""
    dm = ImageFolderData(root=str(root), num_workers=0, image_size=image_size, **kwargs)
    if classes is not None:
        dm.class_names = classes
    dm.setup(stage)
    dm.preprocessing = dict(PREP, image_size=[image_size] * 2) if image_size else PREP
    return dm


def test_setup_fit_labels_and_batches(data):
    dm = _dm(data, image_size=48)
    assert dm.class_names == ["ellipses", "rectangles"]
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, 48, 48)  # normalised on the device, later
    assert set(y.tolist()) <= {0, 1} and len(index) == len(y)
    assert len(dm.dataset_for("train")) == 24 and len(dm.dataset_for("val")) == 12
    assert dm.class_counts("train") == [12, 12]


@pytest.mark.parametrize("world", [1, 2])
def test_min_steps_per_epoch_makes_fresh_passes_over_small_data(world):
    from tl_cli.data.datasets import ResumableSampler

    one = ResumableSampler(10, seed=3, num_replicas=world, rank=0)
    ranks = [ResumableSampler(10, seed=3, num_replicas=world, rank=r, passes=3) for r in range(world)]
    for s in [one, *ranks]:
        s.set_epoch(2)
    got = [list(s) for s in ranks]
    assert all(len(g) == len(r) == 3 * len(one) for g, r in zip(got, ranks, strict=True))
    passes = [[i for r in got for i, _ in r[p * len(one) : (p + 1) * len(one)]] for p in range(3)]
    for p in passes:
        assert sorted(set(p)) == list(range(10))  # each pass covers every sample, over the ranks
    assert passes[0] != passes[1] != passes[2]  # in an order of its own
    seeds = [seed for r in got for _, seed in r]
    assert len(set(seeds)) == len(seeds)  # and with augmentations of its own
    if world == 1:
        assert got[0][: len(one)] == list(one)  # the first pass is a one-pass epoch


def test_min_steps_per_epoch_sets_the_number_of_training_batches(data):
    assert len(_dm(data, image_size=32, batch_size=4).train_dataloader()) == 6
    assert len(_dm(data, image_size=32, batch_size=4, min_steps_per_epoch=6).train_dataloader()) == 6
    assert len(_dm(data, image_size=32, batch_size=4, min_steps_per_epoch=7).train_dataloader()) == 12
    assert len(_dm(data, image_size=32, batch_size=4, min_steps_per_epoch=7).val_dataloader()) == 3  # val: once
    # passes are batched as one stream: 24 images in batches of 10 make 3 batches a pass, but
    # 3 passes make 8 (not 9); at least 9 takes 4 passes, 10 batches
    assert len(_dm(data, image_size=32, batch_size=10, min_steps_per_epoch=9).train_dataloader()) == 10
    with pytest.raises(TLError, match="min_steps_per_epoch=0"):
        ImageFolderData(root=str(data), min_steps_per_epoch=0)


def test_passes_for_gives_the_fewest_passes_that_reach_the_minimum():
    from tl_cli.data.module import passes_for

    def steps(passes, n, world, batch):
        return -(-passes * -(-n // world) // batch)

    assert passes_for(None, 80, 1, 32) == 1
    for n in (1, 7, 80, 112, 180, 2000):
        for world in (1, 2, 3):
            for batch in (1, 4, 32):
                for least in (1, 5, 15, 40):
                    p = passes_for(least, n, world, batch)
                    assert steps(p, n, world, batch) >= least, (n, world, batch, least)
                    assert p == 1 or steps(p - 1, n, world, batch) < least, (n, world, batch, least)


def test_deprecated_steps_per_epoch_still_works_and_names_its_new_key(data, capsys):
    dm = _dm(data, image_size=32, batch_size=4, steps_per_epoch=7)
    assert dm.min_steps_per_epoch == 7 and len(dm.train_dataloader()) == 12
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "data.steps_per_epoch is deprecated" in err and "use data.min_steps_per_epoch" in err
    )
    _dm(data, image_size=32, batch_size=4, min_steps_per_epoch=7)
    assert capsys.readouterr().err == ""


def test_checkpoint_class_order_wins_for_test(data):
    dm = _dm(data, stage="test", classes=["rectangles", "ellipses"])
    labels = {p.parent.name: y for p, y in dm.samples("test")}
    assert labels == {"rectangles": 0, "ellipses": 1}


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda r: shutil.rmtree(r / "val"), "val does not exist"),
        (lambda r: shutil.rmtree(r / "val" / "rectangles"), "missing class folder(s) rectangles"),
        (
            lambda r: (
                (r / "val" / "birds").mkdir()
                or shutil.copy(next((r / "val" / "ellipses").iterdir()), r / "val" / "birds")
            ),
            "class folder(s) birds not in",
        ),
        (lambda r: (r / "train" / "stars").mkdir(), "contain no images"),
        (lambda r: (r / "train" / "ellipses" / "notes.txt").write_text("hi"), "notes.txt"),
        (lambda r: (r / "train" / "loose.jpg").write_bytes(b""), "holds files directly"),
    ],
)
def test_layout_errors_name_the_problem(data, damage, message):
    damage(data)
    with pytest.raises(TLError) as info:
        _dm(data).train_dataloader()
        _dm(data).val_dataloader()
    assert message in str(info.value)


def test_missing_root_and_predict_dir(tmp_path):
    with pytest.raises(TLError, match="does not exist"):
        _dm(tmp_path / "nowhere")
    with pytest.raises(TLError, match="predict_dir"):
        _dm(tmp_path, stage="predict", classes=["a", "b"]).predict_dataloader()


def test_hidden_files_are_not_images(data):
    (data / "train" / "ellipses" / ".DS_Store").write_bytes(b"\0")
    assert len(scan_split(data / "train")["ellipses"]) == 12


def test_file_going_bad_after_the_check_is_named(data):
    dm = _dm(data, cache_images=False)
    dataset = dm.dataset_for("train")
    bad = data / "train" / "ellipses" / "ellipses.0.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    index = [i for i, (p, _) in enumerate(dm.samples("train")) if p == bad][0]
    with pytest.raises(TLError, match="ellipses.0.jpg"):
        dataset[index]


def _break_files(root):
    truncated = root / "train" / "ellipses" / "ellipses.1.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (root / "train" / "rectangles" / "empty.jpg").write_bytes(b"")
    (root / "val" / "ellipses" / "fake.png").write_text("not a png")
    return {truncated, root / "train" / "rectangles" / "empty.jpg", root / "val" / "ellipses" / "fake.png"}


def test_bad_images_stop_before_training_with_the_full_list(data):
    names = _break_files(data)
    with pytest.raises(TLError) as info:
        _dm(data).train_dataloader()
    msg = str(info.value)
    in_train = [str(p) for p in names if "train" in p.parts]
    assert all(p in msg for p in in_train) and "on_bad_image skip" in msg and "tl data check" in msg
    assert "truncated" in msg and "empty file" in msg


def test_bad_images_skipped_with_a_warning_each(data, capsys):
    names = _break_files(data)
    dm = _dm(data, on_bad_image="skip")
    assert (
        len(dm.dataset_for("train")) == 23 and len(dm.dataset_for("val")) == 12
    )  # 24 + empty.jpg - 2; 12 + fake.png - 1
    warned = capsys.readouterr().err
    assert all(str(p) in warned for p in names)
    kept = {p for p, _ in dm.samples("train") + dm.samples("val")}
    assert not kept & names


def test_bad_augment_is_rejected_by_the_parser(tiny_data, capsys):
    from tests.helpers import tl

    assert tl("fit", "--data.root", tiny_data, "--data.augment", "mixup") == 2
    assert "randaugment" in capsys.readouterr().err


# --------------------------------------------------------------------------- decoding


def test_rgb_conversion_of_awkward_modes(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(tmp_path / "a.png")
    assert load_rgb(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "p.png", transparency=1)
    assert load_rgb(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    deep.save(tmp_path / "d.png")
    assert load_rgb(tmp_path / "d.png").getpixel((0, 0))[0] in (127, 128)  # not clipped to 255
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_rgb(tmp_path / "c.jpg").getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    tall = Image.new("RGB", (6, 2), (0, 0, 255))
    exif = tall.getexif()
    exif[0x0112] = 6  # rotate 90 when displayed
    tall.save(tmp_path / "e.jpg", exif=exif)
    assert load_rgb(tmp_path / "e.jpg").size == (2, 6)


def test_one_pipeline_follows_preprocessing():
    img = Image.new("RGB", (80, 60), (128, 128, 128))
    decoded = decode_resized(img, PREP)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, 36, 48)  # short side 32 / 0.875
    x = Normalize(PREP["mean"], PREP["std"])(crop_pipeline("none", PREP)(decoded)[None])
    assert x.shape == (1, 3, 32, 32)
    assert float(x.mean()) == pytest.approx((128 / 255 - 0.5) / 0.25, abs=1e-3)
    for augment in AUGMENTS:
        out = crop_pipeline(augment, PREP)(decoded)
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)


def test_distributed_loaders_start_workers_from_a_fork_server_sharing_the_image_cache(tmp_path):
    """Under DDP, a fork() of a rank can hang its child for good (a process-group thread holds
    CPython's thread-list lock at that instant, gh-112275); workers then come from a fork server,
    and the image cache travels to them by reference: the cache file each worker maps, or (an
    array without a file) shared memory."""
    import io
    from multiprocessing.reduction import ForkingPickler

    from torch.utils.data import DataLoader

    from tl_cli.data.datasets import CachedImages, ignore_preemption_signal, worker_context

    assert worker_context(2, world_size=1) is None and worker_context(0, world_size=2) is None
    context = worker_context(2, world_size=2)
    assert context is not None and context.get_start_method() == "forkserver"

    n, shape = 6, (8, 8, 3)
    pixels = np.random.default_rng(0).integers(0, 256, size=n * int(np.prod(shape)), dtype=np.uint8)
    offsets, shapes = np.arange(n) * int(np.prod(shape)), np.tile(shape, (n, 1))
    file = tmp_path / "images.bin"
    pixels.tofile(file)
    expected = torch.from_numpy(pixels.reshape(n, *shape)).permute(0, 3, 1, 2)

    def cached(data: np.ndarray, **kw) -> CachedImages:
        return CachedImages(data, offsets, shapes, list(range(n)), torch.nn.Identity(), **kw)

    in_ram, mapped, no_file = cached(pixels.copy(), file=file), cached(np.memmap(file, mode="r")), cached(pixels.copy())
    assert mapped.file == file
    for dataset in (in_ram, mapped, no_file):
        loader = DataLoader(
            dataset,
            batch_size=2,
            num_workers=2,
            multiprocessing_context=context,
            worker_init_fn=ignore_preemption_signal,
        )
        images, labels, indices = (torch.cat(t) for t in zip(*loader, strict=True))
        assert torch.equal(images, expected) and labels.tolist() == indices.tolist() == list(range(n))
        assert torch.equal(dataset[3][0], expected[3])  # the rank still reads its own array

    # 64 MB of cached images reach a worker as a few hundred bytes, not a copy per worker
    big = np.zeros(64 << 20, dtype=np.uint8)
    big.tofile(tmp_path / "big.bin")
    for dataset in (cached(big, file=tmp_path / "big.bin"), cached(big.copy())):
        buffer = io.BytesIO()
        ForkingPickler(buffer).dump(dataset)
        assert len(buffer.getvalue()) < 10_000
    assert dataset._shared.is_shared() and dataset.data.ctypes.data == dataset._shared.data_ptr()


_SIGNALLED = """
import multiprocessing.forkserver as fs, multiprocessing.resource_tracker as rt, os, signal, sys, time
from torch.utils.data import DataLoader
from tl_cli.cli.main import short_tmpdir
from tl_cli.data.datasets import worker_context
if __name__ == "__main__":
    print("given up", short_tmpdir())
    print("single process", [b.tolist() for b in DataLoader(range(4), batch_size=2, num_workers=2, timeout=60)])
    signal.signal(signal.SIGUSR1, lambda *a: print("the rank handled SIGUSR1"))
    context = worker_context(2, world_size=2)
    pids = [fs._forkserver._forkserver_pid, rt._resource_tracker._pid]
    for pid in pids:  # at once: the server may still be importing what it preloads
        os.kill(pid, signal.SIGUSR1)
    time.sleep(1)
    print("alive", [os.waitpid(pid, os.WNOHANG) == (0, 0) for pid in pids])
    loader = DataLoader(range(4), batch_size=2, num_workers=2, multiprocessing_context=context, timeout=60)
    print("distributed", [b.tolist() for b in loader])
"""


def test_workers_start_under_slurms_signal_and_a_deep_tmpdir(tmp_path):
    """SLURM's SIGUSR1 reaches every process of a step: the workers' fork server and
    multiprocessing's resource tracker must outlive it (without tl's blocking, the tracker dies
    and warns "process died unexpectedly"). Workers return batches through UNIX sockets in
    $TMPDIR: under a folder too deep for an AF_UNIX address (job scratch folders) every worker
    failed and the DataLoader waited forever; tl moves TMPDIR to /tmp and says so."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    script = tmp_path / "signalled.py"
    script.write_text(_SIGNALLED)
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for tmp, given_up in ((None, "None"), (deep, str(deep))):
        run_env = env if tmp is None else {**env, "TMPDIR": str(tmp)}
        done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=run_env, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"given up {given_up}" in done.stdout and "alive [True, True]" in done.stdout, done.stdout
        assert "single process [[0, 1], [2, 3]]" in done.stdout and "distributed [[0, 1], [2, 3]]" in done.stdout
        assert "died unexpectedly" not in done.stderr and "AF_UNIX" not in done.stderr, done.stderr[-3000:]
    # the CLI does it first, and says so
    done = subprocess.run(
        [sys.executable, "-m", "tl_cli.cli", "--version"],
        capture_output=True,
        text=True,
        env={**env, "TMPDIR": str(deep)},
    )
    assert done.returncode == 0 and f"TMPDIR={deep} is too deep" in done.stderr, done.stderr


@pytest.mark.parametrize("rank", [0, 1])
def test_layout_errors_every_rank_meets_are_printed_by_rank_zero_alone(data, monkeypatch, rank):
    from tl_cli.cluster import distributed

    monkeypatch.setattr(distributed, "rank", lambda: rank)
    (data / "val" / "notes.txt").write_text("loose\n")
    with pytest.raises(TLError, match="holds files directly") as caught:
        _dm(data, image_size=32)
    assert getattr(caught.value, "quiet", False) == (rank == 1)  # `tl` prints an error unless quiet
