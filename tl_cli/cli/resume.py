"""Continuing a run: ``tl resume RUN_DIR``, and ``tl fit --ckpt_path X`` without a config.

``tl resume RUN_DIR [--trainer.max_epochs N ...]`` is ``tl fit`` with the run's own
``config.yaml``, the overrides given, and ``--ckpt_path RUN_DIR/checkpoints/last.ckpt``, in
the same folder (`tl_cli.cli.runs.continuing`): the same logger versions, metrics.csv going on,
config.yaml rewritten with what changed, the same tracked MLflow / W&B run. A run with nothing
left to do says so and changes nothing (`check_what_is_left`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Optional

from tl_cli.cli import runs
from tl_cli.errors import TLError

DESCRIPTION = (
    "Continue a run from its folder alone: its config.yaml and checkpoints/last.ckpt, in the same "
    "folder (same logger versions, metrics.csv and tracked run continued). Options after RUN_DIR are "
    "tl fit's and override the run's config, e.g. --trainer.max_epochs 20 to train a finished run on "
    "(the learning-rate schedule goes on from where it stands). Paths in config.yaml (data.root) are "
    "as the run was started: resume from the same folder, or give --data.root."
)


def _rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0 and int(os.environ.get("RANK", "0") or 0) == 0


def resume_arguments(argv: list[str]) -> tuple[list[str], str]:
    """``tl resume`` 's arguments -> ``tl fit`` 's, and the name of the run folder it continues
    (`tl_cli.cli.runs.continuing`). Says what it will do."""
    parser = argparse.ArgumentParser(prog="tl resume", description=DESCRIPTION)
    parser.add_argument("run_dir", type=Path, help="the run folder (runs/<config>/version_N, or .../latest)")
    args, overrides = parser.parse_known_args(argv)
    run: Path = args.run_dir
    config, last = run / "config.yaml", run / "checkpoints" / "last.ckpt"
    if not run.is_dir():
        raise TLError(f"{run} is not a run folder. Give a folder tl fit wrote, such as runs/<config>/version_0.")
    for path, what in ((config, "its config"), (last, "the training state to continue from")):
        if not path.is_file():
            raise TLError(
                f"{run} has no {path.relative_to(run)} ({what}), so it cannot be resumed. A run folder of "
                "tl fit has both once its first epoch ended (checkpoint.save_last, on by default)."
            )
    for flag in ("--ckpt_path", "--trainer.default_root_dir", "-o", "--output"):
        if any(arg == flag or arg.startswith(f"{flag}=") for arg in overrides):
            raise TLError(f"tl resume continues {run} from its last.ckpt, in that folder: drop {flag}.")
    name = Path(os.path.realpath(run)).name  # runs/x/latest -> the version it points at
    ckpt: Any = str(last)
    hpc = runs.preemption_checkpoints(run.parent)
    if hpc and runs.slurm_restarted():
        runs.newest_preemption_checkpoint(run.parent)  # readable, or stop with it named
        ckpt = "hpc"  # a requeued `tl resume` job: Lightning's newest preemption checkpoint
    else:
        ckpt = str(_mid_epoch_state(last, hpc) or last)
    fit = ["fit", "--config", str(config), *overrides, "--ckpt_path", ckpt]
    if _rank_zero():
        print(f"tl: resuming {run.parent / name} from {ckpt}, in the same folder")
        import yaml

        before = ((yaml.safe_load(config.read_text()) or {}).get("trainer") or {}).get("max_epochs")
        after = _flag_value(overrides, "--trainer.max_epochs")
        if after is not None and str(after) != str(before):
            print(
                f"tl: trainer.max_epochs {before} -> {after}: the run goes on in its folder (config.yaml rewritten "
                "with it), its learning-rate schedule from where it stands, not from the start"
            )
    return [*fit, "--trainer.default_root_dir", str(run.parent)], name


def _mid_epoch_state(last: Path, hpc: list[Path]) -> Optional[Path]:
    """A run stopped mid-epoch (preempted) also wrote ``last.ckpt`` at that epoch's end, which
    Lightning would resume from the next epoch: its preemption checkpoint of the same step
    (``hpc_ckpt_N.ckpt`` beside the run folder) resumes within the epoch."""
    state = runs.load_state(last)
    if state is None:
        others = ", ".join(str(p) for p in hpc if runs.load_state(p) is not None)
        raise TLError(
            f"{last} is not a readable checkpoint (empty or cut short: a job killed while writing it?), "
            "so the run cannot be resumed from it. "
            + (
                f"Continue from a preemption checkpoint with `tl fit --config {last.parent.parent / 'config.yaml'} "
                f"--ckpt_path CKPT` (readable: {others}; it goes on in a new version folder), or start the run again."
                if others
                else "Start the run again, or continue from another checkpoint of it with "
                f"`tl fit --config {last.parent.parent / 'config.yaml'} --ckpt_path CKPT`."
            )
        )
    if not (state.get("tl_position") or {}).get("batches"):
        return None
    for path in reversed(hpc):
        other = runs.load_state(path)  # an unreadable preemption checkpoint is passed over
        if other is not None and other.get("global_step") == state.get("global_step"):
            return path
    return None


def _flag_value(args: list[str], *flags: str) -> Optional[str]:
    for i, arg in enumerate(args):
        for flag in flags:
            if arg == flag and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(f"{flag}="):
                return arg.split("=", 1)[1]
    return None


def fit_from_checkpoint(args: list[str]) -> list[str]:
    """``tl fit --ckpt_path X`` without ``--config``: the run that wrote X, rebuilt.

    With the run's ``config.yaml`` beside its ``checkpoints/`` folder, that config (model, data,
    callbacks, trainer), else the checkpoint's model class and hyperparameters, as ``tl test``
    rebuilds them; options given on the command line override either.
    """
    if not args or args[0] != "fit" or _flag_value(args, "--config", "-c") is not None:
        return args
    ckpt = _flag_value(args, "--ckpt_path")
    if not ckpt or not Path(ckpt).is_file():
        return args
    path = Path(ckpt)
    config = path.parent.parent / "config.yaml"
    if path.parent.name == "checkpoints" and config.is_file():
        if _rank_zero():
            print(f"tl: fit --ckpt_path {ckpt}: the settings of the run that wrote it ({config})")
        return [args[0], "--config", str(config), *args[1:]]
    from tl_cli.models.checkpoints import model_arguments, model_class_path, read_tl_checkpoint, resolve_class

    checkpoint = read_tl_checkpoint(ckpt, what="--ckpt_path checkpoint")
    cls = resolve_class(model_class_path(checkpoint))
    names = cls.argument_names()
    init_args = {k: v for k, v in model_arguments(checkpoint).items() if k in names}
    model = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}
    if _rank_zero():
        print(f"tl: fit --ckpt_path {ckpt}: a {cls.__name__} checkpoint, rebuilt with its own hyperparameters")
    return [args[0], "--model", json.dumps(model), *args[1:]]


def check_what_is_left(cfg: Any, ckpt: dict[str, Any], ckpt_path: str) -> None:
    """Stop, changing nothing, when the checkpoint's run has nothing left to do under `cfg`
    (the fit's parsed config): its epochs or steps done, or early stopping having stopped it.
    Otherwise say where training goes on from."""
    position = ckpt.get("tl_position") or {"epoch": int(ckpt.get("epoch", -1)) + 1, "batches": 0}
    epoch, step = int(position["epoch"]), int(ckpt.get("global_step", 0))
    max_epochs, max_steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps") or -1
    if max_epochs is None and max_steps == -1:
        max_epochs = 1000  # Lightning's default
    stopped = [
        state
        for key, state in (ckpt.get("callbacks") or {}).items()
        if key.startswith("EarlyStopping") and isinstance(state, dict) and state.get("stopped_epoch", 0) > 0
    ]
    reason = None
    if stopped:
        reason = (
            f"early stopping stopped it at epoch {stopped[0]['stopped_epoch'] + 1} (no improvement for "
            f"{stopped[0].get('patience')} epochs; resumed, it would stop again)"
        )
    elif max_epochs is not None and 0 <= max_epochs <= epoch and position.get("batches", 0) == 0:
        reason = f"it trained {epoch} epochs, and trainer.max_epochs is {max_epochs}"
    elif max_steps > 0 and step >= max_steps:
        reason = f"it trained {step} steps, and trainer.max_steps is {max_steps}"
    if reason is not None:
        if _rank_zero():
            print(
                f"tl: {ckpt_path}: nothing left to do: {reason}. Nothing was changed. To train on, give a "
                "larger --trainer.max_epochs (tl resume RUN_DIR --trainer.max_epochs N)."
            )
        raise SystemExit(0)
    if _rank_zero():
        until = f"epoch {max_epochs}" if max_epochs is not None and max_epochs >= 0 else f"step {max_steps}"
        print(f"tl: {ckpt_path}: training goes on from epoch {epoch + 1} (step {step}) to {until}")
