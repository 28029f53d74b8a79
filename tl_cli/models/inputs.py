"""Mixin for `Classifier`: what the model takes from the DataModule (class names, image size;
it hands back its preprocessing), from a uint8 batch to the network's input, and the frozen
backbone's features for the feature cache."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from tl_cli.backbones.factory import Backbone
from tl_cli.data.transforms import Normalize
from tl_cli.errors import TLError


class Inputs:
    """Class names and preprocessing from the DataModule's handshake; normalisation on the
    device, the precision's input type, channels-last; the frozen backbone's features."""

    # declared by the host (`Classifier`), besides LightningModule's own
    backbone: nn.Module
    backbone_info: Backbone
    class_names: Optional[list[str]]
    preprocessing: Optional[dict[str, Any]]
    normalize: Optional[Normalize]  # set with the preprocessing, before any batch
    build_head: Callable[[int], None]
    _trainer: Optional[pl.Trainer]  # LightningModule's: None until a Trainer attaches the model

    # -- the DataModule's handshake (`tl_cli.data.module`) ---------------------------------------

    def take_class_names(self, dm: Any, stage: str) -> None:
        """The data's class names, for a model without any (and a new head); else the model's
        order imposed on the data (a checkpoint's)."""
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

    def default_image_size(self) -> Optional[int]:
        """The input size without ``data.image_size`` (None: the backbone's)."""
        return None

    def resolve_preprocessing(self, image_size: Optional[int], stage: str) -> None:
        """Training: the backbone's preprocessing at ``data.image_size``. Evaluation: the one
        the checkpoint was trained with (``data.image_size`` cannot change it)."""
        if self.preprocessing is not None and stage != "fit":
            trained = self.preprocessing["image_size"]
            if image_size is not None and [image_size, image_size] != trained:
                self.print(f"note: data.image_size={image_size} ignored; the checkpoint is evaluated at {trained}.")
            return
        prep = dict(self.backbone_info.preprocessing)
        size = image_size or self.default_image_size()
        if size is not None:
            prep["image_size"] = [int(size), int(size)]
        self.set_preprocessing(prep)

    def set_preprocessing(self, preprocessing: dict[str, Any]) -> None:
        """Use (and store in checkpoints) this input size, mean, std, interpolation, crop_pct."""
        self.preprocessing = preprocessing
        self.hparams["preprocessing"] = dict(preprocessing)
        self.normalize = Normalize(preprocessing["mean"], preprocessing["std"])

    # -- batches -------------------------------------------------------------------------------

    def use_channels_last(self) -> bool:
        """``model.channels_last``, or by default: on CUDA and on the CPU (oneDNN's convolutions
        are faster in it there too: bench/channels_last.py), off on other accelerators and
        without a trainer."""
        if self.hparams.channels_last is not None:
            return bool(self.hparams.channels_last)
        if self._trainer is None:
            return False
        return type(self.trainer.accelerator).__name__ in ("CUDAAccelerator", "CPUAccelerator")

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised, in the precision's input type and memory format."""
        if x.dtype == torch.uint8:
            x = self.normalize(x)
            if self._trainer is not None:  # bf16-true/16-true: convert after normalising
                x = self.trainer.precision_plugin.convert_input(x)
        if x.ndim == 4 and self.use_channels_last():
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare_batch(self, batch: Any) -> Any:
        """A batch ``(images, labels, index)`` with its images prepared (`prepare_input`)."""
        if isinstance(batch, dict):  # several loaders combined (domain adaptation)
            return {k: self.prepare_batch(v) for k, v in batch.items()}
        x, *rest = batch
        return (self.prepare_input(x), *rest)

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

    # -- the feature cache ---------------------------------------------------------------------

    @torch.inference_mode()
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's output for uint8 centre crops, float32 on the CPU."""
        modes = {m: m.training for m in self.backbone.modules()}
        self.backbone.eval()
        context = self.trainer.precision_plugin.forward_context() if self._trainer is not None else nullcontext()
        with context:
            out = self.backbone(self.prepare_input(images.to(self.device, non_blocking=True)))
        for module, mode in modes.items():
            module.training = mode
        return out.float().cpu()
