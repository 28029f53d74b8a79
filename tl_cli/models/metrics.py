"""Mixin for `Classifier`: loss and accuracy per epoch, summed on the device, logged once.

A step adds ``[loss x n, correct, n]`` to a running sum (no host synchronisation); each epoch
logs the means once, summed over the ranks with one all-reduce. Validation also logs
``val/calibrated_loss``, the cross-entropy at the one temperature fitted on the split itself
(Guo et al. 2017), with ``val/temperature``: a temperature changes no prediction, so this loss
compares how good the probabilities are without rewarding a model for being less confident,
which plain ``val/loss`` does (label smoothing, early epochs). It is the minimum over a fixed
grid of temperatures, summed like the other metrics (no logits kept).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch

# The temperatures tried for val/calibrated_loss: 1/2 to 16, a twelfth of an octave (6 %) apart
# (the loss is flat in log T near its minimum). Not below 1/2: on a split the model gets all
# right the loss falls towards 0 with T, and every such epoch would tie at "0".
TEMPERATURE_LOGSPACE = (math.log10(0.5), math.log10(16.0), 61)  # torch.logspace's arguments
TEMPERATURES = torch.logspace(*TEMPERATURE_LOGSPACE)
T1_INDEX = 12  # TEMPERATURES[T1_INDEX] == 1: the plain cross-entropy
CHUNK = 16  # temperatures at a time: [16, batch, classes] floats, not [61, ...] (1000 classes)


def nll_by_temperature(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[len(TEMPERATURES), batch]``: each image's cross-entropy at each temperature."""
    z = logits.detach().float()
    temps = torch.logspace(*TEMPERATURE_LOGSPACE, device=z.device)  # made on the device: no copy, no host sync
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
    if not losses[k] < losses[T1_INDEX] - 1e-7:
        k = T1_INDEX
    return losses[k], TEMPERATURES[k].to(losses.device)


class Metrics:
    """Running sums per prefix (``train``, ``val``, ``val_target``, ``test``, ``test_target``),
    logged once an epoch by `log_epoch`; `validation_scores` scores the model as it is."""

    # declared by the host (`Classifier`), besides LightningModule's own
    sums: dict[str, torch.Tensor]  # prefix -> running sum of this epoch
    loss_weight: Optional[torch.Tensor]  # class weights of the loss, or None
    val_balanced_acc: Any  # torchmetrics MulticlassAccuracy(average="macro")
    val_macro_f1: Any  # torchmetrics MulticlassF1Score(average="macro")
    loss: Callable[..., torch.Tensor]  # (logits, targets, train) -> the loss

    def accumulate(self, prefix: str, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch's loss and hits to the running sum under ``prefix``."""
        n = torch.tensor(float(len(y)), device=logits.device)
        step = torch.stack([loss.detach().float() * n, (logits.detach().argmax(1) == y).sum().float(), n])
        if prefix == "val":
            step = torch.cat([step, calibration_sums(logits, y, self.loss_weight)])
        self.sums[prefix] = step if prefix not in self.sums else self.sums[prefix] + step

    def log_step_loss(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Log the training step's loss every ``trainer.log_every_n_steps`` steps."""
        if batch_idx % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)

    def epoch_metrics(self, prefix: str) -> dict[str, torch.Tensor]:
        """The epoch's means of what `accumulate` summed under ``prefix``, over every rank (each
        rank calls this for every prefix, in the same order); the sums start again."""
        total = self.sums.pop(prefix)
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        count = total[2].clamp(min=1)
        loss_key = f"{prefix}/loss_epoch" if prefix == "train" else f"{prefix}/loss"
        out = {loss_key: total[0] / count, f"{prefix}/acc": total[1] / count}
        if len(total) > 3:
            # the loss at T = 1 is val/loss, as the weighted mean over the whole split (with class
            # weights the mean of the batches' weighted means would depend on the batch size)
            out[loss_key] = total[4 + T1_INDEX] / total[3].clamp(min=1e-12)
            out[f"{prefix}/calibrated_loss"], out[f"{prefix}/temperature"] = calibrated(total[3:])
        return out

    def zero_sums(self, prefix: str) -> torch.Tensor:
        """What `accumulate` sums under ``prefix`` over no batch (a rank with none still reduces)."""
        return torch.zeros(3 + (1 + len(TEMPERATURES) if prefix == "val" else 0), device=self.device)

    def log_epoch(self, *prefixes: str) -> None:
        """Log the epoch's metrics of each prefix that has sums."""
        for prefix in [p for p in prefixes if p in self.sums]:
            shown = prefix in ("train", "val")
            for key, value in self.epoch_metrics(prefix).items():
                bar = shown and key.rsplit("/", 1)[1] in ("loss", "loss_epoch", "acc")
                self.log(key, value, prog_bar=bar, add_dataloader_idx=False)

    def log_class_balanced(self) -> None:
        """Log val/balanced_acc and val/macro_f1 (torchmetrics syncs the ranks in compute())."""
        if self.val_balanced_acc.update_count:
            for key, metric in {"val/balanced_acc": self.val_balanced_acc, "val/macro_f1": self.val_macro_f1}.items():
                self.log(key, metric.compute(), add_dataloader_idx=False)
                metric.reset()

    def validation_scores(self, per_image: bool = False) -> tuple[dict[str, float], Optional[torch.Tensor]]:
        """val/loss, val/acc, val/calibrated_loss and val/temperature of the model as it is, on
        the validation batches an epoch sees, in its precision, summed as an epoch's are; with
        ``per_image``, also this rank's `image_scores` (on the CPU, in the loader's order)."""
        trainer = self.trainer
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        modes = {m: m.training for m in self.modules()}
        self.eval()
        self.sums.pop("val", None)
        images = []
        limit = trainer.num_val_batches[0] if trainer.num_val_batches else math.inf  # limit_val_batches
        with torch.inference_mode(), trainer.precision_plugin.val_step_context():
            for i, batch in enumerate(loader):
                if i >= limit:
                    break
                batch = trainer.strategy.batch_to_device(batch)
                x, y, _ = self.on_after_batch_transfer(batch, 0)
                logits = self(x)
                self.accumulate("val", self.loss(logits, y, train=False), logits, y)
                if per_image:
                    images.append(image_scores(logits, y, self.loss_weight).cpu())
        for module, mode in modes.items():
            module.training = mode
        if "val" not in self.sums:  # an empty loader: the ranks still reduce together
            self.sums["val"] = self.zero_sums("val")
        scores = {k: float(v) for k, v in self.epoch_metrics("val").items()}
        kept = torch.cat(images) if images else torch.zeros(0, 2 + len(TEMPERATURES))
        return scores, kept if per_image else None
