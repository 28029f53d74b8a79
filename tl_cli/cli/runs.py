"""Run folders: ``default_root_dir/version_N/`` (``array_<job>_<task>/`` for a SLURM array
task), one per run, allocated atomically, and ``default_root_dir/latest`` pointing at the
newest run that completed.

Several ``tl fit`` started at once into the same folder (a job array, a shell loop) each get
their own: a folder is claimed with ``mkdir``, which only one process can win. Under DDP only
rank 0 claims, when the process group exists, and tells the others. A requeued SLURM job
continues the folder its first start claimed (a marker file names the job); ``tl resume``
continues the folder it is given (`continuing`).
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from tl_cli.cluster import distributed
from tl_cli.errors import TLError

MARKER = ".tl-run.json"
_resumed: Optional[str] = None  # the run folder `tl resume` continues (`continuing`)


@contextmanager
def continuing(name: str) -> Iterator[None]:
    """Within this block, a run folder claimed is `name` (which exists), continued: ``tl resume``."""
    global _resumed
    before, _resumed = _resumed, name
    try:
        yield
    finally:
        _resumed = before


def slurm_restarted() -> bool:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def _continued(root: Path) -> Optional[str]:
    """The folder ``tl resume`` continues, or the one a requeued SLURM job claimed when it
    first started."""
    if _resumed is not None and (root / _resumed).is_dir():
        return _resumed
    job = os.environ.get("SLURM_JOB_ID")
    if not job or not slurm_restarted() or not root.is_dir():
        return None
    for marker in root.glob(f"*/{MARKER}"):
        if marker.parent.is_symlink():  # latest: the folder it points at is found as itself
            continue
        try:
            if json.loads(marker.read_text()).get("slurm_job_id") == job:
                return marker.parent.name
        except (OSError, ValueError):
            continue
    return None


def continued_folder(root: Path) -> Optional[Path]:
    """The run folder under `root` that this run continues (``tl resume``, a requeued job), if any."""
    name = _continued(root)
    return None if name is None else root / name


def claim(root: Path) -> tuple[str, bool]:
    """Claim a new run folder under `root` (or the one a requeued job continues).

    Returns its name and whether it continues an earlier start of the same job.
    """
    root.mkdir(parents=True, exist_ok=True)
    earlier = _continued(root)
    if earlier:
        if slurm_restarted():
            newest_preemption_checkpoint(root)  # what Lightning resumes from: readable, or stop here
        _count_restart(root / earlier)
        return earlier, True
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        name = f"array_{array}_{task}"
        continued = (root / name / MARKER).is_file()
        (root / name).mkdir(exist_ok=True)
        if continued:
            _count_restart(root / name)
            return name, True
    else:
        taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
        n = max(taken, default=-1) + 1
        while True:
            try:
                (root / f"version_{n}").mkdir()
                break
            except FileExistsError:  # another run claimed it first
                n += 1
        name, continued = f"version_{n}", False
    marker = {"slurm_job_id": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(), "pid": os.getpid()}
    marker["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (root / name / MARKER).write_text(json.dumps(marker) + "\n")
    return name, continued


def _count_restart(folder: Path) -> None:
    """Record in the run's marker that a requeued job (`tl sweep gather` says so) or ``tl
    resume`` continued it."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return
    key = "resumes" if _resumed is not None and not slurm_restarted() else "restarts"
    marker[key] = int(marker.get(key, 0)) + 1
    (folder / MARKER).write_text(json.dumps(marker) + "\n")


def mark_complete(root: Path, name: str) -> None:
    """Point ``root/latest`` at `name`, atomically (a reader never sees no link)."""
    link = root / "latest"
    if link.exists() and not link.is_symlink():
        return  # something of the user's: leave it
    tmp = root / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name)
    os.replace(tmp, link)


class RunFolder:
    """The run's folder under `root`, claimed on first use (by rank 0 under DDP)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._name: Optional[str] = None
        self.continued = False
        self._made_from: Optional[Path] = None  # the outermost folder the claim created

    @property
    def name(self) -> str:
        if self._name is None:
            if distributed.world_size() == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise RuntimeError("the run folder was asked for before the process group exists")
            missing = [p for p in (self.root, *self.root.parents) if not p.exists()]
            self._made_from = missing[-1] if missing else None
            self._name, self.continued = distributed.on_rank_zero(lambda: claim(self.root), 600.0)
        return self._name

    def discard_unstarted(self) -> bool:
        """Remove the run folder of a run that failed before it wrote a checkpoint (a typo'd key,
        a bad data folder), and the folders its claim created: a failed start leaves nothing.
        A continued run's folder stays. Returns whether it removed it."""
        if self._name is None or self.continued:
            return False
        import shutil

        folder = self.root / self._name
        if any(folder.rglob("*.ckpt")):
            return False
        shutil.rmtree(folder, ignore_errors=True)
        if self._made_from is not None:
            for parent in (self.root, *self.root.parents):
                if parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
                if parent == self._made_from:
                    break
        return True

    @property
    def path(self) -> Path:
        return self.root / self.name


class _InRunFolder:
    """Logger mixin: version = the run folder's name, claimed when the logger first writes
    (Lightning asks every logger for its experiment on every rank, in the same order, once the
    process group exists)."""

    def __init__(self, run: RunFolder, **kwargs: Any) -> None:
        super().__init__(save_dir=str(run.root), name="", **kwargs)
        self.run = run

    @property
    def version(self) -> str:
        return self.run.name

    @property
    def experiment(self) -> Any:
        _ = self.run.name
        return super().experiment


class RunCSVLogger(_InRunFolder, CSVLogger):
    """Lightning's CSV logger in the run folder; a requeued run keeps the rows it logged."""

    @property
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        _ = self.run.name
        rows = None
        if self.run.continued and distributed.rank() == 0:
            rows = earlier_rows(Path(self.log_dir) / "metrics.csv", resumed_checkpoint(self.run))
        experiment = super().experiment
        if rows is not None:  # Lightning's CSV writer deletes the file it finds: hand them back
            keys, kept = rows
            experiment.metrics_keys = keys + [k for k in experiment.metrics_keys if k not in keys]
            experiment.metrics.extend(kept)
        return experiment


class RunTensorBoardLogger(_InRunFolder, TensorBoardLogger):
    """Lightning's TensorBoard logger in the run folder."""

    def __init__(self, run: RunFolder) -> None:
        super().__init__(run, default_hp_metric=False)


def load_state(path: Path) -> Optional[dict[str, Any]]:
    """A checkpoint's contents (memory-mapped, no code run), or None if it cannot be read."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # zero bytes, cut short, not a zip: every way a file can fail to load
        return None
    return state if isinstance(state, dict) else None


def preemption_checkpoints(root: Path) -> list[Path]:
    """Lightning's ``hpc_ckpt_N.ckpt`` under `root` (beside the run folders), oldest first."""
    return sorted(root.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def newest_preemption_checkpoint(root: Path) -> Optional[Path]:
    """The newest preemption checkpoint under `root`, the one Lightning resumes a requeued job
    from, or None if there is none. Stops with the file named if it cannot be read: Lightning
    would fail on it with a traceback, and tl does not delete a user's file to go on."""
    hpc = preemption_checkpoints(root)
    if not hpc or load_state(hpc[-1]) is not None:
        return hpc[-1] if hpc else None
    older = next((p for p in reversed(hpc[:-1]) if load_state(p) is not None), None)
    raise TLError(
        f"{hpc[-1]} is not a readable checkpoint (empty or cut short: the job stopped while writing it?), "
        "and a requeued job continues from the newest preemption checkpoint. "
        + (
            f"Move it out of {root} to continue from {older.name}, the newest readable one, and submit again."
            if older is not None
            else f"Move it out of {root} and submit again: the run then starts from its last.ckpt or anew."
        )
    )


def resumed_checkpoint(run: RunFolder) -> Optional[Path]:
    """The checkpoint a continued run resumes from: the newest ``hpc_ckpt_N.ckpt`` of a requeued
    job (Lightning's choice), else the run's ``last.ckpt`` (``tl resume``)."""
    hpc = preemption_checkpoints(run.root)
    if hpc and slurm_restarted():
        return hpc[-1]
    last = run.path / "checkpoints" / "last.ckpt"
    return last if last.is_file() else (hpc[-1] if hpc else None)


def earlier_rows(path: Path, checkpoint: Optional[Path]) -> Optional[tuple[list[str], list[dict[str, str]]]]:
    """A continued run's metrics.csv rows logged before the checkpoint it resumes from."""
    import torch

    if not path.is_file() or checkpoint is None:
        return None
    step = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        keys = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("step", "") == "" or int(float(r["step"])) < step]
    return keys, [{k: v for k, v in r.items() if v != ""} for r in rows]
