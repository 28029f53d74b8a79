"""What `tl slurm` checks on the login node that would otherwise fail on the compute node, after
the job waited in the queue: the `tl fit` arguments (parsed as `tl fit` parses them), the data
folder, and the weights being in the cache an offline compute node reads."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import yaml

from tl_cli.errors import TLError

# sbatch's options, which a user may put after `--` by mistake (they would reach `tl fit`)
SBATCH_OPTIONS = {
    "--array": "use `tl sweep --slurm` for a job array",
    "--time": "give it to tl slurm, before --",
    "--partition": "give it to tl slurm, before --",
    "--account": "give it to tl slurm, before --",
    "--nodes": "give it to tl slurm, before --",
    "--mem": "give it to tl slurm, before --",
    "--cpus-per-task": "give it to tl slurm, before --",
    "--gres": "give --gpus-per-node to tl slurm, before --",
    "--gpus": "give --gpus-per-node to tl slurm, before --",
    "--ntasks": "tl slurm sets it from trainer.devices",
    "--ntasks-per-node": "tl slurm sets it from trainer.devices",
    "--job-name": "give it to tl slurm, before --",
    "--output": "tl slurm names the log slurm-<name>-<job>.out",
}


def resolved_fit_config(configs: list[Path], extra: list[str]) -> dict[str, Any]:
    """The configuration `tl fit --config CONFIGS EXTRA` would run with.

    Raises:
        TLError: the arguments `tl fit` would refuse, with its message.
    """
    for arg in extra:
        name = arg.split("=", 1)[0]
        if name in SBATCH_OPTIONS:
            raise TLError(
                f"{name} after -- would reach `tl fit`, which has no such option: it is sbatch's ({SBATCH_OPTIONS[name]})."
            )
    from tl_cli.cli.lightning_cli import TLCLI

    args = ["fit", *[a for c in configs for a in ("--config", str(c))], *extra, "--print_config"]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            TLCLI(args=args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    except TLError as exc:
        raise TLError(f"`tl fit` would stop on the compute node: {exc}") from None
    if code != 0:
        said = [line for line in err.getvalue().splitlines() if line.strip() and not line.startswith("usage:")]
        raise TLError("`tl fit` would refuse these arguments on the compute node:\n  " + "\n  ".join(said[-12:]))
    return yaml.safe_load(out.getvalue()) or {}


def _init_args(section: Any) -> dict[str, Any]:
    if not isinstance(section, dict):
        return {}
    return section.get("init_args", section)


def check_fit(configs: list[Path], extra: list[str]) -> list[str]:
    """Check what a compute node would meet; return notes on what was checked."""
    from tl_cli.backbones.weights import weights_in_cache

    config = resolved_fit_config(configs, extra)
    data, model = _init_args(config.get("data")), _init_args(config.get("model"))
    root = Path(str(data.get("root", "")))
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise TLError(
            f"data.root={root} has no {' or '.join(m + '/' for m in missing)} folder here on the login node; "
            "the compute nodes would not find it either. Point --data.root at the data set on the shared "
            "filesystem (an absolute path), e.g. `tl slurm ... -- --data.root /expanse/lustre/projects/...`."
        )
    if not root.is_absolute():
        notes = [f"data.root={root} is relative: the job runs in this folder ({Path.cwd()})"]
    else:
        notes = []
    backbone, weights = str(model.get("backbone", "")), str(model.get("weights", "imagenet"))
    if backbone and model.get("init_from") in (None, "null") and not weights_in_cache(backbone, weights):
        raise TLError(
            f"The weights of {backbone} (model.weights={weights}) are not in this machine's cache, and "
            f"compute nodes have no internet: run `tl weights fetch {backbone}` here on the login node "
            "first (the job reads the same HF_HOME / TORCH_HOME), or pass --model.weights PATH."
        )
    notes.append(f"tl fit arguments, data.root and the weights of {backbone or 'the model'} checked")
    return notes
