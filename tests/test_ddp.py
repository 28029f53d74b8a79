"""Distributed training, run as users run it: 2 CPU processes (gloo) through Lightning's own
launcher and through torchrun, DataLoader workers on; what every rank ends with is compared.
(srun on a real cluster: tests/test_slurm_cluster.py.)"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    CONFIGS,
    TINY_DDP,
    TL,
    assert_cached_as_decoded,
    compare_ranks,
    large_photos,
    ok,
    run_tl,
    subprocess_env,
    tl,
)

DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]


def _fe(data: Path, *extra: str) -> tuple[Path, str]:
    """Feature extraction, 2 epochs: its best.ckpt and what it printed."""
    args = [
        "fit",
        "--config",
        CONFIGS / "feature_extract.yaml",
        *TINY_DDP,
        "--data.root",
        data,
        "--trainer.max_epochs",
        "2",
    ]
    log = ok(run_tl([*args, *extra]))
    return Path("runs/feature_extract/latest/checkpoints/best.ckpt"), log


@pytest.mark.slow
def test_lightning_launcher_feature_extraction_then_fine_tuning_ranks_agree(data, tmp_path):
    """The shipped configs under `--trainer.devices 2 --trainer.strategy ddp`, a Rich progress
    bar, 2 workers per rank; fine-tuning unfreezes more stages mid-run and passes over the
    data several times an epoch (`data.min_steps_per_epoch`)."""
    rich = ["--trainer.callbacks+", "RichProgressBar"]
    save = ["--trainer.callbacks+", "tests.helpers.SaveRankState", "--trainer.callbacks.folder"]
    # a bad file skipped, auto class weights counted after the first pass, a leaked test image:
    # each said once (rank 0), and nothing of it lets the ranks diverge
    broken = data / "train" / "ellipses" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a whole jpeg")
    leaked = data / "test" / "ellipses" / "copy.jpg"
    leaked.write_bytes(next((data / "train" / "rectangles").glob("*.jpg")).read_bytes())
    skip = ["--data.on_bad_image", "skip"]
    fe = [*DDP, "--data.num_workers", "2", *rich, *save, "fe_state", *skip, "--model.class_weights", "auto"]
    out, log = _fe(data, *fe)
    assert log.count(f"warning: skipping {broken}") == 1 and log.count("tl: class weights (auto): ") == 1
    assert log.count("byte-identical copies of training images") == 1 and f"  {leaked} = " in log
    folders = list(Path("runs/feature_extract").glob("version_*"))
    assert len(folders) == 1 and sorted(p.name for p in (folders[0] / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]
    assert compare_ranks(Path("fe_state"))[0] == 0
    # the feature cache: one entry per split, built from both ranks' shares, no parts left
    entries = sorted(p.name for p in (Path(os.environ["TL_CACHE_DIR"]) / "features").iterdir())
    assert len(entries) == 2 and all(e.endswith(".pt") for e in entries), entries
    done = run_tl(
        [
            "fit",
            "--config",
            CONFIGS / "finetune.yaml",
            *TINY_DDP,
            *DDP,
            "--data.root",
            data,
            "--data.num_workers",
            "2",
            "--trainer.max_epochs",
            "2",
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
            *skip,
            *("--model.class_weights", "auto"),
        ]
    )
    log = ok(done)
    assert "GLOBAL_RANK: 1" in log and "epoch 1: backbone stages trainable" in log
    assert log.count("tl: class weights (auto): ") == 1  # fine-tuning counts them too, once
    differ, trained = compare_ranks(Path("ft_state"))
    assert differ == 0, f"{differ} tensors differ between the ranks"  # weights and val/ metrics
    ends = torch.load("ft_state/end0.pt", weights_only=True)
    assert {"metric:val/loss", "metric:val/calibrated_loss", "metric:val/temperature", "best:score"} <= set(ends)
    assert trained > 0, "the backbone did not train"
    assert len(list(Path("runs/finetune").glob("version_*"))) == 1
    last = torch.load("runs/finetune/latest/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2 * 9, last["global_step"]  # 2 epochs x 3 passes x 3 batches


@pytest.mark.slow
def test_lightning_launcher_caches_large_photos_as_the_uncached_loader_decodes_them(tmp_path):
    """Photographs large enough to decode at a reduced scale, 2 ranks with 2 workers each: the
    decoded-image cache the ranks build from their shares holds, image by image, the pixels the
    uncached loader (one process) decodes; the ranks end identical."""
    photos = large_photos(tmp_path / "photos")
    args = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY_DDP, *DDP, "--data.root", photos]
    args += ["--data.num_workers", "2", "--data.cache_features", "false", "--data.cache_images", "true"]
    ok(run_tl([*args, "--trainer.max_epochs", "1", "--trainer.callbacks+", "tests.helpers.SaveRankState"]))
    assert compare_ranks(Path("rankstate"))[0] == 0
    best = torch.load("runs/feature_extract/latest/checkpoints/best.ckpt", weights_only=False)
    drafted = assert_cached_as_decoded(Path(os.environ["TL_CACHE_DIR"]), photos, best["tl"]["preprocessing"])
    assert drafted >= 12, drafted  # most decoded smaller: the road under test was taken


@pytest.mark.slow
def test_torchrun_fine_tuning_ranks_agree(data):
    best, _ = _fe(data, "--data.num_workers", "0")
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
        *TINY_DDP,
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
        "--model.warmup_epochs",
        "0",
        "--trainer.callbacks+",
        "tests.helpers.SaveRankState",
    ]
    log = ok(run_tl(args, launcher=torchrun))
    assert re.search(r"within the noise of 12 validation images|standard errors over 12 images", log), log[-3000:]
    differ, trained = compare_ranks(Path("rankstate"))
    assert differ == 0 and trained > 0  # the weights, and the verdict on best.ckpt
    assert len(list(Path("runs/finetune").glob("version_*"))) == 1
    assert (Path("runs/finetune/latest/checkpoints/last.ckpt")).is_file()


def _csv_row(folder: str) -> dict[str, float]:
    *_, row = csv.DictReader(Path(folder, "latest", "metrics.csv").open())
    return {k: float(v) for k, v in row.items() if k.startswith("val/")}


@pytest.mark.slow
def test_test_and_validation_count_every_image_once_and_a_rank0_failure_stops_all(data):
    # the checkpoint and the one-process reference run in this process (no start-up to pay)
    fe = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY_DDP, "--data.root", data]
    assert tl(*fe, "--trainer.max_epochs", "2", "--data.num_workers", "0") == 0
    best = Path("runs/feature_extract/latest/checkpoints/best.ckpt")
    next((data / "test" / "rectangles").iterdir()).unlink()  # 11 test images: the sampler pads one
    next((data / "val" / "rectangles").iterdir()).unlink()  # 11 validation images: Lightning's would too
    # validation on 2 ranks (2 workers each) gives what one process gives: no image counted twice
    validate = ["validate", "--ckpt_path", best, "--data.root", data, "--data.num_workers", "2"]
    assert tl(*validate, "--trainer.accelerator", "cpu", "-o", "v1") == 0
    ok(run_tl([*validate, *DDP, "--trainer.accelerator", "cpu", "-o", "v2"]))
    one, two = _csv_row("v1"), _csv_row("v2")
    assert set(one) >= {"val/loss", "val/acc", "val/calibrated_loss", "val/balanced_acc"} and set(one) == set(two)
    assert all(two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6) for k in one), (one, two)
    assert round(one["val/acc"] * 11) == pytest.approx(one["val/acc"] * 11, abs=1e-4)  # k of 11, not of 12
    ok(
        run_tl(
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
    fit = [
        "fit",
        "--config",
        CONFIGS / "finetune.yaml",
        *TINY_DDP,
        *DDP,
        "--data.root",
        data,
        "--data.num_workers",
        "2",
    ]
    fit += ["--model.init_from", best, "--trainer.max_epochs", "1", "--checkpoint.select", "last"]
    fit += ["--model.warmup_epochs", "0", "--model.lr", "0.05"]  # far from the start in 3 steps
    log = ok(run_tl([*fit, "--early_stopping", "null", "--model.label_smoothing", "0.9", "-o", "paired"]))
    assert "GLOBAL_RANK: 1" in log
    assert re.search(r"within the noise of 11 validation images|standard errors over 11 images", log), log[-3000:]
    # a broken image: every rank stops before training, the paragraph printed once, no hang
    bad = next((data / "train" / "ellipses").iterdir())
    bad.write_bytes(bad.read_bytes()[:150])
    done = run_tl(
        ["fit", "--config", CONFIGS / "finetune.yaml", *TINY_DDP, *DDP, "--data.root", data, "--model.init_from", best],
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
    args = [
        "fit",
        "--config",
        CONFIGS / "feature_extract.yaml",
        *TINY_DDP,
        "--data.root",
        data,
        "--data.num_workers",
        "0",
    ]
    args += ["--trainer.max_epochs", "1"]
    procs = [
        subprocess.Popen(
            [*TL, *map(str, args)], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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
def test_two_process_preemption_in_an_epochs_last_batch_resumes_like_an_uninterrupted_run(data):
    """Both ranks (and their workers) get SIGUSR1 in an epoch's last batch; the job resumed from
    hpc_ckpt ends with the uninterrupted job's weights and step count. With MixUp/CutMix on
    (drawn from each rank's generator, restored on resume). A preemption mid-epoch on two
    ranks: tests/test_multinode.py and tests/test_slurm_cluster.py (under SLURM)."""
    args = [
        "fit",
        "--config",
        CONFIGS / "finetune.yaml",
        *TINY_DDP,
        *DDP,
        "--data.root",
        data,
        "--data.num_workers",
        "2",
    ]
    args += ["--data.augment", "flip", "--unfreeze.schedule", "{1: 2}", "--trainer.max_epochs", "3"]
    args += ["--model.mixup_alpha", "0.2", "--model.cutmix_alpha", "1.0"]
    ok(run_tl([*args, "-o", "straight"]))
    signal = ["--trainer.callbacks+", "tests.helpers.SignalSelf", "--trainer.callbacks.epoch", "1"]
    log = ok(run_tl([*args, "-o", "pre", *signal, "--trainer.callbacks.batch", "2"]))  # of batches 0-2
    # the workers' fork server and multiprocessing's resource tracker were signalled too, and lived
    assert "died unexpectedly" not in log and "SIGUSR1" not in log, log[-3000:]
    assert list(Path("pre").glob("hpc_ckpt_*.ckpt")) and not Path("pre/latest").exists()  # not complete
    os.environ["TL_TEST_RESUMED"] = "1"
    try:
        ok(run_tl([*args, "-o", "pre", "--ckpt_path", "hpc"]))
    finally:
        del os.environ["TL_TEST_RESUMED"]
    a = torch.load("straight/latest/checkpoints/last.ckpt", weights_only=True)
    b = torch.load("pre/latest/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 9
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
