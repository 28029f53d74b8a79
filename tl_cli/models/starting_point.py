"""Mixin for `FineTune` and `FeatureExtraction`: training never ends worse than where it started.

Before the first step the starting model (the ``init_from`` checkpoint, or the tuned probe) is validated and kept
(a copy on the CPU). When training ends, if no epoch beat it on the monitored metric of the
checkpoint callback, ``best.ckpt`` becomes the starting model; either way the run says which
won and by how much.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning_utilities.core.apply_func import apply_to_collection


class StartingPoint:
    """Validate the starting model first; let it compete for ``best.ckpt``."""

    def _validate_start(self) -> dict[str, float]:
        """val/loss and val/acc of the model as it is, over the whole validation split."""
        trainer = self.trainer
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        modes = {m: m.training for m in self.modules()}
        self.eval()
        sums = torch.zeros(3, device=self.device)
        with torch.inference_mode():
            for batch in loader:
                batch = trainer.strategy.batch_to_device(batch)
                x, y, _ = self.on_after_batch_transfer(batch, 0)
                logits = self(x)
                loss = F.cross_entropy(logits, y, weight=getattr(self, "loss_weight", None), reduction="sum")
                sums += torch.stack(
                    [
                        loss.float(),
                        (logits.argmax(1) == y).sum().float(),
                        torch.tensor(float(len(y)), device=self.device),
                    ]
                )
        for module, mode in modes.items():
            module.training = mode
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums.clone(), reduce_op="sum")
        n = float(sums[2].clamp(min=1))
        return {"val/loss": float(sums[0]) / n, "val/acc": float(sums[1]) / n}

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
        if best is not None and sign * (float(best) - begin) <= 0:
            epoch = self._best_epoch(callback)
            self.print(
                f"tl: epoch {epoch} won: {callback.monitor} {float(best):.4f} against {begin:.4f} at the start "
                f"({float(best) - begin:+.4f}); best.ckpt holds it"
            )
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
    def _best_epoch(callback: Any) -> str:
        epoch = getattr(callback, "saved_epochs", {}).get(callback.best_model_path)
        return "?" if epoch is None else str(epoch)
