"""The scale and GPU benchmarks run end to end at toy size, so that they cannot rot unseen.

They run as `make bench` runs them (subprocesses from bench/), offline, on tiny timm models.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str, work: Path, timeout: int) -> str:
    env = {**os.environ, "TL_BENCH_DIR": str(work)}
    done = subprocess.run(
        [sys.executable, script, *args], cwd=BENCH, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_scale_bench_prints_per_image_costs_ratios_and_the_tiny_image_cache_bytes(tmp_path):
    out = run_bench(
        "scale.py",
        *("--tiny-images", "--sizes", "8", "16", "--image-size", "32", "--backbone", "timm:test_efficientnet"),
        *("--weights", "none", "--fe-epochs", "1", "--ft-epochs", "1", "--workers", "1", "--val-per-class", "2"),
        *("--repeats", "2"),
        work=tmp_path,
        timeout=2400,
    )
    header = next(line for line in out.splitlines() if line.startswith("scale: N "))
    for column in (
        "first pass ms/img tl / plain / plain-CL",
        "cached FE epoch",
        "fine-tune epoch",
        "peak PSS",
        "cache MiB",
    ):
        assert column in header
    rows = [line for line in out.splitlines() if line.startswith("scale: ") and line.split()[1] in ("8", "16")]
    assert len(rows) == 2
    assert all("B/img" not in r and ("in memory" in r or "memory-mapped" in r) for r in rows)
    names = ("first_pass_vs_plain", "finetune_vs_plain", "cached_vs_plain", "memmap")
    names += ("first_pass_vs_plain_channels_last", "finetune_vs_plain_channels_last")
    for name in (f"{n}.n16" for n in names):
        assert f"RESULT scale.{name}: " in out
    for name in ("flat.first", "flat.cached_epoch", "flat.finetune", "memory"):
        assert f"RESULT scale.{name}: " in out
    # the first passes alternate: two rounds each, the ratio from the rounds
    by_round = [line for line in out.splitlines() if "first pass by round" in line]
    assert len(by_round) == 2
    for line in by_round:
        tl_part, plain_part, cl_part = line.split("ms/image: ")[1].split(" | ")
        assert len(tl_part.split()) == 3 and len(plain_part.split()) == 3 and len(cl_part.split()) == 3
    assert "median of 2 alternating rounds" in out
    assert sum("warm feature-extraction run, whole process" in line for line in out.splitlines()) == 2
    # the curve for the README: an SVG with the seven lines
    svg = (tmp_path / "scale_28x28gray_2c.svg").read_text()
    assert svg.startswith("<?xml") and "fine-tuning epoch" in svg and "plain loop in channels-last" in svg
    # 28 x 28 grayscale images: the decoded-image cache's bytes per image are reported
    assert (tmp_path / "scale_pool_28x28gray_2c" / "train").is_dir()


@pytest.mark.slow
def test_gpu_bench_dry_run_runs_every_part_on_the_cpu(tmp_path):
    out = run_bench("gpu.py", "--dry-run", work=tmp_path, timeout=2400)
    # the CUDA-only variants are the default again on the CPU: left out, their flags parsed by tl
    assert "variant no_channels_last left out (the default's code path, for time)" in out
    assert "variant compile left out (compilation is off on the CPU)" in out
    assert "gpu: dry run: tl takes --model.channels_last=false --model.compile=true" in out
    for part in ("first_pass", "finetune", "fe_epoch"):
        assert f"RESULT gpu.{part}.default: " in out
    assert "gpu: export: checked against the checkpoint" in out
    assert "RESULT gpu.numerics: " in out
    assert "fine-tune img/s tl / plain" in out


def test_gpu_bench_dry_run_stops_on_a_variant_flag_tl_no_longer_takes(monkeypatch, capsys):
    sys.path.insert(0, str(BENCH))
    monkeypatch.chdir(BENCH)
    try:
        import gpu
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.setitem(gpu.VARIANTS, "compile", ["--model.compile_it=true"])
    with pytest.raises(SystemExit, match="does not take the flags"):
        gpu.flags_parse(["compile"], [])


def test_real_images_shrinks_a_large_transparent_picture_in_bands_to_the_same_pixels(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(BENCH))
    try:
        import real_images
    finally:
        sys.path.remove(str(BENCH))
    from tl_cli.data.images import load_rgb

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 200, 4), dtype=np.uint8)
    pixels[::7, :, 3] = 0  # fully transparent rows, half-transparent everywhere else
    src = tmp_path / "big.png"
    Image.fromarray(pixels, "RGBA").save(src)
    monkeypatch.setattr(real_images, "BAND", 64)  # 300 rows: 5 bands, the last one short
    monkeypatch.setattr(real_images, "MAX_SIDE", 10_000)  # no resize: compare the flattening itself
    monkeypatch.setattr(Image.Image, "save", lambda img, dst, **kw: setattr(real_images, "_saved", img))
    real_images._shrink((src, tmp_path / "out.jpg"))
    assert np.array_equal(np.asarray(real_images._saved), np.asarray(load_rgb(src)))


def test_the_plain_fine_tuning_loop_trains_the_stages_the_shipped_recipe_trains_at_each_size(monkeypatch):
    """The scale and GPU benches compare tl's fine-tuning with a plain loop: the loop's backward
    must reach as deep as tl's `auto` schedule (the last 4 stages below 1,000 images, every
    stage from 1,000 on), or the ratio compares two different amounts of work."""
    monkeypatch.syspath_prepend(str(BENCH))
    import scale

    from tl_cli.callbacks.freezing import SIZE_RULES

    assert [scale.recipe_stages(n) for n in (80, 999, 1000, 16000)] == [4, 4, None, None]
    assert {scale.recipe_stages(start) for start, _, _ in SIZE_RULES} == {stages for _, stages, _ in SIZE_RULES}

    def trainable(stages):
        model = scale.plain_model("test_efficientnet", 2, stages)
        return {n for n, p in model.named_parameters() if p.requires_grad}, model

    every, model = trainable(None)
    assert every == {n for n, _ in model.named_parameters()}
    last4, _ = trainable(4)
    assert "conv_stem.weight" not in last4 and "classifier.weight" in last4
    assert last4 < every and any(n.startswith("blocks.") for n in last4)
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))  # pinned
    extract, model = trainable(0)
    assert not hasattr(model, "classifier") or isinstance(model.get_classifier(), torch.nn.Identity)


@pytest.mark.parametrize("per_class, expected", [(2, 4), (500, None)])
def test_the_scale_bench_plain_loop_asks_for_the_recipe_stages_of_its_training_set(
    tmp_path, monkeypatch, per_class, expected
):
    from PIL import Image

    monkeypatch.syspath_prepend(str(BENCH))
    import scale

    for kind in ("a", "b"):
        (tmp_path / "train" / kind).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8)).save(tmp_path / "train" / kind / f"{i}.png")
    asked = []

    def spy(name, classes, trainable_stages, **kwargs):
        asked.append(trainable_stages)
        raise RuntimeError("stop")

    monkeypatch.setattr(scale, "plain_model", spy)
    with pytest.raises(RuntimeError, match="stop"):
        scale.plain_finetune(tmp_path, "test_efficientnet", 2, 32, 4, 0, 1)
    assert asked == [expected]


def test_the_scale_bench_first_passes_rotate_their_order_and_each_round_meets_its_own_plain_passes(
    tmp_path, monkeypatch, capsys
):
    """The machine's speed drifts between minutes: a pass that always ran first (or last) would
    always meet the same drift, so each round rotates the order; each ratio is the median of the
    rounds' own ratios; `--first-pass-only` stops there (no warm, fine-tuning or memmap runs)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import scale

    monkeypatch.setattr(scale, "WORK", tmp_path)
    calls: list[str] = []
    # plain, plain-CL, tl seconds per image for rounds 1-3: the ratios' medians differ from the
    # ratio of the medians, so a bench that took the latter would be caught
    speeds = {"plain": [0.010, 0.030, 0.020], "plain-CL": [0.009, 0.027, 0.018], "tl": [0.011, 0.020, 0.040]}

    def fake_plain(root, name, image_size, batch, workers, channels_last=False):
        key = "plain-CL" if channels_last else "plain"
        calls.append(key)
        return speeds[key][calls.count(key) - 1]

    def fake_tl(args, log, env=None, ram_share=None):
        assert "configs/feature_extract.yaml" in args  # only feature extraction in this mode
        calls.append("tl")
        seconds = speeds["tl"][calls.count("tl") - 1] * 100
        return {
            "text": f"tl: train: bottleneck features of 100 images prepared in {seconds:.1f} s",
            "pss": 1,
            "held": 2,
        }

    monkeypatch.setattr(scale, "plain_features", fake_plain)
    monkeypatch.setattr(scale, "run_tl", fake_tl)
    opts = scale.parse(
        ["--sizes", "100", "--repeats", "3", "--first-pass-only", "--backbone", "timm:test_efficientnet"]
    )
    row = scale.measure(100, tmp_path, opts, budget=1)
    assert calls == ["plain", "plain-CL", "tl", "plain-CL", "tl", "plain", "tl", "plain", "plain-CL"]
    assert row["first_runs"] == pytest.approx([0.011, 0.020, 0.040])
    assert row["first_ratio"] == pytest.approx(statistics.median([0.010 / 0.011, 0.030 / 0.020, 0.020 / 0.040]))
    assert row["first_ratio_cl"] == pytest.approx(statistics.median([0.009 / 0.011, 0.027 / 0.020, 0.018 / 0.040]))
    assert "finetune" not in row and "cached_epoch" not in row
    scale.report_first_pass([row])
    out = capsys.readouterr().out
    assert "round 2 (plain-CL, tl, plain)" in out and "round 3 (tl, plain, plain-CL)" in out
    assert "RESULT scale.first_pass_vs_plain.n100: 0.91x (target >= 0.95x) MISS" in out
    assert "RESULT scale.first_pass_vs_plain_channels_last.n100: 0.82x (target >= 0.9x) MISS" in out
