"""The user's path through the CLI: fit, test, validate, predict, fine-tune from the feature
extraction, and the plain log lines a batch job's output file gets."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from tests.helpers import CONFIGS, TINY, tl


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


def test_batch_logs_are_plain_lines_and_the_bar_can_be_switched_off(tiny_data, capsys, caplog):
    """A SLURM .out file gets a line per interval (step, loss, images/s, time left) and one per
    epoch; `--trainer.enable_progress_bar false` (what batch users type first) just works."""
    args = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", tiny_data]
    plain = ["--trainer.callbacks+", "tl_cli.callbacks.PlainProgress", "--trainer.callbacks.every_seconds", "0"]
    caplog.set_level(logging.INFO)  # Lightning's rank-zero messages: its logger, not stdout, under pytest
    assert tl(*args, "--trainer.max_epochs", "2", *plain) == 0
    out, notes = capsys.readouterr().out, caplog.messages
    steps = [line for line in out.splitlines() if line.startswith("tl: epoch 1/2 step ")]
    assert len(steps) == 3  # 24 images / 8
    assert "loss " in steps[0] and "images/s" in steps[0] and "left" in steps[0]
    assert any(line.startswith("tl: epoch 2/2 done in") and "val/acc" in line for line in out.splitlines())
    # the whole run's expected duration, and at the end what it took
    said = [line for line in notes if line.startswith("tl: expected duration: ")]
    assert len(said) == 1 and "for 2 epochs, unless early stopping ends it sooner" in said[0]
    assert any(line.startswith("tl: training took ") for line in notes)
    assert "\x1b[" not in out  # no terminal control codes in a log file
    assert tl(*args, "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false") == 0
    assert "epoch 1/1 done" not in capsys.readouterr().out
