"""Fixtures every test shares: an isolated environment, the tiny generated dataset (and a copy
a test may change), and a run trained on it. What tests import is in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

# Offline before anything imports huggingface_hub (it reads HF_HUB_OFFLINE once, at import): a
# test module importing timm at collection would otherwise send later tests to the network, to
# wait out its timeouts (test_compare took 102 s instead of 8)
os.environ["HF_HUB_OFFLINE"] = "1"

# Re-exported: tests written before tests/helpers.py import these from here.
from tests.helpers import CONFIGS, REPO, TINY, fit_tiny, tl  # noqa: F401
from tl_cli.datatools.synth import synthesize


def _isolate(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Offline, outside any SLURM job, caches and working directory in `folder`."""
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(folder / "hf_home"))
    monkeypatch.setenv("TORCH_HOME", str(folder / "torch_home"))
    monkeypatch.setenv("TL_CACHE_DIR", str(folder / "tl_cache"))
    monkeypatch.chdir(folder)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run every test in its own folder, offline, outside any SLURM job, with signals restored."""
    _isolate(monkeypatch, tmp_path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """2 classes x (12 train, 6 val, 6 test) generated images, 64 px. Shared: never change it."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    synthesize(root, seed=1, num_classes=2, per_split={"train": 12, "val": 6, "test": 6}, size=64)
    return root


@pytest.fixture
def data(tiny_data, tmp_path) -> Path:
    """A copy of `tiny_data` in the test's folder, for a test that changes the files."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    return root


@pytest.fixture(scope="session")
def trained(tiny_data, tmp_path_factory) -> Path:
    """The run folder of a 3-epoch feature extraction on `tiny_data` through the CLI, with its
    best.ckpt and last.ckpt. Shared: read it, never change it."""
    work = tmp_path_factory.mktemp("trained")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate(monkeypatch, work)
        fit_tiny(tiny_data, 3)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    return work / "runs" / "feature_extract" / "latest"
