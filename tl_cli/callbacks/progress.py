"""What a run prints while it trains, on a terminal and in a batch job's log file; and the
metric synchronisation that keeps the ranks' collectives in step.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping, ProgressBar, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
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


class ExpectedDuration(pl.Callback):
    """Says early how long training will take, corrects itself when an epoch shows otherwise,
    and says at the end how long it took against what it said.

    After ``measure_steps`` steps of the run's first epoch (not counting the first
    ``skip_steps``, which pay for start-up) it prints the steps left at the measured rate, plus
    one validation an epoch at the rate the sanity check's batches ran (without a sanity check:
    a third of a training step a batch, the forward pass alone). At the end of each of the
    first epochs it measures the whole epoch, validation included, and prints a revised figure
    when that differs from the last one by more than a quarter (the first epoch of fine-tuning
    also decodes the images into the cache; later ones read the cache). Lightning's bars give
    the time left in one epoch; this is the whole run's, which a batch job's time limit needs.

    Args:
        measure_steps: training steps timed for the first figure.
        skip_steps: steps at the start not timed.
        clock: seconds, monotonic (a test passes its own).
    """

    def __init__(self, measure_steps: int = 10, skip_steps: int = 2, clock: Any = time.monotonic) -> None:
        self.measure_steps = measure_steps
        self.skip_steps = skip_steps
        self.clock = clock
        self._said: float | None = None
        self._first_said: float | None = None
        self._val_batch: float | None = None
        self._sanity_times: list[float] = []

    def _epochs(self, trainer: pl.Trainer) -> int:
        return trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1

    def _all_epochs(self, trainer: pl.Trainer) -> str:
        stops = any(isinstance(c, EarlyStopping) for c in trainer.callbacks)
        return f"{self._epochs(trainer)} epochs" + (", unless early stopping ends it sooner" if stops else "")

    def _say(self, trainer: pl.Trainer, total: float, how: str, revised: bool = False) -> None:
        self._said = total
        if self._first_said is None:
            self._first_said = total
        left = max(0.0, total - (self.clock() - self._start))
        ends = time.strftime("%H:%M", time.localtime(time.time() + left))
        word = "expected duration, revised" if revised else "expected duration"
        rank_zero_info(
            f"tl: {word}: {_duration(total)} for {self._all_epochs(trainer)} ({how}); about {_duration(left)} left, "
            f"ending about {ends}"
        )

    @override
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sanity_times = []

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            self._sanity_times.append(self.clock())

    @override
    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the first batch pays for starting the loader's workers: time the ones after it
        times = self._sanity_times
        self._val_batch = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self.clock()
        self._first_epoch = trainer.current_epoch
        self._steps = 0
        self._timed_from: tuple[int, float] | None = None
        self._said = self._first_said = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self.clock()
        if trainer.current_epoch == self._first_epoch and min(self.skip_steps, trainer.num_training_batches - 1) <= 0:
            self._timed_from = (0, self._epoch_start)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch != self._first_epoch or self._said is not None:
            return
        self._steps += 1
        per_epoch = trainer.num_training_batches
        if per_epoch == float("inf"):  # an iterable dataset of unknown length: no estimate
            return
        skip = min(self.skip_steps, per_epoch - 1)
        if self._steps == skip:
            self._timed_from = (self._steps, self.clock())
        if self._timed_from is None or self._steps < min(skip + self.measure_steps, per_epoch):
            return
        steps, since = self._timed_from
        step = (self.clock() - since) / (self._steps - steps)
        val_batches = sum(trainer.num_val_batches) if trainer.num_val_batches else 0
        val_batch = self._val_batch if self._val_batch is not None else step / 3
        epochs_left = self._epochs(trainer) - trainer.current_epoch
        steps_left = per_epoch * epochs_left - self._steps
        elapsed = self.clock() - self._start
        total = elapsed + steps_left * step + epochs_left * val_batches * val_batch
        how = f"{per_epoch} steps an epoch at {step:.2f} s"
        if val_batches:
            how += f", {val_batches} validation batches at {val_batch:.2f} s"
        self._say(trainer, total, how)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # runs after the epoch's validation (Lightning validates inside the training epoch)
        done = trainer.current_epoch + 1 - self._first_epoch
        if self._said is None or done > 3 or trainer.should_stop:
            return
        epoch = self.clock() - self._epoch_start
        total = (self.clock() - self._start) + epoch * (self._epochs(trainer) - trainer.current_epoch - 1)
        if abs(total - self._said) > 0.25 * self._said:
            self._say(trainer, total, f"the last epoch took {_duration(epoch)}", revised=True)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._first_said is not None:
            took = self.clock() - self._start
            rank_zero_info(f"tl: training took {_duration(took)} (first expected: {_duration(self._first_said)})")
