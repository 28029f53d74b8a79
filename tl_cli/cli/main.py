"""``tl``: Lightning's fit/validate/test/predict plus tl's own commands.

Lightning's subcommands go through `TLCLI` (a thin `LightningCLI`, imported only for them).
``tl --help`` and tl's own commands (`tl_cli.cli.commands`) start without importing torch or
Lightning. User mistakes (`TLError`) are printed as one paragraph, without a traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Optional

from tl_cli import __version__
from tl_cli.cli.commands import COMMANDS, TL_COMMANDS, predict_exported
from tl_cli.cli.configs import resolve_configs
from tl_cli.cli.help import wanted as wanted_help
from tl_cli.cli.mistakes import output_folder, unknown_command
from tl_cli.errors import TLError, find_tl_error

LIGHTNING_COMMANDS = {
    "fit": "train a model (feature extraction, fine-tuning, domain adaptation: the config picks)",
    "validate": "evaluate a checkpoint on data.root/val",
    "test": "evaluate a checkpoint on data.root/test: metrics, confusion matrix, reports",
    "predict": "classify the images of data.predict_dir: predictions.csv",
    "lr_find": "suggest a learning rate for a config (loss against learning rate: lr_find.png)",
}


def usage() -> str:
    lines = [
        f"usage: tl COMMAND [options]      (tl {__version__}: transfer learning for image classifiers)",
        "",
        "Lightning's commands (`tl COMMAND --help` lists every option; --config FILE picks a config):",
    ]
    lines += [f"  tl {name:<16} {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "tl's own commands:"]
    lines += [f"  tl {name:<16} {text}" for name, text in TL_COMMANDS.items()]
    lines += [
        "",
        "Start:  tl data synth data/shapes && tl fit --config configs/feature_extract.yaml --config configs/demo.yaml",
        "Models: --model FeatureExtraction | FineTune | DomainAdaptation (`tl fit --model FineTune --help`).",
        "Results go to runs/<config>/version_N/ (runs/<config>/latest: the newest complete run); -o DIR for another.",
    ]
    return "\n".join(lines)


def _is_exported_predict(argv: list[str]) -> bool:
    if not argv or argv[0] != "predict":
        return False
    for i, arg in enumerate(argv):
        value = (
            arg.split("=", 1)[1]
            if arg.startswith("--model=")
            else (argv[i + 1] if arg == "--model" and i + 1 < len(argv) else "")
        )
        if value.endswith((".onnx", ".pt")):
            return True
    return False


#: what a run of Lightning's commands writes into ``-o DIR``
RUN_FOLDER_FILES = "version_N/ run folders (config.yaml, checkpoints/, metrics.json, predictions.csv ...)"


def lightning_args(argv: list[str]) -> list[str]:
    """tl's vocabulary on Lightning's commands: ``-o/--output DIR`` is where results go
    (``--trainer.default_root_dir``), a folder."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-o", "--output", "--trainer.default_root_dir") and i + 1 < len(argv):
            out += ["--trainer.default_root_dir", output_folder(argv[i + 1], arg, RUN_FOLDER_FILES)]
            i += 2
            continue
        name, _, value = arg.partition("=")
        if name in ("--output", "--trainer.default_root_dir") and value:
            out += ["--trainer.default_root_dir", output_folder(value, name, RUN_FOLDER_FILES)]
        else:
            out.append(arg)
        i += 1
    return out


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"tl {__version__}")
        return 0
    if argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    if _is_exported_predict(argv):
        return predict_exported(argv[1:])
    if argv[0] == "resume":  # tl fit with a run's config and last.ckpt, in its folder
        from tl_cli.cli.lightning_cli import TLCLI
        from tl_cli.cli.resume import resume_arguments
        from tl_cli.cli.runs import continuing

        args, name = resume_arguments(argv[1:])
        try:
            with continuing(name):
                TLCLI(args=args, save_config_kwargs={"overwrite": True})
        finally:
            _close_process_group()
        return 0
    if argv[0] not in LIGHTNING_COMMANDS:
        raise TLError(unknown_command(argv[0], [*LIGHTNING_COMMANDS, *COMMANDS]))
    args = resolve_configs(lightning_args(argv))
    topic = wanted_help(args)
    if topic is not None:
        from tl_cli.cli.help import configured_model, help_text

        print(help_text(argv[0], configured_model(args), "" if topic == "keys" else topic))
        return 0
    from tl_cli.cli.lightning_cli import TLCLI

    try:
        TLCLI(args=args)
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """End a DDP run's process group before exit: left to interpreter shutdown, gloo's threads
    sometimes abort the process ("terminate called without an active exception") after a
    finished run, and SLURM then reports the job as failed."""
    import torch.distributed as dist

    from tl_cli.cluster import distributed

    if dist.is_available() and dist.is_initialized():
        distributed.reset()
        dist.destroy_process_group()


def user_message(exc: TLError) -> str:
    """The user's paragraph, without the worker traceback PyTorch wraps around it.

    A TLError raised in a DataLoader worker comes back as ``TLError("Caught TLError in
    DataLoader worker process 0. Original Traceback ... tl_cli.errors.TLError: <message>")``.
    """
    text = str(exc)
    marker = f"{type(exc).__module__}.{type(exc).__name__}: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def _rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def short_tmpdir() -> Optional[str]:
    """Point ``$TMPDIR`` at ``/tmp`` when it is too deep for the UNIX sockets of DataLoader
    workers; returns the folder given up, None when it fits.

    Workers hand every batch back through a socket at ``$TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX``
    (multiprocessing's resource sharer; the fork server listens there too), and an AF_UNIX
    address holds 107 bytes: under a deeper folder (job-specific scratch on clusters) each worker
    fails with "AF_UNIX path too long" and the DataLoader waits for it forever. Called by the CLI
    before anything starts a process; children inherit the environment."""
    deep = tempfile.gettempdir()
    if len(os.fsencode(os.path.join(deep, "pymp-xxxxxxxx", "listener-xxxxxxxx"))) < 108:
        return None
    short = next((d for d in ("/tmp", "/var/tmp", "/dev/shm") if os.access(d, os.W_OK | os.X_OK)), None)
    if short is None:
        raise TLError(
            f"TMPDIR={deep} is too deep for the UNIX sockets of DataLoader workers (an address holds 107 "
            "bytes) and /tmp is not writable: set TMPDIR to a shorter folder, or --data.num_workers 0."
        )
    os.environ["TMPDIR"] = short
    tempfile.tempdir = None  # gettempdir() looks again
    return deep


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            deep = short_tmpdir()
            if deep and not _rank():
                print(
                    f"tl: TMPDIR={deep} is too deep for the UNIX sockets of DataLoader workers; this run "
                    f"keeps its temporary files in {os.environ['TMPDIR']}",
                    file=sys.stderr,
                )
            return _dispatch(argv)
        except Exception as wrapped:
            cause = find_tl_error(wrapped)
            if cause is None or cause is wrapped:
                raise
            raise cause from None
    except TLError as exc:
        # under DDP, an error every rank meets (or one rank's, passed on) is printed by rank 0
        if not getattr(exc, "quiet", False):
            where = f" (rank {_rank()})" if _rank() else ""
            print(f"tl: error{where}: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tl: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The console script: `main`, then a quick exit.

    Tearing down an interpreter that imported torch and Lightning (thousands of modules)
    takes seconds, longer than a run on cached features. Everything that must happen at exit
    happens first: the exit handlers run (they close the loggers' files and flush logging),
    standard streams are flushed, DataLoader workers still alive are stopped; then the
    process ends without the teardown.
    """
    code = main()
    import atexit
    import multiprocessing

    atexit._run_exitfuncs()
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=5)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
