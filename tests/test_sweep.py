"""`tl sweep`: a grid of runs here, and as a real SLURM job array (one task preempted and
requeued), gathered into the leaderboard `tl compare` writes."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO, TINY, tl
from tl_cli.cli.sweep import parse_grid, point_runs, points, split_values
from tl_cli.errors import TLError


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "leaderboard.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_grid_values_split_on_top_level_commas_and_expand_to_every_combination():
    assert split_values("1e-3, 1e-4") == ["1e-3", "1e-4"]
    assert split_values("{0: 2, 1: 4},{0: 4}") == ["{0: 2, 1: 4}", "{0: 4}"]
    grid = parse_grid(["model.lr=1e-3,1e-4", "--unfreeze.schedule={0: 2, 1: 4},{0: 4}", "seed_everything=0,1,2"])
    runs = points(grid)
    assert len(runs) == 12 and len({tuple(r.items()) for r in runs}) == 12
    assert runs[0] == {"model.lr": "1e-3", "unfreeze.schedule": "{0: 2, 1: 4}", "seed_everything": "0"}
    for bad, said in [
        (["model.lr"], "KEY=V1,V2"),
        (["model.lr="], "KEY=V1,V2"),
        (["model lr=1"], "not a config key"),
        (["model.lr=1", "model.lr=2"], "twice"),
        ([], "at least one --grid"),
    ]:
        with pytest.raises(TLError, match=said):
            parse_grid(bad)


@pytest.mark.slow
def test_a_local_sweep_runs_every_point_in_its_own_folder_and_gather_ranks_them_with_failures(tiny_data, capsys):
    folder = Path("runs/sweep_test")
    args = ["sweep", "-c", CONFIGS / "feature_extract.yaml", "--grid", "model.lr=0.05,0.001"]
    args += ["--grid", "data.augment=none,sideways", "-o", folder, "--", *TINY, "--data.root", tiny_data]
    args += ["--trainer.max_epochs", "2"]
    assert tl(*args) == 0
    out = capsys.readouterr().out
    assert "tl sweep: 4 runs in" in out and out.count("failed (exit 2") == 2, out
    for i in range(4):
        assert (folder / "logs" / f"point_{i}.log").is_file()
    for i in (0, 2):  # augment none: finished, each point its own run folder
        assert (folder / f"point_{i}" / "latest" / "checkpoints" / "best.ckpt").is_file()
        # its runs are the real folders, never the `latest` link (which would look unfinished)
        assert [r.name for r in point_runs(folder / f"point_{i}")] == ["version_0"]
    # running the same sweep into the same folder is fine; another sweep there is refused
    assert tl("sweep", "-c", CONFIGS / "finetune.yaml", "--grid", "model.lr=1", "-o", folder) == 2
    assert "holds another sweep" in capsys.readouterr().err

    assert tl("sweep", "gather", folder) == 0
    printed = capsys.readouterr().out
    rows = _rows(folder)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    assert [r["rank"] for r in rows] == ["1", "2", "", ""]
    assert float(rows[0]["val_acc"]) >= float(rows[1]["val_acc"])  # best validation first
    assert {r["settings"] for r in rows[:2]} == {"model.lr=0.05 data.augment=none", "model.lr=0.001 data.augment=none"}
    for row in rows[2:]:  # the error each failed run printed, not a guess
        assert "sideways" in row["note"] and "data.augment=sideways" in row["settings"], row
    assert "data.augment=sideways" in printed and (folder / "leaderboard.png").stat().st_size > 0
    assert tl("sweep", "gather", Path("runs")) == 2
    assert "not a sweep folder" in capsys.readouterr().err


def test_the_array_script_runs_k_points_per_task_within_a_concurrency_limit(tmp_path, capsys):
    folder = tmp_path / "sw"
    assert (
        tl(
            "sweep",
            "-c",
            CONFIGS / "finetune.yaml",
            "--grid",
            "model.lr=1e-3,1e-4,1e-5",
            "--slurm",
            "--dry-run",
            "--runs-per-task",
            "2",
            "--max-concurrent",
            "4",
            "--account",
            "abc123",
            "-o",
            folder,
        )
        == 0
    )
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-1%4" in script  # 3 points, 2 a task: tasks 0 and 1
    assert f"#SBATCH --output={folder}/logs/%A_%a.out" in script
    assert "#SBATCH --account=abc123" in script and "#SBATCH --gpus-per-node=1" in script
    assert script.count("--trainer.default_root_dir") == 3
    for i in range(3):
        assert f"{folder}/point_{i}" in script
    assert (folder / "sweep.sbatch").read_text() == script
    # bash accepts it
    assert subprocess.run(["bash", "-n", folder / "sweep.sbatch"]).returncode == 0


def _slurm_up() -> bool:
    return (
        shutil.which("sbatch") is not None
        and subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    )


def _state(job: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    found = re.findall(r"JobState=(\w+)", shown)
    return ",".join(found) if found else "?"


@pytest.mark.slow
@pytest.mark.skipif(not _slurm_up(), reason="no SLURM cluster here: run scripts/slurm-local.sh start (CI does)")
def test_a_sweep_as_a_real_job_array_with_one_task_preempted_is_gathered_whole(tiny_data, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    folder = Path("runs/array").resolve()
    venv = Path(sys.executable).parent.parent
    args = ["sweep", "-c", CONFIGS / "finetune.yaml", "--grid", "model.lr=1e-3,1e-4,1e-5", "--slurm", "--cpu"]
    args += ["--max-concurrent", "2", "--partition", "debug", "--cpus-per-task", "1", "--mem", "2G"]
    args += ["--time", "00:10:00", "--venv", venv, "-o", folder, "--", *TINY, "--data.root", tiny_data]
    args += ["--data.augment", "flip", "--trainer.max_epochs", "8", "--early_stopping", "null"]
    assert tl(*args) == 0
    job = re.search(r"Submitted batch job (\d+)", capsys.readouterr().out).group(1)
    log = folder / "logs" / "point_0.log"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and "epoch 2/8 done" in log.read_text()):
        time.sleep(0.2)
    assert "RUNNING" in _state(f"{job}_0"), _state(job)
    subprocess.run(["scancel", "--signal=USR1", f"{job}_0"], check=True)  # task 0 is preempted
    deadline = time.time() + 600
    while time.time() < deadline:
        states = _state(job)
        if "PENDING" in states and "hpc_ckpt" in " ".join(p.name for p in (folder / "point_0").glob("*")):
            subprocess.run(["scontrol", "update", f"JobId={job}_0", "StartTime=now"], capture_output=True)
        if states and all(s in ("COMPLETED", "FAILED", "CANCELLED") for s in states.split(",")):
            break
        time.sleep(2)
    assert all(s == "COMPLETED" for s in _state(job).split(",")), _state(job)
    runs = sorted(p.relative_to(folder).as_posix() for p in folder.glob("point_*/array_*"))
    assert runs == [f"point_{i}/array_{job}_{i}" for i in range(3)], runs
    assert tl("sweep", "gather", folder) == 0
    rows = _rows(folder)
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    preempted = [r for r in rows if r["settings"] == "model.lr=1e-3"][0]
    assert "requeued 1x" in preempted["note"], preempted
    assert "Restored all states from the checkpoint" in log.read_text()


def test_compare_as_a_job_array_runs_one_feature_extraction_per_backbone_and_gathers_like_a_sweep(tmp_path, capsys):
    folder = tmp_path / "cmp"
    args = ["compare", "-c", CONFIGS / "feature_extract.yaml", "--backbones", "timm:test_efficientnet"]
    args += ["timm:test_vit=none", "--slurm", "--dry-run", "--cpu", "--max-concurrent", "1", "-o", folder]
    assert tl(*args) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-1%1" in script
    cases = [line for line in script.splitlines() if ") ARGS=(" in line]
    assert len(cases) == 2 and all("--model FeatureExtraction" in c for c in cases)
    assert "--model.backbone timm:test_vit --model.weights none" in cases[1]
    assert tl("sweep", "gather", folder) == 1  # nothing ran yet: every backbone listed, none ok
    rows = _rows(folder)
    assert [r["status"] for r in rows] == ["not started", "not started"]
    assert {r["settings"] for r in rows} == {
        "model.backbone=timm:test_efficientnet",
        "model.backbone=timm:test_vit model.weights=none",
    }
