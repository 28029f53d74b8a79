"""Lightning's side of ``tl``: the Trainer and LightningCLI subclasses.

Imported only for Lightning's subcommands, so ``tl data ...`` starts without Lightning.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from tl_cli.callbacks import PreemptionCheckpoint
from tl_cli.cli import EPILOG, next_version
from tl_cli.data import ImageFolderData
from tl_cli.models import TransferClassifier, read_tl_checkpoint


def _cuda_wanted(accelerator: Any) -> bool:
    import torch

    return (accelerator in ("auto", "gpu", "cuda") or accelerator is None) and torch.cuda.is_available()


def resolve_precision(precision: Any, accelerator: Any = "auto") -> Any:
    """``auto``: bf16-mixed on CUDA GPUs that support it, 16-mixed on older ones, 32-true otherwise."""
    if precision != "auto":
        return precision
    import torch

    if _cuda_wanted(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _DropLightningAds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


for _handler in logging.getLogger("lightning.pytorch").handlers:
    _handler.addFilter(_DropLightningAds())
# tl creates the run folder before the CSV logger does (config.yaml lands first): not a conflict.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# tl's model moves image batches to channels-last there, whatever the datamodule.
warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer`")
# `tl test --ckpt_path` needs no training callbacks.
warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks")


def _keep_csv_rows(logger: CSVLogger, root: Path) -> None:
    """Carry a requeued run's metrics.csv over: Lightning's CSV writer deletes the file it
    finds, so the rows logged before the checkpoint the job resumes from are handed back to it."""
    import csv

    import torch

    path = Path(logger.log_dir) / "metrics.csv"
    hpc = sorted(root.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not path.is_file() or not hpc:
        return
    step = torch.load(hpc[-1], map_location="cpu", weights_only=True, mmap=True).get("global_step", 0)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        keys = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("step", "") == "" or int(float(r["step"])) < step]
    writer = logger.experiment  # creating it removes the old file
    writer.metrics_keys = keys + [k for k in writer.metrics_keys if k not in keys]
    writer.metrics.extend({k: v for k, v in r.items() if v != ""} for r in rows)


class TLTrainer(Trainer):
    """Lightning's Trainer with tl's defaults: ``precision: auto``, TensorBoard + CSV logs in
    ``default_root_dir/version_N`` and a ``default_root_dir/latest`` link to that run.
    """

    def __init__(self, *args: Any, precision: Any = "auto", **kwargs: Any) -> None:
        chosen = resolve_precision(precision, kwargs.get("accelerator", "auto"))
        if precision == "auto":
            rank_zero_info(f"tl: trainer.precision=auto -> {chosen}")
        logger = kwargs.get("logger")
        root = kwargs.get("default_root_dir")
        if root and logger in (None, True):
            root = Path(root)
            version = next_version(root)
            restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
            latest = root / "latest"
            continuing = restarts > 0 and latest.is_symlink() and (root / os.readlink(latest)).is_dir()
            if continuing:
                # a requeued SLURM job continues its run's folder instead of starting another
                version = int(os.readlink(latest).rsplit("_", 1)[1])
            csv_logger = CSVLogger(save_dir=str(root), name="", version=version)
            kwargs["logger"] = [
                TensorBoardLogger(save_dir=str(root), name="", version=version, default_hp_metric=False),
                csv_logger,
            ]
            if continuing and rank_zero_only.rank == 0:
                _keep_csv_rows(csv_logger, root)
            if rank_zero_only.rank == 0:
                run_dir = root / f"version_{version}"
                run_dir.mkdir(parents=True, exist_ok=True)
                latest = root / "latest"
                if latest.is_symlink() or not latest.exists():
                    latest.unlink(missing_ok=True)
                    latest.symlink_to(run_dir.name)
        kwargs["callbacks"] = [*_as_list(kwargs.get("callbacks")), PreemptionCheckpoint()]
        if SLURMEnvironment.detect():
            # tl's PreemptionCheckpoint saves at a batch boundary and requeues; Lightning's own
            # handler would save from inside the signal handler, mid-step
            plugins = _as_list(kwargs.get("plugins"))
            if not any(isinstance(p, SLURMEnvironment) for p in plugins):
                kwargs["plugins"] = [*plugins, SLURMEnvironment(auto_requeue=False)]
        if kwargs.get("benchmark") is None and _cuda_wanted(kwargs.get("accelerator", "auto")):
            # fixed input size: let cuDNN pick its fastest kernels (no effect on CPU)
            kwargs["benchmark"] = not kwargs.get("deterministic")
        super().__init__(*args, precision=chosen, **kwargs)


def wants_domain_adaptation(argv: Sequence[str]) -> bool:
    """Domain adaptation is asked for by a ``data.target_root`` (argument or config) or by a
    DANN checkpoint; everything else is the classifier."""
    import yaml

    args = list(argv)
    if any(a == "--data.target_root" or a.startswith("--data.target_root=") for a in args):
        return True
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
        if arg.split("=", 1)[0] in ("--config", "-c"):
            try:
                config = yaml.safe_load(Path(value).read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue  # the parser reports it properly
            data = config.get("data") or {}
            if isinstance(data, dict) and (data.get("target_root") or data.get("init_args", {}).get("target_root")):
                return True
        if arg.split("=", 1)[0] == "--ckpt_path" and Path(value).is_file():
            try:
                import torch

                ckpt = torch.load(value, map_location="cpu", weights_only=True, mmap=True)
                if isinstance(ckpt, dict) and ckpt.get("tl", {}).get("kind") == "domain_adapt":
                    return True
            except Exception:
                continue  # read_tl_checkpoint explains a bad file
    return False


class TLCLI(LightningCLI):
    """LightningCLI for tl: model and data fixed, checkpoint-driven test/predict."""

    def __init__(
        self,
        args: Optional[Sequence[str]] = None,
        run: bool = True,
        model_class: type = TransferClassifier,
        datamodule_class: type = ImageFolderData,
        **kwargs: Any,
    ) -> None:
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            # a requeued job writes the same config.yaml into the run folder it continues
            kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {})
        kwargs["parser_kwargs"].setdefault("description", "tl: transfer learning for image classifiers.")
        kwargs["parser_kwargs"].setdefault("epilog", EPILOG)
        kwargs["parser_kwargs"].setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(
            model_class,
            datamodule_class,
            trainer_class=TLTrainer,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        """A checkpoint rebuilds the model: its hyperparameters replace the config's model."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        ckpt = read_tl_checkpoint(ckpt_path, what="--ckpt_path checkpoint")
        hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
        hparams["init_from"] = None  # the checkpoint itself holds the weights
        self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)

    def before_fit(self) -> None:
        if self.config.fit.get("ckpt_path"):
            self.model._weights_ready = True  # resuming: the checkpoint brings every weight

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        if cfg.trainer.get("default_root_dir") is None:
            configs = cfg.get("config") or []
            name = Path(str(configs[-1])).stem if configs else (sub or "run")
            cfg.trainer.default_root_dir = str(Path("runs") / name)
