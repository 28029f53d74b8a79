"""Shared fixtures: an isolated environment, a tiny generated dataset, the CLI in-process."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tl_cli.cli.main import main
from tl_cli.datatools.synth import synthesize

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# A real config, shrunk: timm's tiny test model with random weights, 64 px, no workers, one
# pass over the data an epoch (finetune.yaml asks for at least 30 steps an epoch).
TINY = [
    "--model.backbone",
    "timm:test_efficientnet",
    "--model.weights",
    "none",
    "--data.image_size",
    "64",
    "--data.batch_size",
    "8",
    "--data.num_workers",
    "0",
    "--data.min_steps_per_epoch",
    "null",
    "--trainer.accelerator",
    "cpu",
    "--trainer.log_every_n_steps",
    "1",
]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run every test in its own folder, offline, outside any SLURM job, with signals restored."""
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path / "tl_cache"))
    monkeypatch.chdir(tmp_path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """2 classes x (12 train, 6 val, 6 test) generated images, 64 px."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    synthesize(root, seed=1, num_classes=2, per_split={"train": 12, "val": 6, "test": 6}, size=64)
    return root


def tl(*args: str) -> int:
    """Run ``tl ARGS`` in this process and return its exit status."""
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:  # argparse / jsonargparse exit on --help and on parse errors
        return int(exc.code or 0)


def fit_tiny(data_root, epochs: int = 1, config: str = "feature_extract.yaml", *extra) -> Path:
    """`tl fit` with a shipped config shrunk to TINY; returns the run's best.ckpt."""
    assert (
        tl(
            "fit",
            "--config",
            CONFIGS / config,
            *TINY,
            "--data.root",
            data_root,
            "--trainer.max_epochs",
            str(epochs),
            *extra,
        )
        == 0
    )
    return Path("runs") / Path(config).stem / "latest" / "checkpoints" / "best.ckpt"
