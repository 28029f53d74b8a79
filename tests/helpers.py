"""Callbacks the multi-process tests load by class path (``--trainer.callbacks+``)."""

from __future__ import annotations

import contextlib
import os

import lightning.pytorch as pl
import torch


def _state(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class SaveRankState(pl.Callback):
    """Every rank saves the model it starts and ends training with, to compare the ranks, and
    with the end the last validation's metrics (as ``metric:val/...``) and what its checkpoint
    callback holds as best when the fit is over (``best:score``, ``best:path``)."""

    def __init__(self, folder: str = "rankstate") -> None:
        self.folder = folder

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        os.makedirs(self.folder, exist_ok=True)
        torch.save(_state(pl_module), f"{self.folder}/start{trainer.global_rank}.pt")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {
            f"metric:{k}": torch.as_tensor(v).detach().cpu().clone() for k, v in trainer.callback_metrics.items()
        }
        ends = {**_state(pl_module), **{k: v for k, v in metrics.items() if k.startswith("metric:val/")}}
        torch.save(ends, f"{self.folder}/end{trainer.global_rank}.pt")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the module's on_train_end, where the start may have taken best.ckpt: what each
        # rank's checkpoint callback holds as best (score and path), to compare the ranks' verdicts
        callback = trainer.checkpoint_callback
        if callback is None:
            return
        path = f"{self.folder}/end{trainer.global_rank}.pt"
        if not os.path.exists(path):  # the fit stopped before training ended (a preemption)
            return
        ends = torch.load(path, weights_only=True)
        score = callback.best_model_score
        ends["best:score"] = torch.tensor(-1.0 if score is None else float(score), dtype=torch.float64)
        ends["best:path"] = torch.tensor(list(str(callback.best_model_path).encode()), dtype=torch.uint8)
        torch.save(ends, path)


class CollectiveAtEpochEnd(pl.Callback):
    """A collective on the default process group at every train epoch end, without reading
    metrics first (as tl's preemption check once did): with a progress bar that syncs metrics
    on rank 0 alone (Lightning issue 21264), the ranks' collectives no longer pair up."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.reduce_boolean_decision(False, all=False)


def descendants(pid: int) -> list[int]:
    """Every process under `pid`, parents before children (from /proc: no psutil needed)."""
    from pathlib import Path

    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the task ended meanwhile
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


class SignalSelf(pl.Callback):
    """Each rank sends itself and every process under it (DataLoader workers, their fork
    server, multiprocessing's resource tracker) SIGUSR1 at a given batch, as SLURM signals every
    process of a job step."""

    def __init__(self, epoch: int = 1, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        import signal

        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch) or os.environ.get("TL_TEST_RESUMED"):
            return
        for pid in descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
