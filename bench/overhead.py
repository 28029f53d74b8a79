"""overhead: fine-tuning steps through tl's LightningModule and Trainer vs a plain PyTorch loop
doing the same forward / backward / optimizer step on the same in-memory batches.

EfficientNet-Lite0 (random init), last 4 stages unfrozen, AdamW with tl's two parameter
groups, batches of 16 images at 224 px already in memory (no data loading measured). Both
time steps WARMUP..STEPS; the plain loop runs before and after tl and its mean is the
baseline. Target: tl >= 0.90x the plain loop's throughput.
"""

from __future__ import annotations

import time

from common import result

STEPS = 18
WARMUP = 3
BATCH = 16


def make_model():
    import lightning.pytorch as pl

    from tl_cli.models import FineTune

    pl.seed_everything(0)
    model = FineTune(backbone="timm:efficientnet_lite0", weights="none", scheduler="none", class_names=["a", "b"])
    model.set_preprocessing(dict(model.backbone_info.preprocessing))
    return model


def batches():
    import torch

    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(BATCH, 3, 224, 224, generator=g), torch.randint(0, 2, (BATCH,), generator=g), torch.arange(BATCH))
        for _ in range(6)
    ]


def plain_loop(data) -> float:
    import torch
    import torch.nn.functional as F

    from tl_cli.callbacks.freezing import backbone_stages

    model = make_model()
    stages = backbone_stages(model.backbone)
    for i, (_, params) in enumerate(stages):
        for p in params:
            p.requires_grad_(i >= len(stages) - 4)
    model.train()
    opt = torch.optim.AdamW(
        [
            {"params": list(model.head.parameters()), "lr": 1e-3},
            {"params": list(model.backbone.parameters()), "lr": 1e-4},
        ],
        weight_decay=1e-4,
    )
    for step in range(STEPS):
        if step == WARMUP:
            start = time.perf_counter()
        x, y, _ = data[step % len(data)]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (STEPS - WARMUP) * BATCH / (time.perf_counter() - start)


def tl_loop(data) -> float:
    import lightning.pytorch as pl
    import torch

    from tl_cli.callbacks import UnfreezeSchedule

    class StepTimer(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == WARMUP:
                self.start = time.perf_counter()

        def on_train_end(self, trainer, module):
            self.seconds = time.perf_counter() - self.start

    model = make_model()
    model.skip_starting_weights()  # same random init as the plain loop, nothing to load
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer, UnfreezeSchedule({0: 4}, update_unfrozen_bn_stats=True)],
    )
    loader = torch.utils.data.DataLoader([data[i % len(data)] for i in range(STEPS)], batch_size=None)
    trainer.fit(model, train_dataloaders=loader)
    return (STEPS - WARMUP) * BATCH / timer.seconds


def main() -> None:
    data = batches()
    plain_a = plain_loop(data)
    tl = tl_loop(data)
    plain_b = plain_loop(data)
    plain = (plain_a + plain_b) / 2
    print(
        f"overhead: images/s plain loop {plain_a:.1f} / {plain_b:.1f}, tl {tl:.1f} ({STEPS - WARMUP} steps of {BATCH})"
    )
    result("overhead", tl / plain, 0.90, f"tl {tl:.1f} vs plain {plain:.1f} images/s")


if __name__ == "__main__":
    main()
