"""The report files: numbers against a case computed by hand, the pictures' content, the
mistakes grid `tl test` writes and the learning curves `tl fit` draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tl
from tl_cli.reports.files import classification_metrics, plot_confusion_matrix, plot_mistakes


def test_metrics_match_a_hand_computed_case():
    # true:  a a a a b b c c c c   (class d never appears)
    # pred:  a a b c b a c c b b   (asymmetric: c is taken for b, never b for c)
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 0, 1, 2, 1, 0, 2, 2, 1, 1])
    m = classification_metrics(target, pred, 4)
    # rows are the true class, columns the prediction
    assert m["confusion_matrix"] == [[2, 1, 1, 0], [1, 1, 0, 0], [0, 2, 2, 0], [0, 0, 0, 0]]
    assert m["accuracy"] == pytest.approx(5 / 10)
    assert m["precision"][:3] == pytest.approx([2 / 3, 1 / 4, 2 / 3])  # per predicted column
    assert m["recall"][:3] == pytest.approx([2 / 4, 1 / 2, 2 / 4])  # per true row
    f1 = [4 / 7, 1 / 3, 4 / 7]
    assert m["f1"][:3] == pytest.approx(f1)
    assert m["support"] == [4, 2, 4, 0]
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)  # over present classes
    assert m["macro_f1"] == pytest.approx(sum(f1) / 4)  # class d: F1 0
    assert m["n_samples"] == 10


def test_confusion_matrix_picture_has_rows_as_true_classes(tmp_path):
    path = tmp_path / "cm.png"
    plot_confusion_matrix([[0, 9], [0, 0]], ["cats", "dogs"], path)
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    dark = np.argwhere(img < 80)  # the one filled cell (the axes' text is thin)
    rows, cols = dark[:, 0], dark[:, 1]
    h, w = img.shape
    # the dark cell is in the top row (true: cats), right column (predicted: dogs)
    assert np.median(rows) < h / 2 and np.median(cols) > w / 2


def test_mistakes_are_the_most_confident_ones_first(tmp_path, monkeypatch):
    paths = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(p)
        paths.append(p)
    target = torch.tensor([0, 0, 1, 1])
    probs = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.95, 0.05], [0.4, 0.6]])  # wrong: 0 (0.8), 2 (0.95)
    titles = []
    import matplotlib.axes

    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda self, text, **kw: titles.append(text))
    shown = plot_mistakes(paths, target, probs, ["cats", "dogs"], tmp_path / "m.png")
    assert shown == 2
    assert titles[0] == "true: dogs\npred: cats (0.95)" and titles[1] == "true: cats\npred: dogs (0.80)"


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
