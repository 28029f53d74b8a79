"""A resumed run continues exactly where the checkpoint left it (`ExactResume`), and an extended
one from the learning rate it stands at (`ReplanSchedule`).

Two things Lightning does not restore: where in the epoch's order the run was (it restarts
the epoch's data from the beginning), and the random number generators (dropout). This
callback stores every rank's CPU and CUDA generator state in the checkpoint and, when a run
resumes, restores them and makes the `ResumableSampler` of every training loader skip the
samples the interrupted epoch had already trained on.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from tl_cli.cluster import distributed
from tl_cli.data.datasets import ResumableSampler


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def position(trainer: pl.Trainer) -> dict[str, int]:
    """Where a run resumed from a checkpoint taken now continues: an epoch, and its batches
    already done (after an epoch's last batch: the next epoch, from its start)."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    if done >= trainer.num_training_batches:
        return {"epoch": trainer.current_epoch + 1, "batches": 0}
    return {"epoch": trainer.current_epoch, "batches": done}


class ExactResume(pl.Callback):
    """Random-number state of every rank in the checkpoint; position in the epoch on resume.

    Lightning builds (and iterates) the training loader before it calls any hook of a resumed
    run, so the position goes to the DataModule as soon as the checkpoint is read
    (``resume_at``, a hook of `ImageFolderData`); ``on_train_start`` places the samplers again
    for loaders of other DataModules.
    """

    def __init__(self) -> None:
        self._restored: Optional[list[dict[str, Any]]] = None
        self._position: Optional[dict[str, int]] = None

    @override
    def state_dict(self) -> dict[str, Any]:
        # Lightning builds the checkpoint on every rank (rank 0 writes it): all take part
        return {"rng": distributed.on_every_rank(_rng_state, 1800.0)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("rng")

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["tl_position"] = position(trainer)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._position = checkpoint.get("tl_position")
        resume_at = getattr(trainer.datamodule, "resume_at", None)
        if self._position and resume_at is not None:
            resume_at(**self._position)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._position:
            loaders = trainer.train_dataloader
            for loader in loaders.flattened if hasattr(loaders, "flattened") else [loaders]:
                sampler = getattr(loader, "sampler", None)
                if isinstance(sampler, ResumableSampler):
                    sampler.resume_at(batch_size=loader.batch_size, **self._position)
        self._position = None
        if self._restored:
            rank = trainer.global_rank
            state = self._restored[rank] if rank < len(self._restored) else self._restored[0]
            torch.set_rng_state(state["cpu"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda"])
        self._restored = None


class ReplanSchedule(pl.Callback):
    """A resumed run whose schedule changed (a larger ``trainer.max_epochs``, a finished run
    extended) goes on from the learning rate it stands at, down to where the new plan ends.

    Lightning restores a per-step schedule's step count and the optimizer's learning rates, and
    the model plans the schedule for the new number of steps; at the step the run stands at,
    that plan would jump (a cosine planned over more steps is higher there). Each `LambdaLR`
    factor whose plan disagrees with the learning rate restored is rescaled: the new plan's
    remaining shape, from the factor the run stands at to the plan's end. A plan that agrees
    (an interrupted run resumed as configured) is left as it is, so resuming stays exact.
    """

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        total = int(trainer.estimated_stepping_batches)
        said = []
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if config.interval != "step" or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                continue
            step = scheduler.last_epoch
            groups = scheduler.optimizer.param_groups
            for i, (group, base, plan) in enumerate(
                zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=False)
            ):
                if not base:
                    continue
                now, planned, end = group["lr"] / base, plan(step), plan(total)
                if abs(planned - now) <= 1e-9 * max(abs(now), abs(planned)):
                    continue
                scheduler.lr_lambdas[i] = _replanned(plan, now, planned, end)
                name = group.get("name", f"group {i}")
                said.append(f"{name} lr {group['lr']:.3g} now, {base * end:.3g} at its end (not {base * planned:.3g})")
        if said:
            rank_zero_info(
                f"tl: the learning-rate schedule changed (now {total} steps): it goes on from step {step} where "
                f"it stands, down to its end: {'; '.join(said)}"
            )


def _replanned(plan: Any, now: float, planned: float, end: float) -> Any:
    """`plan`'s remaining shape, rescaled to start at `now` (where `plan` says `planned`) and
    end where `plan` ends. A plain function: LambdaLR's state_dict saves other callables."""
    span = planned - end

    def factor(step: int) -> float:
        if span == 0:
            return now
        return end + (now - end) * min(1.0, max(0.0, (plan(step) - end) / span))

    return factor
