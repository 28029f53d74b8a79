"""Experiment trackers (MLflow, W&B, any Lightning logger) beside tl's own run folder.

``--trainer.logger`` *adds* loggers: tl's TensorBoard and CSV loggers stay first, so the run
folder, its ``config.yaml``, checkpoints, ``metrics.csv``, curves and ``latest`` are what they
are without a tracker, and the tracker gets the same metrics. Each tracker's run id is kept in
the run folder (``trackers.json``): a requeued job and ``tl resume`` continue the same tracked
run, and ``tl test`` of a run's checkpoint logs its metrics and report into the run that
trained it. Under DDP only rank 0 logs (Lightning's loggers) and writes ``trackers.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger
from typing_extensions import override

TRACKERS = "trackers.json"
#: what a run folder holds that a tracker gets as artifacts, when the command wrote it
ARTIFACTS = (
    "config.yaml",
    "curves.svg",
    "metrics.json",
    "report.html",
    "confusion_matrix.png",
    "mistakes.png",
    "predictions.csv",
)


def tracker_ids(logger: Logger) -> Optional[dict[str, Any]]:
    """What names `logger`'s tracked run (None for a logger tl does not continue)."""
    if isinstance(logger, MLFlowLogger):
        return {"run_id": logger.run_id, "experiment_id": logger.experiment_id, "tracking_uri": logger._tracking_uri}
    if isinstance(logger, WandbLogger):
        return {"id": logger.version, "project": logger._project}
    return None


def read_trackers(folder: Path) -> dict[str, dict[str, Any]]:
    """The tracked runs a run folder recorded, by logger class name."""
    try:
        recorded = json.loads((folder / TRACKERS).read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def continue_trackers(loggers: list[Logger], folder: Optional[Path]) -> list[str]:
    """Point the trackers among `loggers` at the runs `folder` recorded, before they start one.

    A tracker configured with a run id of its own, or pointed at another MLflow server, starts
    its own. Returns what each continues, for the message.
    """
    recorded = read_trackers(folder) if folder is not None else {}
    said = []
    for logger in loggers:
        ids = recorded.get(type(logger).__name__)
        if not ids:
            continue
        if isinstance(logger, MLFlowLogger) and logger._run_id is None and not logger._initialized:
            if ids.get("tracking_uri") == logger._tracking_uri and ids.get("run_id"):
                logger._run_id = ids["run_id"]
                _keep_logged_params(logger)
                said.append(f"MLflow run {ids['run_id']}")
        elif isinstance(logger, WandbLogger) and logger._id is None and logger._experiment is None and ids.get("id"):
            logger._id = logger._wandb_init["id"] = ids["id"]
            logger._wandb_init["resume"] = "allow"
            said.append(f"W&B run {ids['id']}")
    return said


def _keep_logged_params(logger: MLFlowLogger) -> None:
    """MLflow refuses to change a parameter a run logged: a continued run (resumed with other
    settings, or the test of its checkpoint) logs only the parameters the run has not logged,
    nor one nested under a logged one or the other way round (``preprocessing`` logged as None,
    ``preprocessing/image_size`` now: a file store keeps them as a file and a folder)."""
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

    log_all = logger.log_hyperparams

    def log_hyperparams(params: Any) -> None:
        logged = logger.experiment.get_run(logger.run_id).data.params
        flat = _flatten_dict(_convert_params(params))
        taken = set(logged) | {k.rsplit("/", n)[0] for k in logged for n in range(1, k.count("/") + 1)}

        def new(key: str) -> bool:
            return key not in taken and not any(key.startswith(f"{old}/") for old in logged)

        log_all({k: v for k, v in flat.items() if new(k)})

    logger.log_hyperparams = log_hyperparams  # type: ignore[method-assign]


def checkpoint_run_folder(ckpt_path: Any) -> Optional[Path]:
    """The run folder a checkpoint file was written into (``<run>/checkpoints/x.ckpt``)."""
    if not ckpt_path:
        return None
    path = Path(str(ckpt_path))
    return path.parent.parent if path.parent.name == "checkpoints" and path.is_file() else None


def log_artifacts(logger: Logger, folder: Path, files: list[Path], subfolder: str) -> None:
    """Copy `files` (in `folder`) into `logger`'s tracked run, under `subfolder`."""
    if isinstance(logger, MLFlowLogger):
        for path in files:
            logger.experiment.log_artifact(logger.run_id, str(path), subfolder)
    elif isinstance(logger, WandbLogger):
        for path in files:
            logger.experiment.save(str(path), base_path=str(folder), policy="now")


class TrackerRecords(pl.Callback):
    """Records the trackers' run ids in the run folder once they started, and gives them the
    files the command wrote there (config, curves, ``tl test``'s metrics and report)."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # every rank: Lightning broadcasts it from rank 0
        if not trainer.is_global_zero or log_dir is None:
            return
        folder = Path(log_dir)
        recorded = read_trackers(folder)
        for logger in trainer.loggers:
            ids = tracker_ids(logger)
            if ids is not None:
                recorded[type(logger).__name__] = ids
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TRACKERS).write_text(json.dumps(recorded, indent=1) + "\n")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # every rank: Lightning broadcasts it from rank 0
        if not trainer.is_global_zero or log_dir is None:
            return
        folder = Path(log_dir)
        files = [folder / name for name in ARTIFACTS if (folder / name).is_file()]
        for logger in trainer.loggers:
            if tracker_ids(logger) is not None:
                log_artifacts(logger, folder, files, str(getattr(stage, "value", stage)))  # fit, test, ...
