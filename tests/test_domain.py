"""Domain-adversarial training: gradient reversal, schedules, label hygiene, the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import CONFIGS, TINY, tl
from tl_cli.callbacks import UnfreezeSchedule
from tl_cli.data.module import ImageFolderData
from tl_cli.models import DomainAdaptation
from tl_cli.models.domain import annealed_lr_factor, dann_lambda, reverse_gradient


def test_gradient_reversal_flips_and_scales_gradients():
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.3 * w)
    # numerically, through a non-linear function: d/dx f(GRL(x)) = -lambda f'(x)
    x2 = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    torch.sin(reverse_gradient(x2, 2.0)).sum().backward()
    eps = 1e-6
    numeric = (math.sin(0.7 + eps) - math.sin(0.7 - eps)) / (2 * eps)
    assert x2.grad.item() == pytest.approx(-2.0 * numeric, rel=1e-6)


def test_paper_schedules():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann_lambda(0.5, maximum=0.5) == pytest.approx(0.5 * (2 / (1 + math.exp(-5)) - 1))
    values = [dann_lambda(p / 10) for p in range(11)]
    assert values == sorted(values)
    assert annealed_lr_factor(0.0) == 1.0
    assert annealed_lr_factor(1.0) == pytest.approx(1 / 11**0.75)


def _domains(tiny_data, tmp_path):
    """Source: the tiny shapes data. Target: the same kind of images, colour-inverted, whose
    train/ folders carry (wrong) class names that must never be used."""
    source = tiny_data
    target = tmp_path / "target"
    for split in ("train", "test"):
        for cls in ("ellipses", "rectangles"):
            for i, path in enumerate(sorted((source / split / cls).iterdir())):
                folder = target / split / ("rectangles" if split == "train" and cls == "ellipses" else cls)
                folder.mkdir(parents=True, exist_ok=True)
                img = Image.fromarray(255 - np.asarray(Image.open(path)))
                img.save(folder / f"{cls}.{i}.png")
    return source, target


def test_target_labels_never_reach_the_loss(tiny_data, tmp_path):
    source, target = _domains(tiny_data, tmp_path)
    pl.seed_everything(0)
    model = DomainAdaptation(backbone="timm:test_efficientnet", weights="none", dropout=0.0, domain_hidden=16)
    dm = ImageFolderData(root=str(source), target_root=str(target), num_workers=0, image_size=64, batch_size=4)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[UnfreezeSchedule({0: 100})],
    )
    trainer.fit(model, dm)
    assert {label for _, label in dm.samples("target_train")} == {-1}
    model.eval()  # no dropout anywhere: the loss is a function of the batch alone
    xs, ys = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 0, 1])
    xt = torch.randn(4, 3, 64, 64)
    losses = [
        model.losses({"source": (xs, ys, torch.arange(4)), "target": (xt, labels, torch.arange(4))})["total"]
        for labels in (torch.full((4,), -1), torch.tensor([1, 0, 1, 0]), torch.full((4,), 99))
    ]
    assert losses[0] == losses[1] == losses[2]
    changed = model.losses(
        {"source": (xs, 1 - ys, torch.arange(4)), "target": (xt, torch.full((4,), -1), torch.arange(4))}
    )
    assert changed["total"] != losses[0]  # whereas source labels do matter


@pytest.mark.parametrize("dann", [True, False])
def test_one_backbone_forward_over_both_domains(dann):
    """DANN forwards source and target together, so batch norm normalises both domains with the
    same statistics in training as at test time; source only never sees the target."""
    model = DomainAdaptation(
        backbone="timm:test_resnet", weights="none", domain_hidden=8, dann=dann, class_names=["a", "b"]
    )
    seen = []
    model.backbone.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    xs, xt = torch.randn(3, 3, 32, 32), torch.randn(5, 3, 32, 32)
    out = model.losses({"source": (xs, torch.tensor([0, 1, 0]), None), "target": (xt, torch.full((5,), -1), None)})
    assert seen == ([8] if dann else [3])
    assert ("domain" in out) == dann


@pytest.mark.slow
def test_domain_adaptation_through_the_cli(tiny_data, tmp_path):
    source, target = _domains(tiny_data, tmp_path)
    args = [
        "--config",
        CONFIGS / "domain_adapt.yaml",
        *TINY,
        "--data.root",
        source,
        "--data.target_root",
        target,
        "--model.domain_hidden",
        "16",
    ]
    assert tl("fit", *args, "--trainer.max_epochs", "2") == 0
    run = Path("runs/domain_adapt/latest")
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "train/domain_acc_epoch" in header and "train/lambda" in header
    best = run / "checkpoints" / "best.ckpt"
    assert torch.load(best, weights_only=True)["hyper_parameters"]["_class_path"] == "tl_cli.models.DomainAdaptation"
    # test needs only the checkpoint and the two data roots; it reports both domains
    assert (
        tl("test", "--ckpt_path", best, "--data.root", source, "--data.target_root", target, "--data.num_workers", "0")
        == 0
    )
    out = Path("runs/test/latest")
    assert json.loads((out / "metrics.json").read_text())["n_samples"] == 12
    assert json.loads((out / "target" / "metrics.json").read_text())["n_samples"] == 12
    # ... and like any classifier with the data root alone (no target report)
    assert tl("test", "--ckpt_path", best, "--data.root", source, "--data.num_workers", "0", "-o", "plain") == 0
    assert json.loads(Path("plain/latest/metrics.json").read_text())["n_samples"] == 12
    assert not Path("plain/latest/target").exists()
    assert tl("export", "--ckpt_path", best, "-o", "dann.onnx") == 0
    # the source-only baseline is the same config with dann off
    assert tl("fit", *args, "--trainer.max_epochs", "1", "--model.dann", "false") == 0
    header = (Path("runs/domain_adapt/latest") / "metrics.csv").read_text().splitlines()[0]
    assert "train/domain_acc" not in header
    shutil.rmtree(target)


def test_the_recipe_for_pretrained_backbones_bottleneck_and_heads():
    model = DomainAdaptation(
        backbone="timm:test_resnet", weights="none", class_names=["a", "b"], bottleneck=32, domain_hidden=16
    )
    width = model.num_features
    assert [type(m).__name__ for m in model.neck] == ["Linear", "BatchNorm1d", "ReLU"]
    assert model.neck[0].in_features == width and model.head.in_features == 32
    assert model.domain_classifier[0].in_features == 32  # both heads read the bottleneck
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.domain_classifier)
    exported = model.logits_module().eval()  # the bottleneck is part of what is exported
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(exported(x), model(x))
    plain = DomainAdaptation(backbone="timm:test_resnet", weights="none", class_names=["a", "b"], bottleneck=0)
    assert isinstance(plain.neck, torch.nn.Identity) and plain.head.in_features == width


def test_shipped_config_follows_the_tllib_recipe():
    import yaml

    cfg = yaml.safe_load((CONFIGS / "domain_adapt.yaml").read_text())
    args = cfg["model"]["init_args"]
    assert args["optimizer"] == "sgd" and args["lr"] == 0.01 and args["backbone_lr_ratio"] == 0.1
    assert args["bottleneck"] == 256 and args["lambda_schedule"] and args["lr_annealing"]
    assert cfg["checkpoint"]["monitor"] == "val/loss"  # chosen on the source, never on target labels


def test_unlabelled_target_signals_are_logged(tiny_data, tmp_path):
    source, target = _domains(tiny_data, tmp_path)
    pl.seed_everything(0)
    model = DomainAdaptation(backbone="timm:test_efficientnet", weights="none", domain_hidden=16, bottleneck=16)
    dm = ImageFolderData(root=str(source), target_root=str(target), num_workers=0, image_size=64, batch_size=4)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[UnfreezeSchedule({0: 100})],
    )
    trainer.fit(model, dm)
    m = trainer.callback_metrics
    assert 0 <= float(m["train/domain_acc"]) <= 1
    assert 0 <= float(m["train/target_entropy"]) <= math.log(2) + 1e-4


def test_a_text_file_among_the_target_images_stops_the_run_or_is_skipped_by_name(tiny_data, tmp_path, capsys):
    source, target = _domains(tiny_data, tmp_path)
    notes = target / "train" / "rectangles" / "notes.txt"
    notes.write_text("camera settings\n")
    args = ["--config", CONFIGS / "domain_adapt.yaml", *TINY, "--data.root", source, "--data.target_root", target]
    args += ["--model.domain_hidden", "16", "--trainer.max_epochs", "1", "-o", tmp_path / "runs"]
    assert tl("fit", *args) == 2
    assert str(notes) in capsys.readouterr().err
    assert tl("fit", *args, "--data.on_bad_image", "skip") == 0
    said = capsys.readouterr()
    assert f"warning: skipping {notes}: not an image (extension .txt)" in said.err
    kept = len(list((target / "train").rglob("*.png")))
    assert f"target train: {kept} decoded images prepared" in said.out + said.err  # not the source's "train:"
    assert notes.read_text() == "camera settings\n"


def test_target_images_all_left_out_by_skip_stop_with_the_folder_named(tiny_data, tmp_path, capsys):
    source, target = _domains(tiny_data, tmp_path)
    shutil.rmtree(target / "train")
    bad = target / "train" / "x" / "photo.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (bad.parent / "notes.txt").write_text("camera settings\n")
    args = ["--config", CONFIGS / "domain_adapt.yaml", *TINY, "--data.root", source, "--data.target_root", target]
    args += ["--model.domain_hidden", "16", "--trainer.max_epochs", "1", "-o", tmp_path / "runs"]
    assert tl("fit", *args, "--data.on_bad_image", "skip") == 2
    err = capsys.readouterr().err
    assert f"{target / 'train'} has no usable images left" in err and "data.target_root" in err
    assert "Traceback" not in err and bad.exists()
