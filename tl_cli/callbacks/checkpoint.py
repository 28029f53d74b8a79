"""`BestAndLast`: Lightning's ModelCheckpoint whose ``last.ckpt`` is always the last epoch's."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class BestAndLast(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` (same arguments): the best checkpoints by the monitored
    metric, and with ``save_last`` a ``last.ckpt`` written after every epoch.

    Lightning (2.6) rewrites ``last.ckpt`` only in an epoch that saved a new best one; when the
    monitored metric stops improving, ``last.ckpt`` silently stays at an earlier epoch, and a
    run resumed from it repeats epochs. Here it always holds the full training state of the
    last epoch (private hooks of ModelCheckpoint are used for that: it has no public one).
    """

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
