"""Mixin for `Classifier`: from a uint8 batch to the network's input, and the frozen
backbone's features for the feature cache."""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from typing import Any

import torch


class Inputs:
    """Normalisation on the device, the precision's input type, channels-last; features."""

    def use_channels_last(self) -> bool:
        if self.hparams.channels_last is not None:
            return bool(self.hparams.channels_last)
        return self._trainer is not None and type(self.trainer.accelerator).__name__ == "CUDAAccelerator"

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> normalised, in the precision's input type and memory format."""
        if x.dtype == torch.uint8:
            x = self.normalize(x)
            if self._trainer is not None:  # bf16-true/16-true: convert after normalising
                x = self.trainer.precision_plugin.convert_input(x)
        if x.ndim == 4 and self.use_channels_last():
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict):  # several loaders combined (domain adaptation)
            return {k: self.on_after_batch_transfer(v, dataloader_idx) for k, v in batch.items()}
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
