"""Under DDP the feature cache is built once, by rank 0, and every rank trains on it."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from torch.multiprocessing.spawn import ProcessExitedException

from tl_cli.data import ImageFolderData
from tl_cli.models import TransferClassifier


class CountingClassifier(TransferClassifier):
    """Records which rank extracts features (a file: spawned processes share no memory)."""

    def extract_features(self, loader):
        with open(os.environ["TL_TEST_SPY"], "a") as fh:
            fh.write(f"{self.global_rank} {len(loader.dataset)}\n")
        return super().extract_features(loader)


def test_two_process_ddp_builds_each_cache_entry_once(tiny_data, tmp_path, monkeypatch):
    spy = tmp_path / "spy.txt"
    monkeypatch.setenv("TL_TEST_SPY", str(spy))
    model = CountingClassifier(backbone="timm:test_efficientnet", weights="none")
    dm = ImageFolderData(root=str(tiny_data), batch_size=4, num_workers=0, image_size=64)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    try:
        trainer.fit(model, dm)
    except ProcessExitedException as exc:
        # gloo sometimes aborts a worker while tearing down after a finished run ("terminate
        # called without an active exception"); the run's results are still checked below.
        if "SIGABRT" not in str(exc):
            raise
    assert sorted(spy.read_text().split("\n")[:-1]) == ["0 12", "0 24"]  # val and train, rank 0 only
    entries = list((tmp_path / "tl_cache" / "features").glob("*.pt"))
    assert len(entries) == 2


def test_two_process_test_reports_count_every_image_once(tiny_data, tmp_path):
    import json
    import shutil

    root = tmp_path / "odd"
    shutil.copytree(tiny_data, root)
    next((root / "test" / "rectangles").iterdir()).unlink()  # 11 test images: the sampler pads one
    pl.seed_everything(0)
    model = TransferClassifier(
        backbone="timm:test_efficientnet", weights="none", class_names=["ellipses", "rectangles"]
    )
    dm = ImageFolderData(root=str(root), batch_size=4, num_workers=0, image_size=64)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        enable_progress_bar=False,
        default_root_dir=str(tmp_path / "run"),
        logger=pl.loggers.CSVLogger(str(tmp_path / "run"), name="", version=0),
    )
    try:
        trainer.test(model, dm)
    except ProcessExitedException as exc:
        if "SIGABRT" not in str(exc):
            raise
    metrics = json.loads((tmp_path / "run" / "version_0" / "metrics.json").read_text())
    assert metrics["n_samples"] == 11 and sum(map(sum, metrics["confusion_matrix"])) == 11
    rows = (tmp_path / "run" / "version_0" / "predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == 11 and len({r.split(",")[0] for r in rows}) == 11
