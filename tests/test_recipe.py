"""The fine-tuning recipe says, in one line at the start of the run, what it does for the data
it has: how many images, how many steps, which stages train, BatchNorm, learning rates."""

from __future__ import annotations

from tests.helpers import CONFIGS, TINY, tl


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
    assert "for 24 training images: 2 epochs x 3 steps = 6 steps" in line, line
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
