"""`--trainer.logger` adds MLflow (a file store, a real local `mlflow server`) or W&B (offline)
beside tl's run folder; the tracked run is continued by `tl test` of its checkpoint and by `tl
resume`; under DDP one tracked run."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, TINY, tl
from tests.helpers import ok, run_tl

MLFLOW = ["--trainer.logger", "lightning.pytorch.loggers.MLFlowLogger", "--trainer.logger.experiment_name", "tl"]
RUNS = Path("runs/feature_extract")


def _fit(data, epochs: int, *extra) -> int:
    args = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", data]
    return tl(*args, "--trainer.max_epochs", str(epochs), *extra)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _runs(uri: str) -> list:
    client = _client(uri)
    return client.search_runs([client.get_experiment_by_name("tl").experiment_id])


def _run_id(run: Path, logger: str = "MLFlowLogger") -> str:
    return (
        json.loads((run / "trackers.json").read_text())[logger].get("run_id")
        or json.loads((run / "trackers.json").read_text())[logger]["id"]
    )


@pytest.fixture
def file_store(monkeypatch, tmp_path) -> str:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks file stores to opt in
    return f"file:{tmp_path / 'mlruns'}"


@pytest.mark.slow
def test_mlflow_is_added_beside_the_run_folder_and_the_same_command_runs_twice(tiny_data, file_store):
    for _ in range(2):
        assert _fit(tiny_data, 1, *MLFLOW, "--trainer.logger.tracking_uri", file_store) == 0
    assert os.readlink(RUNS / "latest") == "version_1"
    for run in (RUNS / "version_0", RUNS / "version_1"):
        for name in ("config.yaml", "metrics.csv", "curves.svg", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
            assert (run / name).is_file(), run / name
    ids = {_run_id(RUNS / "version_0"), _run_id(RUNS / "version_1")}
    assert {r.info.run_id for r in _runs(file_store)} == ids and len(ids) == 2
    client = _client(file_store)
    run = client.get_run(_run_id(RUNS / "version_1"))
    assert "val/loss" in run.data.metrics and run.data.params["backbone"] == "timm:test_efficientnet"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "fit")} >= {"fit/config.yaml", "fit/curves.svg"}


@pytest.mark.slow
def test_tl_test_logs_its_metrics_and_report_into_the_run_that_trained_the_checkpoint(tiny_data, file_store):
    assert _fit(tiny_data, 1, *MLFLOW, "--trainer.logger.tracking_uri", file_store) == 0
    best = RUNS / "latest/checkpoints/best.ckpt"
    test = ["test", "--ckpt_path", best, "--data.root", tiny_data, "--data.num_workers", "0"]
    assert tl(*test, *MLFLOW, "--trainer.logger.tracking_uri", file_store) == 0
    assert (Path("runs/test/latest/report.html")).is_file() and Path("runs/test/latest/metrics.json").is_file()
    (tracked,) = _runs(file_store)  # no second tracked run
    assert tracked.info.run_id == _run_id(RUNS / "version_0")
    assert "test/acc" in tracked.data.metrics and "val/loss" in tracked.data.metrics
    files = {a.path for a in _client(file_store).list_artifacts(tracked.info.run_id, "test")}
    assert {"test/metrics.json", "test/report.html", "test/confusion_matrix.png"} <= files


def test_resume_continues_the_same_mlflow_run_with_one_history(tiny_data, file_store, caplog):
    assert _fit(tiny_data, 2, *MLFLOW, "--trainer.logger.tracking_uri", file_store) == 0
    run = RUNS / "version_0"
    first = _run_id(run)
    caplog.set_level(logging.INFO)  # Lightning's rank-zero messages: its logger, under pytest
    assert tl("resume", run, "--trainer.max_epochs", "3") == 0
    assert f"continuing MLflow run {first}" in caplog.text
    assert _run_id(run) == first
    (tracked,) = _runs(file_store)
    steps = [m.step for m in _client(file_store).get_metric_history(first, "train/loss")]
    assert steps == list(range(9)), steps  # 3 epochs of 3 steps, each step once


def test_a_requeued_job_continues_the_tracked_run_of_its_first_start(tiny_data, file_store, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert _fit(tiny_data, 1, *MLFLOW, "--trainer.logger.tracking_uri", file_store) == 0
    first = _run_id(RUNS / "version_0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert _fit(tiny_data, 1, *MLFLOW, "--trainer.logger.tracking_uri", file_store) == 0
    assert sorted(p.name for p in RUNS.iterdir()) == ["latest", "version_0"]
    assert [r.info.run_id for r in _runs(file_store)] == [first]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (a free port, a SQLite store, artifacts served),
    ready within 120 s, stopped afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(tmp_path / "artifacts")]
    log = open(tmp_path / "mlflow-server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'mlflow-server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_a_real_mlflow_server_gets_the_fit_and_the_test(tiny_data, mlflow_server, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert _fit(tiny_data, 1, *MLFLOW, "--trainer.logger.tracking_uri", mlflow_server) == 0
    best = RUNS / "latest/checkpoints/best.ckpt"
    test = ["test", "--ckpt_path", best, "--data.root", tiny_data, "--data.num_workers", "0"]
    assert tl(*test, *MLFLOW, "--trainer.logger.tracking_uri", mlflow_server) == 0
    (tracked,) = _runs(mlflow_server)
    assert tracked.info.run_id == _run_id(RUNS / "version_0") and "test/acc" in tracked.data.metrics
    files = {a.path for a in _client(mlflow_server).list_artifacts(tracked.info.run_id, "test")}
    assert "test/report.html" in files
    assert (RUNS / "version_0/metrics.csv").is_file() and os.readlink(RUNS / "latest") == "version_0"


@pytest.mark.slow
def test_wandb_offline_is_added_and_resume_continues_its_run(tiny_data, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    wandb = ["--trainer.logger", "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.offline", "true"]
    wandb += ["--trainer.logger.project", "tl", "--trainer.logger.save_dir", str(tmp_path / "wandb")]
    fit = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", tiny_data]
    ok(run_tl([*fit, "--trainer.max_epochs", "1", *wandb]))  # each its own process, as on a cluster
    run = RUNS / "version_0"
    first = _run_id(run, "WandbLogger")
    assert (run / "metrics.csv").is_file() and os.readlink(RUNS / "latest") == "version_0"
    ok(run_tl(["resume", run, "--trainer.max_epochs", "2"]))
    assert _run_id(run, "WandbLogger") == first
    offline = sorted(p.name for p in (tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(f"-{first}") for name in offline), offline  # one W&B run


@pytest.mark.slow
def test_a_ddp_run_creates_one_tracked_run(tiny_data, file_store):
    args = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", tiny_data]
    args += ["--trainer.max_epochs", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    ok(run_tl([*args, *MLFLOW, "--trainer.logger.tracking_uri", file_store]))
    (tracked,) = _runs(file_store)
    assert tracked.info.run_id == _run_id(RUNS / "version_0") and "val/loss" in tracked.data.metrics
    assert sorted(p.name for p in RUNS.iterdir()) == ["latest", "version_0"]
