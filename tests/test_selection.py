"""Training behaviour: frozen backbone, unfreezing schedule, learning rates, resume, outputs."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import CONFIGS, TINY, fit_tiny, tl
from tl_cli.callbacks import FreezeBackbone, UnfreezeSchedule
from tl_cli.callbacks.checkpoint import END_UNLESS_START_BETTER as END_UNLESS_START
from tl_cli.callbacks.freezing import backbone_stages
from tl_cli.data.module import ImageFolderData
from tl_cli.errors import TLError
from tl_cli.models import FeatureExtraction, FineTune


def _trainer(tmp_path, epochs, **kwargs):
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **kwargs,
    )


def _data(root, **kwargs):
    return ImageFolderData(root=str(root), batch_size=8, num_workers=0, image_size=64, **kwargs)


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
    trainer = _trainer(tmp_path, 2, callbacks=[FreezeBackbone()] if listed else [])
    trainer.fit(model, _data(tiny_data, augment="flip"))
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
    _trainer(tmp_path, 1, callbacks=[FreezeBackbone(update_bn_stats=True)]).fit(model, _data(tiny_data))
    after = model.backbone.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved)


def test_feature_extraction_refuses_an_unfreeze_schedule(tiny_data, tmp_path):
    model = FeatureExtraction(backbone="timm:test_efficientnet", weights="none")
    with pytest.raises(TLError, match="never trains its backbone.*FineTune"):
        _trainer(tmp_path, 1, callbacks=[UnfreezeSchedule({0: 2})]).fit(model, _data(tiny_data))


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
    _trainer(tmp_path, 3, callbacks=[rec, UnfreezeSchedule({1: 1, 2: 3})]).fit(model, _data(tiny_data))
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
    _trainer(tmp_path, 1, callbacks=callbacks).fit(model, _data(tiny_data))
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
    trainer = _trainer(tmp_path, epochs, callbacks=callbacks, deterministic=True)
    trainer.fit(model, _data(tiny_data), ckpt_path=ckpt_path)
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


# --------------------------------------------------------------------------- through the CLI


def test_fit_test_predict_finetune_through_the_cli(tiny_data, tmp_path):
    fe_args = [
        "fit",
        "--config",
        CONFIGS / "feature_extract.yaml",
        *TINY,
        "--data.root",
        tiny_data,
        "--trainer.max_epochs",
        "2",
    ]
    assert tl(*fe_args) == 0
    run = Path("runs/feature_extract/latest")
    for name in ("config.yaml", "metrics.csv", "hparams.yaml", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run / name).exists(), name
    assert list(run.glob("events.out.tfevents.*"))
    best = run / "checkpoints" / "best.ckpt"
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["tl"]["class_names"] == ["ellipses", "rectangles"]
    assert ckpt["tl"]["preprocessing"]["image_size"] == [64, 64]
    assert any(k.startswith("backbone.") for k in ckpt["state_dict"])  # the whole model

    # test: nothing but the checkpoint and the data root
    assert tl("test", "--ckpt_path", best, "--data.root", tiny_data, "--data.num_workers", "0") == 0
    out = Path("runs/test/latest")
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "classes", "confusion_matrix", "n_samples", "checkpoint"):
        assert key in metrics
    assert metrics["n_samples"] == 12 and sum(map(sum, metrics["confusion_matrix"])) == 12
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 12 and set(rows[0]) == {"file", "true", "predicted", "prob_ellipses", "prob_rectangles"}
    assert all(abs(float(r["prob_ellipses"]) + float(r["prob_rectangles"]) - 1) < 1e-4 for r in rows)
    correct = sum(r["true"] == r["predicted"] for r in rows)
    assert metrics["accuracy"] == pytest.approx(correct / 12)

    # validate with the same checkpoint: val metrics logged to the run's CSV
    assert tl("validate", "--ckpt_path", best, "--data.root", tiny_data, "--data.num_workers", "0") == 0
    assert "val/acc" in Path("runs/validate/latest/metrics.csv").read_text()

    # predict on a folder, recursively
    assert tl("predict", "--ckpt_path", best, "--data.predict_dir", tiny_data / "test", "--data.num_workers", "0") == 0
    rows = list(csv.DictReader(open(Path("runs/predict/latest/predictions.csv"))))
    assert len(rows) == 12 and "true" not in rows[0]

    # fine-tune from the feature-extraction checkpoint, then test that checkpoint too
    ft_args = [
        "fit",
        "--config",
        CONFIGS / "finetune.yaml",
        *TINY,
        "--data.root",
        tiny_data,
        "--trainer.max_epochs",
        "2",
        "--model.init_from",
        best,
    ]
    assert tl(*ft_args) == 0
    ft_best = Path("runs/finetune/latest/checkpoints/best.ckpt")
    assert tl("test", "--ckpt_path", ft_best, "--data.root", tiny_data, "--data.num_workers", "0") == 0
    assert json.loads(Path("runs/test/latest/metrics.json").read_text())["checkpoint"] == str(ft_best)


def test_fine_tuning_starts_from_the_feature_extraction_weights(tiny_data, tmp_path):
    best = fit_tiny(tiny_data)
    state = torch.load(best, weights_only=True)["state_dict"]
    model = FineTune(backbone="timm:test_efficientnet", weights="none", init_from=str(best))
    trainer = _trainer(tmp_path, 0)
    trainer.fit(model, _data(tiny_data))  # max_epochs=0: only the start hooks run
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_clear_errors_for_bad_checkpoints_and_mismatched_classes(tiny_data, tmp_path, capsys):
    (tmp_path / "notes.ckpt").write_text("hello")
    assert tl("test", "--ckpt_path", tmp_path / "notes.ckpt", "--data.root", tiny_data) == 2
    assert "is not a loadable PyTorch checkpoint" in capsys.readouterr().err
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    assert tl("test", "--ckpt_path", tmp_path / "plain.ckpt", "--data.root", tiny_data) == 2
    assert "not a tl checkpoint" in capsys.readouterr().err
    assert tl("test", "--ckpt_path", tmp_path / "missing.ckpt") == 2
    assert "does not exist" in capsys.readouterr().err

    best = fit_tiny(tiny_data)
    other = tmp_path / "other"
    (other / "test" / "cats").mkdir(parents=True)
    (other / "test" / "dogs").mkdir(parents=True)
    for d in ("cats", "dogs"):
        for p in list((tiny_data / "test" / "ellipses").iterdir())[:2]:
            (other / "test" / d / p.name).write_bytes(p.read_bytes())
    assert tl("test", "--ckpt_path", best, "--data.root", other, "--data.num_workers", "0") == 2
    err = capsys.readouterr().err
    assert "missing class folder(s) ellipses, rectangles" in err and "Traceback" not in err


def test_corrupt_image_in_a_worker_is_named_without_traceback(tiny_data, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    bad = root / "val" / "rectangles" / "rectangles.3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    args = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", root]
    assert tl(*args, "--trainer.max_epochs", "1", "--data.num_workers", "1") == 2
    err = capsys.readouterr().err
    assert "rectangles.3.jpg" in err and "Traceback" not in err


def test_batch_logs_are_plain_lines_and_the_bar_can_be_switched_off(tiny_data, capsys):
    """A SLURM .out file gets a line per interval (step, loss, images/s, time left) and one per
    epoch; `--trainer.enable_progress_bar false` (what batch users type first) just works."""
    args = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", tiny_data]
    plain = ["--trainer.callbacks+", "tl_cli.callbacks.PlainProgress", "--trainer.callbacks.every_seconds", "0"]
    assert tl(*args, "--trainer.max_epochs", "2", *plain) == 0
    out = capsys.readouterr().out
    steps = [line for line in out.splitlines() if line.startswith("tl: epoch 1/2 step ")]
    assert len(steps) == 3  # 24 images / 8
    assert "loss " in steps[0] and "images/s" in steps[0] and "left" in steps[0]
    assert any(line.startswith("tl: epoch 2/2 done in") and "val/acc" in line for line in out.splitlines())
    assert "\x1b[" not in out  # no terminal control codes in a log file
    assert tl(*args, "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false") == 0
    assert "epoch 1/1 done" not in capsys.readouterr().out


@pytest.mark.parametrize("scale, side", [(0.6, "underconfident"), (1.0, None), (8.0, "overconfident")])
def test_calibrated_validation_loss_is_the_loss_at_the_fitted_temperature(scale, side):
    import math

    import torch.nn.functional as F
    from scipy.optimize import minimize_scalar

    from tl_cli.models.metrics import calibrated, calibration_sums

    g = torch.Generator().manual_seed(0)
    calibrated_logits = torch.randn(300, 4, generator=g) * 2
    y = torch.multinomial(calibrated_logits.softmax(1), 1, generator=g).squeeze(1)  # T = 1 is right
    weight = torch.tensor([1.0, 2.0, 0.5, 1.0])  # class weights count as in val/loss
    logits = calibrated_logits * scale  # the right temperature is `scale`
    # summed batch by batch (as over an epoch, and over the ranks), no logits kept
    sums = sum(calibration_sums(logits[i : i + 64], y[i : i + 64], weight) for i in range(0, 300, 64))
    loss, temperature = calibrated(sums)
    exact = minimize_scalar(
        lambda lt: F.cross_entropy(logits / math.exp(lt), y, weight=weight).item(), bounds=(-4, 4), method="bounded"
    )
    assert float(loss) == pytest.approx(exact.fun, rel=1e-3)  # the grid is 6 % apart in T
    assert float(temperature) == pytest.approx(math.exp(exact.x), rel=0.07)
    plain = F.cross_entropy(logits, y, weight=weight).item()
    assert float(loss) <= plain + 1e-6  # T = 1 is on the grid
    if side == "overconfident":
        assert float(temperature) > 4 and float(loss) < plain - 0.1
    elif side == "underconfident":
        assert float(temperature) < 0.75 and float(loss) < plain - 0.03
    else:
        assert 0.75 < float(temperature) < 1.33 and float(loss) > plain - 0.01
    # a split the model gets all right: the loss falls as T does; T stops at the grid's 1/2
    right = torch.where(F.one_hot(y, 4).bool(), 3.0, 0.0)
    sharp, t_sharp = calibrated(calibration_sums(right, y, weight))
    assert float(t_sharp) == pytest.approx(0.5) and float(sharp) == pytest.approx(
        F.cross_entropy(right * 2, y, weight=weight).item(), rel=1e-5
    )
    # logits all equal: every temperature ties, and the tie goes to T = 1
    flat, t_flat = calibrated(calibration_sums(torch.zeros(8, 4), y[:8], weight))
    assert float(t_flat) == pytest.approx(1.0) and float(flat) == pytest.approx(math.log(4), rel=1e-5)
    # scaling every logit by a constant changes no prediction and not the calibrated loss
    again, t2 = calibrated(calibration_sums(logits * 2, y, weight))
    assert float(again) == pytest.approx(float(loss), rel=2e-3) and float(t2) == pytest.approx(
        2 * float(temperature), rel=0.07
    )


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])  # the start validated under autocast too
def test_validation_logs_the_calibrated_loss_and_the_start_competes_on_it(tiny_data, capsys, precision):
    # the shipped finetune.yaml selects by val/calibrated_loss
    best = fit_tiny(tiny_data, 3, "finetune.yaml", "--early_stopping", "null", "--trainer.precision", precision)
    out = capsys.readouterr().out
    start = re.search(
        r"tl: starting point: val/loss ([\d.]+), val/acc [\d.]+, val/calibrated_loss ([\d.]+), val/temperature ([\d.]+)",
        out,
    )
    assert start and float(start[2]) <= float(start[1]) + 1e-6, out[-3000:]
    with open(best.parent.parent / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/calibrated_loss")]
    assert len(rows) == 3
    for r in rows:
        assert float(r["val/calibrated_loss"]) <= float(r["val/loss"]) + 1e-6
        assert 0.4999 <= float(r["val/temperature"]) <= 16.001  # the grid
    epochs = {int(r["epoch"]): float(r["val/calibrated_loss"]) for r in rows}
    ckpt = torch.load(best, weights_only=True)
    # checkpoint.select: end_unless_start_better -- the end of the schedule, or the start when clearly better
    if "did not beat its starting point" in out:
        assert epochs[2] >= float(start[2]) - 1e-4 and ckpt["epoch"] != 2
    elif "kept:" in out:  # the start scored better, within the noise of 12 images
        assert "epoch 2 kept: val/calibrated_loss" in out and epochs[2] > float(start[2]) and ckpt["epoch"] == 2
    else:
        assert "tl: epoch 2 won: val/calibrated_loss" in out and epochs[2] <= float(start[2])
        assert ckpt["epoch"] == 2


def test_best_checkpoint_is_the_lowest_validation_loss(tiny_data):
    best = fit_tiny(tiny_data, 4, "feature_extract.yaml", "--early_stopping", "null")
    with open(best.parent.parent / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/loss")]
    losses = {int(r["epoch"]): float(r["val/loss"]) for r in rows}
    assert len(losses) == 4
    best_epoch = min(losses, key=losses.get)
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["epoch"] == best_epoch
    last = torch.load(best.with_name("last.ckpt"), weights_only=True)
    assert last["epoch"] == 3 and last["global_step"] == 12  # the last epoch's, improved or not
    if best_epoch != 3:  # then they hold different heads
        assert not torch.equal(ckpt["state_dict"]["head.weight"], last["state_dict"]["head.weight"])


class ScriptedLoss(pl.LightningModule):
    """Logs a val/loss chosen in advance for each epoch."""

    def __init__(self, losses):
        super().__init__()
        self.losses = losses
        self.w = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.w(batch).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.losses[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=2)

    val_dataloader = train_dataloader


@pytest.mark.parametrize("write_every_s", [0.0, 30.0])
def test_last_ckpt_is_the_last_epoch_even_when_it_did_not_improve(tmp_path, write_every_s):
    from tl_cli.callbacks import BestAndLast

    cb = BestAndLast(
        dirpath=tmp_path, monitor="val/loss", mode="min", filename="best", save_last=True, write_every_s=write_every_s
    )
    trainer = pl.Trainer(
        max_epochs=4, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(ScriptedLoss([1.0, 0.5, 0.7, 0.9]))
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 3


@pytest.mark.parametrize("start, winner", [(0.85, "last epoch"), (0.75, "start")])
def test_select_end_unless_start_better_keeps_the_end_and_the_start_competes_with_it_alone(
    tmp_path, capsys, start, winner
):
    """checkpoint.select=end_unless_start_better: best.ckpt is the last epoch (0.8), not the best
    one (epoch 1, 0.5), and the starting point is compared with that epoch's score only."""
    from tl_cli.callbacks import BestAndLast
    from tl_cli.models.starting_point import StartingPoint

    class WithStart(ScriptedLoss):
        def on_train_start(self):
            checkpoint = self.trainer._checkpoint_connector.dump_checkpoint()
            self.start = StartingPoint()
            self.start.scores, self.start.checkpoint = {"val/loss": start}, {**checkpoint, "epoch": -1}

        def on_train_end(self):
            self.start.settle(self)

    cb = BestAndLast(
        dirpath=tmp_path, monitor="val/loss", mode="min", filename="best", save_last=True, select=END_UNLESS_START
    )
    trainer = pl.Trainer(
        max_epochs=4, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(WithStart([1.0, 0.5, 0.7, 0.8]))
    best = torch.load(tmp_path / "best.ckpt", weights_only=True)
    out = capsys.readouterr().out
    if winner == "last epoch":
        assert best["epoch"] == 3 and cb.best_model_score == pytest.approx(0.8)
        assert "tl: epoch 3 won: val/loss 0.8000 against 0.8500 at the start" in out
    else:
        assert best["epoch"] == -1 and "did not beat its starting point: val/loss 0.7500 at the start" in out
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]
    with pytest.raises(TLError, match="select=end_unless_start_better needs checkpoint.monitor"):
        BestAndLast(dirpath=tmp_path, filename="best", select=END_UNLESS_START)


def test_the_old_select_and_write_every_still_work_and_name_their_new_names(tmp_path, capsys):
    from tl_cli.callbacks import BestAndLast

    cb = BestAndLast(dirpath=tmp_path, monitor="val/loss", filename="best", select="last", write_every=30)
    assert cb.select == END_UNLESS_START and cb.keeps_the_end and cb.write_every_s == 30
    err = capsys.readouterr().err
    assert "checkpoint.select: last" in err and f"checkpoint.select: {END_UNLESS_START}" in err
    assert "checkpoint.write_every" in err and "checkpoint.write_every_s" in err


def _start_against_end(tmp_path, monitor, y, start, end):
    """A `StartingPoint` at the end of a select=end_unless_start_better run: the start's and the
    end's logits on the validation images ``y``. Returns (the starting point, its host, the
    callback, the checkpoints it saved, best.ckpt)."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from tl_cli.callbacks import BestAndLast
    from tl_cli.models.metrics import calibrated, calibration_sums, image_scores
    from tl_cli.models.starting_point import StartingPoint

    def scores(logits):
        loss, temperature = calibrated(calibration_sums(logits, y))
        acc = float((logits.argmax(1) == y).float().mean())
        nll = float(F.cross_entropy(logits, y))
        return {
            "val/calibrated_loss": float(loss),
            "val/temperature": float(temperature),
            "val/loss": nll,
            "val/acc": acc,
        }

    mode = "max" if monitor == "val/acc" else "min"
    cb = BestAndLast(dirpath=tmp_path, monitor=monitor, mode=mode, filename="best", select=END_UNLESS_START)
    best = str(tmp_path / "best.ckpt")
    cb.best_model_path, cb.best_model_score = best, torch.tensor(scores(end)[monitor])
    saved = []
    save = SimpleNamespace(save_checkpoint=lambda c, path: saved.append(path))
    host = SimpleNamespace(
        trainer=SimpleNamespace(checkpoint_callback=cb, world_size=1, strategy=save),
        device=torch.device("cpu"),
        print=print,
        validation_scores=lambda per_image=False: (scores(end), image_scores(end, y)),
        scores=scores,
    )
    point = StartingPoint()
    point.scores, point.checkpoint, point.images = scores(start), {"start": True}, image_scores(start, y)
    return point, host, cb, saved, best


@pytest.mark.parametrize("monitor", ["val/calibrated_loss", "val/loss", "val/acc"])
@pytest.mark.parametrize("gap, winner", [(0.2, "end"), (1.5, "start")])
def test_select_end_unless_start_better_keeps_the_end_unless_the_start_wins_beyond_the_noise(
    tmp_path, capsys, monitor, gap, winner
):
    """With select=end_unless_start_better, a start that scores better than the end of the
    schedule takes best.ckpt only when the per-image paired difference on the validation images
    exceeds MARGIN standard errors; a small lead (one image more right on 60, a slightly lower
    loss) is noise."""
    import torch.nn.functional as F

    from tl_cli.models.starting_point import MARGIN

    g = torch.Generator().manual_seed(2)
    y = torch.arange(60) % 3
    end = torch.randn(60, 3, generator=g) + 1.5 * F.one_hot(y, 3)
    # the start: the end's logits with the true class raised by `gap`, give or take 1 an image
    # (small gap: lower losses on some images, higher on others, a little lower on the whole)
    shift = gap + torch.randn(60, generator=g) if gap < 1 else torch.full((60,), gap)
    start = end + shift[:, None] * F.one_hot(y, 3)
    if monitor == "val/acc":  # the start: right on the end's first wrong image (small) or on all
        wrong = (end.argmax(1) != y).nonzero().flatten()
        start = end.clone()
        for i in wrong[:1] if gap < 1 else wrong:
            start[i, y[i]] = start[i].max() + 1
    point, host, cb, saved, best = _start_against_end(tmp_path, monitor, y, start, end)
    sign = 1 if cb.mode == "min" else -1
    mean, se, n = point.paired_difference(host, cb)
    # the per-image terms add up to the monitored scores: the mean difference is their difference
    expected = sign * (host.scores(end)[monitor] - host.scores(start)[monitor])
    assert mean == pytest.approx(expected, abs=1e-5) and n == 60
    assert mean > 0  # the start scored better in both cases
    point.settle(host)
    out = capsys.readouterr().out
    if winner == "end":
        assert mean <= MARGIN * se and saved == [] and "kept:" in out
        assert "within the noise of 60 validation images" in out
    else:
        assert mean > MARGIN * se and saved == [best] and "did not beat its starting point" in out
        assert "standard errors over 60 images" in out


def test_a_wrecked_end_loses_to_the_start_although_its_losses_swamp_the_standard_error(tmp_path, capsys):
    """A learning rate that wrecks the network gives some images a loss of 1e4 and others 0: the
    raw t-statistic is then ~1 whatever the mean; capped per-image losses still find it worse."""
    from tl_cli.models.metrics import image_scores

    g = torch.Generator().manual_seed(0)
    y = torch.arange(12) % 2
    start = 0.3 * torch.randn(12, 2, generator=g)  # near chance, as a probe on random features
    end = torch.zeros(12, 2)
    end[torch.arange(12), torch.where(torch.arange(12) % 4 < 2, y, 1 - y)] = 1e4  # sure, and wrong on half
    point, host, _, saved, best = _start_against_end(tmp_path, "val/calibrated_loss", y, start, end)
    raw = image_scores(end, y)[:, 2:].max()
    assert float(raw) == pytest.approx(math.log(2000), rel=1e-5)  # capped, not 1e4 / T
    point.settle(host)
    assert saved == [best] and "did not beat its starting point" in capsys.readouterr().out


class ScriptedAccuracy(ScriptedLoss):
    """Logs a (val/acc, val/loss) chosen in advance for each epoch."""

    def validation_step(self, batch, batch_idx):
        acc, loss = self.losses[self.current_epoch]
        self.log_dict({"val/acc": acc, "val/loss": loss})


@pytest.mark.parametrize("tie_break, best", [(None, 1), ("val/loss", 2)])
def test_accuracy_ties_between_epochs_go_to_the_lower_val_loss(tmp_path, tie_break, best):
    from tl_cli.callbacks import BestAndLast

    cb = BestAndLast(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best", tie_break=tie_break)
    trainer = pl.Trainer(
        max_epochs=5, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    # epochs 1-3 tie on accuracy; 2 has the lowest loss; 4 is less accurate with the lowest loss
    trainer.fit(ScriptedAccuracy([(0.5, 1.0), (0.75, 0.8), (0.75, 0.6), (0.75, 0.7), (0.7, 0.3)]))
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["epoch"] == best
    assert cb.best_model_score == pytest.approx(0.75)
    if tie_break:
        assert cb.tie_scores == {str(tmp_path / "best.ckpt"): pytest.approx(0.6)}
        assert cb.state_dict()["tie_scores"] == cb.tie_scores  # kept for a resumed run


@pytest.mark.parametrize(
    "start_loss, winner",
    [(0.5, "start"), (0.7, "epoch")],  # the best epoch: val/acc 0.6 (a float32), val/loss 0.6
)
def test_an_accuracy_tie_with_the_starting_point_goes_to_the_lower_val_loss(tmp_path, capsys, start_loss, winner):
    from types import SimpleNamespace

    from tl_cli.callbacks import BestAndLast
    from tl_cli.models.starting_point import StartingPoint

    cb = BestAndLast(dirpath=tmp_path, monitor="val/acc", mode="max", filename="best", tie_break="val/loss")
    best = str(tmp_path / "best.ckpt")
    cb.best_model_path, cb.best_model_score, cb.tie_scores = best, torch.tensor(0.6), {best: 0.6}
    saved = []
    trainer = SimpleNamespace(
        checkpoint_callback=cb, strategy=SimpleNamespace(save_checkpoint=lambda ckpt, path: saved.append(path))
    )
    point = StartingPoint()
    point.scores, point.checkpoint = {"val/loss": start_loss, "val/acc": 0.6}, {"start": True}
    point.settle(SimpleNamespace(trainer=trainer, print=print))
    out = capsys.readouterr().out
    if winner == "start":
        assert saved == [best] and "did not beat its starting point" in out
    else:
        assert saved == [] and "won: val/acc 0.6000 against 0.6000" in out and "val/loss 0.6000 against 0.7000" in out


MIX = ["--model.mixup_alpha", "0.2", "--model.cutmix_alpha", "1.0"]


@pytest.mark.parametrize("mix", [[], MIX], ids=["plain", "mixup+cutmix"])
def test_resume_through_the_cli_ends_like_an_uninterrupted_run(tiny_data, mix):
    """Also with MixUp/CutMix, whose draws come from the generator the run's state restores."""
    args = ["fit", "--config", CONFIGS / "finetune.yaml", *TINY, "--data.root", tiny_data, "--data.augment", "flip"]
    args += mix
    # a constant learning rate: the schedule's length would depend on max_epochs, which is
    # what differs between the two halves here (preemption keeps it: tests/test_preemption.py)
    args += ["--unfreeze.schedule", "{1: 2}", "--early_stopping", "null", "--model.scheduler", "none"]
    assert tl(*args, "--trainer.max_epochs", "3", "-o", "straight") == 0
    assert tl(*args, "--trainer.max_epochs", "2", "-o", "split") == 0
    assert (
        tl(*args, "--trainer.max_epochs", "3", "-o", "split", "--ckpt_path", "split/latest/checkpoints/last.ckpt") == 0
    )
    a = torch.load("straight/latest/checkpoints/last.ckpt", weights_only=True)
    b = torch.load("split/latest/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 9
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key


def test_fine_tuning_never_ends_worse_than_its_starting_point(tiny_data, capsys):
    fe = fit_tiny(tiny_data, 3, "feature_extract.yaml", "--model.head_init", "random")  # a start to beat
    args = ["fit", "--config", CONFIGS / "finetune.yaml", *TINY, "--data.root", tiny_data, "--model.init_from", fe]
    args += ["--trainer.max_epochs", "2", "--unfreeze.schedule", "{0: 6}", "--early_stopping", "null"]
    # a learning rate that wrecks the network: no epoch beats the start (on the shipped val/calibrated_loss;
    # on 12 validation images of random features a wrecked network can be luckier in accuracy)
    wreck = ["--model.lr", "20", "--model.backbone_lr_ratio", "1", "-o", "wrecked"]
    assert tl(*args, *wreck) == 0
    out = capsys.readouterr().out
    assert "tl: starting point: val/loss" in out and "did not beat its starting point" in out
    start = torch.load(fe, weights_only=True)["state_dict"]
    best = torch.load("wrecked/latest/checkpoints/best.ckpt", weights_only=True)
    assert all(torch.equal(v, best["state_dict"][k]) for k, v in start.items())  # the starting model
    assert best["tl"]["class_path"].endswith("FineTune")  # a checkpoint of this run, usable as any
    # a gentle one, on val/acc (ties to val/loss): an epoch wins, and the run says which and by how much
    by_acc = ["--checkpoint.monitor", "val/acc", "--checkpoint.mode", "max", "--checkpoint.tie_break", "val/loss"]
    by_acc += ["--checkpoint.select", "best"]
    assert tl(*args, *by_acc, "--model.lr", "0.01", "-o", "gentle") == 0
    out = capsys.readouterr().out
    won = r"tl: epoch \d won: val/acc [\d.]+ against [\d.]+ at the start \(\+[\d.]+\)(, val/loss [\d.]+ against)?"
    assert re.search(won, out), out[-2000:]


def test_linear_probe_is_scikit_learns_logistic_regression_with_c_chosen_on_val():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from tl_cli.models.probe import fit_linear_probe

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 20, generator=g) * 0.7
    scale = torch.rand(20, generator=g) * 5 + 0.1  # unequal feature scales: standardisation matters

    def blobs(n):
        y = torch.arange(n) % 3
        return (centres[y] + torch.randn(n, 20, generator=g)) * scale + 3, y

    (x, y), (xv, yv), (xt, _) = blobs(60), blobs(60), blobs(300)
    probe = fit_linear_probe(x, y, xv, yv, 3)
    # the chosen C is the grid's best on val (loss, then accuracy), and the head is sklearn's model there
    assert min(probe.table, key=lambda r: (r[2], -r[1]))[0] == probe.c
    assert max(r[2] for r in probe.table) > probe.val_loss + 0.05  # the choice mattered
    scaler = StandardScaler().fit(x.numpy())
    ref = LogisticRegression(C=probe.c, max_iter=10000, tol=1e-8).fit(scaler.transform(x.numpy()), y.numpy())
    ours = (xt @ probe.weight.T + probe.bias).softmax(1)
    theirs = torch.from_numpy(ref.predict_proba(scaler.transform(xt.numpy()))).float()
    assert torch.allclose(ours, theirs, atol=2e-3)


def test_feature_extraction_head_starts_as_the_tuned_probe(tiny_data, capsys):
    fit_tiny(tiny_data, 1, "feature_extract.yaml", "-o", "probe")
    out = capsys.readouterr().out
    probe = re.search(
        r"tl: head = tuned linear probe on 24 cached features: L2 C=\S+ chosen on val/ \(val acc ([\d.]+), val loss ([\d.]+)\)",
        out,
    )
    start = re.search(r"tl: starting point: val/loss ([\d.]+), val/acc ([\d.]+)", out)
    assert probe and start, out[-3000:]
    # the model validated before the first step is the probe (a random head would score otherwise)
    assert float(start[1]) == pytest.approx(float(probe[2]), abs=2e-4)
    assert float(start[2]) == pytest.approx(float(probe[1]), abs=1e-4)
    fit_tiny(tiny_data, 1, "feature_extract.yaml", "-o", "random", "--model.head_init", "random")
    out = capsys.readouterr().out
    assert "tuned linear probe" not in out and "tl: starting point: val/loss" in out


def test_flip_tta_averages_each_image_with_its_mirror_and_is_recorded(tiny_data):
    from tl_cli.models import load_model

    best = fit_tiny(tiny_data, 1)
    model = load_model(best).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        plain = model.predict_logits(x)
        model.hparams.tta = "flip"
        flipped = model.predict_logits(x)
        expected = ((model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2).log()
    assert torch.allclose(flipped, expected, atol=1e-5) and not torch.allclose(flipped, plain, atol=1e-4)
    # through the CLI: the probabilities written are the averaged ones, and metrics.json says so
    for tta in ("none", "flip"):
        args = ["test", "--ckpt_path", best, "--data.root", tiny_data, "--model.tta", tta, "-o", f"tta_{tta}"]
        assert tl(*args) == 0
    rows = {t: list(csv.DictReader(open(f"tta_{t}/latest/predictions.csv"))) for t in ("none", "flip")}
    assert json.loads(Path("tta_flip/latest/metrics.json").read_text())["tta"] == "flip"
    assert json.loads(Path("tta_none/latest/metrics.json").read_text())["tta"] == "none"
    assert [r["prob_ellipses"] for r in rows["none"]] != [r["prob_ellipses"] for r in rows["flip"]]


@pytest.mark.parametrize(
    "mix", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}]
)
def test_mixup_and_cutmix_train_on_mixed_images_with_soft_targets(tiny_data, tmp_path, mix):
    """What the model trains on is a blend (MixUp) or a patchwork (CutMix) of two images of
    the batch, and the loss is cross-entropy on the correspondingly mixed labels. A fully
    frozen backbone still sees images (mixing cannot reuse cached features)."""
    import torch.nn.functional as F

    class Spy(FineTune):
        def forward(self, x):
            if self.training:
                self.seen.append(x.detach().clone())
            return super().forward(x)

        def loss(self, logits, y, train):
            if train:
                self.targets.append(y.detach().clone())
            return super().loss(logits, y, train)

    pl.seed_everything(0)
    model = Spy(backbone="timm:test_efficientnet", weights="none", lr=0.01, label_smoothing=0.1, **mix)
    model.seen, model.targets = [], []
    data = _data(tiny_data, augment="none", cache_features="auto")
    batches, kinds = [], set()

    class Batches(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            batches.append((batch[0].clone(), batch[1].clone()))

    _trainer(tmp_path, 2, callbacks=[Batches(), FreezeBackbone()]).fit(model, data)
    assert len(model.seen) == len(batches) == len(model.targets) == 6  # 24 images, batch 8, 2 epochs
    for (x, y), seen, soft in zip(batches, model.seen, model.targets, strict=True):
        assert seen.shape == x.shape  # images, not cached features
        assert soft.shape == (len(y), 2) and torch.allclose(soft.sum(1), torch.ones(len(y)))
        # MixUp: every image is x * lam + (the batch rolled by one) * (1 - lam), one lam for the
        # batch. CutMix: one box of every image comes from its neighbour in the rolled batch,
        # labels mixed by the box's area
        rolled = x.roll(1, 0)
        differs = ~torch.isclose(seen, x, atol=1e-6).all(1).all(0)  # [H, W]: pixels any image changed
        rows, cols = differs.any(1).nonzero(), differs.any(0).nonzero()
        box = torch.zeros_like(differs)
        if len(rows):
            box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        if "cutmix_alpha" in mix and torch.equal(seen, torch.where(box, rolled, x)):  # CutMix
            area = (1 - box.float().mean()).expand(len(y))
            kinds.add("cutmix_alpha")
        else:  # MixUp
            lam = ((seen - rolled) / (x - rolled)).nan_to_num()[(x - rolled).abs() > 1e-3].median()
            assert torch.allclose(seen, x * lam + rolled * (1 - lam), atol=1e-4)
            area = lam.expand(len(y))
            kinds.add("mixup_alpha")
        expected = F.one_hot(y, 2) * area[:, None] + F.one_hot(y.roll(1, 0), 2) * (1 - area[:, None])
        assert torch.allclose(soft, expected, atol=1e-4)
        assert not torch.equal(seen, x) or bool((area == 1).all())
    assert any(not torch.equal(s, x) for (x, _), s in zip(batches, model.seen, strict=True))
    assert kinds == set(mix)  # both set: each batch one of the two, both used


def test_mixing_options_are_checked():
    from tl_cli.models import DomainAdaptation

    with pytest.raises(TLError, match="mixup_alpha=-1"):
        FineTune(backbone="timm:test_efficientnet", weights="none", mixup_alpha=-1)
    with pytest.raises(TLError, match="DomainAdaptation does not mix batches"):
        DomainAdaptation(backbone="timm:test_efficientnet", weights="none", cutmix_alpha=1.0)


def test_the_start_is_validated_on_the_batches_an_epoch_sees(tiny_data, capsys):
    # --trainer.limit_val_batches 1: 8 of the 12 validation images. With lr 1e-12 the head after one
    # epoch is the head it started with (the backbone is frozen): the two scores are one score.
    best = fit_tiny(
        tiny_data, 1, "feature_extract.yaml", "--model.head_init", "random", "--model.lr", "1e-12",
        "--trainer.limit_val_batches", "1",
    )  # fmt: skip
    out = capsys.readouterr().out
    start = re.search(r"tl: starting point: val/loss ([\d.]+), val/acc ([\d.]+)", out)
    with open(best.parent.parent / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/loss")]
    assert start and len(rows) == 1, out[-3000:]
    assert float(rows[0]["val/loss"]) == pytest.approx(float(start[1]), abs=1e-4)
    assert float(rows[0]["val/acc"]) == pytest.approx(float(start[2]), abs=1e-4)
