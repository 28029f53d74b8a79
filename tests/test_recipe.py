"""The fine-tuning recipe says, in one line at the start of the run, what it does for the data
it has: how many images, how many steps, which stages train, BatchNorm, learning rates."""

from __future__ import annotations

import math
from pathlib import Path

from tests.helpers import CONFIGS, TINY, tl
from tl_cli.callbacks import freezing
from tl_cli.callbacks.freezing import size_rule


def _fine_tune(tiny_data, trained, capsys, *extra: str) -> str:
    args = ["fit", "--config", CONFIGS / "finetune.yaml", *TINY, "--data.root", tiny_data]
    args += ["--model.init_from", trained / "checkpoints" / "best.ckpt", "--trainer.max_epochs", "2", *extra]
    assert tl(*args) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("tl: fine-tuning recipe ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_run_says_its_recipe_for_the_data_it_has(tiny_data, trained, capsys):
    line = _fine_tune(tiny_data, trained, capsys)
    # 24 images, batches of 8 (TINY), min_steps_per_epoch off; test_efficientnet has 6 stages
    # finetune.yaml's unfreeze.schedule and model.layer_decay are auto: the small-set rule
    assert (
        "for 24 training images (auto: the shipped recipe for fewer than 1,000): 2 epochs x 3 steps = 6 steps" in line
    )
    assert "the last 4 of 6 from epoch 0 (layer decay 0.7, BatchNorm statistics pinned)" in line, line
    assert "lr 0.0003 at the head, 0.0003 at the last stage; augment randaugment, label smoothing 0.1" in line


def test_the_line_follows_what_the_run_was_told(tiny_data, trained, capsys):
    line = _fine_tune(
        tiny_data,
        trained,
        capsys,
        *("--unfreeze.schedule", "{0: 2, 1: 9}", "--unfreeze.update_unfrozen_bn_stats", "true"),
        *("--data.min_steps_per_epoch", "5", "--model.backbone_lr_ratio", "0.5", "--data.augment", "flip"),
    )
    assert "2 epochs x 6 steps = 12 steps" in line, line  # at least 5: two whole passes of 3
    assert "the last 2 of 6 from epoch 0, the last 6 of 6 from epoch 1" in line, line
    assert "BatchNorm statistics updated in trainable stages" in line
    assert "0.00015 at the last stage; augment flip" in line


# ----------------------------------------------------------------- the recipe by training-set size


def test_the_size_rules_pick_the_recipe_by_training_images():
    # (stages from epoch 0, None = all; layer decay): the small-set recipe up to 999 images
    assert [size_rule(n)[1:] for n in (0, 24, 180, 999)] == [(4, 0.7)] * 4
    assert [size_rule(n)[1:] for n in (1000, 2000, 100_000)] == [(None, 0.85)] * 3


def _checkpoints(trained) -> tuple[dict, dict]:
    import torch

    start = torch.load(trained / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    end = torch.load(Path("runs") / "finetune" / "latest" / "checkpoints" / "last.ckpt", weights_only=False)
    return start["state_dict"], end


def _moved(start: dict, end: dict, prefix: str) -> bool:
    keys = [k for k in start if k.startswith(prefix) and start[k].is_floating_point() and "running_" not in k]
    assert keys, prefix
    return any(not start[k].equal(end["state_dict"][k]) for k in keys)


def test_auto_gives_small_data_the_last_4_stages_at_decay_0_7(tiny_data, trained, capsys):
    line = _fine_tune(tiny_data, trained, capsys)  # finetune.yaml: both auto
    assert "for 24 training images (auto: the shipped recipe for fewer than 1,000)" in line, line
    assert "the last 4 of 6 from epoch 0 (layer decay 0.7," in line, line
    start, end = _checkpoints(trained)
    assert _moved(start, end, "backbone.blocks.1.") and not _moved(start, end, "backbone.conv_stem.")


def test_auto_trains_every_stage_of_a_large_set_at_decay_0_85(tiny_data, trained, capsys, monkeypatch):
    # the tiny set stands for a large one: the size rule's threshold is put under its 24 images
    monkeypatch.setattr(freezing, "SIZE_RULES", ((0, 4, 0.7), (20, None, 0.85)))
    line = _fine_tune(tiny_data, trained, capsys)
    assert "for 24 training images (auto: the shipped recipe for 20 or more)" in line, line
    assert "the last 6 of 6 from epoch 0 (layer decay 0.85," in line, line
    start, end = _checkpoints(trained)
    assert _moved(start, end, "backbone.conv_stem.") and _moved(start, end, "backbone.blocks.0.")
    # each stage's rate: 0.85x the next one's, from the last stage at lr x backbone_lr_ratio
    rates = {g["name"]: g["initial_lr"] for g in end["optimizer_states"][0]["param_groups"]}
    stages = [name for name in rates if name.startswith("backbone.")]
    assert len(stages) == 6, rates
    for i, name in enumerate(stages):
        assert math.isclose(rates[name], 3e-4 * 0.85 ** (5 - i), rel_tol=1e-9), (name, rates)


def test_auto_and_numbers_mix_and_a_wrong_word_is_named(tiny_data, trained, capsys, monkeypatch):
    monkeypatch.setattr(freezing, "SIZE_RULES", ((0, 4, 0.7), (20, None, 0.85)))
    line = _fine_tune(tiny_data, trained, capsys, "--unfreeze.schedule", "{0: 2}", "--model.layer_decay", "auto")
    assert (
        "(auto: the shipped recipe for 20 or more)" in line
        and "the last 2 of 6 from epoch 0 (layer decay 0.85," in line
    )
    args = ["fit", "--config", CONFIGS / "finetune.yaml", *TINY, "--data.root", tiny_data, "--unfreeze.schedule", "all"]
    assert tl(*args) != 0
    assert "unfreeze.schedule" in capsys.readouterr().err
