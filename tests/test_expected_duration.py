"""The expected duration a run prints early: right when steps cost what the first ones did,
revised when an epoch shows otherwise, and the end says how long it took."""

from __future__ import annotations

import logging
import re

import lightning.pytorch as pl
from lightning.pytorch.demos.boring_classes import BoringModel

from tl_cli.callbacks import ExpectedDuration


class FakeClock:
    """Seconds that pass only when a batch says so: each training batch costs `train[epoch]`,
    each validation batch `val`."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Spend(pl.Callback):
    def __init__(self, clock: FakeClock, train: dict[int, float], val: float) -> None:
        self.clock, self.train, self.val = clock, train, val

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.now += self.train.get(trainer.current_epoch, self.train[0])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.clock.now += self.val


def _trainer(tmp_path, callbacks: list, epochs: int, val_batches: int) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=20,
        limit_val_batches=val_batches,
        num_sanity_val_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )


def _fit(tmp_path, caplog, train: dict[int, float], epochs: int = 4) -> tuple[list[str], float]:
    clock = FakeClock()
    # Spend first: the clock has moved when ExpectedDuration reads it
    trainer = _trainer(tmp_path, [Spend(clock, train, val=0.5), ExpectedDuration(clock=clock)], epochs, 4)
    start = clock.now
    with caplog.at_level(logging.INFO):
        trainer.fit(BoringModel())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tl: ")]
    return lines, clock.now - start


def _seconds(text: str) -> int:
    m, s = re.search(r"(\d+)m(\d\d)s", text).groups()
    return int(m) * 60 + int(s)


def test_the_first_figure_is_the_run_when_steps_cost_the_same(tmp_path, caplog):
    lines, took = _fit(tmp_path, caplog, {0: 3.0})
    said = [line for line in lines if line.startswith("tl: expected duration: ")]
    assert len(said) == 1, lines
    # 4 epochs x (20 steps x 3 s + 4 validation batches x 0.5 s), plus the sanity check's 2 batches
    assert took == 4 * (60 + 2) + 1
    assert abs(_seconds(said[0]) - (took - 1)) <= 1, said  # the sanity check ran before training started
    assert "20 steps an epoch at 3.00 s, 4 validation batches at 0.50 s" in said[0]
    assert not any("revised" in line for line in lines)
    end = [line for line in lines if line.startswith("tl: training took ")]
    assert end and _seconds(end[0]) == took - 1 and "first expected: 4m08s" in end[0]


def test_a_slower_or_faster_epoch_revises_the_figure(tmp_path, caplog):
    # the first epoch decodes into the cache at 3 s a step; the later ones read it at 1 s
    lines, took = _fit(tmp_path, caplog, {0: 3.0, 1: 1.0, 2: 1.0, 3: 1.0})
    said = [line for line in lines if line.startswith("tl: expected duration")]
    assert len(said) == 2 and "revised" in said[1], lines
    assert _seconds(said[0]) > 1.5 * (took - 1)  # the first figure was too long, and it said so
    assert abs(_seconds(said[1]) - (took - 1)) <= 1
    assert "the last epoch took 0m22s" in said[1]


def test_a_run_with_early_stopping_says_it_may_end_sooner(tmp_path, caplog):
    clock = FakeClock()
    stop = pl.callbacks.EarlyStopping(monitor="valid_loss", patience=5)
    trainer = _trainer(tmp_path, [Spend(clock, {0: 1.0}, val=0.0), ExpectedDuration(clock=clock), stop], 2, 2)
    model = BoringModel()
    model.validation_step = lambda batch, batch_idx: model.log("valid_loss", model.step(batch))
    with caplog.at_level(logging.INFO):
        trainer.fit(model)
    said = [r.getMessage() for r in caplog.records if "expected duration" in r.getMessage()]
    assert said and "for 2 epochs, unless early stopping ends it sooner" in said[0]
