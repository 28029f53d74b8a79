"""What the tests share besides fixtures: the tiny config, one way to run a fit (through the CLI
in this process, or on the Python API), the runner for multi-process commands, and callbacks
the multi-process tests load by class path (``--trainer.callbacks+ tests.helpers.X``)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from typing_extensions import override

from tl_cli.cli.main import main
from tl_cli.data.module import ImageFolderData

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# A real config, shrunk: timm's tiny test model with random weights, 64 px, batches of 8, no
# workers, one pass over the data an epoch (finetune.yaml asks for at least 30 steps an epoch).
TINY = [
    "--model.backbone",
    "timm:test_efficientnet",
    "--model.weights",
    "none",
    "--data.image_size",
    "64",
    "--data.batch_size",
    "8",
    "--data.num_workers",
    "0",
    "--data.min_steps_per_epoch",
    "null",
    "--trainer.accelerator",
    "cpu",
    "--trainer.log_every_n_steps",
    "1",
]
# TINY on 2 ranks: batches of 4 (the 24 training images make 3 batches a rank a pass, which the
# step counts of the multi-process tests assume), and the shipped configs' DataLoader workers
# (min(8, CPU cores)) unless a test sets them.
TINY_DDP = [*TINY, "--data.batch_size", "4", "--data.num_workers", "null"]

# Preprocessing as a checkpoint records it, for the tests of the image pipeline.
PREP = {"image_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic", "crop_pct": 0.875}


# --------------------------------------------------------------------------- large photographs


def photo(path: Path, w: int, h: int, orientation: int | None = None, mode: str = "RGB", **save: object) -> Path:
    """A smooth picture (gradients, a disc) with a little noise, as a JPEG (or as `path` says)."""
    rng = np.random.default_rng(w * 7 + h)
    y, x = np.mgrid[0:h, 0:w]
    disc = ((x - w / 3) ** 2 + (y - h / 2) ** 2 < (min(w, h) / 4) ** 2) * 90
    rgb = np.stack([x * 200 / w + disc, y * 200 / h, (x + y) * 120 / (w + h) + disc], axis=-1)
    pixels = np.clip(rgb + rng.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    if orientation is not None:
        exif = img.getexif()
        exif[0x0112] = orientation
        save["exif"] = exif
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **({"quality": 90} if path.suffix == ".jpg" else {}), **save)
    return path


# (size, photo() keywords, file suffix): with TINY's 64 px (an eval resize of about 73 px) the
# first six decode at 1/2 or 1/4 scale, the last two in full (too small; not a JPEG)
_PHOTOS = [
    ((640, 480), {}, ".jpg"),
    ((1200, 900), {}, ".jpg"),
    ((480, 640), {"orientation": 6}, ".jpg"),
    ((600, 450), {"progressive": True}, ".jpg"),
    ((800, 600), {"mode": "L"}, ".jpg"),
    ((700, 525), {"orientation": 3}, ".jpg"),
    ((150, 120), {}, ".jpg"),
    ((640, 480), {}, ".png"),
]


def large_photos(root: Path) -> Path:
    """2 classes x (8 train, 3 val, 2 test) photographs of the sizes above, as a camera folder
    holds them: most large enough to decode at a reduced scale."""
    for c, name in enumerate(("a", "b")):
        for split, n in (("train", 8), ("val", 3), ("test", 2)):
            for i in range(n):
                (w, h), keywords, suffix = _PHOTOS[(i + 3 * c + (split != "train")) % len(_PHOTOS)]
                # each file its own pixels: a size nudged by its index, most not whole multiples
                # of the decode's scale
                photo(root / split / name / f"{i}{suffix}", w + 7 * c + 13 * i, h + 3 * c + i, **keywords)
    return root


def assert_cached_as_decoded(cache_dir: Path, root: Path, preprocessing: dict) -> int:
    """Every decoded-image cache entry in `cache_dir` (one per split, told apart by their sizes)
    holds, image by image, the uncached loader's pixels (`decode_resized`) for the files of
    `root`; returns how many of them decoded at a reduced scale."""
    from tl_cli.data.folders import labelled_samples
    from tl_cli.data.images import load_rgb
    from tl_cli.data.transforms import decode_resized, resize_side

    classes = sorted(p.name for p in (root / "train").iterdir())
    splits = {s: [p for p, _ in labelled_samples(root / s, classes, "train")] for s in ("train", "val", "test")}
    entries = sorted((cache_dir / "images").glob("*.json"))
    assert entries, f"no decoded-image cache in {cache_dir}"
    drafted = 0
    for index_path in entries:
        index = json.loads(index_path.read_text())
        data = np.fromfile(index_path.with_suffix(".u8"), dtype=np.uint8)
        assert data.size == index["total"], index_path
        paths = [s for s in splits.values() if len(s) == len(index["shapes"])]
        assert len(paths) == 1, f"{index_path}: {len(index['shapes'])} images, no split of that size"
        for path, offset, shape in zip(paths[0], index["offsets"], index["shapes"], strict=True):
            cached = data[offset : offset + int(np.prod(shape))].reshape(shape)
            expected = decode_resized(path, preprocessing).permute(1, 2, 0).numpy()
            assert np.array_equal(np.broadcast_to(cached, expected.shape), expected), path
            drafted += load_rgb(path, shrink_to=resize_side(preprocessing)).size != load_rgb(path).size
    return drafted


# --------------------------------------------------------------------------- one process


def tl(*args: str) -> int:
    """Run ``tl ARGS`` in this process and return its exit status."""
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:  # argparse / jsonargparse exit on --help and on parse errors
        return int(exc.code or 0)


def fit_tiny(data_root, epochs: int = 1, config: str = "feature_extract.yaml", *extra) -> Path:
    """`tl fit` with a shipped config shrunk to TINY; returns the run's best.ckpt."""
    assert (
        tl(
            "fit",
            "--config",
            CONFIGS / config,
            *TINY,
            "--data.root",
            data_root,
            "--trainer.max_epochs",
            str(epochs),
            *extra,
        )
        == 0
    )
    return Path("runs") / Path(config).stem / "latest" / "checkpoints" / "best.ckpt"


def tiny_datamodule(root, **kwargs) -> ImageFolderData:
    """The data as TINY serves it (64 px, batches of 8, no workers) unless `kwargs` say otherwise."""
    return ImageFolderData(root=str(root), **{"batch_size": 8, "num_workers": 0, "image_size": 64, **kwargs})


def quiet_trainer(epochs: int, root=None, trainer: type[pl.Trainer] = pl.Trainer, **kwargs) -> pl.Trainer:
    """A CPU trainer that prints and logs nothing, its files under `root` (default: here).

    Args:
        trainer: the class, ``pl.Trainer`` or tl's ``TLTrainer`` (preemption, resume from "hpc").
    """
    return trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root or Path.cwd()),
        **kwargs,
    )


def fit_model(model: pl.LightningModule, data, epochs: int = 1, ckpt_path=None, **trainer_kwargs) -> pl.Trainer:
    """Fit `model` on the DataModule `data` with a `quiet_trainer`; returns the trainer."""
    trainer = quiet_trainer(epochs, **trainer_kwargs)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


def csv_rows(path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header (predictions.csv, metrics.csv), as dicts."""
    with open(path) as fh:
        return list(csv.DictReader(fh))


def predict_folder(tiny_data: Path, tmp_path: Path) -> Path:
    """The tiny test split with a broken JPEG and a text file among the images."""
    import shutil

    folder = tmp_path / "incoming"
    shutil.copytree(tiny_data / "test", folder)
    (folder / "ellipses" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "README.txt").write_text("photos from the field trip")
    return folder


# --------------------------------------------------------------------------- several processes

TL = [sys.executable, "-m", "tl_cli.cli"]


def subprocess_env() -> dict[str, str]:
    """This environment for a child `tl`: the repository importable, no launcher's variables."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC", "LOCAL_RANK", "WORLD_SIZE"))]:
        env.pop(key)
    return env


def run_tl(args: list, timeout: float = 420, launcher: list | None = None) -> subprocess.CompletedProcess:
    """`tl ARGS` in child processes (under `launcher`, e.g. torchrun). On a timeout every process
    under the command goes (ranks, workers, fork servers; torchrun starts each rank in a session
    of its own), not just the launcher: orphans would hold this machine's cores through the rest
    of the suite, and the pipes they hold open would block the wait for the output. What the
    command printed comes with the exception."""
    command = [*(launcher or TL), *[str(a) for a in args]]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env()
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            for pid in [process.pid, *descendants(process.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            exc.stdout, exc.stderr = process.communicate(timeout=60)
            raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def ok(done: subprocess.CompletedProcess) -> str:
    """Assert the command succeeded; returns what it printed (stdout, then stderr)."""
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def compare_ranks(folder: Path) -> tuple[int, int]:
    """(tensors that differ between the ranks, backbone tensors that trained) from what
    `SaveRankState` saved in `folder`: the weights, the last validation's metrics and the
    checkpoint callback's best score and path."""
    ends = [torch.load(folder / f"end{r}.pt", weights_only=True) for r in (0, 1)]
    start = torch.load(folder / "start0.pt", weights_only=True)
    differ = sum(not torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    trained = sum(k.startswith("backbone.") and not torch.equal(ends[0][k], start[k]) for k in start)
    return differ, trained


def descendants(pid: int) -> list[int]:
    """Every process under `pid`, parents before children (from /proc: no psutil needed)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the task ended meanwhile
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


# --------------------------------------------------------------------------- callbacks


def _state(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class SaveRankState(pl.Callback):
    """Every rank saves the model it starts and ends training with, to compare the ranks, and
    with the end the last validation's metrics (as ``metric:val/...``) and what its checkpoint
    callback holds as best when the fit is over (``best:score``, ``best:path``)."""

    def __init__(self, folder: str = "rankstate") -> None:
        self.folder = folder

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        os.makedirs(self.folder, exist_ok=True)
        torch.save(_state(pl_module), f"{self.folder}/start{trainer.global_rank}.pt")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {
            f"metric:{k}": torch.as_tensor(v).detach().cpu().clone() for k, v in trainer.callback_metrics.items()
        }
        ends = {**_state(pl_module), **{k: v for k, v in metrics.items() if k.startswith("metric:val/")}}
        torch.save(ends, f"{self.folder}/end{trainer.global_rank}.pt")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the module's on_train_end, where the start may have taken best.ckpt: what each
        # rank's checkpoint callback holds as best (score and path), to compare the ranks' verdicts
        callback = trainer.checkpoint_callback
        if callback is None:
            return
        path = f"{self.folder}/end{trainer.global_rank}.pt"
        if not os.path.exists(path):  # the fit stopped before training ended (a preemption)
            return
        ends = torch.load(path, weights_only=True)
        score = callback.best_model_score
        ends["best:score"] = torch.tensor(-1.0 if score is None else float(score), dtype=torch.float64)
        ends["best:path"] = torch.tensor(list(str(callback.best_model_path).encode()), dtype=torch.uint8)
        torch.save(ends, path)


class CollectiveAtEpochEnd(pl.Callback):
    """A collective on the default process group at every train epoch end, without reading
    metrics first (as tl's preemption check once did): with a progress bar that syncs metrics
    on rank 0 alone (Lightning issue 21264), the ranks' collectives no longer pair up."""

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.reduce_boolean_decision(False, all=False)


class SignalSelf(pl.Callback):
    """Each rank sends itself and every process under it (DataLoader workers, their fork
    server, multiprocessing's resource tracker) SIGUSR1 at a given batch, as SLURM signals every
    process of a job step."""

    def __init__(self, epoch: int = 1, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch) or os.environ.get("TL_TEST_RESUMED"):
            return
        for pid in descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
