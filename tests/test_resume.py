"""`tl resume RUN_DIR` continues a run from its folder alone, in that folder; a finished run
says so and changes nothing; an extended one goes on from the learning rate it stands at; `tl
fit --ckpt_path X` alone rebuilds the run that wrote X."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, TINY, fit_tiny, tl
from tl_cli.errors import TLError

RUNS = Path("runs/feature_extract")


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _train_loss_steps(run: Path) -> list[int]:
    return [int(r["step"]) for r in _rows(run) if r.get("train/loss")]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_continues_an_interrupted_run_in_its_folder_as_if_never_interrupted(tiny_data, monkeypatch, capsys):
    fit = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", tiny_data]
    fit += ["--trainer.max_epochs", "2"]
    assert tl(*fit, "-o", "straight") == 0
    # interrupted in its second epoch (SIGUSR1 at batch 1: stops at a batch boundary, latest not set)
    signal = ["--trainer.callbacks+", "tests.helpers.SignalSelf", "--trainer.callbacks.epoch", "1"]
    assert tl(*fit, *signal, "--trainer.callbacks.batch", "1") == 0
    assert not (RUNS / "latest").exists()
    assert 3 <= torch.load(RUNS / "version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] < 6
    capsys.readouterr()

    monkeypatch.setenv("TL_TEST_RESUMED", "1")
    assert tl("resume", RUNS / "version_0") == 0
    out = capsys.readouterr().out
    assert (
        "resuming runs/feature_extract/version_0 from runs/feature_extract/hpc_ckpt_1.ckpt" in out
        and "goes on from epoch 2" in out
    ), out
    assert sorted(p.name for p in RUNS.iterdir() if p.is_dir()) == ["latest", "version_0"]  # no new version folder
    assert os.readlink(RUNS / "latest") == "version_0"
    run = RUNS / "version_0"
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # TensorBoard: the same version, two sessions
    assert json.loads((run / ".tl-run.json").read_text())["resumes"] == 1
    steps = _train_loss_steps(run)
    assert steps == list(range(6)), steps  # 3 steps an epoch, each logged once: one history
    resumed = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    straight = torch.load(Path("straight/latest/checkpoints/last.ckpt"), weights_only=True)
    assert resumed["global_step"] == straight["global_step"] == 6
    for key, value in straight["state_dict"].items():
        assert torch.allclose(value.float(), resumed["state_dict"][key].float(), atol=1e-6), key


def test_a_finished_run_resumed_says_nothing_is_left_and_changes_nothing(tiny_data, capsys):
    fit_tiny(tiny_data, 1)
    before = _snapshot(Path("runs"))
    capsys.readouterr()
    assert tl("resume", RUNS / "latest") == 0
    out = capsys.readouterr().out
    assert "nothing left to do: it trained 1 epochs, and trainer.max_epochs is 1" in out, out
    assert "--trainer.max_epochs" in out  # how to train on
    assert _snapshot(Path("runs")) == before  # no new folder, no file touched, latest as it was
    assert os.readlink(RUNS / "latest") == "version_0"
    # tl fit --ckpt_path of the same checkpoint says the same, and makes no empty version_1
    last = RUNS / "version_0/checkpoints/last.ckpt"
    assert tl("fit", "--ckpt_path", last, "--trainer.max_epochs", "1") == 0
    assert "nothing left to do" in capsys.readouterr().out
    assert _snapshot(Path("runs")) == before


@pytest.mark.slow
def test_extending_a_finished_run_says_so_and_its_learning_rate_goes_on_down(tiny_data, capsys):
    fit_tiny(tiny_data, 2)
    run = RUNS / "version_0"
    capsys.readouterr()
    assert tl("resume", run, "--trainer.max_epochs", "4") == 0
    out = capsys.readouterr().out
    assert "trainer.max_epochs 2 -> 4" in out and "learning-rate schedule" in out, out
    assert sorted(p.name for p in RUNS.iterdir()) == ["latest", "version_0"]
    assert "max_epochs: 4" in (run / "config.yaml").read_text()
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["epoch"] == 3
    # LearningRateMonitor logs the head's learning rate each epoch: never up again after epoch 1
    lrs = [float(r["lr-AdamW/head"]) for r in _rows(run) if r.get("lr-AdamW/head")]
    assert len(lrs) == 4 and lrs[1] < lrs[0], lrs
    assert all(later <= lrs[1] * (1 + 1e-6) for later in lrs[2:]), lrs
    assert _train_loss_steps(run) == list(range(12))


@pytest.mark.slow
def test_fit_with_only_a_checkpoint_rebuilds_the_run_that_wrote_it(tiny_data, tmp_path, capsys):
    """The backbone is the checkpoint's (timm:test_efficientnet), not the default one, and the
    run goes on in a new version folder beside it."""
    fit_tiny(tiny_data, 1)
    last = RUNS / "version_0/checkpoints/last.ckpt"
    capsys.readouterr()
    assert tl("fit", "--ckpt_path", last, "--data.root", tiny_data, "--trainer.max_epochs", "2") == 0
    assert "the settings of the run that wrote it" in capsys.readouterr().out
    ckpt = torch.load(RUNS / "version_1/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["backbone"] == "timm:test_efficientnet" and ckpt["epoch"] == 1
    # a checkpoint moved out of its run folder: its model, with its own hyperparameters
    alone = tmp_path / "alone.ckpt"
    alone.write_bytes(last.read_bytes())
    trainer = ["--trainer.accelerator", "cpu", "--trainer.max_epochs", "2", "-o", "alone"]
    assert tl("fit", "--ckpt_path", alone, "--data.root", tiny_data, "--data.num_workers", "0", *trainer) == 0
    assert "a FeatureExtraction checkpoint, rebuilt with its own hyperparameters" in capsys.readouterr().out
    (written,) = Path("alone/latest/checkpoints").glob("*.ckpt")  # no config: Lightning's default checkpointing
    ckpt = torch.load(written, weights_only=True)
    assert ckpt["hyper_parameters"]["backbone"] == "timm:test_efficientnet" and ckpt["epoch"] == 1


def test_resume_of_a_folder_that_is_not_a_run_says_what_is_missing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert tl("resume", tmp_path / "empty") == 2
    err = capsys.readouterr().err
    assert "has no config.yaml" in err and "cannot be resumed" in err
    assert tl("resume", tmp_path / "nowhere") == 2
    assert "is not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["zero bytes", "cut short"])
def test_resume_from_an_unreadable_last_ckpt_names_it_and_touches_nothing(tmp_path, capsys, damage):
    # a job killed while Lightning wrote last.ckpt leaves it empty or cut short
    run = tmp_path / "runs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("trainer:\n  max_epochs: 2\n")
    last = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 3}, last)
    last.write_bytes(b"" if damage == "zero bytes" else last.read_bytes()[:500])
    good = tmp_path / "runs" / "hpc_ckpt_1.ckpt"
    torch.save({"global_step": 3}, good)
    (tmp_path / "runs" / "hpc_ckpt_2.ckpt").write_bytes(b"")
    before = _snapshot(tmp_path)
    assert tl("resume", run) == 2
    err = capsys.readouterr().err
    assert f"{last} is not a readable checkpoint" in err and "Traceback" not in err
    assert f"readable: {good}; it goes on in a new version folder)" in err  # the unreadable hpc_ckpt_2: not offered
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["resume", "claim"])
def test_a_requeued_job_whose_newest_preemption_checkpoint_is_unreadable_names_it(
    tmp_path, capsys, monkeypatch, command
):
    # Lightning resumes a requeued job from the newest hpc_ckpt_N.ckpt, unchecked: an empty one
    # would end the job in a traceback (tl resume and a requeued tl fit alike)
    from tl_cli.cli.runs import MARKER, claim

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    root = tmp_path / "runs"
    run = root / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / MARKER).write_text(json.dumps({"slurm_job_id": "77"}))
    (run / "config.yaml").write_text("trainer:\n  max_epochs: 2\n")
    torch.save({"global_step": 3}, run / "checkpoints" / "last.ckpt")
    torch.save({"global_step": 3}, root / "hpc_ckpt_1.ckpt")
    (root / "hpc_ckpt_2.ckpt").write_bytes(b"")
    before = _snapshot(tmp_path)
    if command == "resume":
        assert tl("resume", run) == 2
        err = capsys.readouterr().err
    else:
        with pytest.raises(TLError) as caught:
            claim(root)
        err = str(caught.value)
    assert f"{root / 'hpc_ckpt_2.ckpt'} is not a readable checkpoint" in err and "Traceback" not in err
    assert "to continue from hpc_ckpt_1.ckpt, the newest readable one" in err
    assert _snapshot(tmp_path) == before
    (root / "hpc_ckpt_2.ckpt").unlink()  # what the message says: then the job goes on
    if command == "claim":
        assert claim(root) == ("version_0", True)
