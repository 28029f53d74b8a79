"""Freezing and unfreezing: a frozen backbone and its BatchNorm statistics stay put, the unfreeze
schedule opens stages at the backbone's learning rate (and per stage with layer decay), and a
resumed run keeps what was unfrozen."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers import quiet_trainer, tiny_datamodule
from tl_cli.callbacks import FreezeBackbone, UnfreezeSchedule
from tl_cli.callbacks.freezing import backbone_stages
from tl_cli.errors import TLError
from tl_cli.models import FeatureExtraction, FineTune


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("listed", [True, False])
def test_feature_extraction_freezes_weights_and_bn_statistics(tiny_data, tmp_path, listed):
    """With FreezeBackbone in the callbacks, or without it (FeatureExtraction adds it)."""
    pl.seed_everything(0)
    model = FeatureExtraction(
        backbone="timm:test_efficientnet",
        weights="none",
        lr=0.01,
        scheduler="none",
        class_names=["ellipses", "rectangles"],
    )
    before = _snapshot(model.backbone)
    head_before = model.head.weight.detach().clone()
    trainer = quiet_trainer(2, tmp_path, callbacks=[FreezeBackbone()] if listed else [])
    trainer.fit(model, tiny_datamodule(tiny_data, augment="flip"))
    assert sum(isinstance(c, FreezeBackbone) for c in trainer.callbacks) == 1
    assert any("running_mean" in k for k in before)
    after = model.backbone.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed during feature extraction"
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    assert not torch.equal(head_before, model.head.weight)  # while the head trains
    assert not any(m.training for m in model.backbone.modules())  # frozen backbone pinned in eval


def test_freeze_backbone_update_bn_stats_moves_only_bn_statistics(tiny_data, tmp_path):
    pl.seed_everything(0)
    model = FeatureExtraction(backbone="timm:test_efficientnet", weights="none", class_names=["ellipses", "rectangles"])
    before = _snapshot(model.backbone)
    quiet_trainer(1, tmp_path, callbacks=[FreezeBackbone(update_bn_stats=True)]).fit(model, tiny_datamodule(tiny_data))
    after = model.backbone.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved)


def test_feature_extraction_refuses_an_unfreeze_schedule(tiny_data, tmp_path):
    model = FeatureExtraction(backbone="timm:test_efficientnet", weights="none")
    with pytest.raises(TLError, match="never trains its backbone.*FineTune"):
        quiet_trainer(1, tmp_path, callbacks=[UnfreezeSchedule({0: 2})]).fit(model, tiny_datamodule(tiny_data))


class Recorder(pl.Callback):
    """Per epoch: trainable stages, each param group's lr, BN mode, at the first batch."""

    def __init__(self):
        self.epochs = {}

    def on_train_batch_start(self, trainer, model, batch, batch_idx):
        if batch_idx:
            return
        bn = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        self.epochs[trainer.current_epoch] = {
            "trainable": [all(p.requires_grad for p in params) for _, params in backbone_stages(model.backbone)],
            "lrs": [g["lr"] for g in trainer.optimizers[0].param_groups],
            "bn_training": [m.training for m in bn],
        }


def test_unfreeze_schedule_learning_rates_and_bn_statistics(tiny_data, tmp_path):
    pl.seed_everything(0)
    model = FineTune(
        backbone="timm:test_efficientnet", weights="none", lr=0.01, backbone_lr_ratio=0.1, scheduler="none"
    )
    n = len(model.backbone_info.stages)
    before = _snapshot(model.backbone)
    rec = Recorder()
    quiet_trainer(3, tmp_path, callbacks=[rec, UnfreezeSchedule({1: 1, 2: 3})]).fit(model, tiny_datamodule(tiny_data))
    assert rec.epochs[0]["trainable"] == [False] * n
    assert rec.epochs[1]["trainable"] == [False] * (n - 1) + [True]
    assert rec.epochs[2]["trainable"] == [False] * (n - 3) + [True] * 3
    assert rec.epochs[2]["lrs"] == pytest.approx([0.01, 0.001])  # head, backbone = lr x ratio
    assert not any(any(e["bn_training"]) for e in rec.epochs.values())  # update_unfrozen_bn_stats=false
    after = model.backbone.state_dict()
    frozen = {n for _, names in model.backbone_info.stages[: n - 3] for n in names}
    trained = {n for _, names in model.backbone_info.stages[n - 1 :] for n in names}
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    assert all(torch.equal(before[k], after[k]) for k in before if "running_" in k)


def test_layer_decay_gives_each_stage_its_own_rate_and_every_parameter_one_group():
    from tl_cli.models import DomainAdaptation

    model = FineTune(
        backbone="timm:test_efficientnet",
        weights="none",
        class_names=["a", "b"],
        lr=0.01,
        backbone_lr_ratio=0.5,
        layer_decay=0.5,
    )
    groups = model.param_groups()
    stages = [g for g in groups if g["name"].startswith("backbone.")]
    n = len(model.backbone_info.stages)
    assert [g["lr"] for g in stages] == pytest.approx([0.005 * 0.5 ** (n - 1 - i) for i in range(n)])
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed)) and set(listed) == {id(p) for p in model.parameters()}
    # a model with a neck (DANN's bottleneck) trains it at the head's rate
    dann = DomainAdaptation(
        backbone="timm:test_efficientnet", weights="none", class_names=["a", "b"], bottleneck=8, domain_hidden=16
    )
    groups = dann.param_groups()
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in dann.parameters()}
    assert next(g for g in groups if g["name"] == "neck")["lr"] == dann.hparams.lr
    with pytest.raises(Exception, match="layer_decay"):
        FineTune(backbone="timm:test_efficientnet", weights="none", layer_decay=0)


def test_update_unfrozen_bn_stats_moves_statistics_of_unfrozen_layers_only(tiny_data, tmp_path):
    pl.seed_everything(0)
    model = FineTune(backbone="timm:test_efficientnet", weights="none")
    before = _snapshot(model.backbone)
    callbacks = [UnfreezeSchedule({0: 1}, update_unfrozen_bn_stats=True)]
    quiet_trainer(1, tmp_path, callbacks=callbacks).fit(model, tiny_datamodule(tiny_data))
    after = model.backbone.state_dict()
    last = {k.rsplit(".", 1)[0] for k in model.backbone_info.stages[-1][1]}
    stats = [k for k in before if k.endswith("running_mean")]
    changed = {k for k in stats if not torch.equal(before[k], after[k])}
    assert changed and all(k.rsplit(".", 1)[0] in last for k in changed)


class StopAfter(pl.Callback):
    """Ends the run after `epochs` epochs, as a preempted job would (max_epochs stays the same)."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, model):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _fit_ckpt(tmp_path, tiny_data, epochs, ckpt_path=None, rec=None, stop_after=None):
    pl.seed_everything(0)
    model = FineTune(
        backbone="timm:test_efficientnet", weights="none", lr=0.01, backbone_lr_ratio=0.2, warmup_epochs=0.5
    )
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callbacks = [ckpt, rec or Recorder(), UnfreezeSchedule({1: 2})] + ([StopAfter(stop_after)] if stop_after else [])
    trainer = quiet_trainer(epochs, tmp_path, callbacks=callbacks, deterministic=True)
    trainer.fit(model, tiny_datamodule(tiny_data), ckpt_path=ckpt_path)
    return model, trainer


def test_resume_after_unfreeze_keeps_stages_trainable_and_learning_rates(tiny_data, tmp_path):
    """Lightning's BaseFinetuning loses unfrozen stages on resume (issue 21901); tl must not."""
    straight = Recorder()
    _fit_ckpt(tmp_path / "a", tiny_data, 3, rec=straight)
    _fit_ckpt(tmp_path / "b", tiny_data, 3, stop_after=2)
    resumed = Recorder()
    model, _ = _fit_ckpt(tmp_path / "b", tiny_data, 3, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt", rec=resumed)
    assert list(resumed.epochs) == [2]
    assert resumed.epochs[2]["trainable"] == straight.epochs[2]["trainable"]
    assert sum(resumed.epochs[2]["trainable"]) == 2
    assert resumed.epochs[2]["lrs"] == pytest.approx(straight.epochs[2]["lrs"])
    assert resumed.epochs[2]["lrs"][1] == pytest.approx(resumed.epochs[2]["lrs"][0] * 0.2)
    assert resumed.epochs[2]["lrs"][0] < 0.01  # the cosine schedule went on, not restarted
