"""`tl compare`: a leaderboard of backbones on the user's data, robust to missing weights and
failures, reusing caches."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.helpers import CONFIGS, tl
from tl_cli.models import Classifier

EXTRA = [
    "--",
    "--model.weights",
    "none",
    "--data.image_size",
    "64",
    "--data.batch_size",
    "8",
    "--data.num_workers",
    "0",
]
EXTRA += ["--trainer.accelerator", "cpu", "--trainer.max_epochs", "3"]


@pytest.mark.slow
def test_compare_writes_a_leaderboard_and_reuses_caches(tiny_data, monkeypatch, capsys):
    extracted = []
    original = Classifier.extract_features
    monkeypatch.setattr(
        Classifier, "extract_features", lambda self, x: (extracted.append(len(x)), original(self, x))[1]
    )
    args = [
        "compare",
        "--config",
        CONFIGS / "feature_extract.yaml",
        "--backbones",
        "timm:test_efficientnet",
        "timm:test_resnet",
    ]
    args += ["torchvision:nosuchnet", "timm:resnet18=imagenet", *EXTRA, "--data.root", tiny_data]
    assert tl(*args) == 0
    out = capsys.readouterr().out
    assert "[1/4] timm:test_efficientnet" in out and "[4/4] timm:resnet18" in out  # progress
    rows = list(csv.DictReader(open("runs/compare/leaderboard.csv")))
    by = {r["backbone"]: r for r in rows}
    assert set(by) == {"timm:test_efficientnet", "timm:test_resnet", "torchvision:nosuchnet", "timm:resnet18"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["rank"] for r in ok] == ["1", "2"]
    assert float(ok[0]["val_acc"]) >= float(ok[1]["val_acc"])  # sorted by validation accuracy
    for r in ok:
        assert 0 <= float(r["test_acc"]) <= 1 and float(r["images_per_s"]) > 0 and float(r["latency_ms"]) > 0
        assert int(r["input_size"]) == 64 and Path(r["checkpoint"]).is_file()
    assert by["timm:test_efficientnet"]["features"] == "256" and by["timm:test_resnet"]["features"] == "96"
    assert (
        by["torchvision:nosuchnet"]["status"] == "failed" and "Unknown backbone" in by["torchvision:nosuchnet"]["note"]
    )
    assert (
        by["timm:resnet18"]["status"] == "skipped" and "tl weights fetch timm:resnet18" in by["timm:resnet18"]["note"]
    )
    assert Path("runs/compare/leaderboard.png").stat().st_size > 5000
    assert f"--model.init_from {ok[0]['checkpoint']}" in out  # ready for fine-tuning
    first = sum(extracted)
    assert first == 2 * 36  # two backbones, 24 train + 12 val images each
    assert tl(*args) == 0
    assert sum(extracted) == first  # every cache reused
