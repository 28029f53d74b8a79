"""`StartingPoint`: training never ends worse than where it started.

Before the first step the starting model (the ``init_from`` checkpoint, or the tuned probe) is
scored on validation and kept (a copy on the CPU). When training ends it competes with what the
checkpoint callback (`BestAndLast`) chose, on the callback's monitor (a tie going to the lower
``tie_break`` metric); ``best.ckpt`` becomes the start if that did not beat it, and the run says
which won and by how much.

With ``checkpoint.select: end_unless_start_better`` the candidate is the end of the schedule,
and the start replaces it only when better by more than `MARGIN` standard errors of the paired
per-image difference on the validation images: on a small split the two often differ by less
than the noise, and the end of the schedule is what fine-tuning is run for.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Protocol

import lightning.pytorch as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection

from tl_cli.callbacks.checkpoint import BestAndLast
from tl_cli.models.metrics import T1_INDEX, TEMPERATURES

# How much better the start must be than the end of the schedule (select end_unless_start_better),
# in standard errors of the paired per-image difference (one-sided, about 2 % by chance).
MARGIN = 2.0


class ModelWithStart(Protocol):
    """What `StartingPoint` needs from the model that owns it (`Classifier`)."""

    trainer: pl.Trainer
    device: torch.device

    def print(self, *args: Any, **kwargs: Any) -> None: ...

    def validation_scores(self, per_image: bool = False) -> tuple[dict[str, float], Optional[torch.Tensor]]: ...


def checkpoint_callback(trainer: pl.Trainer) -> Optional[BestAndLast]:
    """The run's `BestAndLast` (the start competes only with the choices of one)."""
    callback = trainer.checkpoint_callback
    return callback if isinstance(callback, BestAndLast) else None


class StartingPoint:
    """The starting model's validation scores and a copy of it, competing for ``best.ckpt``:
    `keep` before the first step of a fresh fit, `settle` when training ends."""

    def __init__(self) -> None:
        self.scores: Optional[dict[str, float]] = None  # the start's val/* metrics
        self.checkpoint: Optional[dict[str, Any]] = None  # the start's full checkpoint, on the CPU
        self.images: Optional[torch.Tensor] = None  # its `image_scores` (select end_unless_start_better)

    def clear(self) -> None:
        """Forget the start (a resumed fit has none; a settled one needs it no more)."""
        self.scores = self.checkpoint = self.images = None

    def keep(self, model: ModelWithStart) -> None:
        """Score the model as it is and keep a copy (a fresh fit with validation only)."""
        self.clear()
        trainer = model.trainer
        callback = checkpoint_callback(trainer)
        if callback is None or trainer.ckpt_path is not None or not trainer.val_dataloaders:
            return
        if trainer.limit_val_batches == 0:  # no epoch is validated: nothing to compete with
            return
        self.scores, self.images = model.validation_scores(per_image=callback.keeps_the_end)
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        self.checkpoint = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))
        model.print(
            "tl: starting point: "
            + ", ".join(f"{k} {v:.4f}" for k, v in self.scores.items())
            + " (it competes for best.ckpt)"
        )

    def settle(self, model: ModelWithStart) -> None:
        """When training ends: ``best.ckpt`` becomes the start if training did not beat it."""
        callback = checkpoint_callback(model.trainer)
        scores, checkpoint = self.scores, self.checkpoint
        if scores is None or callback is None or not callback.monitor or callback.monitor not in scores:
            return
        monitor, begin, best = callback.monitor, scores[callback.monitor], callback.best_model_score
        sign = 1 if callback.mode == "min" else -1
        # accuracy is a float32 on the epochs' side: equal within 1e-6 is a tie
        diff = sign * (float(best) - begin) if best is not None else math.nan
        tie = self.tie(callback) if abs(diff) <= 1e-6 else None
        epoch = callback.epoch_of(callback.best_model_path)
        epoch = "?" if epoch is None else epoch
        if diff < -1e-6 or (abs(diff) <= 1e-6 and (tie is None or tie[0] < tie[1])):
            won = f"{monitor} {float(best):.4f} against {begin:.4f} at the start ({float(best) - begin:+.4f})"
            if tie is not None:
                won += f", {callback.tie_break} {tie[0]:.4f} against {tie[1]:.4f}"
            model.print(f"tl: epoch {epoch} won: {won}; best.ckpt holds it")
            self.clear()
            return
        paired = self.paired_difference(model, callback) if diff > 1e-6 else None
        if paired is not None and paired[0] <= MARGIN * paired[1]:
            mean, se, n = paired
            model.print(
                f"tl: epoch {epoch} kept: {monitor} {float(best):.4f} against "
                f"{begin:.4f} at the start, a difference within the noise of {n:.0f} validation images "
                f"({mean / se if se > 0 else 0.0:.1f} standard errors of the per-image difference, under "
                f"{MARGIN:g}); best.ckpt holds the end of the schedule"
            )
            self.clear()
            return
        path = callback.replace_best(model.trainer, checkpoint, begin)
        got = "no epoch" if best is None or math.isnan(float(best)) else f"the best epoch ({float(best):.4f})"
        if paired is not None:
            t = paired[0] / paired[1] if paired[1] > 0 else math.inf
            got = f"the end of the schedule ({float(best):.4f}; {t:.1f} standard errors over {paired[2]:.0f} images)"
        model.print(
            f"tl: training did not beat its starting point: {monitor} {begin:.4f} at the start, {got} "
            f"after training; best.ckpt holds the starting model ({path})"
        )
        self.clear()

    def paired_difference(self, model: ModelWithStart, callback: BestAndLast) -> Optional[tuple[float, float, float]]:
        """How much better the start is than the model as training left it, image by image on
        the validation split: (mean difference of the monitor's per-image terms, its standard
        error, images); None unless the callback keeps the end and the monitor has per-image
        terms. Every rank calls this and gets the same answer (the sums are reduced)."""
        images, monitor = self.images, callback.monitor
        if not callback.keeps_the_end or images is None or self.scores is None:
            return None
        if monitor not in ("val/loss", "val/acc", "val/calibrated_loss"):
            return None
        scores, now = model.validation_scores(per_image=True)  # the model as training left it
        if now is None or now.shape != images.shape:
            return None

        def values(table: torch.Tensor, temperature: Optional[float]) -> torch.Tensor:
            if monitor == "val/acc":
                return table[:, 1]
            column = T1_INDEX if monitor == "val/loss" else int((TEMPERATURES - temperature).abs().argmin())
            return table[:, 2 + column]

        sign = 1 if callback.mode == "min" else -1
        weight = torch.ones(len(images)) if monitor == "val/acc" else images[:, 0]
        start_values = values(images, self.scores.get("val/temperature"))
        end_values = values(now, scores.get("val/temperature"))
        d = sign * (end_values - start_values).double()  # > 0: the start is better on this image
        sums = torch.stack([weight.sum(), (weight * d).sum(), (weight * d * d).sum(), (weight * weight).sum()])
        sums = sums.double().to(model.device)
        if model.trainer.world_size > 1:
            sums = model.trainer.strategy.reduce(sums, reduce_op="sum")
        total, first, second, squares = (float(v) for v in sums.cpu())
        n = total * total / squares if squares > 0 else 0.0  # images (weighted: effective count)
        if n < 2:
            return None
        mean = first / total
        se = math.sqrt(max(second / total - mean * mean, 0.0) * n / (n - 1) / n)
        return mean, se, n

    def tie(self, callback: BestAndLast) -> Optional[tuple[float, float]]:
        """(best epoch, start) on the callback's tie_break metric, when both are known."""
        held = callback.tie_score_of(callback.best_model_path)
        metric = callback.tie_break
        if self.scores is None or metric is None or metric not in self.scores or held is None:
            return None
        return held, self.scores[metric]
