"""`BestAndLast`: Lightning's ModelCheckpoint whose ``last.ckpt`` is always the last epoch's,
and which can write at most every few seconds when epochs are faster than writing."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection


class BestAndLast(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`: the best checkpoints by the monitored metric, and with
    ``save_last`` a ``last.ckpt`` written after every epoch.

    Lightning (2.6) rewrites ``last.ckpt`` only in an epoch that saved a new best one; when the
    monitored metric stops improving, ``last.ckpt`` silently stays at an earlier epoch, and a
    run resumed from it repeats epochs. Here it always holds the full training state of the
    last epoch. (Private hooks of ModelCheckpoint are used for that: it has no public one.)

    Args:
        write_every: with cached features an epoch takes milliseconds and writing a checkpoint
            (the whole backbone) takes longer than the epoch: then the checkpoints are kept in
            memory (a copy on the CPU) and written at most every this many seconds, and always
            when training ends, stops early, is preempted or fails. 0 writes each at once.
        *args: Lightning's ModelCheckpoint arguments (dirpath, filename, monitor, mode, ...).
        **kwargs: Lightning's ModelCheckpoint arguments (dirpath, filename, monitor, mode, ...).
    """

    def __init__(self, *args: Any, write_every: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.write_every = write_every
        self._pending: dict[str, dict[str, Any]] = {}
        self._written_at = time.monotonic()
        self.saved_epochs: dict[str, int] = {}  # the epoch each file holds

    def _last_too(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._last_too(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._last_too(trainer)

    # -- deferred writes ----------------------------------------------------------------------

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self.saved_epochs[filepath] = trainer.current_epoch
        if self.write_every <= 0:
            return super()._save_checkpoint(trainer, filepath)
        # every rank builds the checkpoint (as Trainer.save_checkpoint does: it may gather);
        # only rank 0 writes, so the ranks need not agree on when
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
        copy = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))
        self._pending[filepath] = copy
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if time.monotonic() - self._written_at >= self.write_every:
            self.flush(trainer)

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self._pending.pop(filepath, None) is None:
            super()._remove_checkpoint(trainer, filepath)

    def flush(self, trainer: pl.Trainer) -> None:
        """Write the checkpoints kept in memory."""
        for filepath, checkpoint in self._pending.items():
            trainer.strategy.save_checkpoint(checkpoint, filepath)
        if self._pending and trainer.is_global_zero:
            rank_zero_info(f"tl: checkpoints written: {', '.join(sorted(self._pending))}")
        self._pending.clear()
        self._written_at = time.monotonic()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.flush(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self.flush(trainer)
