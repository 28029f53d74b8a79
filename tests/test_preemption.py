"""A run interrupted by SIGUSR1 mid-epoch and resumed ends exactly like an uninterrupted one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch

from tl_cli.callbacks import PreemptionCheckpoint
from tl_cli.data import ImageFolderData
from tl_cli.models import TransferClassifier


class SignalAt(pl.Callback):
    """Sends this process SIGUSR1 during a given batch, as `scancel --signal=USR1` would."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.at = (epoch, batch)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


class CountBatches(pl.Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_train_batch_end(self, *args):
        self.n += 1


def _run(root, data, workdir: Path, signal_at=None, resume=False, **model_kwargs):
    pl.seed_everything(7)
    model = TransferClassifier(backbone="timm:test_efficientnet", weights="none", lr=0.01, dropout=0.3, **model_kwargs)
    dm = ImageFolderData(root=str(data), batch_size=4, num_workers=0, image_size=64, **root)
    counter = CountBatches()
    callbacks = [
        PreemptionCheckpoint(),
        pl.callbacks.ModelCheckpoint(dirpath=workdir / "ckpt", monitor="val/loss"),
        counter,
    ]
    if signal_at:
        callbacks.append(SignalAt(*signal_at))
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(workdir),
        callbacks=callbacks,
    )
    # under SLURM a requeued job finds hpc_ckpt_*.ckpt by itself (ckpt_path None); here, say "hpc"
    trainer.fit(model, dm, ckpt_path="hpc" if resume else None)
    trainer.batches_run = counter.n
    return model, trainer


def _check_same(tiny_data, tmp_path, root, signal_at=(1, 2), **model_kwargs):
    straight, t1 = _run(root, tiny_data, tmp_path / "a", **model_kwargs)
    _, t2 = _run(root, tiny_data, tmp_path / "b", signal_at=signal_at, **model_kwargs)
    done = 6 * signal_at[0] + signal_at[1] + 1
    assert t2.global_step == done and list((tmp_path / "b").glob("hpc_ckpt_*.ckpt"))
    resumed, t3 = _run(root, tiny_data, tmp_path / "b", resume=True, **model_kwargs)
    assert t3.global_step == t1.global_step == 18
    assert t2.batches_run == done and t3.batches_run == 18 - done  # the resumed run did only what was left
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    # the checkpoint callback's state went through the interruption: it goes on counting
    assert t3.checkpoint_callback.best_model_score is not None


def test_feature_extraction_preempted_mid_epoch_resumes_exactly(tiny_data, tmp_path):
    _check_same(tiny_data, tmp_path, {})  # cached features, head with dropout


def test_fine_tuning_preempted_mid_epoch_resumes_exactly(tiny_data, tmp_path):
    # unfrozen stages (from epoch 1, i.e. the interrupted epoch), flip augmentation, cached images
    _check_same(tiny_data, tmp_path, {"augment": "flip"}, unfreeze={1: 2}, train_bn=True)


def test_preempted_at_the_last_batch_of_an_epoch_resumes_after_its_validation(tiny_data, tmp_path):
    # the signal lands in the epoch's last batch: the checkpoint waits for validation and the
    # epoch-end callbacks, so the resumed run starts the next epoch cleanly
    _check_same(tiny_data, tmp_path, {}, signal_at=(0, 5), unfreeze={1: 1})
