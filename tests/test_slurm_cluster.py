"""Real SLURM jobs on the one-node cluster `scripts/slurm-local.sh start` runs (CI starts it)."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    CONFIGS,
    REPO,
    TINY,
    assert_cached_as_decoded,
    compare_ranks,
    fit_tiny,
    large_photos,
    tl,
)

pytestmark = [pytest.mark.slow]
pytestmark.append(
    pytest.mark.skipif(
        shutil.which("sbatch") is None
        or subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode != 0,
        reason="no SLURM cluster here: run scripts/slurm-local.sh start (CI does)",
    )
)


def _wait(job: str, timeout: float = 400) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        state = re.search(r"JobState=(\w+)", shown)
        if state and state.group(1) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state.group(1)
        time.sleep(0.5)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout} s")


@pytest.fixture(autouse=True)
def importable_helpers(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # jobs load tests.helpers callbacks


def _submit(capsys, job_name: str, devices: int, *fit_args, config: str = "feature_extract.yaml") -> str:
    """`tl slurm --cpu` for TINY `tl fit` on the local cluster; returns the job id."""
    venv = Path(sys.executable).parent.parent
    args = [
        "slurm",
        "--config",
        CONFIGS / config,
        "--cpu",
        "--devices",
        str(devices),
        "--partition",
        "debug",
        "--cpus-per-task",
        str(2 // devices),
        "--mem",
        "3G",
        "--time",
        "00:10:00",
        "--job-name",
        job_name,
        "--venv",
        venv,
        "--",
        *TINY,
        *fit_args,
    ]
    assert tl(*args) == 0
    return re.search(r"Submitted batch job (\d+)", capsys.readouterr().out).group(1)


def test_two_task_ddp_fine_tuning_job_ranks_agree(tiny_data, capsys):
    """The shipped fine-tuning config as a 2-task srun job (callbacks, progress output and all),
    DataLoader workers on, more stages unfrozen mid-run: the ranks end bit-identical."""
    best = fit_tiny(tiny_data, 2)
    job = _submit(
        capsys,
        "tl-test-ddp",
        2,
        "--data.root",
        tiny_data,
        "--data.num_workers",
        "2",
        "--trainer.max_epochs",
        "3",
        "--model.init_from",
        best,
        "--unfreeze.schedule",
        "{0: 1, 1: 3}",
        # training towards uniform probabilities: the start scores better than the end, and the
        # shipped select=last compares them image by image, summed over the two tasks
        "--model.label_smoothing",
        "0.9",
        "--trainer.callbacks+",
        "tests.helpers.SaveRankState",
        config="finetune.yaml",
    )
    state = _wait(job)
    log = Path(f"slurm-tl-test-ddp-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "max_epochs=3` reached" in log
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # two DDP processes really ran
    assert "tl: epoch 1/3 done in" in log  # plain progress lines in the batch log
    assert re.search(r"within the noise of 12 validation images|standard errors over 12 images", log), log[-3000:]
    differ, trained = compare_ranks(Path("rankstate"))
    assert differ == 0 and trained > 0  # the weights, and the verdict on best.ckpt
    versions = list(Path("runs/finetune").glob("version_*"))
    assert len(versions) == 1, versions
    ckpts = sorted(p.name for p in (versions[0] / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["best.ckpt", "last.ckpt"]  # one set, written by rank 0
    assert torch.load(versions[0] / "checkpoints" / "best.ckpt", weights_only=True)["tl"]["class_names"] == [
        "ellipses",
        "rectangles",
    ]


def test_two_task_job_caches_large_photos_as_the_uncached_loader_decodes_them(tmp_path, capsys):
    """Photographs large enough to decode at a reduced scale, a 2-task srun job with 2 workers a
    task: the decoded-image cache holds, image by image, the uncached loader's pixels; the ranks
    end identical."""
    photos = large_photos(tmp_path / "photos")
    job = _submit(
        capsys,
        "tl-test-photos",
        2,
        *("--data.root", photos, "--data.num_workers", "2", "--trainer.max_epochs", "1"),
        *("--data.cache_features", "false", "--data.cache_images", "true"),
        *("--trainer.callbacks+", "tests.helpers.SaveRankState"),
    )
    state = _wait(job)
    log = Path(f"slurm-tl-test-photos-{job}.out").read_text()
    assert state == "COMPLETED" and "GLOBAL_RANK: 1, MEMBER: 2/2" in log, log[-3000:]
    assert compare_ranks(Path("rankstate"))[0] == 0
    best = torch.load("runs/feature_extract/latest/checkpoints/best.ckpt", weights_only=False)
    drafted = assert_cached_as_decoded(tmp_path / "tl_cache", photos, best["tl"]["preprocessing"])
    assert drafted >= 12, drafted


EPOCHS = 8  # the preemption lands after epoch 3: 5 epochs (several seconds) still to run


def _preemptable(capsys, data, root_dir: str, job_name: str, tasks: int) -> str:
    return _submit(
        capsys,
        job_name,
        tasks,
        "--data.root",
        data,
        "--data.augment",
        "flip",
        "--data.num_workers",
        "2",
        "--trainer.max_epochs",
        str(EPOCHS),
        "--unfreeze.schedule",
        "{3: 2}",
        # every epoch must run (the CSV check below); on tiny data val/acc reaches 1.0 at once and
        # the shipped early stopping (val/acc, patience 5) would end both runs near epoch 5
        "--early_stopping",
        "null",
        "--trainer.default_root_dir",
        root_dir,
        config="finetune.yaml",
    )


def _state(job: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\w+)", shown)
    return match.group(1) if match else "?"


def test_preempted_job_requeues_and_ends_like_an_uninterrupted_one(tiny_data, capsys):
    """SIGUSR1 to every process of the step (workers too), mid-run, in a 2-task DDP job. A
    single-task job preempted and requeued: tests/test_sweep.py (a real job array)."""
    tasks = 2
    straight = _preemptable(capsys, tiny_data, "runs/straight", "tl-test-straight", tasks)
    assert _wait(straight) == "COMPLETED", Path(f"slurm-tl-test-straight-{straight}.out").read_text()[-3000:]

    job = _preemptable(capsys, tiny_data, "runs/preempted", "tl-test-preempt", tasks)
    log = Path(f"slurm-tl-test-preempt-{job}.out")
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and f"epoch 3/{EPOCHS} done" in log.read_text()):
        time.sleep(0.1)  # wait until a few epochs are done (plain progress lines): then it is mid-run
    assert _state(job) == "RUNNING", "the job ended before it could be preempted"
    # USR1 to the job's steps (not --full: that would hit the batch shell too)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    deadline = time.time() + 120
    while time.time() < deadline and _state(job) not in ("PENDING", "REQUEUED", "COMPLETED"):
        time.sleep(0.5)
    assert list(Path("runs/preempted").glob("hpc_ckpt_*.ckpt")), "no checkpoint at the preemption"
    # SLURM holds a requeued job back for a while; let it start now
    for _ in range(30):
        if _state(job) in ("RUNNING", "COMPLETED"):
            break
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        time.sleep(2)
    assert _wait(job) == "COMPLETED", Path(f"slurm-tl-test-preempt-{job}.out").read_text()[-3000:]
    restarts = re.search(
        r"Restarts=(\d+)", subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    )
    assert restarts and int(restarts.group(1)) >= 1
    text = Path(f"slurm-tl-test-preempt-{job}.out").read_text()
    assert "tl: preemption signal: training state saved" in text and "Restored all states from the checkpoint" in text
    assert "User defined signal" not in text  # no process (worker or rank) died of the signal
    # requeueing SIGTERMs the step: the ranks end on their own, not SIGKILLed after KillWait
    # (inside the fit, Lightning's SIGTERM handler broadcasts, and the ranks hung there)
    assert not re.search(r"tasks? [\d-]+: Killed", text), text[-3000:]
    assert "died unexpectedly" not in text  # nor the workers' fork server or resource tracker

    a = torch.load("runs/straight/latest/checkpoints/last.ckpt", weights_only=True)
    b = torch.load("runs/preempted/latest/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
    # the requeued job continued the same run folder: one version, one config.yaml, and the
    # CSV log holds every epoch, before and after the preemption
    assert [p.name for p in Path("runs/preempted").glob("version_*")] == ["version_0"]
    assert Path("runs/preempted/latest").resolve().name == "version_0"
    with open("runs/preempted/version_0/metrics.csv") as fh:
        epochs = {int(float(r["epoch"])) for r in csv.DictReader(fh) if r.get("epoch")}
    assert epochs == set(range(EPOCHS))
