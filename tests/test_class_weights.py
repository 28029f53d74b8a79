"""Class weights: ``auto`` is inverse class frequency, and the loss weights each sample by its
class as ``CrossEntropy(weight=...)`` does."""

from __future__ import annotations

import shutil

import lightning.pytorch as pl
import pytest
import torch

from tl_cli.data.module import ImageFolderData
from tl_cli.models import FeatureExtraction


def test_class_weights_auto_is_inverse_frequency(tiny_data, tmp_path):
    root = tmp_path / "imbalanced"
    shutil.copytree(tiny_data, root)
    for extra in list((root / "train" / "rectangles").iterdir())[:8]:
        extra.unlink()  # 12 ellipses, 4 rectangles
    pl.seed_everything(0)
    model = FeatureExtraction(backbone="timm:test_efficientnet", weights="none", class_weights="auto")
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    trainer.fit(model, ImageFolderData(root=str(root), num_workers=0, image_size=64, batch_size=8))
    assert model.loss_weight.tolist() == pytest.approx([16 / (2 * 12), 16 / (2 * 4)])
    assert "val/balanced_acc" in trainer.callback_metrics and "val/macro_f1" in trainer.callback_metrics
    with pytest.raises(Exception, match="class_weights has 3 values"):
        bad = FeatureExtraction(backbone="timm:test_efficientnet", weights="none", class_weights=[1.0, 2.0, 3.0])
        pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False).fit(
            bad, ImageFolderData(root=str(root), num_workers=0, image_size=64)
        )


def test_class_weights_change_the_training_loss():
    """tl's loss weights each sample by its class's weight, as CrossEntropy(weight=...) defines."""
    model = FeatureExtraction(backbone="timm:test_efficientnet", weights="none", class_names=["a", "b"], dropout=0.0)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    model.register_buffer("loss_weight", None, persistent=False)
    plain = model.loss(logits, y, train=True)
    model.register_buffer("loss_weight", torch.tensor([0.5, 2.0]), persistent=False)
    weighted = model.loss(logits, y, train=True)
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    w = torch.tensor([0.5, 2.0])[y]
    assert float(plain) == pytest.approx(float(per.mean()))
    assert float(weighted) == pytest.approx(float((per * w).sum() / w.sum()))
    assert float(weighted) != pytest.approx(float(plain))
