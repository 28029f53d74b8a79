"""The learning-rate finder: `tl lr_find` and `--model.lr auto`, respecting the freeze state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import CONFIGS, TINY, fit_tiny, tl
from tl_cli.models import Classifier


def _spy_trainable(monkeypatch):
    """Which backbone parameters could train during the search's steps."""
    seen: list[int] = []
    original = Classifier.training_step

    def spy(self, batch, batch_idx):
        seen.append(sum(p.requires_grad for p in self.backbone.parameters()))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(Classifier, "training_step", spy)
    return seen


def test_lr_find_feature_extraction_searches_on_cached_features(tiny_data, monkeypatch, capsys):
    seen = _spy_trainable(monkeypatch)
    args = ["lr_find", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", tiny_data]
    assert tl(*args, "--num_training", "20", "--min_lr", "1e-5", "--max_lr", "10") == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "train: bottleneck features of 24 images" in out  # the search ran on cached features
    assert seen and set(seen) == {0}  # with the backbone frozen
    found = json.loads(Path("runs/feature_extract_lr_find/latest/lr_find.json").read_text())
    assert 1e-5 <= found["suggestion"] <= 10 and len(found["lr"]) == len(found["loss"]) > 5
    assert Path("runs/feature_extract_lr_find/latest/lr_find.png").stat().st_size > 5000
    assert f"suggested learning rate {found['suggestion']:.3g}" in out


@pytest.mark.slow
def test_lr_find_fine_tuning_trains_the_first_stages_and_lr_auto_uses_it(tiny_data, monkeypatch, capsys):
    best = fit_tiny(tiny_data, 1)
    seen = _spy_trainable(monkeypatch)
    args = ["fit", "--config", CONFIGS / "finetune.yaml", *TINY, "--data.root", tiny_data, "--model.init_from", best]
    args += ["--unfreeze.schedule", "{0: 1}", "--trainer.max_epochs", "1", "--model.lr", "auto"]
    assert tl(*args) == 0
    out = capsys.readouterr().out
    assert "model.lr auto -> " in out
    assert seen[0] > 0  # the search trained the schedule's first stage, not a frozen backbone
    run = Path("runs/finetune/latest")
    suggestion = json.loads((run / "lr_find.json").read_text())["suggestion"]
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["lr"] == suggestion
