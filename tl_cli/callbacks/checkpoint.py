"""`BestAndLast`: Lightning's ModelCheckpoint with ``last.ckpt`` always the last epoch's, ties
of a coarse monitor broken by a second metric, ``best.ckpt`` optionally the end of the schedule
(for the starting point to compete with), and writes at most every few seconds."""

from __future__ import annotations

import ast
import time
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from typing_extensions import override

from tl_cli.errors import TLError, warn_deprecated

#: ``checkpoint.select``: the epoch best on the monitor, or the end of the schedule unless the
#: starting model is better beyond the noise (``last``: the old name of the second)
Select = Literal["best", "end_unless_start_better", "last"]
END_UNLESS_START_BETTER = "end_unless_start_better"


class BestAndLast(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`: the best checkpoints by the monitored metric, and with
    ``save_last`` a ``last.ckpt`` of the full training state after every epoch.

    Lightning (2.6) rewrites ``last.ckpt`` only in an epoch that saved a new best one, so a run
    resumed from it could repeat epochs; private hooks of ModelCheckpoint fix that (it has no
    public one). The starting-point logic (`tl_cli.models.starting_point`) uses `keeps_the_end`,
    `tie_break`, `tie_score_of`, `epoch_of` and `replace_best`.

    Args:
        tie_break: a metric where lower is better (``val/loss``) that decides between epochs
            equal on the monitored one (accuracy on a small validation split often ties;
            Lightning keeps the earlier epoch). None: no tie break.
        select: ``best``: ``best.ckpt`` is the epoch best on the monitor (Lightning's choice).
            ``end_unless_start_better``: ``best.ckpt`` is the last epoch, the end of the
            schedule, scored on the monitor; a starting point (FineTune, FeatureExtraction)
            replaces it only when better beyond the noise of the validation images. The best of
            many noisy epoch scores is mostly the luckiest; one comparison is less noisy.
            (``last``: the old name of ``end_unless_start_better``.)
        write_every_s: keep the checkpoints in memory (a copy on the CPU) and write them at most
            every this many seconds, and always when training ends, stops or fails: for epochs
            faster than writing a checkpoint (cached features). 0: write each at once.
        write_every: the old name of ``write_every_s``.
        *args: Lightning's ModelCheckpoint arguments (dirpath, filename, monitor, mode, ...).
        **kwargs: Lightning's ModelCheckpoint arguments (dirpath, filename, monitor, mode, ...).
    """

    def __init__(
        self,
        *args: Any,
        tie_break: Optional[str] = None,
        select: Select = "best",
        write_every_s: float = 0.0,
        write_every: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if select == "last":
            warn_deprecated("checkpoint.select: last", f"checkpoint.select: {END_UNLESS_START_BETTER}")
            select = END_UNLESS_START_BETTER
        if select not in ("best", END_UNLESS_START_BETTER):
            raise TLError(f"checkpoint.select={select!r}: use best or {END_UNLESS_START_BETTER}.")
        if select == END_UNLESS_START_BETTER and (self.monitor is None or self.save_top_k != 1):
            raise TLError(
                f"checkpoint.select={select} needs checkpoint.monitor (the metric the starting point is "
                "compared on) and checkpoint.save_top_k 1."
            )
        if write_every is not None:
            warn_deprecated("checkpoint.write_every", "checkpoint.write_every_s")
            write_every_s = write_every
        self.select: Literal["best", "end_unless_start_better"] = select
        self.tie_break: Optional[str] = tie_break
        self.tie_scores: dict[str, float] = {}  # the tie_break metric of each best checkpoint file
        self.write_every_s = write_every_s
        self._pending: dict[str, dict[str, Any]] = {}
        self._written_at = time.monotonic()
        self._epochs: dict[str, int] = {}  # the epoch each file holds

    # -- for the starting point ---------------------------------------------------------------

    @property
    def keeps_the_end(self) -> bool:
        """Whether ``best.ckpt`` is the end of the schedule (``select: end_unless_start_better``)."""
        return self.select == END_UNLESS_START_BETTER

    def epoch_of(self, path: str) -> Optional[int]:
        """The epoch the checkpoint file ``path`` holds, if this callback saved it."""
        return self._epochs.get(path)

    def tie_score_of(self, path: str) -> Optional[float]:
        """The tie_break metric of the checkpoint file ``path`` (None: no tie_break, or unknown)."""
        return self.tie_scores.get(path) if self.tie_break else None

    def replace_best(self, trainer: pl.Trainer, checkpoint: dict[str, Any], score: float) -> str:
        """Write ``checkpoint`` (scoring ``score`` on the monitor) as the best one, in place of the
        best file (or where it would go); every rank calls this. Returns its path."""
        path = self.best_model_path or str(self.format_checkpoint_name({}))
        self._pending.pop(path, None)
        trainer.strategy.save_checkpoint(checkpoint, path)
        self.best_model_path, self.best_model_score = path, torch.tensor(score)
        if path in self.best_k_models:
            self.best_k_models[path] = self.best_model_score
        self.tie_scores.pop(path, None)
        self._epochs[path] = int(checkpoint.get("epoch", -1))
        return path

    # -- last.ckpt after every epoch --------------------------------------------------------------

    def _save_last_every_epoch(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_every_epoch(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_every_epoch(trainer)

    # -- ties on the monitor --------------------------------------------------------------------

    def epoch_tie_score(self, trainer: pl.Trainer) -> Optional[float]:
        """This epoch's tie_break metric (None without one)."""
        value = trainer.callback_metrics.get(self.tie_break) if self.tie_break else None
        return None if value is None else float(value)

    @override
    def check_monitor_top_k(self, trainer: pl.Trainer, current: Optional[torch.Tensor] = None) -> bool:
        if self.keeps_the_end and current is not None:
            return True  # each epoch replaces best.ckpt: it ends as the last one, with its score
        better = super().check_monitor_top_k(trainer, current)
        if better or self.tie_break is None or current is None:
            return better
        held = self.tie_scores.get(self.kth_best_model_path)
        score = self.epoch_tie_score(trainer)
        kth = self.best_k_models[self.kth_best_model_path]
        tied = abs(float(current) - float(kth)) <= 1e-6
        wins = tied and None not in (score, held) and score < held
        # the metrics are synced over the ranks; agreeing makes the decision certainly the same
        return trainer.strategy.reduce_boolean_decision(wins)

    @override
    def _update_best_and_save(self, current: torch.Tensor, trainer: pl.Trainer, candidates: dict[str, Any]) -> None:
        score = self.epoch_tie_score(trainer)
        super()._update_best_and_save(current, trainer, candidates)
        self.tie_scores = {path: self.tie_scores.get(path, score) for path in self.best_k_models}
        if score is not None:
            self.tie_scores[self.current_path] = score

    @property
    def current_path(self) -> str:
        """The file the last `_update_best_and_save` wrote (Lightning keeps no name for it)."""
        return next(p for p, v in self.best_k_models.items() if v is self.current_score)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tie_scores": dict(self.tie_scores)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.tie_scores = dict(state_dict.get("tie_scores", {}))

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resuming: say so when the checkpoint's or early stopping's state cannot carry over.

        Lightning files a callback's state under its settings (``state_key``: the monitor, the
        mode, ...) and silently skips a state saved under other settings, so a resume with a
        new monitor starts the best checkpoint and early stopping's patience over (and tl's CLI
        hides Lightning's generic warning, meant for test/validate). Starting over is right, the
        old scores measure something else; silence is not."""
        first = next(c for c in trainer.callbacks if isinstance(c, BestAndLast))
        if trainer.state.fn != TrainerFn.FITTING or first is not self:  # said once, by the first
            return
        saved = list(checkpoint.get("callbacks") or {})
        # states that no callback of this run claims, each paired with one callback of its class
        unclaimed = [k for k in saved if k not in {c.state_key for c in trainer.callbacks}]
        for callback in trainer.callbacks:
            if not isinstance(callback, (ModelCheckpoint, EarlyStopping)) or callback.state_key in saved:
                continue
            name, now = _settings(callback.state_key)
            old = next((k for k in unclaimed if _settings(k)[0] == name), None)
            if old is None:
                continue
            unclaimed.remove(old)
            was = _settings(old)[1]
            section, what = (
                ("checkpoint", "the best checkpoint")
                if isinstance(callback, ModelCheckpoint)
                else ("early_stopping", "early stopping's patience")
            )
            changed = (
                ", ".join(
                    f"{section}.{k} {was.get(k)} -> {now.get(k)}" for k in {**was, **now} if was.get(k) != now.get(k)
                )
                if was and now
                else f"{old} -> {callback.state_key}"
            )
            rank_zero_info(
                f"tl: {trainer.ckpt_path} was saved under other settings ({changed}): {what} starts over "
                "from this epoch (Lightning restores a callback's state only under the settings it was saved with)."
            )

    # -- deferred writes ----------------------------------------------------------------------

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self._epochs[filepath] = trainer.current_epoch
        if self.write_every_s <= 0:
            return super()._save_checkpoint(trainer, filepath)
        # every rank builds the checkpoint (as Trainer.save_checkpoint does: it may gather);
        # only rank 0 writes, so the ranks need not agree on when
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
        copy = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))
        self._pending[filepath] = copy
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if time.monotonic() - self._written_at >= self.write_every_s:
            self.flush(trainer)

    @override
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

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.flush(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self.flush(trainer)


def _settings(state_key: str) -> tuple[str, dict[str, Any]]:
    """``"EarlyStopping{'monitor': 'val/loss', 'mode': 'min'}"`` -> the class name and the
    settings (Lightning's ``Callback._generate_state_key`` format)."""
    name, brace, rest = state_key.partition("{")
    try:
        settings = ast.literal_eval(brace + rest)
    except (ValueError, SyntaxError):
        return name, {}
    return name, settings if isinstance(settings, dict) else {}
