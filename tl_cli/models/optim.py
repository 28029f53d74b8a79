"""Mixin for `Classifier`: optimizer and learning-rate schedule. Subclasses add parameter
groups (`param_groups`) or replace the schedule (`lr_factor`)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn


class Optimization:
    """AdamW or SGD over the model's parameter groups, cosine or constant learning rate."""

    # declared by the host (`Classifier`), besides LightningModule's own
    head: nn.Linear

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the head here; subclasses add theirs."""
        return [{"params": list(self.head.parameters()), "lr": self.hparams.lr, "name": "head"}]

    def lr_factor(self, total_steps: int) -> Optional[Any]:
        """step -> learning-rate factor, or None for a constant learning rate."""
        hp = self.hparams
        if hp.scheduler == "none":
            return None
        per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        warmup = int(hp.warmup_epochs * per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

        return factor

    def optimizer_and_schedule(self) -> Any:
        """What `configure_optimizers` returns: the optimizer, with its per-step schedule."""
        hp = self.hparams
        groups = self.param_groups()
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        factor = self.lr_factor(max(1, int(self.trainer.estimated_stepping_batches)))
        if factor is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
