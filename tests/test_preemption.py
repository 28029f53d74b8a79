"""A run interrupted by SIGUSR1 mid-epoch and resumed ends exactly like an uninterrupted one,
DataLoader workers included (SLURM signals every process of the job step); so does a run
resumed from its last.ckpt through the CLI."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers import CONFIGS, TINY, fit_model, tiny_datamodule, tl
from tl_cli.callbacks import UnfreezeSchedule
from tl_cli.cli.trainer import TLTrainer
from tl_cli.models import FeatureExtraction, FineTune


def _children() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


class SignalAt(pl.Callback):
    """Sends SIGUSR1 during a given batch to this process and its DataLoader workers, as
    `scancel --signal=USR1` does to every process of a job step."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)
        self.workers_hit = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            for pid in _children():
                os.kill(pid, signal.SIGUSR1)
                self.workers_hit += 1
            os.kill(os.getpid(), signal.SIGUSR1)


class CountBatches(pl.Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_train_batch_end(self, *args):
        self.n += 1


def _run(data, workdir: Path, signal_at=None, resume=False, finetune=False, workers=0, **data_kwargs):
    pl.seed_everything(7)
    cls = FineTune if finetune else FeatureExtraction
    model = cls(backbone="timm:test_efficientnet", weights="none", lr=0.01, dropout=0.3)
    dm = tiny_datamodule(data, batch_size=4, num_workers=workers, **data_kwargs)
    counter = CountBatches()
    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=workdir / "ckpt", monitor="val/loss"), counter]
    if finetune:
        callbacks.append(UnfreezeSchedule({1: 2}, update_unfrozen_bn_stats=True))
    signaller = SignalAt(*signal_at) if signal_at else None
    if signaller:
        callbacks.append(signaller)
    # under SLURM a requeued job finds hpc_ckpt_*.ckpt by itself (ckpt_path None); here, say "hpc"
    ckpt_path = "hpc" if resume else None
    trainer = fit_model(model, dm, 3, ckpt_path, root=workdir, trainer=TLTrainer, callbacks=callbacks)
    trainer.batches_run = counter.n
    trainer.workers_hit = signaller.workers_hit if signaller else 0
    return model, trainer


def _check_same(tiny_data, tmp_path, signal_at=(1, 2), per_epoch=6, **kwargs):
    straight, t1 = _run(tiny_data, tmp_path / "a", **kwargs)
    _, t2 = _run(tiny_data, tmp_path / "b", signal_at=signal_at, **kwargs)
    done = per_epoch * signal_at[0] + signal_at[1] + 1
    assert t2.global_step == done and list((tmp_path / "b").glob("hpc_ckpt_*.ckpt"))
    if kwargs.get("workers"):
        assert t2.workers_hit >= kwargs["workers"]  # the workers got the signal too, and lived
    resumed, t3 = _run(tiny_data, tmp_path / "b", resume=True, **kwargs)
    assert t3.global_step == t1.global_step == 3 * per_epoch
    assert t2.batches_run == done and t3.batches_run == 3 * per_epoch - done  # the resumed run did only what was left
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    # the checkpoint callback's state went through the interruption: it goes on counting
    assert t3.checkpoint_callback.best_model_score is not None


@pytest.mark.slow
def test_feature_extraction_preempted_mid_epoch_resumes_exactly(tiny_data, tmp_path):
    _check_same(tiny_data, tmp_path)  # cached features, head with dropout


@pytest.mark.parametrize("workers", [0, 2])
def test_fine_tuning_preempted_mid_epoch_resumes_exactly(tiny_data, tmp_path, workers):
    # a stage unfrozen from epoch 1 (the interrupted epoch), flip augmentation drawn in the
    # workers, cached images, BatchNorm statistics of unfrozen stages updating
    _check_same(tiny_data, tmp_path, finetune=True, workers=workers, augment="flip")


def test_preempted_in_a_later_pass_of_a_many_pass_epoch_resumes_exactly(tiny_data, tmp_path):
    # data.min_steps_per_epoch 10 over 6 batches: 2 passes (12 batches) an epoch, each its own
    # order and augmentations; the signal lands in epoch 1's second pass
    _check_same(
        tiny_data, tmp_path, signal_at=(1, 8), per_epoch=12, finetune=True, augment="flip", min_steps_per_epoch=10
    )


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_preempted_at_the_last_batch_of_an_epoch_resumes_after_its_validation(tiny_data, tmp_path, workers):
    # the signal lands in the epoch's last batch: the checkpoint waits for validation and the
    # epoch-end callbacks, so the resumed run starts the next epoch cleanly (with persistent
    # workers too, whose iterator Lightning creates before any hook of the resumed run)
    _check_same(tiny_data, tmp_path, signal_at=(0, 5), finetune=True, workers=workers, augment="flip")


MIX = ["--model.mixup_alpha", "0.2", "--model.cutmix_alpha", "1.0"]


@pytest.mark.slow
@pytest.mark.parametrize("mix", [[], MIX], ids=["plain", "mixup+cutmix"])
def test_resume_through_the_cli_ends_like_an_uninterrupted_run(tiny_data, mix):
    """Also with MixUp/CutMix, whose draws come from the generator the run's state restores."""
    args = ["fit", "--config", CONFIGS / "finetune.yaml", *TINY, "--data.root", tiny_data, "--data.augment", "flip"]
    args += mix
    # a constant learning rate: the schedule's length would depend on max_epochs, which is
    # what differs between the two halves here (preemption keeps it: the tests above)
    args += ["--unfreeze.schedule", "{1: 2}", "--early_stopping", "null", "--model.scheduler", "none"]
    assert tl(*args, "--trainer.max_epochs", "3", "-o", "straight") == 0
    assert tl(*args, "--trainer.max_epochs", "2", "-o", "split") == 0
    assert (
        tl(*args, "--trainer.max_epochs", "3", "-o", "split", "--ckpt_path", "split/latest/checkpoints/last.ckpt") == 0
    )
    a = torch.load("straight/latest/checkpoints/last.ckpt", weights_only=True)
    b = torch.load("split/latest/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 9
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
