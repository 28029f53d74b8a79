"""Mixin for `FineTune` and `FeatureExtraction`: training never ends worse than where it started.

Before the first step the starting model (the ``init_from`` checkpoint, or the tuned probe) is validated and kept
(a copy on the CPU). When training ends, if no epoch beat it on the monitored metric of the
checkpoint callback (a tie going to the lower ``tie_break`` metric, when the callback has one),
``best.ckpt`` becomes the starting model; either way the run says which won and by how much.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from lightning_utilities.core.apply_func import apply_to_collection


class StartingPoint:
    """Validate the starting model first; let it compete for ``best.ckpt``."""

    def _validate_start(self) -> dict[str, float]:
        """val/loss, val/acc and val/calibrated_loss of the model as it is, over the whole
        validation split, summed as an epoch's are (`Metrics`)."""
        trainer = self.trainer
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        modes = {m: m.training for m in self.modules()}
        self.eval()
        sums = self.__dict__.setdefault("_sums", {})
        sums.pop("val", None)
        # in the precision the epochs are validated in (autocast under AMP)
        with torch.inference_mode(), trainer.precision_plugin.val_step_context():
            for batch in loader:
                batch = trainer.strategy.batch_to_device(batch)
                x, y, _ = self.on_after_batch_transfer(batch, 0)
                logits = self(x)
                self.accumulate("val", self.loss(logits, y, train=False), logits, y)
        for module, mode in modes.items():
            module.training = mode
        if "val" not in sums:  # an empty loader: the ranks still reduce together
            sums["val"] = self.zero_sums("val")
        return {k: float(v) for k, v in self.epoch_metrics("val").items()}

    def keep_starting_point(self) -> None:
        """Called at the start of a fresh (not resumed) fit."""
        trainer = self.trainer
        self._start: Optional[dict[str, Any]] = None
        callback = trainer.checkpoint_callback
        if callback is None or trainer.ckpt_path is not None or not trainer.val_dataloaders:
            return
        scores = self._validate_start()
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        copy = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))
        self._start = {"scores": scores, "checkpoint": copy}
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
        path = callback.best_model_path or str(callback.format_checkpoint_name({}))
        self.trainer.strategy.save_checkpoint(start["checkpoint"], path)
        callback.best_model_path, callback.best_model_score = path, torch.tensor(begin)
        got = "no epoch" if best is None or math.isnan(float(best)) else f"the best epoch ({float(best):.4f})"
        self.print(
            f"tl: training did not beat its starting point: {callback.monitor} {begin:.4f} at the start, {got} "
            f"after training; best.ckpt holds the starting model ({path})"
        )
        self._start = None

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
