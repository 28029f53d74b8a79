"""Real SLURM jobs on the one-node cluster `scripts/slurm-local.sh start` runs (CI starts it)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, TINY, tl

pytestmark = pytest.mark.skipif(
    shutil.which("sbatch") is None or subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode != 0,
    reason="no SLURM cluster here: run scripts/slurm-local.sh start (CI does)",
)


def _wait(job: str, timeout: float = 400) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        state = re.search(r"JobState=(\w+)", shown)
        if state and state.group(1) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state.group(1)
        time.sleep(2)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout} s")


def test_two_process_cpu_ddp_job_completes_with_one_set_of_checkpoints(tiny_data, capsys):
    venv = Path(sys.executable).parent.parent
    args = [
        "slurm",
        "--config",
        CONFIGS / "feature_extract.yaml",
        "--cpu",
        "--devices",
        "2",
        "--partition",
        "debug",
        "--cpus-per-task",
        "1",
        "--mem",
        "3G",
        "--time",
        "00:10:00",
        "--job-name",
        "tl-test-ddp",
        "--venv",
        venv,
        "--",
        *TINY,
        "--data.root",
        tiny_data,
        "--trainer.max_epochs",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks",
        "[]",
        "--trainer.enable_checkpointing",
        "true",
    ]
    # TINY's accelerator cpu comes after tl slurm's own --trainer.accelerator cpu: same value
    assert tl(*args) == 0
    job = re.search(r"Submitted batch job (\d+)", capsys.readouterr().out).group(1)
    state = _wait(job)
    log = Path(f"slurm-tl-test-ddp-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # two DDP processes really ran
    versions = list(Path("runs/feature_extract").glob("version_*"))
    assert len(versions) == 1, versions
    ckpts = list((versions[0] / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 1, ckpts  # rank 0 alone wrote the checkpoint
    assert torch.load(ckpts[0], weights_only=True)["tl"]["class_names"] == ["ellipses", "rectangles"]
