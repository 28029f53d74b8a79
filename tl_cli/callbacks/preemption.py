"""Surviving preemption and time limits: checkpoint at a batch boundary, requeue, resume exactly.

Lightning's own SLURM handler saves its checkpoint from inside the signal handler, wherever
the training step happens to be (between backward and optimizer step, say), so the resumed
run cannot be the same as an uninterrupted one. tl handles SIGUSR1 (``#SBATCH
--signal=SIGUSR1@90``) itself: the handler only raises a flag; the ranks agree on it at a
batch boundary, the full training state is written to ``hpc_ckpt_N.ckpt`` in
``trainer.default_root_dir`` (where Lightning looks when the job starts again), rank 0 asks
SLURM to requeue the job, and training stops. With `ExactResume` the resumed run continues
with exactly the batches and random numbers the interrupted one would have used.

Agreement without a synchronisation per step: the ranks exchange their flags with an
asynchronous all-reduce on tl's own CPU (gloo) group, launched at agreed batches and read at
the next agreed one, about every ``check_seconds``. Every rank reads the same result at the
same batch, so they stop together, and nothing waits on the GPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from tl_cli.cluster import distributed


class PreemptionCheckpoint(pl.Callback):
    """On SIGUSR1: checkpoint at a batch boundary, requeue under SLURM, stop.

    Args:
        signum: the signal that announces the end (SLURM's ``--signal``).
        check_seconds: how often (in training time) the ranks agree on whether it came.
    """

    def __init__(self, signum: int = signal.SIGUSR1, check_seconds: float = 2.0) -> None:
        self.signum, self.check_seconds = signum, check_seconds
        self.requested = False
        self.preempted = False  # this run stopped for the signal (it is not complete)
        self._previous: Any = None
        self._group: Any = None
        self._pending: Optional[tuple[Any, torch.Tensor]] = None
        self._batches = 0
        self._next_check = 1
        self._started = time.monotonic()
        self._stop_at_epoch_end = False
        self._saved = ""  # the hpc checkpoint written at the preemption

    def _flag(self, signum: int, frame: Any) -> None:
        self.requested = True

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # before any DataLoader worker starts: workers inherit the disposition, then ignore it
        self._previous = signal.signal(self.signum, self._flag)
        self._group = distributed.group(1800.0, "preemption")
        self.requested, self._pending, self._batches, self._next_check = False, None, 0, 1
        self.preempted = False
        self._stop_at_epoch_end = False

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._pending is not None:
            self._pending[0].wait()  # every rank launched it: it completes
            self._pending = None
        if self.preempted and stage == "fit":
            self._requeue(trainer)
        if self._previous is not None:
            # a signal that comes after training (SLURM's warning of a job that is finishing
            # anyway) must not kill the process with the default action: ignore it then
            signal.signal(self.signum, signal.SIG_IGN if self._previous == signal.SIG_DFL else self._previous)
            self._previous = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.monotonic()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        last = batch_idx + 1 >= trainer.num_training_batches
        if not self._agreed_to_stop(epoch_end=last):
            return
        # After an epoch's last batch, validation and the epoch-end callbacks (checkpointing,
        # early stopping) still have to run: a checkpoint taken here would resume past them.
        if batch_idx + 1 < trainer.num_training_batches:
            self._preempt(trainer)
        else:
            self._stop_at_epoch_end = True

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stop_at_epoch_end:
            self._stop_at_epoch_end = False
            self._preempt(trainer)

    def _agreed_to_stop(self, epoch_end: bool = False) -> bool:
        """Whether every rank agrees to stop now. At an epoch's last batch the exchange is
        completed on the spot (once per epoch), so a signal never outlives a short run."""
        if self._group is None:  # one process: nobody to agree with
            return self.requested
        if self._batches < self._next_check and not epoch_end:
            return False
        decision = False
        if self._pending is not None:
            work, values = self._pending
            work.wait()  # launched one check ago: long done
            decision = bool(values[0] > 0)
            self._next_check = self._batches + max(1, int(-values[1]))
            self._pending = None
        else:
            self._next_check = self._batches + 1
        if epoch_end and not decision:
            decision = self._exchange(wait=True)
        if not decision:
            self._exchange(wait=False)
        return decision

    def _exchange(self, wait: bool) -> bool:
        """All-reduce (this rank's flag, its proposed interval): anyone's flag, the shortest
        interval. Asynchronous unless `wait`; then returns whether anyone was signalled."""
        per_batch = (time.monotonic() - self._started) / max(1, self._batches)
        interval = max(1, min(1000, int(self.check_seconds / max(per_batch, 1e-6))))
        values = torch.tensor([float(self.requested), -float(interval)])
        work = torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX, group=self._group, async_op=True)
        if not wait:
            self._pending = (work, values)
            return False
        work.wait()
        self._next_check = self._batches + max(1, int(-values[1]))
        return bool(values[0] > 0)

    def _preempt(self, trainer: pl.Trainer) -> None:
        self.requested, self.preempted = False, True
        # Lightning 2.6 names the hpc_ckpt_N.ckpt it resumes from only in its private connector
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        rank_zero_info(f"tl: preemption signal: training state saved to {path}")
        self._saved = path
        trainer.should_stop = True

    def _requeue(self, trainer: pl.Trainer) -> None:
        """Under SLURM, requeue the job once every rank is out of the fit.

        Requeueing sends SIGTERM to every process of the job. Inside the fit, Lightning's
        SIGTERM handler (2.6, ``_SignalConnector._sigterm_notifier_fn``) runs a broadcast in
        the handler, and the ranks hang there until SLURM's KillWait ends them with SIGKILL.
        Here its handlers are gone (Trainer._teardown ran), the DataLoader workers are shut
        down, and the state is saved: every rank ignores SIGTERM and exits on its own."""
        job = os.environ.get("SLURM_JOB_ID")
        if not job:
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self._group is not None:
            torch.distributed.barrier(group=self._group)  # every rank ignores it before it comes
        if not trainer.is_global_zero:
            return
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if done.returncode == 0:
            rank_zero_info(f"tl: SLURM job {job} requeued; it resumes from {self._saved}")
        else:
            rank_zero_info(f"tl: requeueing SLURM job {job} failed: {done.stderr.strip()}")
