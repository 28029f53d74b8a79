"""Transfer when the target has no labels: Domain-Adversarial Training (DANN, Ganin et al. 2016).

A labelled *source* domain (``data.root``) and an unlabelled *target* domain
(``data.target_root``) share one backbone. The label head learns from source labels only; a
domain classifier learns to tell source from target features, and a gradient-reversal layer
between it and the backbone pushes the backbone towards features the domain classifier cannot
separate, so the label head carries over to the target.

Schedules from the paper (both switchable): the reversal weight grows from 0 to
``lambda_max`` as ``2 / (1 + exp(-10 p)) - 1`` and the learning rate anneals as
``lr / (1 + 10 p) ** 0.75``, with ``p`` the training progress from 0 to 1.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from tl_cli.errors import TLError
from tl_cli.models.finetune import FineTune


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grad, None


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-weight`` backward."""
    return _ReverseGradient.apply(x, weight)


def dann_lambda(progress: float, maximum: float = 1.0) -> float:
    """The paper's reversal weight: ``2 / (1 + exp(-10 p)) - 1``, scaled to `maximum`."""
    return maximum * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)


def annealed_lr_factor(progress: float) -> float:
    """The paper's learning-rate annealing factor ``1 / (1 + 10 p) ** 0.75``."""
    return 1.0 / (1.0 + 10.0 * progress) ** 0.75


class DomainAdaptation(FineTune):
    """DANN: a `FineTune` plus a domain classifier behind gradient reversal. Needs
    ``data.target_root``; evaluated like any classifier (``tl test`` reports the target too
    when ``--data.target_root`` is given).

    The recipe of the maintained implementations for pretrained backbones (thuml's
    Transfer-Learning-Library): a bottleneck (linear, batch norm, ReLU) between the backbone
    and both the label head and the domain classifier, a domain classifier of two hidden
    layers with batch norm, SGD with momentum, the backbone at a tenth of the learning rate
    (``backbone_lr_ratio``), the paper's reversal-weight ramp and learning-rate annealing.

    Args:
        dann: train the domain classifier through gradient reversal; false trains on source
            labels alone (the "source only" baseline, same everything else).
        bottleneck: width of the bottleneck the label head and the domain classifier share;
            0: none (the paper's digit networks).
        domain_hidden: width of the domain classifier's two hidden layers.
        lambda_max: final weight of the reversed gradient.
        lambda_schedule: grow the weight from 0 to lambda_max as 2/(1+exp(-10 p)) - 1; false
            keeps it at lambda_max.
        lr_annealing: anneal the learning rate as lr / (1 + 10 p)^0.75 (replaces
            ``model.scheduler``); false keeps ``model.scheduler``.
        *args: everything `FineTune` takes (backbone, weights, lr, backbone_lr_ratio, ...).
        **kwargs: everything `FineTune` takes (backbone, weights, lr, backbone_lr_ratio, ...).
    """

    supports_feature_cache = False  # the backbone is what adapts
    supports_batch_mixing = False  # its own training step: source and target batches
    expects_init_from = False  # domain adaptation starts from pretrained weights by design
    bottleneck_width: int  # set before Classifier.__init__, which builds the neck and the head

    def __init__(
        self,
        *args: Any,
        dann: bool = True,
        bottleneck: int = 256,
        domain_hidden: int = 1024,
        lambda_max: float = 1.0,
        lambda_schedule: bool = True,
        lr_annealing: bool = True,
        **kwargs: Any,
    ) -> None:
        self.bottleneck_width = bottleneck  # read by build_neck() and head_in_features()
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        width = self.head_in_features()
        self.domain_classifier = nn.Sequential(
            nn.Linear(width, domain_hidden),
            nn.BatchNorm1d(domain_hidden),
            nn.ReLU(),
            nn.Linear(domain_hidden, domain_hidden),
            nn.BatchNorm1d(domain_hidden),
            nn.ReLU(),
            nn.Linear(domain_hidden, 1),
        )
        # source only never uses it: DDP must not wait for its gradients
        self.domain_classifier.requires_grad_(dann)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state, own = checkpoint["state_dict"], self.state_dict()
        keys = [k for k in state if k.startswith("domain_classifier.")]
        if any(k not in own or own[k].shape != state[k].shape for k in keys) or len(keys) != sum(
            k.startswith("domain_classifier.") for k in own
        ):
            # a domain classifier of an older layout: evaluation does not use it, training
            # starts a new one (the label head and the backbone load as they are)
            for k in keys:
                del state[k]
            self.strict_loading = False

    def build_neck(self) -> nn.Module:
        """The bottleneck: linear, batch norm, ReLU (or nothing, with width 0)."""
        width = self.bottleneck_width
        if not width:
            return nn.Identity()
        return nn.Sequential(nn.Linear(self.num_features, width), nn.BatchNorm1d(width), nn.ReLU())

    def head_in_features(self) -> int:
        return self.bottleneck_width or self.num_features

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and getattr(dm, "target_root", None) is None:
            raise TLError("DomainAdaptation needs --data.target_root, the folder of unlabelled target images.")

    def progress(self) -> float:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        return min(1.0, self.global_step / max(1.0, float(total)))

    def reversal_weight(self) -> float:
        hp = self.hparams
        return dann_lambda(self.progress(), hp.lambda_max) if hp.lambda_schedule else hp.lambda_max

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Label loss on source images; domain loss on both (target labels are never read)."""
        (xs, ys, _), (xt, _, _) = batch["source"], batch["target"]
        if self.hparams.dann:
            # one forward over both domains: batch-norm layers normalise source and target with
            # the same statistics in training, as their running averages will at test time
            # (separate forwards normalise each domain by itself and fail at test time)
            features = self.neck(self.backbone(torch.cat([xs, xt])))
            source = features[: len(xs)]
        else:
            source = self.neck(self.backbone(xs))  # source only: the target is never seen
        logits = self.head(self.dropout(source))
        out = {"label": self.loss(logits, ys, train=True), "logits": logits}
        out["total"] = out["label"]
        if self.hparams.dann:
            out["lambda"] = torch.tensor(self.reversal_weight())
            domain_logits = self.domain_classifier(reverse_gradient(features, float(out["lambda"]))).squeeze(1)
            domain = torch.cat([torch.zeros(len(xs)), torch.ones(len(xt))]).to(domain_logits)
            out["domain"] = F.binary_cross_entropy_with_logits(domain_logits, domain)
            out["domain_acc"] = ((domain_logits > 0).float() == domain).float().mean()
            # a target-side signal that needs no labels: how sure the label head is there
            with torch.no_grad():
                target_probs = self.head(features[len(xs) :].detach()).float().softmax(1)
                out["target_entropy"] = -(target_probs * target_probs.clamp(min=1e-12).log()).sum(1).mean()
            out["total"] = out["label"] + out["domain"]
        return out

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # replaces Classifier's
        out = self.losses(batch)
        n = len(batch["source"][1])
        self.log("train/loss_label", out["label"], on_epoch=True, sync_dist=True, on_step=False, batch_size=n)
        if "domain" in out:
            self.log("train/loss_domain", out["domain"], on_step=False, on_epoch=True, sync_dist=True, batch_size=2 * n)
            self.log(
                "train/domain_acc", out["domain_acc"], on_epoch=True, sync_dist=True, prog_bar=True, batch_size=2 * n
            )
            self.log("train/lambda", out["lambda"], on_step=True, on_epoch=False)
            self.log(
                "train/target_entropy",
                out["target_entropy"],
                on_step=False,
                on_epoch=True,
                sync_dist=True,
                batch_size=n,
            )
        self.accumulate("train", out["total"], out["logits"], batch["source"][1])
        self.log_step_loss(out["total"], batch_idx)
        return out["total"]

    def param_groups(self) -> list[dict[str, Any]]:
        domain = {"params": list(self.domain_classifier.parameters()), "lr": self.hparams.lr, "name": "domain"}
        return [*super().param_groups(), domain]

    def lr_factor(self, total_steps: int) -> Optional[Any]:
        if not self.hparams.lr_annealing:
            return super().lr_factor(total_steps)
        return lambda step: annealed_lr_factor(step / total_steps)
