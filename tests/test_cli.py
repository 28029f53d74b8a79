"""The command-line contract: subcommands, classes picked by class_path, documented keys,
configs, callback sections, precision, run folders."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONFIGS, REPO, TINY, tl
from tl_cli.cli.lightning_cli import TLCLI
from tl_cli.cli.trainer import resolve_precision

CONTRACT_KEYS = [
    "data.root",
    "data.batch_size",
    "data.min_steps_per_epoch",
    "data.num_workers",
    "data.augment",
    "data.image_size",
    "data.predict_dir",
    "data.target_root",
    "data.cache_features",
    "data.cache_images",
    "data.cache_dir",
    "data.on_bad_image",
    "model.backbone",
    "model.weights",
    "model.lr",
    "model.optimizer",
    "model.scheduler",
    "model.class_weights",
    "freeze.update_bn_stats",
    "unfreeze.schedule",
    "unfreeze.update_unfrozen_bn_stats",
    "early_stopping.patience",
    "checkpoint.monitor",
    "trainer.precision",
]


def test_top_level_help_is_fast_and_lists_commands():
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tl_cli.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0
    for sub in ("fit", "validate", "test", "predict", "tl data synth", "tl weights fetch", "tl export", "tl slurm"):
        assert sub in done.stdout
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tl_cli.cli.main; print('torch' in sys.modules, 'lightning' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout.split()
    assert imported == ["False", "False"], "tl --help must not import torch or Lightning"
    assert time.perf_counter() - start < 30  # loose: the measured figure is bench/startup.py's


def test_fit_help_documents_every_contract_key(capsys):
    assert tl("fit", "--help") == 0
    out = capsys.readouterr().out
    for key in CONTRACT_KEYS:
        assert f"--{key} " in out, key
    # docstrings become help text; the default model is FeatureExtraction
    assert "Model (--model.KEY; tl_cli.models.FeatureExtraction;" in out
    assert "from that epoch on, the last `n` backbone stages train" in " ".join(out.split())


def test_model_option_picks_the_class_and_its_help(capsys):
    assert tl("fit", "--model", "FineTune", "--help") == 0
    out = capsys.readouterr().out
    assert "Model (--model.KEY; tl_cli.models.FineTune;" in out
    assert "--model.init_from " in out and "--model.backbone_lr_ratio " in out
    assert tl("fit", "--help") == 0
    assert "--model.backbone_lr_ratio " not in capsys.readouterr().out  # FeatureExtraction has none


def _cli(*args):
    return TLCLI(args=[str(a) for a in args], run=False)


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_instantiates_its_classes(config):
    stack = [CONFIGS / config]
    if config.startswith("demo_finetune"):
        stack = [CONFIGS / "finetune.yaml", *stack]
    elif config.startswith("demo"):
        stack = [CONFIGS / "feature_extract.yaml", *stack]
    cli = _cli(*[a for c in stack for a in ("--config", c)])
    expected = {"feature_extract": "FeatureExtraction", "finetune": "FineTune", "domain_adapt": "DomainAdaptation"}
    kind = next(v for k, v in expected.items() if k in config or (config == "demo.yaml" and k == "feature_extract"))
    assert type(cli.model).__name__ == kind
    assert type(cli.datamodule).__name__ == "ImageFolderData"
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert ("FreezeBackbone" in names) == (kind == "FeatureExtraction")
    assert ("UnfreezeSchedule" in names) == (kind != "FeatureExtraction")
    assert {"BestAndLast", "PreemptionCheckpoint", "ExactResume"} <= names
    assert type(cli.trainer.callbacks[0]).__name__ == "SyncEpochMetrics"
    assert cli.trainer.precision == "32-true"  # auto on a CPU-only machine
    assert str(cli.trainer.default_root_dir).startswith("runs")


def test_configs_read_as_the_contract():
    """model.class_path / data.class_path pick the classes; freezing is a visible callback."""
    fe = yaml.safe_load((CONFIGS / "feature_extract.yaml").read_text())
    ft = yaml.safe_load((CONFIGS / "finetune.yaml").read_text())
    assert fe["model"]["class_path"] == "tl_cli.models.FeatureExtraction" and "freeze" in fe
    assert ft["model"]["class_path"] == "tl_cli.models.FineTune" and ft["unfreeze"]["schedule"]
    assert fe["data"]["class_path"] == ft["data"]["class_path"] == "tl_cli.data.ImageFolderData"
    assert "early_stopping" in fe and "checkpoint" in fe


def test_callback_sections_are_one_short_flag_away():
    cli = _cli("--config", CONFIGS / "finetune.yaml", "--unfreeze.schedule", "{0: 4}", "--early_stopping.patience", "7")
    by_name = {type(c).__name__: c for c in cli.trainer.callbacks}
    assert by_name["UnfreezeSchedule"].schedule == {0: 4}
    assert by_name["EarlyStopping"].patience == 7
    cli = _cli(
        "--config", CONFIGS / "finetune.yaml", "--early_stopping", "null", "--trainer.enable_progress_bar", "false"
    )
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert "EarlyStopping" not in names and not any("Progress" in n for n in names)
    cli = _cli("--config", CONFIGS / "finetune.yaml", "--trainer.callbacks", "LearningRateMonitor")
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert {"LearningRateMonitor", "UnfreezeSchedule", "EarlyStopping", "BestAndLast"} <= set(names)
    assert len(names) == len(set(names))  # each once


DEPRECATED = [  # (section, old key, value, new key, attribute, value it sets)
    ("freeze", "train_bn", "true", "update_bn_stats", "bn_stats", "all"),
    ("unfreeze", "train_bn", "true", "update_unfrozen_bn_stats", "bn_stats", "unfrozen"),
    ("data", "steps_per_epoch", "5", "min_steps_per_epoch", "min_steps_per_epoch", 5),
]


def _built(cli, section):
    if section == "data":
        return cli.datamodule
    cls = {"freeze": "FreezeBackbone", "unfreeze": "UnfreezeSchedule"}[section]
    return next(c for c in cli.trainer.callbacks if type(c).__name__ == cls)


@pytest.mark.parametrize(("section", "old", "value", "new", "attribute", "expected"), DEPRECATED)
def test_deprecated_keys_still_work_and_name_their_new_key(
    section, old, value, new, attribute, expected, tmp_path, capsys
):
    config = CONFIGS / ("feature_extract.yaml" if section == "freeze" else "finetune.yaml")
    notice = f"tl: {section}.{old} is deprecated and will be removed in the next release: use {section}.{new}"
    # on the command line
    cli = _cli("--config", config, *TINY, f"--{section}.{old}", value)
    assert getattr(_built(cli, section), attribute) == expected
    assert capsys.readouterr().err.splitlines().count(notice) == 1
    # in a YAML file
    overlay = tmp_path / "old.yaml"
    inner = {"init_args": {old: yaml.safe_load(value)}} if section == "data" else {old: yaml.safe_load(value)}
    overlay.write_text(yaml.safe_dump({section: inner}))
    cli = _cli("--config", config, "--config", overlay, *TINY)
    assert getattr(_built(cli, section), attribute) == expected
    assert capsys.readouterr().err.splitlines().count(notice) == 1
    # the new key: the same effect, no notice
    cli = _cli("--config", config, *TINY, f"--{section}.{new}", value)
    assert getattr(_built(cli, section), attribute) == expected
    assert f"{section}.{old} " not in capsys.readouterr().err


def test_model_switch_on_the_command_line():
    cli = _cli("--config", CONFIGS / "feature_extract.yaml", "--model", "FineTune", "--model.backbone_lr_ratio", "0.5")
    assert type(cli.model).__name__ == "FineTune" and cli.model.hparams.backbone_lr_ratio == 0.5
    assert cli.model.hparams.backbone == "timm:mobilenetv2_100"  # kept from the config


def test_configs_stack_later_one_wins(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  init_args:\n    lr: 0.5\ndata:\n  init_args:\n    batch_size: 3\n")
    cli = _cli("--config", CONFIGS / "feature_extract.yaml", "--config", overlay)
    assert cli.model.hparams.lr == 0.5 and cli.datamodule.batch_size == 3
    cli = _cli("--config", CONFIGS / "feature_extract.yaml", "--config", overlay, "--model.lr", "0.25")
    assert cli.model.hparams.lr == 0.25  # the command line after the configs wins


def test_freeze_and_unfreeze_together_are_refused(capsys):
    assert tl("fit", "--config", CONFIGS / "finetune.yaml", "--freeze.update_bn_stats", "false", *TINY) == 2
    assert "both freeze" in capsys.readouterr().err


def test_target_root_needs_domain_adaptation(tiny_data, capsys):
    args = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", tiny_data]
    assert tl(*args, "--data.target_root", tiny_data) == 2
    assert "data.target_root is for domain adaptation" in capsys.readouterr().err


def test_precision_auto_asks_the_driver_not_cuda(monkeypatch):
    import torch

    import tl_cli.cli.trainer as trainer_mod

    assert resolve_precision("16-mixed", "cpu")[0] == "16-mixed"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("initialised CUDA"))
    monkeypatch.setattr(trainer_mod, "gpu_capabilities", lambda: [(8, 0), (9, 0)])
    assert resolve_precision("auto", "auto")[0] == "bf16-mixed"
    assert resolve_precision("auto", "gpu")[0] == "bf16-mixed"
    assert resolve_precision("auto", "cpu")[0] == "32-true"
    monkeypatch.setattr(trainer_mod, "gpu_capabilities", lambda: [(7, 0), (8, 0)])  # a V100 among them
    assert resolve_precision("auto", "cuda") == ("16-mixed", "GPU compute capability 7.0")


def test_gpu_capabilities_parse_nvidia_smi(monkeypatch, tmp_path):
    import tl_cli.cli.trainer as trainer_mod

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, GPU-aaa, 7.0'\necho '1, GPU-bbb, 8.0'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{Path(sys.executable).parent}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert trainer_mod.gpu_capabilities() == [(7, 0), (8, 0)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert trainer_mod.gpu_capabilities() == [(8, 0)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaa")
    assert trainer_mod.gpu_capabilities() == [(7, 0)]


def test_user_errors_exit_2_without_traceback(capsys):
    assert tl("fit", "--config", CONFIGS / "feature_extract.yaml", "--model.backbone", "timm:resnet5O") == 2
    err = capsys.readouterr().err
    assert "Unknown backbone timm:resnet5O" in err and "timm:resnet50" in err
    assert "Traceback" not in err
    assert tl("frobnicate") == 2
    assert "Unknown command 'frobnicate'" in capsys.readouterr().err
