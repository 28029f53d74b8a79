"""One factory for every backbone: ``timm:NAME``, ``torchvision:NAME`` or ``tl:NAME``.

A backbone here is a network with its ImageNet classifier removed: it maps a batch of images
to pooled features ``[B, num_features]``. It also says how its inputs must be prepared
(size, mean, std, interpolation, crop) and how its parameters group into *stages*, from the
input to the output, which is what fine-tuning unfreezes.

Building the architecture never touches the network: weights load separately
(`tl_cli.backbones.weights`), so a model rebuilt from a tl checkpoint needs no download.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tl_cli.errors import TLError

SOURCES = ("timm", "torchvision", "tl")


@dataclass
class Backbone:
    """A feature extractor and what tl needs to know about it.

    Attributes:
        spec: ``source:name`` as the user wrote it.
        module: images ``[B, 3, H, W]`` -> features ``[B, num_features]``.
        num_features: width of the features, the head's input.
        preprocessing: plain-typed input settings: ``image_size`` [H, W], ``mean``, ``std``,
            ``interpolation`` (``bilinear``/``bicubic``/...), ``crop_pct``.
        stages: ``(name, parameter names)`` from input to output; every parameter of
            ``module`` is in exactly one stage.
    """

    spec: str
    module: nn.Module
    num_features: int
    preprocessing: dict[str, Any]
    stages: list[tuple[str, list[str]]] = field(default_factory=list)


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``timm:resnet50`` into ``("timm", "resnet50")`` or explain what is wrong."""
    source, sep, name = spec.partition(":")
    if not sep or source not in SOURCES or not name:
        bare = name if sep else spec
        known = [f"timm:{bare}"] if bare and _timm_has(bare) else []
        known += [f"torchvision:{bare}"] if bare and bare in _torchvision_names() else []
        hint = f" Did you mean {' or '.join(repr(k) for k in known)}?" if known else ""
        raise TLError(
            f"model.backbone={spec!r} is not of the form 'timm:<name>', 'torchvision:<name>' or 'tl:<name>'.{hint}"
        )
    return source, name


def _timm_has(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _unknown_name(source: str, name: str, known: list[str]) -> TLError:
    close = difflib.get_close_matches(name, known, n=6, cutoff=0.5)
    lowered = [k for k in known if name.lower() in k.lower() and k not in close][: 6 - len(close)]
    close += lowered
    suggestion = (
        "Close matches: " + ", ".join(f"{source}:{c}" for c in close) + "."
        if close
        else f'See the list with `python -c "import {source}..."`.'
    )
    if source == "timm" and not close:
        suggestion = "List them with `python -c \"import timm; print(timm.list_models('*pattern*'))\"`."
    if source == "torchvision" and not close:
        suggestion = (
            'List them with `python -c "import torchvision; '
            'print(torchvision.models.list_models(module=torchvision.models))"`.'
        )
    if source == "tl":
        suggestion = "tl's own backbones: " + ", ".join(f"tl:{k}" for k in known) + "."
    return TLError(f"Unknown backbone {source}:{name}. {suggestion}")


# --------------------------------------------------------------------------- timm


def _timm_preprocessing(model: nn.Module) -> dict[str, Any]:
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return {
        "image_size": [int(cfg["input_size"][1]), int(cfg["input_size"][2])],
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": str(cfg.get("interpolation", "bilinear")),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }


def create_timm_model(name: str, *, pretrained: bool = False, num_classes: int = 0) -> nn.Module:
    import timm

    if not _timm_has(name):
        raise _unknown_name("timm", name, timm.list_models())
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)


def _timm_stages(model: nn.Module) -> list[tuple[str, list[str]]] | None:
    if not hasattr(model, "group_matcher"):
        return None
    from timm.models import group_parameters

    try:
        groups = group_parameters(model, model.group_matcher(coarse=True))
    except (NotImplementedError, AttributeError, TypeError):
        return None
    stages = []
    for _, names in sorted(groups.items()):
        stages.append((_common_prefix(names), list(names)))
    return stages


class LeNet(nn.Module):
    """The small network of the DANN paper's digit experiments (Ganin et al. 2016, MNIST ->
    MNIST-M), for small images trained from scratch: conv 5x5 32 - max-pool 2 - conv 5x5 48 -
    dropout - max-pool 2, with batch norm, then the 48 x 4 x 4 map flattened to 768 features
    (an adaptive max-pool makes 4 x 4 of any input from 28 px up). No pretrained weights."""

    num_features = 48 * 4 * 4
    preprocessing = {
        "image_size": [32, 32],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 32, 5), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(
            nn.Conv2d(32, 48, 5), nn.BatchNorm2d(48), nn.Dropout2d(0.5), nn.ReLU(inplace=True), nn.AdaptiveMaxPool2d(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x)).flatten(1)


TL_MODELS = {"lenet": LeNet}


def _tl_create(name: str) -> nn.Module:
    if name not in TL_MODELS:
        raise _unknown_name("tl", name, sorted(TL_MODELS))
    return TL_MODELS[name]()


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix: list[str] = []
    for tokens in zip(*parts, strict=False):
        if len(set(tokens)) != 1:
            break
        prefix.append(tokens[0])
    if prefix and len(names) == 1:
        prefix = prefix[:-1]  # a single parameter: name the module, not the tensor
    return ".".join(prefix) or "+".join(sorted({n.split(".")[0] for n in names}))


# --------------------------------------------------------------------------- torchvision


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def create_torchvision_model(name: str, weights: str | None = None) -> nn.Module:
    import torchvision

    if name not in _torchvision_names():
        raise _unknown_name("torchvision", name, _torchvision_names())
    return torchvision.models.get_model(name, weights=weights)


def _torchvision_preprocessing(name: str) -> dict[str, Any]:
    import torchvision

    try:
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop = int(preset.crop_size[0])
        resize = int(preset.resize_size[0])
        return {
            "image_size": [crop, crop],
            "mean": [float(v) for v in preset.mean],
            "std": [float(v) for v in preset.std],
            "interpolation": preset.interpolation.value,
            "crop_pct": crop / resize,
        }
    except (ValueError, AttributeError, IndexError):  # a model without published weights
        return {
            "image_size": [224, 224],
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "interpolation": "bilinear",
            "crop_pct": 0.875,
        }


def strip_last_linear(model: nn.Module) -> int:
    """Replace the last ``nn.Linear`` (the ImageNet classifier) by Identity; return its input width.

    Works across torchvision's families: ``fc`` (ResNet, RegNet, Inception), ``classifier[-1]``
    (MobileNet, EfficientNet, VGG, ConvNeXt), ``heads.head`` (ViT), ``head`` (Swin).
    """
    last_name, last = None, None
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = mod_name, module
    if last is None:
        raise TLError(f"{type(model).__name__} has no linear classifier tl can replace; use a timm backbone instead.")
    parent_name, _, child = last_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return last.in_features


def generic_stages(model: nn.Module, min_stages: int = 4, max_share: float = 0.5) -> list[tuple[str, list[str]]]:
    """Stages for a model without a stage map: its top-level children, in order.

    A child holding most of the parameters (torchvision's ``features`` or ViT's
    ``encoder.layers``) is split into its own children until there are at least `min_stages`
    stages and none holds more than `max_share` of the parameters (or it cannot be split).
    Parameters that sit directly on a split container form a stage of their own.
    """
    total = sum(p.numel() for p in model.parameters()) or 1

    def entries(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module | None, list[str]]]:
        out: list[tuple[str, nn.Module | None, list[str]]] = []
        direct = [f"{prefix}{n}" for n, _ in module.named_parameters(recurse=False)]
        if direct:
            out.append((prefix.rstrip(".") or "<root>", None, direct))
        for child_name, child in module.named_children():
            names = [f"{prefix}{child_name}.{n}" for n, _ in child.named_parameters()]
            if names:
                out.append((f"{prefix}{child_name}", child, names))
        return out

    stages = entries("", model)
    while True:
        splittable = [
            (sum(model.get_parameter(n).numel() for n in names), i)
            for i, (_, mod, names) in enumerate(stages)
            if mod is not None and len(entries("", mod)) > 1
        ]
        if not splittable:
            break
        size, i = max(splittable)
        if len(stages) >= min_stages and size / total <= max_share:
            break
        name, mod, _ = stages[i]
        stages[i : i + 1] = entries(f"{name}.", mod)
    return [(name, names) for name, _, names in stages]


# --------------------------------------------------------------------------- factory


def create_backbone(spec: str) -> Backbone:
    """Build the architecture named by `spec`, randomly initialised, without its classifier."""
    source, name = parse_spec(spec)
    if source == "timm":
        module = create_timm_model(name)
        num_features = int(module.num_features)
        preprocessing = _timm_preprocessing(module)
        stages = _timm_stages(module) or generic_stages(module)
    elif source == "tl":
        module = _tl_create(name)
        num_features = module.num_features
        preprocessing = dict(module.preprocessing)
        stages = [(child, [f"{child}.{n}" for n, _ in m.named_parameters()]) for child, m in module.named_children()]
    else:
        module = create_torchvision_model(name)
        num_features = strip_last_linear(module)
        preprocessing = _torchvision_preprocessing(name)
        stages = generic_stages(module)
    _check_stages(module, stages, spec)
    return Backbone(spec, module, num_features, preprocessing, stages)


def _check_stages(module: nn.Module, stages: list[tuple[str, list[str]]], spec: str) -> None:
    listed = [n for _, names in stages for n in names]
    actual = [n for n, _ in module.named_parameters()]
    if sorted(listed) != sorted(actual):
        missing = sorted(set(actual) - set(listed))
        raise RuntimeError(f"stage map of {spec} misses parameters {missing[:5]}")
