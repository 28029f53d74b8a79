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
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch import nn

from tl_cli.data import ImageFiles, ImageFolderData, list_images, scan_split
from tl_cli.errors import TLError
from tl_cli.models import TransferClassifier
from tl_cli.transforms import eval_transform, train_transform

KIND = "domain_adapt"


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


class DomainAdaptation(TransferClassifier):
    """DANN: a `TransferClassifier` plus a domain classifier behind gradient reversal.

    Args:
        dann: train the domain classifier through gradient reversal; false trains on source
            labels alone (the "source only" baseline, same everything else).
        domain_hidden: width of the domain classifier's two hidden layers.
        lambda_max: final weight of the reversed gradient.
        lambda_schedule: grow the weight from 0 to lambda_max as 2/(1+exp(-10 p)) - 1; false
            keeps it at lambda_max.
        lr_annealing: anneal the learning rate as lr / (1 + 10 p)^0.75 (replaces
            ``model.scheduler``); false keeps ``model.scheduler``.
        **kwargs: everything `TransferClassifier` takes (backbone, weights, lr, unfreeze, ...).
    """

    def __init__(
        self,
        *args: Any,
        dann: bool = True,
        domain_hidden: int = 256,
        lambda_max: float = 1.0,
        lambda_schedule: bool = True,
        lr_annealing: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        width = self.spec.num_features
        self.domain_classifier = nn.Sequential(
            nn.Linear(width, domain_hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(domain_hidden, domain_hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(domain_hidden, 1),
        )

    @property
    def frozen_for_whole_run(self) -> bool:
        return False  # the backbone is what adapts: never serve cached features

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
            features = self.features(torch.cat([xs, xt]))
            source = features[: len(xs)]
        else:
            source = self.features(xs)  # source only: the target is never seen
        logits = self.head(self.dropout(source))
        out = {
            "label": F.cross_entropy(logits, ys, weight=getattr(self, "loss_weight", None)),
            "acc": (logits.argmax(1) == ys).float().mean(),
        }
        out["total"] = out["label"]
        if self.hparams.dann:
            out["lambda"] = torch.tensor(self.reversal_weight())
            domain_logits = self.domain_classifier(reverse_gradient(features, float(out["lambda"]))).squeeze(1)
            domain = torch.cat([torch.zeros(len(xs)), torch.ones(len(xt))]).to(domain_logits)
            out["domain"] = F.binary_cross_entropy_with_logits(domain_logits, domain)
            out["domain_acc"] = ((domain_logits > 0).float() == domain).float().mean()
            out["total"] = out["label"] + out["domain"]
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.losses(batch)
        n = len(batch["source"][1])
        self.log("train/loss_label", out["label"], on_step=True, on_epoch=True, batch_size=n)
        self.log("train/acc", out["acc"], on_epoch=True, batch_size=n)
        if "domain" in out:
            self.log("train/loss_domain", out["domain"], on_epoch=True, batch_size=2 * n)
            self.log("train/domain_acc", out["domain_acc"], on_epoch=True, prog_bar=True, batch_size=2 * n)
            self.log("train/lambda", out["lambda"], on_step=True, on_epoch=False)
        self.log("train/loss", out["total"], on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        return out["total"]

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            return super().validation_step(batch, batch_idx)
        x, y, _ = batch
        logits = self(x)
        self.log(
            "val_target/acc",
            (logits.argmax(1) == y).float().mean(),
            on_epoch=True,
            batch_size=len(y),
            add_dataloader_idx=False,
            sync_dist=True,
        )
        self.log(
            "val_target/loss",
            F.cross_entropy(logits, y),
            on_epoch=True,
            batch_size=len(y),
            add_dataloader_idx=False,
            sync_dist=True,
        )

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y, index = batch
        logits = self(x)
        prefix = "test" if dataloader_idx == 0 else "test_target"
        self.log(
            f"{prefix}/acc",
            (logits.argmax(1) == y).float().mean(),
            on_epoch=True,
            batch_size=len(y),
            add_dataloader_idx=False,
            sync_dist=True,
        )
        self._outputs.append(
            {
                "probs": logits.float().softmax(1).cpu(),
                "target": y.cpu(),
                "index": index.cpu(),
                "split": dataloader_idx,
            }
        )

    def on_test_epoch_end(self) -> None:
        from tl_cli.reports import write_test_reports

        outputs, self._outputs = self._outputs, []
        out_dir = self._out_dir()
        dm = self.trainer.datamodule
        gathered = {}
        for idx, split in enumerate(("test", "target_test")):
            if split in dm.datasets:  # every rank takes part in the gather
                gathered[idx] = self._gathered(("probs", "target", "index"), [o for o in outputs if o["split"] == idx])
        if not self.trainer.is_global_zero:
            return
        summary = {}
        for idx, (name, split) in enumerate((("source", "test"), ("target", "target_test"))):
            if idx not in gathered or not len(gathered[idx][2]):
                continue
            probs, target, index = gathered[idx]
            paths = dm.paths(split)
            self.print(f"\n== {name} domain ==")
            metrics = write_test_reports(
                out_dir if idx == 0 else out_dir / "target",
                class_names=self.class_names,
                paths=[paths[i] for i in index.tolist()],
                target=target,
                probs=probs,
                checkpoint=str(self.trainer.ckpt_path) if self.trainer.ckpt_path else None,
                print_fn=self.print,
            )
            summary[name] = metrics["accuracy"]
        self.print("tl: accuracy " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        optimizer = config["optimizer"] if isinstance(config, dict) else config
        optimizer.add_param_group(
            {"params": list(self.domain_classifier.parameters()), "lr": self.hparams.lr, "name": "domain"}
        )
        if not self.hparams.lr_annealing:
            if isinstance(config, dict):  # the scheduler was built before the new group existed
                config["lr_scheduler"]["scheduler"].base_lrs.append(self.hparams.lr)
                config["lr_scheduler"]["scheduler"].lr_lambdas.append(config["lr_scheduler"]["scheduler"].lr_lambdas[0])
            return config
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: annealed_lr_factor(step / total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tl"]["kind"] = KIND


class DomainAdaptationData(ImageFolderData):
    """Labelled source images (``root``) and target images (``target_root``) drawn together.

    Args:
        target_root: the target domain. Its training images are ``target_root/train/`` (any
            sub-folders; their names are ignored: labels never reach training) or, without a
            ``train/`` folder, every image under ``target_root`` outside ``val/`` and
            ``test/``. Labelled ``target_root/val/<class>/`` and ``target_root/test/<class>/``
            folders, if present, only report target accuracy.
        **kwargs: everything `ImageFolderData` takes.
    """

    def __init__(self, *args: Any, target_root: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not target_root:
            raise TLError("Domain adaptation needs --data.target_root, the folder of unlabelled target images.")
        self.target_root = Path(target_root)

    def _target_train_paths(self) -> list[Path]:
        if not self.target_root.is_dir():
            raise TLError(f"data.target_root={str(self.target_root)!r} does not exist.")
        if (self.target_root / "train").is_dir():
            return list_images(self.target_root / "train")
        paths = [
            p for p in list_images(self.target_root) if p.relative_to(self.target_root).parts[0] not in ("val", "test")
        ]
        return paths

    def _target_labelled(self, split: str) -> Optional[list[tuple[Path, int]]]:
        folder = self.target_root / split
        if not folder.is_dir():
            return None
        found = scan_split(folder)
        from tl_cli.data import check_same_classes

        check_same_classes(self.class_names, sorted(found), folder, "the source")
        index = {name: i for i, name in enumerate(self.class_names)}
        return self._screen(folder, [(p, index[c]) for c in sorted(found) for p in found[c]])

    def setup(self, stage: str) -> None:
        super().setup(stage)
        prep = self.preprocessing
        if stage == "fit":
            paths = self._target_train_paths()
            if not paths:
                raise TLError(f"data.target_root={str(self.target_root)!r} holds no training images.")
            unlabelled = self._screen(self.target_root, [(p, -1) for p in paths])
            self.datasets["target_train"] = ImageFiles(unlabelled, train_transform(self.augment, prep))
            val = self._target_labelled("val")
            if val:
                self.datasets["target_val"] = ImageFiles(val, eval_transform(prep))
        if stage == "test":
            test = self._target_labelled("test")
            if test:
                self.datasets["target_test"] = ImageFiles(test, eval_transform(prep))

    def train_dataloader(self) -> CombinedLoader:
        source = super().train_dataloader()
        target = self._loader(self.served("target_train"), "train", shuffle=True)
        return CombinedLoader({"source": source, "target": target}, mode="max_size_cycle")

    def val_dataloader(self) -> Any:
        loaders = [super().val_dataloader()]
        if "target_val" in self.datasets:
            loaders.append(self._loader(self.served("target_val"), "val"))
        return loaders

    def test_dataloader(self) -> Any:
        loaders = [super().test_dataloader()]
        if "target_test" in self.datasets:
            loaders.append(self._loader(self.datasets["target_test"], "test"))
        return loaders
