"""`tl slurm` renders batch scripts whose process counts always match the Trainer's."""

from __future__ import annotations

import os
import stat
import subprocess

from tests.conftest import CONFIGS, REPO, tl


def test_dry_run_matches_tasks_to_devices_and_nodes(capsys):
    args = [
        "slurm",
        "--config",
        CONFIGS / "finetune.yaml",
        "--partition",
        "gpu",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
    ]
    assert (
        tl(
            *args,
            "--account",
            "abc123",
            "--cluster",
            "expanse",
            "--no-check",
            "--dry-run",
            "--",
            "--data.root",
            "/data/cats",
        )
        == 0
    )
    script = capsys.readouterr().out
    assert (
        "#SBATCH --nodes=2" in script
        and "#SBATCH --ntasks-per-node=4" in script
        and "#SBATCH --gpus-per-node=4" in script
    )
    assert "#SBATCH --signal=SIGUSR1@90" in script and "#SBATCH --account=abc123" in script
    srun = [line for line in script.splitlines() if line.startswith("srun")][0]
    assert srun.startswith("srun --cpus-per-task=10 --kill-on-bad-exit=1 tl fit")
    assert "--trainer.devices 4 --trainer.num_nodes 2 --trainer.strategy ddp" in srun and srun.endswith(
        "--data.root /data/cats"
    )
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_config_and_job_must_agree(tmp_path, capsys):
    cfg = tmp_path / "two.yaml"
    cfg.write_text("trainer:\n  devices: 2\n  num_nodes: 1\n")
    assert tl("slurm", "--cluster", "none", "--no-check", "--config", cfg, "--cpu", "--dry-run") == 0
    script = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=2" in script and "gpus" not in script and "--trainer.accelerator cpu" in script
    assert tl("slurm", "--cluster", "none", "--no-check", "--config", cfg, "--gpus-per-node", "4", "--dry-run") == 2
    assert "trainer.devices=2 but the job asks for 4" in capsys.readouterr().err
    # arguments for `tl fit` cannot contradict the task count either: they set it, or are refused
    assert (
        tl(
            "slurm",
            "--cluster",
            "none",
            "--no-check",
            "--config",
            CONFIGS / "finetune.yaml",
            "--dry-run",
            "--",
            "--trainer.devices",
            "3",
        )
        == 0
    )
    script = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=3" in script and script.count("--trainer.devices") == 1
    assert (
        tl(
            "slurm",
            "--cluster",
            "none",
            "--no-check",
            "--config",
            CONFIGS / "finetune.yaml",
            "--gpus-per-node",
            "4",
            "--dry-run",
            "--",
            "--trainer.devices=2",
        )
        == 2
    )
    assert "trainer.devices=2 but the job asks for 4" in capsys.readouterr().err


def test_submit_uses_sbatch_and_keeps_the_script(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text('#!/bin/sh\necho "$1" > "$(dirname "$0")/submitted"\necho "Submitted batch job 42"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert tl("slurm", "--cluster", "none", "--no-check", "--config", CONFIGS / "feature_extract.yaml") == 0
    assert "Submitted batch job 42" in capsys.readouterr().out
    submitted = (bin_dir / "submitted").read_text().strip()
    assert submitted.startswith("runs/slurm/") and "--kill-on-bad-exit=1 tl fit" in open(submitted).read()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert tl("slurm", "--cluster", "none", "--no-check", "--config", CONFIGS / "feature_extract.yaml") == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err


def test_shipped_templates_are_valid_bash_with_the_signal():
    for template in (REPO / "slurm").glob("*.sbatch"):
        text = template.read_text()
        assert "--signal=SIGUSR1@90" in text and "CHANGE" in text
        assert 'srun --cpus-per-task="$SLURM_CPUS_PER_TASK" --kill-on-bad-exit=1 tl fit' in text
        assert subprocess.run(["bash", "-n", str(template)]).returncode == 0
