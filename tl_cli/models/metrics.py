"""Mixin for `Classifier`: loss and accuracy per epoch, without a ``self.log`` per step.

A step only adds ``[loss x n, correct, n]`` to a running sum on the device (no host
synchronisation, no Lightning bookkeeping); each epoch logs the means once, summed over the
ranks with one all-reduce. The step loss goes to the progress bar and the loggers every
``trainer.log_every_n_steps`` steps, as often as Lightning writes it anyway.

Validation also logs ``val/calibrated_loss``: the cross-entropy after temperature scaling
(Guo et al. 2017, "On calibration of modern neural networks"), the one temperature fitted on
the same validation split, with ``val/temperature`` (above 1: the model is overconfident).
Plain ``val/loss`` mixes two things, how well the model ranks the classes and how confident it
is; two models trained differently (a probe without label smoothing, fine-tuning with it; an
early epoch and a late, more confident one) differ in the second as much as in the first, and
``val/loss`` then picks the less confident one though it is the less accurate. One scalar
fitted on the split itself takes the confidence out (a temperature does not change any
prediction) and leaves what selection should compare, the quality of the probabilities up to
their scale. It is computed as the loss at each of a fixed grid of temperatures, summed like the
other metrics (no logits kept, one all-reduce), and its minimum taken: the loss is flat in
log T near its minimum, so a grid 6 % apart is within a fraction of a percent of it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

# The temperatures tried for val/calibrated_loss: 1/2 to 16, a twelfth of an octave (6 %) apart;
# number 12 is 1. Not below 1/2: on a validation split the model gets all right, the loss falls
# towards 0 as T does, and any such epoch would tie with any other at "0". 1/2 doubles the
# logits, enough to undo label smoothing (0.1, even over 1000 classes, needs T ~0.8).
GRID = (math.log10(0.5), math.log10(16.0), 61)
ONE = 12
TEMPERATURES = torch.logspace(*GRID)
CHUNK = 16  # temperatures at a time: [16, batch, classes] floats, not [101, ...] (1000 classes)


def nll_by_temperature(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[len(TEMPERATURES), batch]``: each image's cross-entropy at each temperature."""
    z = logits.detach().float()
    temps = torch.logspace(*GRID, device=z.device)  # made on the device: no copy, no host sync
    zy = z.gather(1, y.view(-1, 1)).squeeze(1)
    return torch.cat(
        [
            torch.logsumexp(z.unsqueeze(0) / t.view(-1, 1, 1), -1) - zy.unsqueeze(0) / t.view(-1, 1)
            for t in temps.split(CHUNK)
        ]
    )


def calibration_sums(logits: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[sum of w_i, then sum of w_i * NLL_i(logits / T) for each T of TEMPERATURES]``, where
    ``w_i`` is the class weight of image i (1 without class weights)."""
    w = image_weights(logits, y, weight)
    # no matmul: autocast would run it in bf16 against the float weights
    return torch.cat([w.sum().view(1), (nll_by_temperature(logits, y) * w).sum(1)])


def image_weights(logits: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each image's class weight (1 without class weights), as the validation sums weigh it."""
    ones = torch.ones(len(y), device=logits.device)
    return ones if weight is None else weight.to(logits.device, torch.float32)[y]


def image_scores(logits: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[batch, 2 + len(TEMPERATURES)]``: each image's weight, whether it is right, and its
    cross-entropy at each temperature: the terms of val/acc, val/loss and val/calibrated_loss, for
    a paired comparison of two models on the same images (`tl_cli.models.starting_point`).

    The cross-entropies are capped at ``log(1000 x classes)`` (the true class 1000 times less
    likely than chance): a t-test on raw log losses is blind to a wrecked model, because one
    image with a loss of 1e30 makes the standard error as large as the mean."""
    right = (logits.detach().argmax(1) == y).float()
    nll = nll_by_temperature(logits, y).T.clamp(max=math.log(1000 * logits.shape[1]))
    return torch.cat([image_weights(logits, y, weight)[:, None], right[:, None], nll], 1)


def calibrated(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the lowest loss over the temperatures, its temperature) from summed `calibration_sums`;
    a tie (logits all equal: every temperature gives the same loss) or NaN goes to T = 1. A
    model whose best temperature lies beyond the grid (overconfident and near chance) gets the
    loss at T = 16, above its true minimum: it only ranks such a model lower still."""
    losses = sums[1:] / sums[0].clamp(min=1e-12)
    k = int(losses.argmin())
    if not losses[k] < losses[ONE] - 1e-7:
        k = ONE
    return losses[k], TEMPERATURES[k].to(losses.device)


class Metrics:
    """Running sums per prefix (``train``, ``val``, ``val_target``, ``test``, ``test_target``)."""

    def accumulate(self, prefix: str, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        sums = getattr(self, "_sums", None)
        if sums is None:
            sums = self._sums = {}
        n = torch.tensor(float(len(y)), device=logits.device)
        step = torch.stack([loss.detach().float() * n, (logits.detach().argmax(1) == y).sum().float(), n])
        if prefix == "val":
            step = torch.cat([step, calibration_sums(logits, y, getattr(self, "loss_weight", None))])
        sums[prefix] = step if prefix not in sums else sums[prefix] + step

    def log_step_loss(self, loss: torch.Tensor, batch_idx: int) -> None:
        if batch_idx % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)

    def epoch_metrics(self, prefix: str) -> dict[str, torch.Tensor]:
        """The epoch's means of what `accumulate` summed under ``prefix``, over every rank (each
        rank calls this for every prefix, in the same order); the sums start again."""
        total = self._sums.pop(prefix)
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        count = total[2].clamp(min=1)
        loss_key = f"{prefix}/loss_epoch" if prefix == "train" else f"{prefix}/loss"
        out = {loss_key: total[0] / count, f"{prefix}/acc": total[1] / count}
        if len(total) > 3:
            # the loss at T = 1 is val/loss, as the weighted mean over the whole split (with class
            # weights the mean of the batches' weighted means would depend on the batch size)
            out[loss_key] = total[4 + ONE] / total[3].clamp(min=1e-12)
            out[f"{prefix}/calibrated_loss"], out[f"{prefix}/temperature"] = calibrated(total[3:])
        return out

    def zero_sums(self, prefix: str) -> torch.Tensor:
        """What `accumulate` sums under ``prefix`` over no batch (a rank with none still reduces)."""
        return torch.zeros(3 + (1 + len(TEMPERATURES) if prefix == "val" else 0), device=self.device)

    def _log_sums(self, *prefixes: str) -> None:
        sums = getattr(self, "_sums", {})
        for prefix in [p for p in prefixes if p in sums]:
            shown = prefix in ("train", "val")
            for key, value in self.epoch_metrics(prefix).items():
                bar = shown and key.rsplit("/", 1)[1] in ("loss", "loss_epoch", "acc")
                self.log(key, value, prog_bar=bar, add_dataloader_idx=False)

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
