"""Reading tl checkpoints safely and rebuilding the model class they name.

A checkpoint names its class (``hyper_parameters._class_path``, as LightningCLI stores it,
and ``tl.class_path``), so `tl test|validate|predict --ckpt_path` and `tl export` rebuild the
right one from the file alone. Files are read with ``weights_only`` (no code from them runs),
and only tl's own model classes, or classes the running program already imported, are
rebuilt: a class path in a file never makes tl import a module.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import torch

from tl_cli import CHECKPOINT_FORMAT, __version__
from tl_cli.errors import TLError, described

# Keys the checkpoint's hyperparameters may hold that are not constructor arguments.
_NOT_ARGUMENTS = ("_class_path", "_instantiator")
# Before FeatureExtraction/FineTune (one TransferClassifier): moved to the freezing callbacks.
_LEGACY_MOVED = ("unfreeze", "train_bn")


def read_tl_checkpoint(path: str | Path, *, what: str = "checkpoint") -> dict[str, Any]:
    """Load a tl checkpoint safely (no code from the file runs) or explain why it is not one."""
    path = Path(path)
    if not path.is_file():
        raise TLError(f"The {what} {path} does not exist. Pass the path of a .ckpt file written by `tl fit`.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        why = "an empty file" if path.stat().st_size == 0 else described(exc)
        raise TLError(
            f"{path} is not a loadable PyTorch checkpoint ({why}). Pass a .ckpt file written by `tl fit` "
            "(e.g. runs/<config>/latest/checkpoints/best.ckpt)."
        ) from None
    if not isinstance(ckpt, dict) or "tl" not in ckpt or "state_dict" not in ckpt:
        raise TLError(
            f"{path} is a PyTorch file but not a tl checkpoint (no 'tl' metadata). Pass a .ckpt "
            "file written by `tl fit`."
        )
    fmt = ckpt["tl"].get("format")
    if fmt != CHECKPOINT_FORMAT:
        raise TLError(
            f"{path} has tl checkpoint format {fmt}, this tl ({__version__}) reads format "
            f"{CHECKPOINT_FORMAT}. Use the tl version that wrote it."
        )
    return ckpt


def model_class_path(ckpt: dict[str, Any]) -> str:
    """The class a checkpoint's model was; for checkpoints written before classes existed
    (one TransferClassifier), the class that does what that run did."""
    hparams = ckpt.get("hyper_parameters", {})
    if hparams.get("_class_path"):
        return str(hparams["_class_path"])
    if ckpt["tl"].get("class_path"):
        return str(ckpt["tl"]["class_path"])
    if ckpt["tl"].get("kind") == "domain_adapt":
        return "tl_cli.models.DomainAdaptation"
    return (
        "tl_cli.models.FineTune" if any((hparams.get("unfreeze") or {}).values()) else "tl_cli.models.FeatureExtraction"
    )


def model_arguments(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments that rebuild a checkpoint's model for evaluation: its own
    hyperparameters, with nothing to load (the checkpoint brings every weight)."""
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k not in _NOT_ARGUMENTS}
    for key in _LEGACY_MOVED:
        hparams.pop(key, None)
    if ckpt["tl"].get("kind") == "domain_adapt" and "bottleneck" not in hparams:
        hparams["bottleneck"] = 0  # DomainAdaptation before the bottleneck existed
    hparams["class_names"] = list(ckpt["tl"]["class_names"])
    hparams["preprocessing"] = ckpt["tl"]["preprocessing"]
    if "init_from" in hparams:
        hparams["init_from"] = None
    return hparams


def resolve_class(class_path: str) -> type:
    """The class named by a checkpoint, if it is a tl model class (see the module docstring)."""
    from tl_cli.models.base import Classifier

    module_name, _, name = class_path.rpartition(".")
    if module_name.startswith("tl_cli.") or module_name == "tl_cli":
        module = importlib.import_module(module_name)
    elif module_name in sys.modules:
        module = sys.modules[module_name]
    else:
        raise TLError(
            f"The checkpoint's model class is {class_path}, whose module is not loaded; tl does not "
            "import code named by a file. Import it first (a Python program), or pass "
            "--model CLASS on the command line."
        )
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Classifier)):
        raise TLError(f"The checkpoint names {class_path}, which is not a tl model class.")
    return cls


def load_model(path: str | Path, *, what: str = "--ckpt_path checkpoint") -> Any:
    """The trained model of a tl checkpoint, in eval mode, on the CPU."""
    ckpt = read_tl_checkpoint(path, what=what)
    cls = resolve_class(model_class_path(ckpt))
    arguments = model_arguments(ckpt)
    arguments.update(weights="none", compile=False, channels_last=False)
    model = cls(**{k: v for k, v in arguments.items() if k in cls.argument_names()})
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"], strict=model.strict_loading)
    return model.eval()
