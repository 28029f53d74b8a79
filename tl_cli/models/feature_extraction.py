"""Step 1 of the recipe: a new head on a frozen backbone."""

from __future__ import annotations

from typing import Any

from tl_cli.models.base import Classifier


class FeatureExtraction(Classifier):
    """Feature extraction: the backbone stays frozen, weights and BatchNorm statistics, and a
    new linear head trains on its pooled output ("bottleneck features").

    The freezing is the `tl_cli.callbacks.FreezeBackbone` callback's (the shipped config lists
    it; without one, the model adds it). Since the frozen backbone sees the same images every
    epoch, its output is computed once and cached unless train-time augmentation is on
    (``data.cache_features``), so an epoch costs milliseconds and the head can train to
    convergence. Takes the arguments of `Classifier`.
    """

    def configure_callbacks(self) -> list[Any]:
        from tl_cli.callbacks import BackboneFreezing, FreezeBackbone

        if any(isinstance(c, BackboneFreezing) for c in self.trainer.callbacks):
            return []
        return [FreezeBackbone()]
