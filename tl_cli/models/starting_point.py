"""Mixin for `FineTune` and `FeatureExtraction`: training never ends worse than where it started.

Before the first step the starting model (the ``init_from`` checkpoint, or the tuned probe) is validated and kept
(a copy on the CPU). When training ends, if no epoch beat it on the monitored metric of the
checkpoint callback (a tie going to the lower ``tie_break`` metric, when the callback has one),
``best.ckpt`` becomes the starting model; either way the run says which won and by how much.

With ``checkpoint.select: last`` the end of the schedule is the candidate, and the start takes
its place only when validation can tell: the start's per-image losses (or hits) are compared
with the end's on the same images, and the start must be better by more than `MARGIN` standard
errors of that paired difference. On 8-12 validation images a class the two often differ by
less than the noise, and a prior for the schedule's end is what fine-tuning is run for.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from lightning_utilities.core.apply_func import apply_to_collection

from tl_cli.models.metrics import ONE, TEMPERATURES, image_scores

# With checkpoint.select=last, how much better the start must be than the end of the schedule,
# in standard errors of the paired per-image difference (one-sided, about 2 % by chance).
MARGIN = 2.0


class StartingPoint:
    """Validate the starting model first; let it compete for ``best.ckpt``."""

    def _validate_start(self, per_image: bool = False) -> tuple[dict[str, float], Optional[torch.Tensor]]:
        """val/loss, val/acc and val/calibrated_loss of the model as it is, over the batches of
        the validation split an epoch sees, summed as an epoch's are (`Metrics`); with ``per_image``, also this
        rank's `image_scores` (on the CPU, in the loader's order)."""
        trainer = self.trainer
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        modes = {m: m.training for m in self.modules()}
        self.eval()
        sums = self.__dict__.setdefault("_sums", {})
        sums.pop("val", None)
        images = []
        # in the precision the epochs are validated in (autocast under AMP)
        # the batches an epoch's validation sees (trainer.limit_val_batches), so the start and the
        # epochs are scored on the same images
        limit = trainer.num_val_batches[0] if trainer.num_val_batches else math.inf
        with torch.inference_mode(), trainer.precision_plugin.val_step_context():
            for i, batch in enumerate(loader):
                if i >= limit:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                x, y, _ = self.on_after_batch_transfer(batch, 0)
                logits = self(x)
                self.accumulate("val", self.loss(logits, y, train=False), logits, y)
                if per_image:
                    images.append(image_scores(logits, y, getattr(self, "loss_weight", None)).cpu())
        for module, mode in modes.items():
            module.training = mode
        if "val" not in sums:  # an empty loader: the ranks still reduce together
            sums["val"] = self.zero_sums("val")
        scores = {k: float(v) for k, v in self.epoch_metrics("val").items()}
        kept = torch.cat(images) if images else torch.zeros(0, 2 + len(TEMPERATURES))
        return scores, kept if per_image else None

    def keep_starting_point(self) -> None:
        """Called at the start of a fresh (not resumed) fit."""
        trainer = self.trainer
        self._start: Optional[dict[str, Any]] = None
        callback = trainer.checkpoint_callback
        if callback is None or trainer.ckpt_path is not None or not trainer.val_dataloaders:
            return
        if trainer.limit_val_batches == 0:  # no epoch is validated: nothing to compete with
            return
        scores, images = self._validate_start(per_image=getattr(callback, "select", "best") == "last")
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        copy = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))
        self._start = {"scores": scores, "checkpoint": copy, "images": images}
        self.print(
            "tl: starting point: "
            + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            + " (it competes for best.ckpt)"
        )

    def settle_starting_point(self) -> None:
        """Called when training ends: the starting point wins if no epoch beat it."""
        start = getattr(self, "_start", None)
        callback = self.trainer.checkpoint_callback
        if not start or callback is None or not callback.monitor or callback.monitor not in start["scores"]:
            return
        begin = start["scores"][callback.monitor]
        best = callback.best_model_score
        sign = 1 if callback.mode == "min" else -1
        # accuracy is a float32 on the epochs' side: equal within 1e-6 is a tie
        diff = sign * (float(best) - begin) if best is not None else math.nan
        tie = self._tie(callback, start["scores"]) if abs(diff) <= 1e-6 else None
        if diff < -1e-6 or (abs(diff) <= 1e-6 and (tie is None or tie[0] < tie[1])):
            won = f"{callback.monitor} {float(best):.4f} against {begin:.4f} at the start ({float(best) - begin:+.4f})"
            if tie is not None:
                won += f", {callback.tie_break} {tie[0]:.4f} against {tie[1]:.4f}"
            self.print(f"tl: epoch {self._best_epoch(callback)} won: {won}; best.ckpt holds it")
            return
        paired = self._paired_difference(callback, start, sign) if diff > 1e-6 else None
        if paired is not None and paired[0] <= MARGIN * paired[1]:
            mean, se, n = paired
            self.print(
                f"tl: epoch {self._best_epoch(callback)} kept: {callback.monitor} {float(best):.4f} against "
                f"{begin:.4f} at the start, a difference within the noise of {n:.0f} validation images "
                f"({mean / se if se > 0 else 0.0:.1f} standard errors of the per-image difference, under "
                f"{MARGIN:g}); best.ckpt holds the end of the schedule"
            )
            return
        path = callback.best_model_path or str(callback.format_checkpoint_name({}))
        self.trainer.strategy.save_checkpoint(start["checkpoint"], path)
        callback.best_model_path, callback.best_model_score = path, torch.tensor(begin)
        got = "no epoch" if best is None or math.isnan(float(best)) else f"the best epoch ({float(best):.4f})"
        if paired is not None:
            got = f"the end of the schedule ({float(best):.4f}; {paired[0] / paired[1] if paired[1] > 0 else math.inf:.1f} standard errors over {paired[2]:.0f} images)"
        self.print(
            f"tl: training did not beat its starting point: {callback.monitor} {begin:.4f} at the start, {got} "
            f"after training; best.ckpt holds the starting model ({path})"
        )
        self._start = None

    def _paired_difference(
        self, callback: Any, start: dict[str, Any], sign: int
    ) -> Optional[tuple[float, float, float]]:
        """With ``select: last``: how much better the start is than the model as training left it,
        image by image on the validation split: (mean difference of the monitor's per-image
        terms, its standard error, images), or None where the monitor has no per-image terms.
        Every rank calls this and gets the same answer (the sums are reduced)."""
        images = start.get("images")
        if getattr(callback, "select", "best") != "last" or images is None:
            return None
        monitor = callback.monitor
        if monitor not in ("val/loss", "val/acc", "val/calibrated_loss"):
            return None
        scores, now = self._validate_start(per_image=True)  # the model as training left it
        if now.shape != images.shape:
            return None

        def values(table: torch.Tensor, temperature: Optional[float]) -> torch.Tensor:
            if monitor == "val/acc":
                return table[:, 1]
            column = ONE if monitor == "val/loss" else int((TEMPERATURES - temperature).abs().argmin())
            return table[:, 2 + column]

        weight = torch.ones(len(images)) if monitor == "val/acc" else images[:, 0]
        start_values = values(images, start["scores"].get("val/temperature"))
        end_values = values(now, scores.get("val/temperature"))
        d = sign * (end_values - start_values).double()  # > 0: the start is better on this image
        sums = torch.stack([weight.sum(), (weight * d).sum(), (weight * d * d).sum(), (weight * weight).sum()])
        sums = sums.double().to(self.device)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        total, first, second, squares = (float(v) for v in sums.cpu())
        n = total * total / squares if squares > 0 else 0.0  # images (weighted: effective count)
        if n < 2:
            return None
        mean = first / total
        se = math.sqrt(max(second / total - mean * mean, 0.0) * n / (n - 1) / n)
        return mean, se, n

    @staticmethod
    def _tie(callback: Any, scores: dict[str, float]) -> Optional[tuple[float, float]]:
        """(best epoch, start) on the callback's tie_break metric, when both are known."""
        metric = getattr(callback, "tie_break", None)
        held = getattr(callback, "tie_scores", {}).get(callback.best_model_path)
        return None if metric not in scores or held is None else (held, scores[metric])

    @staticmethod
    def _best_epoch(callback: Any) -> str:
        epoch = getattr(callback, "saved_epochs", {}).get(callback.best_model_path)
        return "?" if epoch is None else str(epoch)
