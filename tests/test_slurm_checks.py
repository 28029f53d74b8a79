"""`tl slurm` checks on the login node what would fail on the compute node, after the queue:
the job's shape against the partition's nodes, SLURM's formats, the `tl fit` arguments, the data
folder and the offline weights; it says what it changed, or refuses with the fix."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, tl
from tl_cli.cluster.partitions import EXPANSE, Partition, Request, check_time, fit_request, mem_gb
from tl_cli.errors import TLError

FE = ["--config", CONFIGS / "feature_extract.yaml"]


def _request(**changes) -> Request:
    base = dict(
        partition="gpu-shared",
        nodes=1,
        gpus_per_node=1,
        tasks_per_node=1,
        cpus_per_task=10,
        mem=None,
        time="04:00:00",
        account="abc123",
    )
    return Request(**{**base, **changes})


def test_times_and_memory_sizes_slurm_reads_and_the_ones_it_does_not():
    for good in ("30", "30:00", "04:00:00", "1-12", "1-12:00", "2-00:00:00"):
        assert check_time(good) == good
    for bad in ("4h", "1d", "04:00:00:00", "4 hours", ""):
        with pytest.raises(TLError, match="04:00:00"):
            check_time(bad)
    assert mem_gb("92G") == 92 and mem_gb("512M") == 0.5 and mem_gb("1T") == 1024 and mem_gb("0") is None
    with pytest.raises(TLError, match="92G"):
        mem_gb("lots")


def test_the_request_is_fitted_to_expanses_nodes_or_refused_with_the_fix():
    job, notes = fit_request(_request(), "expanse")
    assert (job.partition, job.mem) == ("gpu-shared", "93G") and not notes  # a quarter of a 374G node
    # two nodes cannot share: whole nodes, all their memory, said
    job, notes = fit_request(_request(nodes=2, gpus_per_node=4, tasks_per_node=4, mem="92G"), "expanse")
    assert (job.partition, job.mem) == ("gpu", "374G")
    assert any("2 nodes need whole nodes: --partition gpu" in n for n in notes)
    assert any("--mem 374G (was 92G)" in n for n in notes)
    # a whole node for 2 GPUs: kept, with the cheaper choice named
    job, notes = fit_request(_request(partition="gpu", gpus_per_node=2, tasks_per_node=2), "expanse")
    assert job.partition == "gpu" and any("--partition gpu-shared costs less" in n for n in notes)
    # more cores than a node has: fitted
    job, notes = fit_request(_request(gpus_per_node=4, tasks_per_node=4, cpus_per_task=16), "expanse")
    assert job.cpus_per_task == 10 and any("40 cores" in n for n in notes)
    for changes, said in [
        (dict(gpus_per_node=8, tasks_per_node=8), r"4 GPU\(s\) a node.*--nodes 2 --gpus-per-node 4"),
        (dict(account=None), "--account PROJECT"),
        (dict(mem="500G"), "at most --mem 374G"),
        (dict(time="4h"), "--time 04:00:00"),
        (dict(partition="gpu-large"), "not one of expanse's"),
        (dict(partition="compute"), r"0 GPU\(s\).*--cpu"),
    ]:
        with pytest.raises(TLError, match=said):
            fit_request(_request(**changes), "expanse")
    # elsewhere no account is required and an unknown cluster is not guessed at
    job, notes = fit_request(_request(account=None), None, use_sinfo=False)
    assert job.account is None and "not checked" in notes[0]
    assert EXPANSE["gpu"] == Partition("gpu", 40, 374, 4, True)


@pytest.mark.skipif(shutil.which("sinfo") is None, reason="no SLURM here: scripts/slurm-local.sh start (CI does)")
def test_off_expanse_the_partitions_come_from_sinfo_on_this_cluster():
    shown = subprocess.run(["sinfo", "-h", "-o", "%R|%c"], capture_output=True, text=True).stdout.split()
    if not shown:
        pytest.skip("sinfo answers nothing")
    name, cores = shown[0].split("|")
    job, _ = fit_request(_request(partition=name, gpus_per_node=0, cpus_per_task=int(cores) + 5), None)
    assert job.cpus_per_task == int(cores)  # fitted to this cluster's real nodes
    with pytest.raises(TLError, match=f"does not exist on this cluster; sinfo lists: .*{name}"):
        fit_request(_request(partition="no-such-partition"), None)
    with pytest.raises(TLError, match=r"0 GPU\(s\)"):
        fit_request(_request(partition=name, gpus_per_node=1), None)


def test_fit_arguments_data_and_weights_are_checked_as_the_compute_node_would_meet_them(
    tiny_data, tmp_path, capsys, monkeypatch
):
    base = ["slurm", *FE, "--cluster", "none", "--dry-run", "--"]
    ok = ["--data.root", tiny_data, "--model.weights", "none"]
    assert tl(*base, *ok) == 0
    out = capsys.readouterr()
    assert out.out.startswith("#!/usr/bin/env bash") and "checked" in out.err
    for extra, said in [
        ([*ok, "--model.backbon", "timm:resnet18"], "would stop on the compute node: --model.backbon"),
        (["--data.root", tmp_path / "nowhere", "--model.weights", "none"], "has no train/ or val/ folder"),
        ([*ok, "--array", "0-3"], "--array after -- would reach `tl fit`.*tl sweep --slurm"),
        ([*ok, "--time=01:00:00"], "--time after --.*give it to tl slurm"),
    ]:
        assert tl(*base, *extra) == 2, extra
        assert said.split(".*")[0] in capsys.readouterr().err
    # ImageNet weights an offline compute node would not find: refused until they are cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    args = [*base, "--data.root", tiny_data, "--model.backbone", "torchvision:resnet18", "--model.weights", "imagenet"]
    assert tl(*args) == 2
    assert "run `tl weights fetch torchvision:resnet18` here on the login node" in capsys.readouterr().err
    from tl_cli.backbones.weights import cached_weights_path

    cached = cached_weights_path("torchvision:resnet18")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")  # what `tl weights fetch` leaves (its loading is tested elsewhere)
    assert tl(*args) == 0
    assert "tl fit --config" in capsys.readouterr().out


def test_the_script_activates_the_environment_tl_slurm_ran_in_and_points_caches_at_node_local_disk(
    tiny_data, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    args = ["slurm", *FE, "--cluster", "none", "--no-check", "--dry-run"]
    assert tl(*args) == 0
    script = capsys.readouterr().out
    assert f"source {Path(sys.prefix).resolve()}/bin/activate" in script  # this venv, not `.venv`
    assert f"export HF_HUB_OFFLINE=1 HF_HOME={tmp_path / 'hf'} TORCH_HOME={tmp_path / 'th'}" in script
    assert script.index("---- environment") < script.index("source ") < script.index("# ----------------")
    assert 'export TL_CACHE_DIR="$d/tl-cache"' in script
    # a conda environment, when no venv is active
    monkeypatch.setattr(sys, "prefix", sys.base_prefix)
    monkeypatch.setenv("CONDA_DEFAULT_ENV", "tl-env")
    assert tl(*args) == 0
    script = capsys.readouterr().out
    assert "conda activate tl-env" in script and "source " not in script.split("---- environment")[1].split("----")[0]
    # the node-local cache block picks $SLURM_TMPDIR, then Expanse's job scratch, and keeps a user's choice
    block = script[script.index('if [ -z "${TL_CACHE_DIR:-}" ]') : script.index("# ------------")]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for env, expected in [
        ({"SLURM_TMPDIR": str(scratch)}, f"{scratch}/tl-cache"),
        ({"SLURM_TMPDIR": "", "TL_CACHE_DIR": "/mine"}, "/mine"),
        ({"SLURM_TMPDIR": ""}, ""),
    ]:
        done = subprocess.run(
            ["bash", "-c", f'{block}\necho "${{TL_CACHE_DIR:-}}"'], capture_output=True, text=True, env=env
        )
        assert done.stdout.strip() == expected, (env, done.stdout, done.stderr)
