"""Freezing and unfreezing the backbone: `FreezeBackbone` (feature extraction) and
`UnfreezeSchedule` (fine-tuning).

They have the shape of Lightning's `BaseFinetuning` (freeze in ``setup``, change at each
epoch start, state in ``state_dict``) without its traps:

- Which stages train is a pure function of the epoch, re-applied at every epoch start and at
  ``on_train_start`` (Lightning skips ``on_train_epoch_start`` when it resumes inside an
  epoch), so a resumed run trains what an uninterrupted one would (``BaseFinetuning``
  forgets unfrozen stages on resume: Lightning issue 21901).
- Frozen layers, and every BatchNorm layer whose statistics are not asked to update
  (``freeze.update_bn_stats``, ``unfreeze.update_unfrozen_bn_stats``), are pinned in eval
  mode, so their statistics never move (issue 15062: ``freeze(train_bn=False)`` kept updating
  them), and re-pinned before every step in case anything called ``.train()``.
- Under DDP, torch registers only the parameters that require grad when it wraps the model,
  so stages unfrozen later would never be all-reduced and every rank would fine-tune its own
  backbone. When the trainable set changes, the model is wrapped again (which also
  broadcasts rank 0's weights and buffers).

They meet the model through one attribute, ``model.backbone``; its stages, from input to
output, are ``model.backbone.tl_stages`` (tl's models set it from timm's ``group_matcher``
or torchvision's top-level children), else the backbone's top-level children.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from tl_cli.errors import TLError, warn_deprecated

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)

#: which BatchNorm layers of the backbone update their running statistics while training
BNStats = Literal["none", "unfrozen", "all"]

#: The shipped fine-tuning recipe by training-set size: what ``unfreeze.schedule: auto`` and
#: ``model.layer_decay: auto`` resolve to. Each rule: (from this many training images on, how
#: many trailing backbone stages train from epoch 0, None: all of them, the layer decay).
#: Small sets (80-180 images) were tuned with the last 4 stages at 0.7 (each earlier stage
#: learns at 0.7x the next); at 2,000 images every stage at 0.85 removed more of feature
#: extraction's test errors (bench/README.md, "accuracy at scale"). Between 180 and 2,000
#: images nothing was measured: the change is put at 1,000.
SIZE_RULES: tuple[tuple[int, Optional[int], float], ...] = ((0, 4, 0.7), (1000, None, 0.85))


def size_rule(images: int) -> tuple[int, Optional[int], float]:
    """The `SIZE_RULES` entry for a training set of `images` images."""
    return max((rule for rule in SIZE_RULES if images >= rule[0]), key=lambda rule: rule[0])


def size_rule_range(images: int) -> str:
    """The training-set sizes the rule for `images` covers, as the recipe line says them."""
    start = size_rule(images)[0]
    end = min((rule[0] for rule in SIZE_RULES if rule[0] > start), default=None)
    if end is None:
        return f"{start:,} or more"
    return f"fewer than {end:,}" if start == 0 else f"{start:,}-{end - 1:,}"


def training_images(trainer: pl.Trainer) -> Optional[int]:
    """How many images the run trains on (its datamodule's train split), if it can tell."""
    counts = getattr(getattr(trainer, "datamodule", None), "class_counts", None)
    return sum(counts("train")) if counts is not None else None


def backbone_stages(backbone: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """``(name, parameters)`` per stage, from the input to the output."""
    stages = getattr(backbone, "tl_stages", None)
    if stages is None:
        stages = [(n, [f"{n}.{p}" for p, _ in m.named_parameters()]) for n, m in backbone.named_children()]
    return [(name, [backbone.get_parameter(p) for p in names]) for name, names in stages if names]


class BackboneFreezing(pl.Callback):
    """The shared machinery of `FreezeBackbone` and `UnfreezeSchedule`.

    Args:
        schedule: ``{epoch: n}``: from that epoch on, the last ``n`` backbone stages train.
        bn_stats: which BatchNorm layers update their running statistics: ``none`` (all keep
            the pretrained ones), ``unfrozen`` (those of trainable stages), ``all``.
    """

    def __init__(
        self, schedule: Union[dict[int, int], Literal["auto"], None] = None, bn_stats: BNStats = "none"
    ) -> None:
        #: ``schedule: auto``: the stages of `SIZE_RULES` for the training set, from epoch 0
        self.auto = schedule == "auto"
        if isinstance(schedule, str) and not self.auto:
            raise TLError(f"unfreeze.schedule={schedule!r}: give {{epoch: last N stages}}, e.g. {{0: 4}}, or auto.")
        # until setup knows the data, auto stands for its smallest rule (some stages train)
        schedule = {0: SIZE_RULES[0][1]} if self.auto else schedule
        self.schedule = {int(k): int(v) for k, v in (schedule or {}).items()}
        if any(k < 0 or v < 0 for k, v in self.schedule.items()):
            raise TLError(f"unfreeze.schedule={schedule}: epochs and stage counts must be >= 0.")
        self.bn_stats = bn_stats
        self.trainable_stages = 0
        self._stages: list[tuple[str, list[nn.Parameter]]] = []
        self._pinned: list[nn.Module] = []
        self._registered: Optional[frozenset[int]] = None

    @property
    def unfreezes(self) -> bool:
        """Whether some backbone stage trains at some epoch."""
        return any(self.schedule.values())

    @property
    def output_fixed(self) -> bool:
        """The backbone's output for an image never changes this run: it can be cached."""
        return not self.unfreezes and self.bn_stats != "all"

    def stages_for_epoch(self, epoch: int) -> int:
        """How many trailing backbone stages train at `epoch` under the schedule."""
        applicable = [k for k in self.schedule if k <= epoch]
        return min(self.schedule[max(applicable)], len(self._stages)) if applicable else 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        backbone = getattr(pl_module, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise TLError(
                f"{type(self).__name__} needs the model's backbone at `model.backbone`; {type(pl_module).__name__} has none."
            )
        if self.unfreezes and not getattr(pl_module, "trains_backbone", True):
            raise TLError(
                f"unfreeze.schedule={self.schedule} unfreezes backbone stages, but {type(pl_module).__name__} never "
                "trains its backbone. Fine-tune with --model FineTune (configs/finetune.yaml)."
            )
        self._stages = backbone_stages(backbone)
        if self.auto:
            images = training_images(trainer)
            if images is None:
                raise TLError(
                    "unfreeze.schedule=auto picks the stages by the size of the training set, which this run's "
                    "data does not tell: give the schedule, e.g. --unfreeze.schedule '{0: 4}'."
                )
            stages = size_rule(images)[1]
            self.schedule = {0: len(self._stages) if stages is None else stages}
        names = ", ".join(f"{i}:{name}" for i, (name, _) in enumerate(self._stages))
        rank_zero_info(f"tl: {len(self._stages)} backbone stages (input -> output): {names}")
        self.apply(trainer, pl_module, 0)  # before DDP wraps the model: it registers what trains now
        if self.output_fixed and getattr(pl_module, "supports_feature_cache", False):
            offer = getattr(trainer.datamodule, "offer_features", None)
            if offer is not None:
                from tl_cli.data.first_pass import Extractor

                offer(
                    Extractor(
                        pl_module.extract_features,
                        pl_module.feature_identity,
                        pl_module.num_features,
                        lambda: pl_module.device,
                    )
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(trainer, pl_module, trainer.current_epoch)  # resumed runs, inside an epoch too

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for module in self._pinned:
            if module.training:  # reading is cheap; nn.Module.__setattr__ is not (every step)
                module.training = False

    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        """Make the schedule's stages for `epoch` trainable, everything else frozen and pinned."""
        count = self.stages_for_epoch(epoch)
        if count and count != self.trainable_stages:
            names = ", ".join(name for name, _ in self._stages[-count:])
            rank_zero_info(f"tl: epoch {epoch}: backbone stages trainable: {names}")
        self.trainable_stages = count
        first = len(self._stages) - count
        for i, (_, params) in enumerate(self._stages):
            for p in params:
                p.requires_grad_(i >= first)
        self._pinned = self._pin(pl_module.backbone, pl_module.training)
        self._sync_ddp(trainer, pl_module)

    def _pin(self, backbone: nn.Module, training: bool) -> list[nn.Module]:
        # A module is frozen when all its parameters are; a module without parameters
        # (dropout, drop-path, activations) follows its parent.
        frozen: dict[str, bool] = {}
        pinned = []
        for name, module in backbone.named_modules():
            params = list(module.parameters())
            is_frozen = (
                not any(p.requires_grad for p in params) if params else frozen.get(name.rpartition(".")[0], True)
            )
            frozen[name] = is_frozen
            if isinstance(module, BN_TYPES):
                pin = self.bn_stats == "none" or (is_frozen and self.bn_stats == "unfrozen")
            else:
                pin = is_frozen
            module.training = training and not pin
            if pin:
                pinned.append(module)
        return pinned

    def _sync_ddp(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.nn.parallel import DistributedDataParallel

        trainable = frozenset(id(p) for p in pl_module.backbone.parameters() if p.requires_grad)
        strategy = trainer.strategy
        wrapped = getattr(strategy, "model", None)
        if not isinstance(wrapped, DistributedDataParallel) or self._registered is None:
            self._registered = trainable  # what DDP registers when it wraps the model
            return
        if trainable != self._registered:
            # Lightning 2.6 has no public way to re-wrap a model in DDP: its strategy's own steps
            strategy.model = strategy._setup_model(pl_module)
            strategy._register_ddp_hooks()
            self._registered = trainable

    @override
    def state_dict(self) -> dict[str, Any]:
        # informational: the trainable stages are a function of the epoch, restored from it
        return {"schedule": self.schedule, "bn_stats": self.bn_stats, "trainable_stages": self.trainable_stages}


class FreezeBackbone(BackboneFreezing):
    """Feature extraction: the whole backbone frozen, weights and BatchNorm statistics, for
    the whole run; its output is then cached (``data.cache_features``).

    Args:
        update_bn_stats: let the frozen backbone's BatchNorm layers update their running
            statistics on the new images (their weights stay frozen): adapts the normalisation
            to images far from ImageNet, at the price of the feature cache.
        train_bn: deprecated: use update_bn_stats.
    """

    def __init__(self, update_bn_stats: bool = False, train_bn: Optional[bool] = None) -> None:
        if train_bn is not None:
            warn_deprecated("freeze.train_bn", "freeze.update_bn_stats")
            update_bn_stats = train_bn
        super().__init__(schedule=None, bn_stats="all" if update_bn_stats else "none")


class UnfreezeSchedule(BackboneFreezing):
    """Fine-tuning: the last backbone stages unfreeze on a schedule.

    Args:
        schedule: ``{epoch: n}``: from that epoch on, the last ``n`` backbone stages train
            (``tl fit`` prints the backbone's stages). Example: ``{0: 2, 3: 4}``. Empty or
            null: nothing unfreezes. ``auto``: from epoch 0, the stages the shipped recipe
            trains for the training set's size (`SIZE_RULES`: the last 4, or all of them from
            1,000 images on).
        update_unfrozen_bn_stats: whether BatchNorm layers of unfrozen stages update their
            running statistics (false keeps the pretrained statistics, better for small data
            sets); those of frozen stages never do.
        train_bn: deprecated: use update_unfrozen_bn_stats.
    """

    def __init__(
        self,
        schedule: Union[dict[int, int], Literal["auto"], None] = None,
        update_unfrozen_bn_stats: bool = False,
        train_bn: Optional[bool] = None,
    ) -> None:
        if train_bn is not None:
            warn_deprecated("unfreeze.train_bn", "unfreeze.update_unfrozen_bn_stats")
            update_unfrozen_bn_stats = train_bn
        super().__init__(schedule=schedule, bn_stats="unfrozen" if update_unfrozen_bn_stats else "none")
