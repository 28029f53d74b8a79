"""Which checkpoint a run keeps: best.ckpt by the monitored score (the calibrated validation loss in
the shipped configs), last.ckpt the last epoch, and the starting point competing with the end of
the schedule, which it replaces only when better beyond the noise."""

from __future__ import annotations

import csv
import math
import re

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers import CONFIGS, TINY, fit_tiny, tl
from tl_cli.callbacks.checkpoint import END_UNLESS_START_BETTER as END_UNLESS_START
from tl_cli.errors import TLError


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
