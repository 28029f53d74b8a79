"""Distributed training, run as users run it: 2 CPU processes (gloo) through Lightning's own
launcher and through torchrun, DataLoader workers on; what every rank ends with is compared.
(srun on a real cluster: tests/test_slurm_cluster.py.)"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, REPO
from tests.helpers import descendants

TINY = [
    "--model.backbone",
    "timm:test_efficientnet",
    "--model.weights",
    "none",
    "--data.image_size",
    "64",
    "--data.batch_size",
    "4",
    "--data.min_steps_per_epoch",  # one pass an epoch unless a test asks for more
    "null",
    "--trainer.accelerator",
    "cpu",
    "--trainer.log_every_n_steps",
    "1",
]
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
TL = [sys.executable, "-m", "tl_cli.cli"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC", "LOCAL_RANK", "WORLD_SIZE"))]:
        env.pop(key)
    return env


def run(args: list, timeout: float = 420, launcher: list | None = None) -> subprocess.CompletedProcess:
    """On a timeout every process under the command goes (ranks, workers, fork servers; torchrun
    starts each rank in a session of its own), not just the launcher: orphans would hold this
    machine's 2 cores through the rest of the suite, and the pipes they hold open would block
    the wait for the output. What the command printed comes with the exception."""
    command = [*(launcher or TL), *[str(a) for a in args]]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            for pid in [process.pid, *descendants(process.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            exc.stdout, exc.stderr = process.communicate(timeout=60)
            raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def compare_ranks(folder: Path) -> tuple[int, int]:
    """(tensors that differ between the ranks, backbone tensors that trained); the tensors are
    the weights, the last validation's metrics and the checkpoint callback's best score and path."""
    ends = [torch.load(folder / f"end{r}.pt", weights_only=True) for r in (0, 1)]
    start = torch.load(folder / "start0.pt", weights_only=True)
    differ = sum(not torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    trained = sum(k.startswith("backbone.") and not torch.equal(ends[0][k], start[k]) for k in start)
    return differ, trained


@pytest.fixture
def data(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    return root


def _fe(data: Path, *extra: str) -> Path:
    args = [
        "fit",
        "--config",
        CONFIGS / "feature_extract.yaml",
        *TINY,
        "--data.root",
        data,
        "--trainer.max_epochs",
        "2",
    ]
    _ok(run([*args, *extra]))
    return Path("runs/feature_extract/latest/checkpoints/best.ckpt")


def test_lightning_launcher_feature_extraction_then_fine_tuning_ranks_agree(data, tmp_path):
    """The shipped configs under `--trainer.devices 2 --trainer.strategy ddp`, a Rich progress
    bar, 2 workers per rank; fine-tuning unfreezes more stages mid-run and passes over the
    data several times an epoch (`data.min_steps_per_epoch`)."""
    rich = ["--trainer.callbacks+", "RichProgressBar"]
    save = ["--trainer.callbacks+", "tests.helpers.SaveRankState", "--trainer.callbacks.folder"]
    out = _fe(data, *DDP, "--data.num_workers", "2", *rich, *save, "fe_state")
    folders = list(Path("runs/feature_extract").glob("version_*"))
    assert len(folders) == 1 and sorted(p.name for p in (folders[0] / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]
    assert compare_ranks(Path("fe_state"))[0] == 0
    # the feature cache: one entry per split, built from both ranks' shares, no parts left
    entries = sorted(p.name for p in (Path(os.environ["TL_CACHE_DIR"]) / "features").iterdir())
    assert len(entries) == 2 and all(e.endswith(".pt") for e in entries), entries
    done = run(
        [
            "fit",
            "--config",
            CONFIGS / "finetune.yaml",
            *TINY,
            *DDP,
            "--data.root",
            data,
            "--data.num_workers",
            "2",
            "--trainer.max_epochs",
            "3",
            "--model.init_from",
            out,
            "--unfreeze.schedule",
            "{0: 1, 1: 3}",
            # 24 images over 2 ranks in batches of 4: 3 batches a pass; 7 steps -> 3 passes
            "--data.min_steps_per_epoch",
            "7",
            *rich,
            *save,
            "ft_state",
        ]
    )
    log = _ok(done)
    assert "GLOBAL_RANK: 1" in log and "epoch 1: backbone stages trainable" in log
    differ, trained = compare_ranks(Path("ft_state"))
    assert differ == 0, f"{differ} tensors differ between the ranks"  # weights and val/ metrics
    ends = torch.load("ft_state/end0.pt", weights_only=True)
    assert {"metric:val/loss", "metric:val/calibrated_loss", "metric:val/temperature", "best:score"} <= set(ends)
    assert trained > 0, "the backbone did not train"
    assert len(list(Path("runs/finetune").glob("version_*"))) == 1
    last = torch.load("runs/finetune/latest/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3 * 9, last["global_step"]  # 3 epochs x 3 passes x 3 batches


@pytest.mark.slow
def test_torchrun_fine_tuning_ranks_agree(data):
    best = _fe(data, "--data.num_workers", "0")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "tl_cli.cli",
    ]
    args = [
        "fit",
        "--config",
        CONFIGS / "finetune.yaml",
        *TINY,
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--data.root",
        data,
        "--data.num_workers",
        "2",
        "--trainer.max_epochs",
        "2",
        "--model.init_from",
        best,
        "--unfreeze.schedule",
        "{1: 2}",
        # training towards uniform probabilities: the start scores better than the end, and the
        # shipped select=last compares them image by image, summed over the ranks
        "--model.label_smoothing",
        "0.9",
        "--trainer.callbacks+",
        "tests.helpers.SaveRankState",
    ]
    log = _ok(run(args, launcher=torchrun))
    assert re.search(r"within the noise of 12 validation images|standard errors over 12 images", log), log[-3000:]
    differ, trained = compare_ranks(Path("rankstate"))
    assert differ == 0 and trained > 0  # the weights, and the verdict on best.ckpt
    assert len(list(Path("runs/finetune").glob("version_*"))) == 1
    assert (Path("runs/finetune/latest/checkpoints/last.ckpt")).is_file()


def _csv_row(folder: str) -> dict[str, float]:
    *_, row = csv.DictReader(Path(folder, "latest", "metrics.csv").open())
    return {k: float(v) for k, v in row.items() if k.startswith("val/")}


def test_test_and_validation_count_every_image_once_and_a_rank0_failure_stops_all(data):
    best = _fe(data, "--data.num_workers", "0")
    next((data / "test" / "rectangles").iterdir()).unlink()  # 11 test images: the sampler pads one
    next((data / "val" / "rectangles").iterdir()).unlink()  # 11 validation images: Lightning's would too
    # validation on 2 ranks (2 workers each) gives what one process gives: no image counted twice
    validate = ["validate", "--ckpt_path", best, "--data.root", data, "--data.num_workers", "2"]
    _ok(run([*validate, "--trainer.accelerator", "cpu", "-o", "v1"]))
    _ok(run([*validate, *DDP, "--trainer.accelerator", "cpu", "-o", "v2"]))
    one, two = _csv_row("v1"), _csv_row("v2")
    assert set(one) >= {"val/loss", "val/acc", "val/calibrated_loss", "val/balanced_acc"} and set(one) == set(two)
    assert all(two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6) for k in one), (one, two)
    assert round(one["val/acc"] * 11) == pytest.approx(one["val/acc"] * 11, abs=1e-4)  # k of 11, not of 12
    _ok(
        run(
            [
                "test",
                "--ckpt_path",
                best,
                "--data.root",
                data,
                "--data.num_workers",
                "0",
                *DDP[:2],
                *DDP[2:],
                "--trainer.accelerator",
                "cpu",
                "-o",
                "t",
            ]
        )
    )
    metrics = json.loads(Path("t/latest/metrics.json").read_text())
    assert metrics["n_samples"] == 11 and sum(map(sum, metrics["confusion_matrix"])) == 11
    rows = Path("t/latest/predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == 11 and len({r.split(",")[0] for r in rows}) == 11
    # select=last: the start and the end of the schedule compared image by image, the sums over
    # both ranks' uneven shares (6 + 5); label smoothing 0.9 trains towards uniform probabilities,
    # so the start scores better at the end and the per-image comparison runs
    fit = ["fit", "--config", CONFIGS / "finetune.yaml", *TINY, *DDP, "--data.root", data, "--data.num_workers", "2"]
    fit += ["--model.init_from", best, "--trainer.max_epochs", "1", "--checkpoint.select", "last"]
    log = _ok(run([*fit, "--early_stopping", "null", "--model.label_smoothing", "0.9", "-o", "paired"]))
    assert "GLOBAL_RANK: 1" in log
    assert re.search(r"within the noise of 11 validation images|standard errors over 11 images", log), log[-3000:]
    # a broken image: every rank stops before training, the paragraph printed once, no hang
    bad = next((data / "train" / "ellipses").iterdir())
    bad.write_bytes(bad.read_bytes()[:150])
    done = run(
        ["fit", "--config", CONFIGS / "finetune.yaml", *TINY, *DDP, "--data.root", data, "--model.init_from", best],
        timeout=300,
    )
    assert done.returncode != 0
    assert done.stderr.count(f"{bad.name}: corrupt or truncated") == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_collective_at_epoch_end_no_longer_mismatches_the_progress_bar(data):
    """Lightning issue 21264's trap, sprung on purpose: tl's trainer syncs the epoch metrics on
    every rank first, so a collective in any epoch-end hook pairs up."""
    args = ["--trainer.callbacks+", "RichProgressBar", "--trainer.callbacks+", "tests.helpers.CollectiveAtEpochEnd"]
    _fe(data, *DDP, "--data.num_workers", "0", *args)


@pytest.mark.slow
def test_many_runs_at_once_into_one_folder(data):
    """A job array or a shell loop: 4 `tl fit` started together, each its own run folder."""
    args = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", data, "--data.num_workers", "0"]
    args += ["--trainer.max_epochs", "1"]
    procs = [
        subprocess.Popen(
            [*TL, *map(str, args)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-1500:] for o in outs)
    folders = sorted(p.name for p in Path("runs/feature_extract").glob("version_*"))
    assert folders == ["version_0", "version_1", "version_2", "version_3"]
    for f in folders:
        assert (Path("runs/feature_extract") / f / "config.yaml").is_file()
        assert (Path("runs/feature_extract") / f / "checkpoints" / "best.ckpt").is_file()
    latest = Path("runs/feature_extract/latest").resolve()
    assert latest.name in folders and (latest / "curves.svg").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("at", [(1, 1), (1, 2)])
def test_two_process_preemption_resumes_like_an_uninterrupted_run(data, at):
    """Both ranks (and their workers) get SIGUSR1 mid-epoch / in an epoch's last batch; the
    job resumed from hpc_ckpt ends with the uninterrupted job's weights and step count. With
    MixUp/CutMix on (drawn from each rank's generator, restored on resume)."""
    args = ["fit", "--config", CONFIGS / "finetune.yaml", *TINY, *DDP, "--data.root", data, "--data.num_workers", "2"]
    args += ["--data.augment", "flip", "--unfreeze.schedule", "{1: 2}", "--trainer.max_epochs", "3"]
    args += ["--model.mixup_alpha", "0.2", "--model.cutmix_alpha", "1.0"]
    _ok(run([*args, "-o", "straight"]))
    signal = ["--trainer.callbacks+", "tests.helpers.SignalSelf", "--trainer.callbacks.epoch", str(at[0])]
    log = _ok(run([*args, "-o", "pre", *signal, "--trainer.callbacks.batch", str(at[1])]))
    # the workers' fork server and multiprocessing's resource tracker were signalled too, and lived
    assert "died unexpectedly" not in log and "SIGUSR1" not in log, log[-3000:]
    assert list(Path("pre").glob("hpc_ckpt_*.ckpt")) and not Path("pre/latest").exists()  # not complete
    os.environ["TL_TEST_RESUMED"] = "1"
    try:
        _ok(run([*args, "-o", "pre", "--ckpt_path", "hpc"]))
    finally:
        del os.environ["TL_TEST_RESUMED"]
    a = torch.load("straight/latest/checkpoints/last.ckpt", weights_only=True)
    b = torch.load("pre/latest/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 9
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
