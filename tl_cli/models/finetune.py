"""Step 2 of the recipe: fine-tuning from the feature-extraction checkpoint."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from typing_extensions import override

from tl_cli.errors import TLError
from tl_cli.models.base import Classifier
from tl_cli.models.checkpoints import read_tl_checkpoint


class FineTune(Classifier):
    """Fine-tuning: backbone stages train too, at ``lr x backbone_lr_ratio``.

    Which stages train, and from which epoch, is the `tl_cli.callbacks.UnfreezeSchedule`
    callback's (``--unfreeze.schedule``); without a freezing callback the whole backbone trains.
    Every backbone parameter is in the optimizer from the start (frozen ones have no gradient
    and are skipped), so unfreezing never changes the optimizer and a resumed run's state fits.
    Fine-tuning never ends worse than where it started: the starting model is validated before
    the first step and competes for ``best.ckpt`` (`tl_cli.models.starting_point`).

    Args:
        init_from: the feature-extraction checkpoint (its ``best.ckpt``) whose backbone and
            head start this run; its classes and, unless ``data.image_size`` is set, its input
            size are kept. Without it the run starts from ``model.weights`` with an untrained
            head, which is what domain adaptation and full training from pretrained weights
            do; for the recipe, pass it: a random head sends large, random gradients into the
            pretrained features during the first steps (linear probe, then fine-tune: LP-FT).
        backbone_lr_ratio: learning rate of the backbone's last stage = ``lr`` x this.
        layer_decay: each stage further from the head learns this much slower than the next
            (layer-wise learning-rate decay: early layers hold the most general features);
            1: the whole backbone at ``lr x backbone_lr_ratio``; ``auto``: the shipped recipe's
            for the training set's size (`tl_cli.callbacks.freezing.SIZE_RULES`: 0.7, or 0.85
            from 1,000 images on, where every stage trains).
        mixup_alpha: MixUp (Zhang et al. 2018) of training batches: each batch is blended with
            a shuffled copy of itself, images and labels alike, by a Beta(alpha, alpha) weight;
            0: off.
        cutmix_alpha: CutMix (Yun et al. 2019): a box of the shuffled copy is pasted in, labels
            mixed by its area; 0: off. Both set: one of the two for each batch, at random (as
            timm's and DeiT's recipes). Train accuracy is then counted against each image's
            own label.
        *args: everything `Classifier` takes (backbone, weights, lr, ...).
        **kwargs: everything `Classifier` takes (backbone, weights, lr, ...).
    """

    trains_backbone = True
    competes_with_start = True
    #: whether MixUp / CutMix may be switched on (`DomainAdaptation` has its own training step)
    supports_batch_mixing = True
    #: whether a run without ``init_from`` is worth a note (the recipe starts from the probe)
    expects_init_from = True

    def __init__(
        self,
        *args: Any,
        init_from: Optional[str] = None,
        backbone_lr_ratio: float = 0.1,
        layer_decay: Union[float, Literal["auto"]] = 1.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if backbone_lr_ratio < 0 or (layer_decay != "auto" and not 0 < layer_decay <= 1):
            raise TLError(
                f"model.backbone_lr_ratio={backbone_lr_ratio} must be >= 0 and model.layer_decay={layer_decay} in (0, 1]."
            )
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise TLError(
                f"model.mixup_alpha={mixup_alpha} and model.cutmix_alpha={cutmix_alpha} must be >= 0 (0: off)."
            )
        if (mixup_alpha or cutmix_alpha) and not self.supports_batch_mixing:
            raise TLError(
                f"{type(self).__name__} does not mix batches: leave model.mixup_alpha and model.cutmix_alpha at 0."
            )
        #: the ``init_from`` checkpoint, read once (its classes, input size, backbone and head)
        self.init_checkpoint = read_tl_checkpoint(init_from, what="model.init_from checkpoint") if init_from else None
        if self.init_checkpoint is not None and not kwargs.get("class_names"):
            kwargs["class_names"] = list(self.init_checkpoint["tl"]["class_names"])
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        mixers = [mix(alpha=alpha) for mix, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha > 0]
        # torchvision's MixUp / CutMix (stateless modules), or None: off
        self.mixer = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers) if mixers else None
        if self.mixer is not None:
            self.supports_feature_cache = False  # mixing needs the images, not their features
        if self.init_checkpoint is not None and self.init_checkpoint["tl"]["backbone"] != self.hparams.backbone:
            raise TLError(
                f"model.init_from={init_from} was trained with backbone {self.init_checkpoint['tl']['backbone']}, "
                f"but this run asks for {self.hparams.backbone}. Use the same model.backbone."
            )

    def mix_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixer is None:
            return x, y
        # soft targets: cross-entropy takes class probabilities (with label smoothing and class
        # weights on top), so the loss is the usual one, on the mixed labels. torchvision draws
        # the weight, the box and the choice from the global generator, which a resumed run
        # restores (tl_cli.callbacks.resume): it mixes what an uninterrupted run would.
        return self.mixer(x, F.one_hot(y, self.head.out_features).to(x.dtype))  # x: normalised already

    def default_image_size(self) -> Optional[int]:
        if self.init_checkpoint is not None and self.init_checkpoint["tl"].get("preprocessing"):
            return int(self.init_checkpoint["tl"]["preprocessing"]["image_size"][0])
        return None

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.expects_init_from and self.init_checkpoint is None and self.trainer.ckpt_path is None:
            self.print(
                "tl: note: no model.init_from, so the head starts untrained; for the recipe pass the "
                "feature-extraction best.ckpt (a random head distorts the pretrained features at first)."
            )

    @override
    def say_recipe(self) -> None:
        from tl_cli.callbacks.freezing import BackboneFreezing, size_rule_range, training_images

        trainer = self.trainer
        dm = getattr(trainer, "datamodule", None)
        images = training_images(trainer)
        stages = len(self.backbone_info.stages)
        freezing = next((c for c in trainer.callbacks if isinstance(c, BackboneFreezing)), None)
        if freezing is None:
            trains = f"all {stages} backbone stages train"
        elif not freezing.schedule:
            trains = "the backbone stays frozen"
        else:
            steps = [
                f"the last {min(n, stages)} of {stages} from epoch {e}" for e, n in sorted(freezing.schedule.items())
            ]
            trains = "backbone stages trainable: " + ", ".join(steps)
        bn = {"none": "pinned", "unfrozen": "updated in trainable stages", "all": "updated"}
        bn_stats = bn.get(freezing.bn_stats, freezing.bn_stats) if freezing is not None else "updated"
        epochs, per_epoch = trainer.max_epochs, trainer.num_training_batches
        length = f"{epochs} epochs x {per_epoch} steps = {epochs * per_epoch} steps" if epochs and epochs > 0 else ""
        augment = getattr(dm, "augment", None)
        what = f"for {images:,} training images" if images is not None else ""
        if images is not None and (self.hparams.get("layer_decay") == "auto" or getattr(freezing, "auto", False)):
            what += f" (auto: the shipped recipe for {size_rule_range(images)})"
        self.print(
            f"tl: fine-tuning recipe {what}: {length}; {trains} (layer decay {self.layer_decay():g}, "
            f"BatchNorm statistics {bn_stats}); lr {self.hparams.lr:g} at the head, "
            f"{self.hparams.lr * self.hparams.backbone_lr_ratio:g} at the last stage; augment {augment}, "
            f"label smoothing {self.hparams.label_smoothing:g}"
        )

    def load_starting_weights(self) -> None:
        if self.init_checkpoint is None:
            return super().load_starting_weights()
        state, own = self.init_checkpoint["state_dict"], self.state_dict()
        wanted = [k for k in own if k.startswith(("backbone.", "head."))]
        missing = [k for k in wanted if k not in state]
        if missing:
            raise TLError(f"model.init_from={self.hparams.init_from} lacks tensors {missing[:3]}.")
        self.load_state_dict({k: state[k] for k in wanted}, strict=False)
        self.print(f"tl: backbone and head from {self.hparams.init_from}")

    def layer_decay(self) -> float:
        """``model.layer_decay``, with ``auto`` resolved for the training set's size."""
        decay = self.hparams.get("layer_decay", 1.0)
        if decay != "auto":
            return float(decay)
        from tl_cli.callbacks.freezing import size_rule, training_images

        images = training_images(self._trainer) if self._trainer is not None else None
        if images is None:
            raise TLError(
                "model.layer_decay=auto picks the decay by the size of the training set, which this run's data "
                "does not tell: give a number, e.g. --model.layer_decay 0.7."
            )
        return size_rule(images)[2]

    def param_groups(self) -> list[dict[str, Any]]:
        top = self.hparams.lr * self.hparams.backbone_lr_ratio
        decay = self.layer_decay()
        neck = list(self.neck.parameters())
        groups = super().param_groups() + ([{"params": neck, "lr": self.hparams.lr, "name": "neck"}] if neck else [])
        if decay == 1.0:
            return [*groups, {"params": list(self.backbone.parameters()), "lr": top, "name": "backbone"}]
        stages = self.backbone_info.stages
        for i, (name, params) in enumerate(stages):  # one group per stage, input to output
            lr = top * decay ** (len(stages) - 1 - i)
            groups.append(
                {"params": [self.backbone.get_parameter(p) for p in params], "lr": lr, "name": f"backbone.{name}"}
            )
        return groups
