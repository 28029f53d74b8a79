"""`TLTrainer`: Lightning's Trainer with tl's defaults.

- ``precision: auto``: bf16-mixed on CUDA GPUs of compute capability 8.0+, 16-mixed on older
  ones, 32-true on CPU; decided without initialising CUDA in the process that launches the
  ranks.
- Logs (TensorBoard + CSV) in a run folder of its own (`tl_cli.cli.runs`), ``latest`` pointing at
  the newest complete run; ``logger`` (MLflow, W&B, ...) adds trackers beside them
  (`tl_cli.cli.tracking`).
- Callbacks always present: metric synchronisation first (Lightning issue 21264), preemption
  at a batch boundary, exact resume, and a progress display fit for where the output goes
  (Rich on a terminal, plain lines in a log file).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any, Optional

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import Checkpoint, ProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from tl_cli.callbacks import (
    ExactResume,
    ExpectedDuration,
    PlainProgress,
    PreemptionCheckpoint,
    ReplanSchedule,
    SyncEpochMetrics,
    TLRichProgressBar,
)
from tl_cli.cli.runs import RunCSVLogger, RunFolder, RunTensorBoardLogger, continued_folder, mark_complete
from tl_cli.cli.tracking import TrackerRecords, checkpoint_run_folder, continue_trackers


def _visible_gpu_ids() -> Optional[list[str]]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if visible is None else [v.strip() for v in visible.split(",") if v.strip()]


def gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capability of each visible GPU, asked of the driver (nvidia-smi), not of CUDA:
    initialising CUDA in the process that launches the DDP ranks breaks forked ones and
    holds memory on GPU 0 in the launcher."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,uuid,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    visible = _visible_gpu_ids()
    for line in out.strip().splitlines():
        try:
            index, uuid, cap = (part.strip() for part in line.split(","))
            major, minor = (int(v) for v in cap.split("."))
        except ValueError:
            continue
        if visible is None or index in visible or uuid in visible:
            found.append((major, minor))
    return found


def _cuda_wanted(accelerator: Any) -> bool:
    import torch

    return accelerator in ("auto", "gpu", "cuda", None) and torch.cuda.device_count() > 0


def resolve_precision(precision: Any, accelerator: Any = "auto") -> tuple[Any, str]:
    """``auto`` -> what this machine should use, and why (for the message)."""
    if precision != "auto":
        return precision, "as configured"
    if not _cuda_wanted(accelerator):
        return "32-true", "no CUDA GPU"
    caps = gpu_capabilities()
    if not caps:  # no nvidia-smi: ask CUDA itself (initialises it in this process)
        import torch

        return ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"), "CUDA reports bf16 support"
    lowest = min(caps)
    chosen = "bf16-mixed" if lowest >= (8, 0) else "16-mixed"
    return chosen, f"GPU compute capability {lowest[0]}.{lowest[1]}"


class CompleteRun(Callback):
    """Points ``latest`` at the run once it completed (not when it was preempted)."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run

    def _mark_if_complete(self, trainer: Trainer) -> None:
        preempted = any(getattr(c, "preempted", False) for c in trainer.callbacks)
        if trainer.is_global_zero and not preempted and not trainer.interrupted:
            mark_complete(self.run.root, self.run.name)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: Any) -> None:
        self._mark_if_complete(trainer)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: Any) -> None:
        self._mark_if_complete(trainer)

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: Any) -> None:
        self._mark_if_complete(trainer)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.state.fn == "validate":
            self._mark_if_complete(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: Any, exception: BaseException) -> None:
        # a failed start (before the first step) leaves no empty version_N/ behind
        if trainer.is_global_zero and trainer.global_step == 0:
            self.run.discard_unstarted()


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class TLTrainer(Trainer):
    """Lightning's Trainer with ``precision: auto``, a run folder per run, and tl's callbacks.

    Takes Lightning's Trainer arguments; see the module docstring for what differs.
    """

    def __init__(self, *args: Any, precision: Any = "auto", **kwargs: Any) -> None:
        chosen, why = resolve_precision(precision, kwargs.get("accelerator", "auto"))
        if precision == "auto":
            rank_zero_info(f"tl: trainer.precision=auto -> {chosen} ({why})")
        callbacks = _as_list(kwargs.get("callbacks"))
        root = kwargs.get("default_root_dir")
        self.run_folder: Optional[RunFolder] = None
        if root and kwargs.get("logger") is not False:
            # tl's loggers first: the run folder is trainer.log_dir (config.yaml, checkpoints)
            trackers = [] if kwargs.get("logger") in (None, True) else _as_list(kwargs.get("logger"))
            self.run_folder = RunFolder(root)
            kwargs["logger"] = [RunTensorBoardLogger(self.run_folder), RunCSVLogger(self.run_folder), *trackers]
            callbacks.append(CompleteRun(self.run_folder))
            if trackers:
                callbacks.append(TrackerRecords())
        callbacks = self._reconcile_callbacks(callbacks, kwargs)
        callbacks += [PreemptionCheckpoint(), ExactResume(), ReplanSchedule(), ExpectedDuration()]
        kwargs["callbacks"] = callbacks
        if SLURMEnvironment.detect():
            # tl's PreemptionCheckpoint saves at a batch boundary and requeues; Lightning's own
            # handler would save from inside the signal handler, mid-step
            plugins = _as_list(kwargs.get("plugins"))
            if not any(isinstance(p, SLURMEnvironment) for p in plugins):
                kwargs["plugins"] = [*plugins, SLURMEnvironment(auto_requeue=False)]
        if kwargs.get("benchmark") is None and _cuda_wanted(kwargs.get("accelerator", "auto")):
            # fixed input size: let cuDNN pick its fastest kernels (no effect on CPU)
            kwargs["benchmark"] = not kwargs.get("deterministic")
        super().__init__(*args, precision=chosen, **kwargs)
        self.callbacks.insert(0, SyncEpochMetrics())

    def continue_trackers(self, ckpt_path: Any, fitting: bool) -> None:
        """Trackers continue the tracked run of the run folder this run continues (``tl resume``,
        a requeued job) or, evaluating a checkpoint, of the run that wrote it."""
        if self.run_folder is None:
            return
        folder = continued_folder(self.run_folder.root) if fitting else checkpoint_run_folder(ckpt_path)
        said = continue_trackers(self.loggers, folder)
        if said:
            rank_zero_info(f"tl: continuing {', '.join(said)} (recorded in {folder})")

    def lr_find(
        self,
        model: Any,
        datamodule: Any = None,
        min_lr: float = 1e-7,
        max_lr: float = 1.0,
        num_training: int = 100,
        mode: str = "exponential",
        early_stop_threshold: Optional[float] = None,
    ) -> float:
        """Find a learning rate: train `num_training` steps with the learning rate growing from
        `min_lr` to `max_lr` and suggest the one where the loss fell fastest (Lightning's
        finder). The freezing callbacks have set up epoch 0 first: feature extraction searches
        on cached features, fine-tuning with the schedule's first stages trainable. Writes
        lr_find.json and lr_find.png into the run folder.

        Args:
            model: the LightningModule.
            datamodule: its data.
            min_lr: the smallest learning rate tried.
            max_lr: the largest learning rate tried.
            num_training: steps of the search.
            mode: ``exponential`` or ``linear`` growth.
            early_stop_threshold: stop when the loss exceeds this times the best one; null
                (default) sweeps the whole range, which small data sets need to give the
                suggestion enough points.
        """
        import json
        from pathlib import Path

        from lightning.pytorch.tuner import Tuner

        epochs = self.fit_loop.max_epochs
        self.fit_loop.max_epochs = 10**6  # the search runs num_training steps, however many epochs that is
        try:
            finder = Tuner(self).lr_find(
                model,
                datamodule=datamodule,
                min_lr=min_lr,
                max_lr=max_lr,
                num_training=num_training,
                mode=mode,
                early_stop_threshold=early_stop_threshold,
                update_attr=False,
            )
        finally:
            self.fit_loop.max_epochs = epochs
        suggestion = finder.suggestion() if finder is not None else None
        if suggestion is None:
            from tl_cli.errors import TLError

            raise TLError("The learning-rate search found no clear drop of the loss; set model.lr yourself.")
        folder = Path(self.log_dir or self.default_root_dir)
        if self.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            record = {"suggestion": suggestion, "lr": finder.results["lr"], "loss": finder.results["loss"]}
            (folder / "lr_find.json").write_text(json.dumps(record, indent=1) + "\n")
            figure = finder.plot(suggest=True)
            figure.savefig(folder / "lr_find.png", dpi=110)
            print(f"tl: suggested learning rate {suggestion:.3g} (lr_find.json, lr_find.png in {folder})", flush=True)
        return suggestion

    @staticmethod
    def _reconcile_callbacks(callbacks: list, kwargs: dict[str, Any]) -> list:
        """Flags win over listed callbacks (Lightning would refuse the combination), and the
        progress display suits where the output goes."""
        bars = [c for c in callbacks if isinstance(c, ProgressBar)]
        if kwargs.get("enable_progress_bar") is False:
            if bars:
                rank_zero_info(f"tl: trainer.enable_progress_bar=false: {type(bars[0]).__name__} not used")
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        elif not bars:
            callbacks.append(TLRichProgressBar() if sys.stdout.isatty() else PlainProgress())
        if kwargs.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
        return callbacks
