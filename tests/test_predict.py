"""`tl predict` and test-time augmentation: broken files get an error row, flip TTA averages each
image with its mirror."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.helpers import csv_rows, fit_tiny, predict_folder, tl


@pytest.mark.slow
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


def test_predict_writes_an_error_row_and_goes_on(trained, tiny_data, tmp_path):
    folder = predict_folder(tiny_data, tmp_path)
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
    rows = csv_rows("runs/predict/latest/predictions.csv")
    assert len(rows) == 14
    bad = [r for r in rows if r["file"].endswith(("broken.jpg", "README.txt"))]
    assert len(bad) == 2 and all(
        r["predicted"] == "" and r["error"].startswith(("not an image", "corrupt")) for r in bad
    )
    assert all(r["predicted"] and r["error"] == "" for r in rows if r not in bad)
