"""What a run prints while it trains, on a terminal and in a batch job's log file; and the
metric synchronisation that keeps the ranks' collectives in step.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from typing_extensions import override


class SyncEpochMetrics(pl.Callback):
    """Every rank computes the epoch's synchronised metrics at the same point, before any other
    callback's epoch-end hook (tl's trainer puts this callback first).

    Lightning computes (and, with ``sync_dist``, all-reduces) an epoch metric lazily, whenever
    something first reads it; its progress bars read them at ``on_train_epoch_end`` on rank 0
    only (they are disabled elsewhere). Rank 0 then runs all-reduces the other ranks run later,
    after any collective another hook does in between: they pair with the wrong operation and
    the run crashes or hangs (Lightning issue 21264). Reading them here, on every rank, first,
    keeps the order of collectives the same everywhere.
    """

    def _compute(self, trainer: pl.Trainer) -> None:
        if trainer.world_size > 1:
            _ = trainer.callback_metrics

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._compute(trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._compute(trainer)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._compute(trainer)


class TLRichProgressBar(RichProgressBar):
    """Lightning's Rich bar, reading the metrics at most twice a second (reading them copies
    them to the host: once per step would synchronise the GPU every step)."""

    def __init__(self, *args: Any, metrics_every: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics_every = metrics_every
        self._last = 0.0

    # Lightning 2.6's RichProgressBar reads the metrics here on every step and offers no public
    # hook or setting for how often: overriding its private method is the only way
    @override
    def _update_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = time.monotonic()
        training = trainer.training and not trainer.sanity_checking
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch if training else True
        if now - self._last >= self.metrics_every or last_batch or not training:
            self._last = now
            super()._update_metrics(trainer, pl_module)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _batch_images(batch: Any) -> int:
    if isinstance(batch, dict):
        return sum(_batch_images(b) for b in batch.values())
    if isinstance(batch, (list, tuple)) and batch:
        return len(batch[0])
    return 0


class PlainProgress(ProgressBar):
    """Progress as plain lines, for logs that are files (a SLURM job's ``.out``): a line every
    ``every_seconds`` while an epoch trains (step, loss, images/s, time left) and one per epoch
    with its metrics. Chosen by tl when standard output is not a terminal.

    Args:
        every_seconds: at most one line per this many seconds within an epoch.
    """

    def __init__(self, every_seconds: float = 30.0) -> None:
        super().__init__()
        self.every_seconds = every_seconds
        self._enabled = True
        self._last = 0.0
        self._fit_start = self._epoch_start = 0.0
        self._images = 0
        self._steps_done = 0

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero if self._trainer is not None else self._enabled

    def _print(self, text: str) -> None:
        if self.is_enabled:
            print(f"tl: {text}", file=sys.stdout, flush=True)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.monotonic()
        self._steps_done = 0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last = time.monotonic()
        self._images = 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += _batch_images(batch)
        self._steps_done += 1
        now = time.monotonic()
        if now - self._last < self.every_seconds:
            return
        self._last = now
        per_step = (now - self._fit_start) / self._steps_done
        total = trainer.num_training_batches * (trainer.max_epochs or 1)
        done = trainer.current_epoch * trainer.num_training_batches + batch_idx + 1
        loss = self.get_metrics(trainer, pl_module).get(
            "train/loss_step", self.get_metrics(trainer, pl_module).get("train/loss")
        )
        loss_text = f"loss {float(loss):.4f}, " if loss is not None else ""
        speed = self._images / max(now - self._epoch_start, 1e-9)
        self._print(
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} step {batch_idx + 1}/{trainer.num_training_batches}: "
            f"{loss_text}{speed:.1f} images/s, {_duration(now - self._fit_start)} elapsed, "
            f"~{_duration(per_step * (total - done))} left (at most, if it runs all epochs)"
        )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = self.get_metrics(trainer, pl_module)
        shown = ", ".join(
            f"{k} {float(v):.4f}"
            for k, v in sorted(metrics.items())
            if k.startswith(("train/", "val")) and not k.endswith("_step")
        )
        seconds = time.monotonic() - self._epoch_start
        self._print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} done in {_duration(seconds)}: {shown}")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn != "fit":
            self._print(f"validating {sum(trainer.num_val_batches)} batches")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(f"testing {sum(trainer.num_test_batches)} batches")

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(f"predicting {sum(trainer.num_predict_batches)} batches")
