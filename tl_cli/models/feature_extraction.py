"""Step 1 of the recipe: a new head on a frozen backbone."""

from __future__ import annotations

from typing import Any, Literal

from typing_extensions import override

from tl_cli.models.base import Classifier


class FeatureExtraction(Classifier):
    """Feature extraction: the backbone stays frozen, weights and BatchNorm statistics, and a
    new linear head trains on its pooled output ("bottleneck features").

    The freezing is the `tl_cli.callbacks.FreezeBackbone` callback's (the shipped config lists
    it; without one, the model adds it). Since the frozen backbone sees the same images every
    epoch, its output is computed once and cached unless train-time augmentation is on
    (``data.cache_features``), so an epoch costs milliseconds and the head can train to
    convergence.

    Args:
        head_init: ``probe``: on cached features, before the first epoch the head is set to
            the tuned linear probe (logistic regression to convergence, its L2 strength chosen
            on ``val/``; see `tl_cli.models.probe`); the epochs then go on from it, and it
            competes for ``best.ckpt`` with them. ``random``: the epochs alone train the head.
            Without cached features (augmentation on) the head starts random either way.
        *args: everything `Classifier` takes (backbone, weights, lr, ...).
        **kwargs: everything `Classifier` takes (backbone, weights, lr, ...).
    """

    competes_with_start = True

    def __init__(self, *args: Any, head_init: Literal["probe", "random"] = "probe", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()

    @override
    def configure_callbacks(self) -> list[Any]:
        from tl_cli.callbacks import BackboneFreezing, FreezeBackbone

        if any(isinstance(c, BackboneFreezing) for c in self.trainer.callbacks):
            return []
        return [FreezeBackbone()]

    @override
    def on_train_start(self) -> None:
        if self.hparams.get("head_init", "random") == "probe" and self.trainer.ckpt_path is None:
            self.start_from_probe()
        super().on_train_start()  # keeps the starting point: the probe, when it set the head

    def start_from_probe(self) -> None:
        """Set the head to the tuned linear probe on the cached train/val features."""
        import torch

        from tl_cli.cluster import distributed
        from tl_cli.data.datasets import FeatureDataset
        from tl_cli.models.probe import fit_linear_probe

        dm = self.trainer.datamodule
        dataset_for = getattr(dm, "dataset_for", None)
        sets = [dataset_for(s) for s in ("train", "val")] if dataset_for else []
        if len(sets) != 2 or not all(isinstance(s, FeatureDataset) for s in sets):
            self.print("tl: head_init probe needs cached features (data.augment none); the head starts random")
            return
        (train, val), weight = sets, self.loss_weight
        smoothing = self.hparams.label_smoothing

        def fit() -> Any:
            return fit_linear_probe(
                train.features, train.labels, val.features, val.labels, len(self.class_names), weight, smoothing
            )

        # rank 0 fits, every rank gets its head (identical weights on every rank under DDP)
        probe = distributed.on_rank_zero(fit, timeout=1800.0)
        with torch.no_grad():
            self.head.weight.copy_(probe.weight.to(self.head.weight))
            self.head.bias.copy_(probe.bias.to(self.head.bias))
        self.print(
            f"tl: head = tuned linear probe on {len(train)} cached features: L2 C={probe.c:.3g} chosen on val/ "
            f"by {probe.chosen_by} ({len(val)} images; val acc {probe.val_acc:.4f}, val loss {probe.val_loss:.4f}); "
            "the epochs go on from it"
        )
