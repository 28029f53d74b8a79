"""channels_last: the memory format tl picks by default (``model.channels_last: null``), against
the contiguous layout a plain loop gets, on this machine's device.

For each backbone (random weights: the layout's speed does not depend on them), a batch of 32
images at 224 px: inference under ``inference_mode`` (feature extraction's first pass) and a
training step with the last stages trainable and BatchNorm pinned (fine-tuning), each timed in
both layouts, contiguous before and after channels-last (their mean is the baseline).
Target: channels-last at least as fast (>= 1.0x) on the MobileNet/EfficientNet backbones tl's
configs ship; the others are printed for the record.
"""

from __future__ import annotations

import argparse
import time

from common import result

SHIPPED = ("efficientnet_lite0", "mobilenetv2_100")
OTHERS = ("efficientnet_b0", "resnet50", "convnext_nano")
FROZEN = ("conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2", "stem", "conv1", "layer1", "layer2", "stages.0")


def seconds_per_image(model, x, train: bool, repeats: int) -> float:
    import torch

    def step() -> None:
        if train:
            model(x).sum().backward()
        else:
            with torch.inference_mode():
                model(x)

    step()  # warm-up: oneDNN picks its kernels on the first call
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats / len(x)


def main() -> None:
    import timm
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=[*SHIPPED, *OTHERS])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    opts = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(opts.batch, 3, 224, 224)
    for name in opts.backbones:
        model = timm.create_model(name, pretrained=False, num_classes=2)
        for pname, param in model.named_parameters():
            param.requires_grad_(not pname.startswith(FROZEN))
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        for train, what in ((False, "inference"), (True, "training")):
            times = {}
            for fmt in ("contiguous", "channels_last", "contiguous_again"):
                layout = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
                model = model.to(memory_format=layout)
                times[fmt] = seconds_per_image(model, x.contiguous(memory_format=layout), train, opts.repeats)
            base = (times["contiguous"] + times["contiguous_again"]) / 2
            detail = f"{name} {what}: {base * 1000:.1f} -> {times['channels_last'] * 1000:.1f} ms/image"
            if name in SHIPPED:
                result(f"channels_last.{name}.{what}", base / times["channels_last"], 1.0, detail)
            else:
                print(f"channels_last: {base / times['channels_last']:.2f}x -- {detail}", flush=True)


if __name__ == "__main__":
    main()
