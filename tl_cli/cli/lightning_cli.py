"""`TLCLI`: Lightning's CLI for tl's models and data.

A thin `LightningCLI`: ``model.class_path`` picks the LightningModule (`FeatureExtraction` by
default, ``--model FineTune`` on the command line), ``data.class_path`` the DataModule; the
callbacks every run has get short sections of their own (``--freeze.update_bn_stats``,
``--unfreeze.schedule "{0: 4}"``, ``--early_stopping.patience 5``, ``--checkpoint.monitor``);
a ``--ckpt_path`` rebuilds the model it names (``fit`` without a config too: `tl_cli.cli.resume`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from tl_cli.callbacks import BestAndLast, FreezeBackbone, UnfreezeSchedule
from tl_cli.cli.mistakes import explain
from tl_cli.cli.resume import check_what_is_left, fit_from_checkpoint
from tl_cli.cli.trainer import TLTrainer
from tl_cli.data.module import ImageFolderData
from tl_cli.errors import TLError
from tl_cli.models import Classifier, DomainAdaptation
from tl_cli.models.checkpoints import model_arguments, model_class_path, read_tl_checkpoint, resolve_class

#: the callbacks with a config section of their own: (key, class, help)
CALLBACK_SECTIONS = (
    (
        "freeze",
        FreezeBackbone,
        "feature extraction: the backbone frozen for the whole run (tl_cli.callbacks.FreezeBackbone)",
    ),
    (
        "unfreeze",
        UnfreezeSchedule,
        "fine-tuning: backbone stages unfreeze on a schedule (tl_cli.callbacks.UnfreezeSchedule)",
    ),
    ("early_stopping", EarlyStopping, "stop when the monitored metric stops improving (Lightning's EarlyStopping)"),
    ("checkpoint", BestAndLast, "best.ckpt and last.ckpt (Lightning's ModelCheckpoint; last.ckpt: every epoch)"),
)


class _DropLightningAds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


for _handler in logging.getLogger("lightning.pytorch").handlers:
    _handler.addFilter(_DropLightningAds())
# tl claims the run folder before the loggers write (config.yaml lands first): not a conflict.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# tl's model normalises uint8 batches and sets their memory format there, whatever the datamodule.
warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer`")
# `tl test --ckpt_path` needs no training callbacks.
warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks")
# `tl compare` runs fits in one process, with its own argument lists
warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")


def silence_synced_metric_advice() -> None:
    """tl's models reduce their epoch metrics over the ranks before they log them (torchmetrics'
    are synced in compute()): Lightning's advice to log them with sync_dist=True does not apply.
    A metric of another name still gets it."""
    warnings.filterwarnings(
        "ignore", message=r"It is recommended to use `self\.log\('(train|val|val_target|test|test_target)/"
    )


silence_synced_metric_advice()
# frozen backbone layers are pinned in eval mode on purpose (tl_cli.callbacks.freezing)
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def _configured_model(args: list[str]) -> str:
    """The model class a help request is about: ``--model NAME``, else the last config's, else
    FeatureExtraction."""
    import yaml

    name = "FeatureExtraction"
    for i, arg in enumerate(args[:-1]):
        if arg in ("--config", "-c"):
            try:
                model = (yaml.safe_load(Path(args[i + 1]).read_text()) or {}).get("model") or {}
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(model, dict) and model.get("class_path"):
                name = model["class_path"].rpartition(".")[2]
        if arg == "--model" and not args[i + 1].startswith("-"):
            return args[i + 1]
    return name


def full_help(parser: LightningArgumentParser, args: list[str]) -> None:
    """``tl fit --help``: Lightning's help, then every key of the model class (``--model NAME`` or
    the config's), of the data module and of the callback sections, as ``--model.lr`` etc."""
    sub = args[0]
    topics = [[sub, "--help"], [sub, "--model.help", _configured_model(args)], [sub, "--data.help", "ImageFolderData"]]
    if sub == "fit":
        topics += [[sub, f"--{key}.help", cls.__name__] for key, cls, _ in CALLBACK_SECTIONS]
    for topic in topics:
        try:
            parser.parse_args(topic)
        except SystemExit:
            pass
        print()
    raise SystemExit(0)


class TLArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose mistakes are one paragraph with the fix (`mistakes.explain`):
    a `TLError`, exit status 2, no usage dump."""

    @override
    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse's inner parsers: it catches these itself
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        command = parser.prog.split()[-1]
        raise TLError(explain(message, command, parser._option_string_actions)) from None


class TLCLI(LightningCLI):
    """LightningCLI for tl: model and data classes by ``class_path``, callback sections."""

    def __init__(self, args: Optional[Sequence[str]] = None, run: bool = True, **kwargs: Any) -> None:
        if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
            # a requeued job writes the same config.yaml into the run folder it continues
            kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        if run and args and args[0] in TLCLI.subcommands():
            # build only the parser of the command asked for: every parser takes time to build
            only = {args[0]: TLCLI.subcommands()[args[0]]}
            self.subcommands = lambda: only
        silence_synced_metric_advice()  # again: a caller's warnings.catch_warnings() may have reset it
        kwargs.setdefault("parser_class", TLArgumentParser)
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("description", "tl: transfer learning for image classifiers.")
        parser_kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(
            Classifier,
            ImageFolderData,
            trainer_class=TLTrainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        """Lightning's fit/validate/test/predict, and ``lr_find`` (`TLTrainer.lr_find`)."""
        return {**LightningCLI.subcommands(), "lr_find": {"model", "datamodule"}}

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        args = list(sys.argv[1:] if args is None else args)
        if args and ("-h" in args or "--help" in args) and not any(a.endswith(".help") for a in args):
            full_help(parser, args)
        super().parse_arguments(parser, fit_from_checkpoint(args))
        sub = self.config.get("subcommand")
        if sub in ("fit", "lr_find") and not self.config[sub].get("config") and not self.config[sub].get("ckpt_path"):
            from tl_cli.cli.configs import shipped

            raise TLError(
                f"tl {sub} needs a config, which picks the model, its callbacks and their settings: tl {sub} "
                "--config feature_extract --data.root DIR (step 1), then --config finetune (step 2). Shipped "
                f"configs: {', '.join(shipped())} (`tl config show NAME`)."
            )
        self.model_from_checkpoint()

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": "tl_cli.models.FeatureExtraction"},
                "data": {"class_path": "tl_cli.data.ImageFolderData"},
            }
        )
        for key, cls, text in CALLBACK_SECTIONS:
            parser.add_argument(f"--{key}", type=Optional[cls], default=None, help=f"{text}; null: none")

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, given the ``trainer.callbacks`` list and the callback sections that are
        set (a section set to null adds no callback)."""
        init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        listed = init.trainer.get("callbacks") or []
        callbacks = list(listed) if isinstance(listed, (list, tuple)) else [listed]
        callbacks += [c for c in (init.get(key) for key, _, _ in CALLBACK_SECTIONS) if c is not None]
        trainer = super().instantiate_trainer(callbacks=callbacks, **kwargs)
        if isinstance(trainer, TLTrainer):  # MLflow / W&B go on with the run they tracked
            trainer.continue_trackers(init.get("ckpt_path"), fitting=self.subcommand == "fit")
        return trainer

    def model_from_checkpoint(self) -> None:
        """A checkpoint given to test/validate/predict rebuilds the model class it names, with
        its own hyperparameters; ``fit --ckpt_path`` resumes the configured model (its class
        must be the checkpoint's)."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        ckpt = read_tl_checkpoint(ckpt_path, what="--ckpt_path checkpoint")
        class_path = model_class_path(ckpt)
        cls = resolve_class(class_path)
        configured = self.config[sub].model.class_path
        if sub == "fit":
            if resolve_class(configured) is not cls:
                raise TLError(
                    f"--ckpt_path {ckpt_path} was written by {class_path}, but this run configures "
                    f"{configured}. Resume with the config that wrote the checkpoint."
                )
            check_what_is_left(self.config[sub], ckpt, ckpt_path)
            return
        names = cls.argument_names()
        init_args = {k: v for k, v in model_arguments(ckpt).items() if k in names}
        # evaluation options are this command's, not the checkpoint's
        init_args["tta"] = self.config[sub].model.init_args.get("tta", "none")
        model = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}
        if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
            print(f"tl: {ckpt_path}: a {cls.__name__} checkpoint ({ckpt.get('tl', {}).get('backbone')})")
        self.config = self.parser.parse_object({sub: {"model": model}}, self.config)

    # Lightning 2.6 has no public hook to replace this step, run right after `parse_arguments`: it
    # would merge the checkpoint's saved hyperparameters into the model's config, overriding this
    # command's options (``model.tta``), the configured model of ``fit --ckpt_path``, and failing
    # on arguments tl's models no longer take. `model_from_checkpoint` does tl's version instead.
    @override
    def _parse_ckpt_path(self) -> None:
        pass

    @override
    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        if cfg.trainer.get("default_root_dir") is None:
            configs = cfg.get("config") or []
            name = Path(str(configs[-1])).stem if configs else (sub or "run")
            cfg.trainer.default_root_dir = str(Path("runs") / name)
        if sub == "lr_find":  # its runs beside the config's fits, not among them
            cfg.trainer.default_root_dir = f"{str(cfg.trainer.default_root_dir).rstrip('/')}_lr_find"
        if cfg.get("freeze") is not None and cfg.get("unfreeze") is not None:
            raise TLError(
                "The config sets both freeze (the backbone frozen for the whole run) and unfreeze (stages "
                "unfreeze on a schedule). Keep one: --freeze null or --unfreeze null."
            )
        model_cls = resolve_class(cfg.model.class_path)
        target = cfg.data.init_args.get("target_root") if "init_args" in cfg.data else None
        if sub == "fit" and target and not issubclass(model_cls, DomainAdaptation):
            raise TLError(
                f"data.target_root is for domain adaptation, but the model is {model_cls.__name__}. Use "
                "configs/domain_adapt.yaml (--model DomainAdaptation), or drop --data.target_root."
            )

    def before_fit(self) -> None:
        if self.config.fit.get("ckpt_path"):
            self.model.skip_starting_weights()  # resuming: the checkpoint brings every weight
        elif self.model.hparams.lr == "auto":
            self.model.hparams.lr = 1e-3  # a placeholder for building the optimizer; the search replaces it
            suggestion = self.trainer.lr_find(self.model, self.datamodule)
            self.model.hparams.lr = suggestion
            print(f"tl: model.lr auto -> {suggestion:.3g}")

    def before_lr_find(self) -> None:
        if self.model.hparams.lr == "auto":
            self.model.hparams.lr = 1e-3

    def after_lr_find(self) -> None:
        from tl_cli.cli.runs import mark_complete

        run = getattr(self.trainer, "run_folder", None)
        if run is not None and self.trainer.is_global_zero:
            mark_complete(run.root, run.name)
