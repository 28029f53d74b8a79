"""The command-line contract: subcommands, documented keys, configs, precision."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import CONFIGS, tl
from tl_cli.lightning_cli import TLCLI, next_version, resolve_precision, wants_domain_adaptation

CONTRACT_KEYS = [
    "data.root",
    "data.batch_size",
    "data.num_workers",
    "data.augment",
    "data.image_size",
    "data.predict_dir",
    "model.backbone",
    "model.weights",
    "model.init_from",
    "model.lr",
    "model.backbone_lr_ratio",
    "model.unfreeze",
    "model.train_bn",
    "trainer.precision",
]


def test_help_lists_subcommands(capsys):
    assert tl("--help") == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict", "tl data synth", "tl weights fetch"):
        assert sub in out


def test_fit_help_documents_every_contract_key(capsys):
    assert tl("fit", "--help") == 0
    out = capsys.readouterr().out
    for key in CONTRACT_KEYS:
        assert f"--{key} " in out, key
    # docstrings become help text
    assert "the last ``n`` backbone stages are trainable" in " ".join(out.split())


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_instantiates(config):
    stack = [CONFIGS / config]
    if config.startswith("demo_finetune"):
        stack = [CONFIGS / "finetune.yaml", *stack]
    elif config.startswith("demo"):
        stack = [CONFIGS / "feature_extract.yaml", *stack]
    args = [a for c in stack for a in ("--config", str(c))]
    classes = {}
    if wants_domain_adaptation(args):
        from tl_cli.domain import DomainAdaptation, DomainAdaptationData

        classes = {"model_class": DomainAdaptation, "datamodule_class": DomainAdaptationData}
    cli = TLCLI(args=args, run=False, **classes)
    assert cli.model.spec.num_features > 0
    assert cli.datamodule.augment in ("none", "flip", "standard", "randaugment")
    assert cli.trainer.precision == "32-true"  # auto on a CPU-only machine
    assert str(cli.trainer.default_root_dir).startswith("runs")


def test_precision_auto(monkeypatch):
    assert resolve_precision("auto", "auto") in ("32-true",) or torch.cuda.is_available()
    assert resolve_precision("16-mixed", "cpu") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "auto") == "bf16-mixed"
    assert resolve_precision("auto", "gpu") == "bf16-mixed"
    assert resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "16-mixed"


def test_next_version_reuses_only_an_empty_newest(tmp_path):
    assert next_version(tmp_path / "none") == 0
    (tmp_path / "version_0").mkdir()
    assert next_version(tmp_path) == 0
    (tmp_path / "version_0" / "metrics.csv").write_text("x")
    assert next_version(tmp_path) == 1


def test_user_errors_exit_2_without_traceback(capsys, tmp_path):
    assert tl("fit", "--config", CONFIGS / "feature_extract.yaml", "--model.backbone", "timm:resnet5O") == 2
    err = capsys.readouterr().err
    assert "Unknown backbone timm:resnet5O" in err and "timm:resnet50" in err
    assert "Traceback" not in err
