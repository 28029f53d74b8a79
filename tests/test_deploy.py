"""Untrusted checkpoints, export, prediction with broken files, class imbalance, pictures."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import fit_tiny, tl
from tl_cli.data.module import ImageFolderData
from tl_cli.models import FeatureExtraction


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A feature-extraction checkpoint trained through the CLI on the tiny data."""
    work = tmp_path_factory.mktemp("trained")
    cwd, cache = os.getcwd(), os.environ.get("TL_CACHE_DIR")
    os.chdir(work)
    os.environ["TL_CACHE_DIR"] = str(work / "cache")
    try:
        fit_tiny(tiny_data, 3)
    finally:
        os.chdir(cwd)
        if cache is None:
            os.environ.pop("TL_CACHE_DIR", None)
        else:
            os.environ["TL_CACHE_DIR"] = cache
    return work / "runs" / "feature_extract" / "latest"


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_fit_draws_learning_curves(trained):
    import xml.etree.ElementTree as ET

    svg = ET.fromstring((trained / "curves.svg").read_text())  # well-formed SVG
    ns = "{http://www.w3.org/2000/svg}"
    lines = svg.findall(f".//{ns}polyline")
    assert len(lines) == 4  # train and val, loss and accuracy
    assert all(len(line.get("points").split()) == 3 for line in lines)  # one point per epoch
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert [row["epoch"] for row in ckpt["tl_history"]] == [0, 1, 2]
    assert {"train/loss", "val/loss", "train/acc", "val/acc"} <= set(ckpt["tl_history"][-1])


def test_test_writes_mistakes_grid(trained, tiny_data):
    assert (
        tl(
            "test",
            "--ckpt_path",
            trained / "checkpoints" / "best.ckpt",
            "--data.root",
            tiny_data,
            "--data.num_workers",
            "0",
        )
        == 0
    )
    assert (Path("runs/test/latest/mistakes.png")).stat().st_size > 3000


class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoints_are_loaded_without_running_their_code(tiny_data, tmp_path, capsys):
    with open(tmp_path / "evil.ckpt", "wb") as fh:
        pickle.dump({"state_dict": Boom(), "tl": {"format": 1}}, fh)
    for command in (["test", "--data.root", tiny_data], ["predict", "--data.predict_dir", tiny_data]):
        assert tl(command[0], "--ckpt_path", tmp_path / "evil.ckpt", *command[1:]) == 2
    assert tl("export", "--ckpt_path", tmp_path / "evil.ckpt") == 2
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()
    assert "not a loadable PyTorch checkpoint" in capsys.readouterr().err


def test_incompatible_checkpoint_version_is_explained(trained, tmp_path, capsys):
    ckpt = torch.load(trained / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["tl"]["format"] = 99
    torch.save(ckpt, tmp_path / "future.ckpt")
    assert tl("export", "--ckpt_path", tmp_path / "future.ckpt") == 2
    assert "format 99" in capsys.readouterr().err


def _predict_dir(tiny_data, tmp_path):
    folder = tmp_path / "incoming"
    shutil.copytree(tiny_data / "test", folder)
    (folder / "ellipses" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "README.txt").write_text("photos from the field trip")
    return folder


def test_predict_writes_an_error_row_and_goes_on(trained, tiny_data, tmp_path):
    folder = _predict_dir(tiny_data, tmp_path)
    assert (
        tl(
            "predict",
            "--ckpt_path",
            trained / "checkpoints" / "best.ckpt",
            "--data.predict_dir",
            folder,
            "--data.num_workers",
            "0",
        )
        == 0
    )
    rows = _rows("runs/predict/latest/predictions.csv")
    assert len(rows) == 14
    bad = [r for r in rows if r["file"].endswith(("broken.jpg", "README.txt"))]
    assert len(bad) == 2 and all(
        r["predicted"] == "" and r["error"].startswith(("not an image", "corrupt")) for r in bad
    )
    assert all(r["predicted"] and r["error"] == "" for r in rows if r not in bad)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_is_checked_and_predicts_like_the_checkpoint(trained, tiny_data, tmp_path, fmt, capsys):
    best = trained / "checkpoints" / "best.ckpt"
    out = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt'}"
    assert tl("export", "--ckpt_path", best, "--format", fmt, "-o", out, "--images", tiny_data / "val") == 0
    said = capsys.readouterr().out
    diff = float(said.split("max |difference| of probabilities ")[1].split()[0])
    assert diff <= 1e-4
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["class_names"] == ["ellipses", "rectangles"]
    assert meta["preprocessing"]["center_crop"] == [64, 64] and len(meta["preprocessing"]["mean"]) == 3
    assert tl("export", "--ckpt_path", best, "--format", fmt, "-o", out) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err

    folder = _predict_dir(tiny_data, tmp_path)
    # one vocabulary: -o DIR is where results go, for both kinds of prediction
    assert tl("predict", "--model", out, "--data.predict_dir", folder, "-o", tmp_path / "exported") == 0
    assert tl("predict", "--ckpt_path", best, "--data.predict_dir", folder, "--data.num_workers", "0", "-o", "ref") == 0
    exported = {r["file"]: r for r in _rows(tmp_path / "exported" / "latest" / "predictions.csv")}
    reference = {r["file"]: r for r in _rows("ref/latest/predictions.csv")}
    assert exported.keys() == reference.keys()
    for file, ref in reference.items():
        got = exported[file]
        assert got["predicted"] == ref["predicted"] and got["error"] == ref["error"]
        if ref["predicted"]:
            assert abs(float(got["prob_ellipses"]) - float(ref["prob_ellipses"])) < 1e-4


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


def test_export_refuses_and_deletes_a_model_that_disagrees(trained, tmp_path, monkeypatch, capsys):
    import tl_cli.export as export_mod

    real = export_mod.ExportedModel.__call__
    monkeypatch.setattr(export_mod.ExportedModel, "__call__", lambda self, x: real(self, x) * 0.9)
    out = tmp_path / "bad.onnx"
    assert tl("export", "--ckpt_path", trained / "checkpoints" / "best.ckpt", "-o", out) == 2
    err = capsys.readouterr().err
    assert "disagrees with the checkpoint" in err and "Nothing was kept" in err
    assert not out.exists() and not out.with_name("bad.onnx.json").exists()
