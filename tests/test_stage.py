"""``data.stage``: where a job's node-local scratch is, and the checked copy made there (one
process here; the two-node run that counts reads of the shared folder is in test_multinode.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import fit_tiny
from tl_cli.data import stage
from tl_cli.errors import TLError


def test_auto_finds_the_scratch_folder_of_the_job_and_nothing_off_a_cluster(tmp_path, monkeypatch):
    slurm_tmp, job_tmp = tmp_path / "slurm_tmp", tmp_path / "job_tmp"
    slurm_tmp.mkdir(), job_tmp.mkdir()
    assert stage.scratch_folder({}) is None  # a laptop
    assert stage.scratch_folder({"TMPDIR": str(job_tmp)}) is None  # TMPDIR alone is no cluster
    assert stage.scratch_folder({"SLURM_TMPDIR": str(slurm_tmp)}) == slurm_tmp
    assert stage.scratch_folder({"SLURM_JOB_ID": "7", "TMPDIR": str(job_tmp)}) == job_tmp
    assert stage.scratch_folder({"SLURM_JOB_ID": "7", "TMPDIR": "/tmp"}) is None  # shared /tmp: not the job's
    both = {"SLURM_JOB_ID": "7", "SLURM_TMPDIR": str(slurm_tmp), "TMPDIR": str(job_tmp)}
    assert stage.scratch_folder(both) == slurm_tmp
    # Expanse: /scratch/$USER/job_$SLURM_JOB_ID (the real path; checked only where it exists)
    expanse = Path("/scratch") / "someone" / "job_7"
    assert stage.scratch_folder({"SLURM_JOB_ID": "7", "USER": "someone"}) == (expanse if expanse.is_dir() else None)
    monkeypatch.delenv("SLURM_TMPDIR", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert stage.stage_folder("auto", tmp_path) is None
    assert stage.stage_folder("none", tmp_path) is None
    there = stage.stage_folder(str(tmp_path / "local"), tmp_path / "data")
    assert there.parent == tmp_path / "local" / "tl-stage" and there.name.startswith("data-")


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name[0] != "."}


def test_a_stage_is_a_checked_copy_reused_while_the_source_is_unchanged(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "_READY", set())
    source = tmp_path / "data"
    shutil.copytree(tiny_data, source)
    said: list[str] = []
    target = stage.stage_data(source, str(tmp_path / "local"), ("train", "val", "test"), said.append)
    assert target != source and _tree(target) == _tree(source)
    for rel in _tree(source):  # the copy keeps size and modification time (the caches' keys)
        assert (target / rel).stat().st_mtime_ns == (source / rel).stat().st_mtime_ns
    assert "copied" in said[-1] and f"{len(_tree(source))} files" in said[-1]
    manifest = json.loads((target / ".tl-stage.json").read_text())
    assert len(manifest["digests"]) == len(_tree(source))

    stage._READY.clear()  # a later job on the same node
    stage.stage_data(source, str(tmp_path / "local"), ("train", "val", "test"), said.append)
    assert "reused" in said[-1]

    # a copy damaged on the node-local disk is found (content digest, same size) and made again
    victim = next(iter(sorted(_tree(source))))
    data = bytearray((target / victim).read_bytes())
    data[-1] ^= 0xFF
    (target / victim).write_bytes(bytes(data))
    stage._READY.clear()
    stage.stage_data(source, str(tmp_path / "local"), ("train", "val", "test"), said.append)
    assert "copied" in said[-1] and _tree(target) == _tree(source)

    # a source file that changed (new bytes, new time) makes a new copy, not a stale reuse
    (source / victim).write_bytes((source / victim).read_bytes() + b"\0")
    os.utime(source / victim, ns=(1, 1))
    stage._READY.clear()
    stage.stage_data(source, str(tmp_path / "local"), ("train", "val", "test"), said.append)
    assert "copied" in said[-1] and _tree(target) == _tree(source)


def test_a_copy_that_differs_from_its_source_stops_the_run_with_the_fix(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "_READY", set())
    real = stage._copy_one

    def truncating(source: Path, target: Path, mtime_ns: int) -> str:
        digest = real(source, target, mtime_ns)
        if source.name.endswith(".3.jpg"):
            target.write_bytes(target.read_bytes()[:-10])  # a disk that lost the end of a file
        return digest

    monkeypatch.setattr(stage, "_copy_one", truncating)
    with pytest.raises(
        TLError, match=r"differ from the source after copying .*bytes, the source has.*--data.stage none"
    ):
        stage.stage_data(tiny_data, str(tmp_path / "local"), ("train",), lambda _: None)
    assert not list((tmp_path / "local" / "tl-stage").iterdir())  # no half-checked copy left to reuse
    with pytest.raises(TLError, match="inside data.root"):
        stage.stage_data(tiny_data, str(tiny_data / "here"), ("train",), lambda _: None)


@pytest.mark.slow
def test_a_run_staged_to_a_folder_trains_from_the_copy_and_shares_the_caches_of_an_unstaged_run(
    tiny_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(stage, "_READY", set())
    fit_tiny(tiny_data, 1, "feature_extract.yaml", "--data.stage", tmp_path / "local")
    out = capsys.readouterr().out
    assert "data staged to" in out and "copied" in out
    # the feature cache names the source's files: the unstaged run finds it
    fit_tiny(tiny_data, 1, "feature_extract.yaml", "--data.stage", "none")
    out = capsys.readouterr().out
    assert "bottleneck features of 12 images loaded" in out and "staged" not in out


def test_layout_errors_of_a_staged_run_name_the_users_files_not_the_copies(tiny_data, tmp_path, monkeypatch, capsys):
    from tests.conftest import CONFIGS, TINY, tl

    monkeypatch.setattr(stage, "_READY", set())
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    readme = root / "train" / "ellipses" / "README.txt"
    readme.write_text("field notes\n")
    loose = root / "val" / "notes.txt"
    args = ["fit", "--config", CONFIGS / "feature_extract.yaml", *TINY, "--data.root", root]
    args += ["--trainer.max_epochs", "1", "--data.stage", tmp_path / "local", "-o", tmp_path / "runs"]
    for bad in (readme, loose):
        if bad == loose:
            readme.unlink()
            loose.write_text("field notes\n")
            monkeypatch.setattr(stage, "_READY", set())  # a new process: the copy is checked again
        assert tl(*args) == 2
        err = capsys.readouterr().err
        assert "tl-stage" not in err, err
        assert f"{bad}" in err if bad == readme else f"{root / 'val'} holds files directly (notes.txt" in err
