"""Surviving preemption and time limits: checkpoint at a batch boundary, requeue, resume exactly.

Lightning's own SLURM handler saves its checkpoint from inside the signal handler, wherever
the training step happens to be (between backward and optimizer step, say), so the resumed
run cannot be the same as an uninterrupted one. tl handles SIGUSR1 (``#SBATCH
--signal=SIGUSR1@90``) itself: the handler only raises a flag; at the end of the current batch
every rank agrees on it, the full training state is written to ``hpc_ckpt_N.ckpt`` in
``trainer.default_root_dir`` (where Lightning looks when the job starts again), rank 0 asks
SLURM to requeue the job, and training stops. With the resumable sampler and the RNG state in
the checkpoint (`TransferClassifier._position_data`), the resumed run continues with exactly
the batches and random numbers the interrupted one would have used.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


class PreemptionCheckpoint(pl.Callback):
    """On SIGUSR1: checkpoint at the next batch end, requeue under SLURM, stop."""

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum
        self.requested = False
        self._previous: Any = None

    def _flag(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requested = False
        self._previous = signal.signal(self.signum, self._flag)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After an epoch's last batch, validation and the epoch-end callbacks (checkpointing,
        # early stopping) still have to run: a checkpoint taken here would resume past them.
        if batch_idx + 1 < trainer.num_training_batches:
            self._maybe_preempt(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_preempt(trainer)

    def _maybe_preempt(self, trainer: pl.Trainer) -> None:
        requested = self.requested
        if trainer.world_size > 1:  # every rank must take the same decision at the same batch
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        self.requested = False  # once: Lightning still calls on_train_epoch_end after stopping
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        rank_zero_info(f"tl: preemption signal: training state saved to {path}")
        job = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and job:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if done.returncode == 0:
                rank_zero_info(f"tl: SLURM job {job} requeued; it resumes from {path}")
            else:
                rank_zero_info(f"tl: requeueing SLURM job {job} failed: {done.stderr.strip()}")
        trainer.should_stop = True
