"""Mixin for `Classifier`: loss and accuracy per epoch, without a ``self.log`` per step.

A step only adds ``[loss x n, correct, n]`` to a running sum on the device (no host
synchronisation, no Lightning bookkeeping); each epoch logs the means once, summed over the
ranks with one all-reduce. The step loss goes to the progress bar and the loggers every
``trainer.log_every_n_steps`` steps, as often as Lightning writes it anyway.
"""

from __future__ import annotations

from typing import Any

import torch


class Metrics:
    """Running sums per prefix (``train``, ``val``, ``val_target``, ``test``, ``test_target``)."""

    def accumulate(self, prefix: str, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        sums = getattr(self, "_sums", None)
        if sums is None:
            sums = self._sums = {}
        n = torch.tensor(float(len(y)), device=logits.device)
        step = torch.stack([loss.detach().float() * n, (logits.detach().argmax(1) == y).sum().float(), n])
        sums[prefix] = step if prefix not in sums else sums[prefix] + step

    def log_step_loss(self, loss: torch.Tensor, batch_idx: int) -> None:
        if batch_idx % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)

    def _log_sums(self, *prefixes: str) -> None:
        sums = getattr(self, "_sums", {})
        for prefix in prefixes:
            if prefix not in sums:
                continue
            total = sums.pop(prefix)
            if self.trainer.world_size > 1:  # every rank logs every prefix here, in this order
                total = self.trainer.strategy.reduce(total, reduce_op="sum")
            count = total[2].clamp(min=1)
            loss_key = f"{prefix}/loss_epoch" if prefix == "train" else f"{prefix}/loss"
            shown = prefix in ("train", "val")
            self.log(loss_key, total[0] / count, prog_bar=shown, add_dataloader_idx=False)
            self.log(f"{prefix}/acc", total[1] / count, prog_bar=shown, add_dataloader_idx=False)

    def on_train_epoch_end(self) -> None:
        self._log_sums("train")
        super().on_train_epoch_end()

    def on_validation_epoch_end(self) -> None:
        self._log_sums("val", "val_target")
        metrics = {"val/balanced_acc": self.val_balanced_acc, "val/macro_f1": self.val_macro_f1}
        if self.val_balanced_acc.update_count:  # torchmetrics syncs the ranks in compute()
            for key, metric in metrics.items():
                self.log(key, metric.compute(), add_dataloader_idx=False)
                metric.reset()
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._log_sums("test", "test_target")
        super().on_test_epoch_end()

    def on_test_epoch_start(self) -> Any:
        self._sums = {}
        return super().on_test_epoch_start()
