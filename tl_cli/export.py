"""`tl export` and `tl predict --model`: a deployable classifier and its preprocessing.

The exported model takes a float32 batch ``[B, 3, H, W]`` that is already resized, cropped
and normalised as the JSON beside it says, and returns class probabilities ``[B, C]``. The
export is checked against the PyTorch model on real decoded images before tl says it is done;
a model that disagrees by more than `TOLERANCE` is removed, not left behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tl_cli.errors import TLError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4


class Probabilities(nn.Module):
    """The model's logits -> class probabilities, as the exported graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(dim=1)


def load_classifier(ckpt_path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a tl checkpoint (any tl model class, eval mode) and its metadata."""
    from tl_cli.models import load_model, read_tl_checkpoint

    meta = read_tl_checkpoint(ckpt_path, what="--ckpt_path checkpoint")["tl"]
    if not meta.get("class_names") or not meta.get("preprocessing"):
        raise TLError(f"{ckpt_path} has no class names or preprocessing; was it written by `tl fit`?")
    return load_model(ckpt_path), meta


def sample_images(preprocessing: dict[str, Any], images: str | Path | None, count: int = 8) -> torch.Tensor:
    """A batch of real decoded images, preprocessed: from `images` or, without it, generated ones."""
    from tl_cli.data.folders import is_image_name, list_images
    from tl_cli.data.transforms import preprocess
    from tl_cli.datatools.synth import CLASSES, image_rng, render_shape

    if images is not None:  # a sample to compare outputs on: other files in the folder do not matter
        pictures = [p for p in list_images(Path(images), others_too=True) if is_image_name(p)][:count]
        if not pictures:
            raise TLError(f"--images {images} holds no images to check the export with.")
    else:
        pictures = [render_shape(CLASSES[i % len(CLASSES)], image_rng(99, i), 256) for i in range(count)]
    return torch.stack([preprocess(p, preprocessing) for p in pictures])


def metadata(meta: dict[str, Any], fmt: str, source: str) -> dict[str, Any]:
    prep = meta["preprocessing"]
    height, width = prep["image_size"]
    return {
        "format": fmt,
        "source_checkpoint": source,
        "backbone": meta["backbone"],
        "class_names": meta["class_names"],
        "input": {"shape": [None, 3, height, width], "dtype": "float32", "layout": "NCHW, RGB"},
        "output": {"name": "probabilities", "shape": [None, len(meta["class_names"])]},
        "preprocessing": {
            "resize_short_side": int(min(height, width) / prep["crop_pct"]),
            "center_crop": [height, width],
            "interpolation": prep["interpolation"],
            "crop_pct": prep["crop_pct"],
            "scale": "divide by 255",
            "mean": prep["mean"],
            "std": prep["std"],
        },
        "tl_preprocessing": prep,
    }


def metadata_path(model_path: Path) -> Path:
    """``best.onnx`` -> ``best.onnx.json``: one JSON per exported file, whatever its format."""
    return model_path.with_name(model_path.name + ".json")


class ExportedModel:
    """Runs an exported ONNX or TorchScript model; `__call__` maps a batch to probabilities."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TLError(f"--model {self.path} does not exist.")
        meta_path = metadata_path(self.path)
        if not meta_path.is_file():
            raise TLError(f"{meta_path} is missing: `tl export` writes it beside the model, with the preprocessing.")
        self.meta = json.loads(meta_path.read_text())
        if self.path.suffix == ".onnx":
            try:
                import onnxruntime
            except ImportError:
                raise TLError("Running an ONNX model needs onnxruntime: pip install -e '.[export]'.") from None
            self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
        else:
            try:
                self.module = torch.jit.load(str(self.path), map_location="cpu").eval()
            except Exception as exc:
                raise TLError(f"{self.path} is not a TorchScript model written by `tl export` ({exc}).") from None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.path.suffix == ".onnx":
            return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy().astype(np.float32)})[0])
        with torch.no_grad():
            return self.module(x)


def export(
    ckpt_path: str | Path, fmt: str, out: str | Path | None = None, images: str | Path | None = None
) -> tuple[Path, float]:
    """Write the model and its JSON; check it on real images; return (path, max |difference|)."""
    if fmt not in FORMATS:
        raise TLError(f"--format {fmt}: choose one of {', '.join(FORMATS)}.")
    model, meta = load_classifier(ckpt_path)
    path = Path(ckpt_path).with_suffix(FORMATS[fmt])
    if out is not None:
        out = Path(out)
        path = out if out.suffix in (".onnx", ".pt") else out / path.name
    meta_path = metadata_path(path)
    for existing in (path, meta_path):
        if existing.exists():
            raise TLError(f"{existing} already exists; tl does not overwrite it. Pass -o NEW_PATH.")
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = Probabilities(model.logits_module()).eval()
    batch = sample_images(meta["preprocessing"], images)
    with torch.no_grad():
        expected = wrapped(batch)
    try:
        if fmt == "onnx":
            _export_onnx(wrapped, batch, path)
        else:
            torch.jit.trace(wrapped, batch[:1], check_trace=False).save(str(path))
        meta_path.write_text(json.dumps(metadata(meta, fmt, str(ckpt_path)), indent=2) + "\n")
        got = ExportedModel(path)(batch)
        diff = float((got - expected).abs().max())
        if not diff <= TOLERANCE:
            raise TLError(
                f"The exported model disagrees with the checkpoint: max |difference| of probabilities "
                f"{diff:.2e} > {TOLERANCE:.0e} on {len(batch)} images. Nothing was kept."
            )
    except BaseException:
        path.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        raise
    return path, diff


def _export_onnx(module: nn.Module, batch: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise TLError("ONNX export needs the onnx packages: pip install -e '.[export]'.") from None
    torch.onnx.export(
        module,
        (batch[:2],),
        str(path),
        input_names=["input"],
        output_names=["probabilities"],
        dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}},
        opset_version=18,
        dynamo=False,
    )


def predict_with_exported(model_path: str | Path, predict_dir: str | Path, out: Path, batch_size: int = 32) -> int:
    """`tl predict --model M --data.predict_dir DIR`: predictions.csv like the checkpoint's."""
    from tl_cli.data.datasets import UNREADABLE, ImageFiles
    from tl_cli.data.folders import list_images
    from tl_cli.data.screening import inspect_image
    from tl_cli.data.transforms import Normalize, crop_pipeline
    from tl_cli.reports.files import write_predictions

    exported = ExportedModel(model_path)
    predict_dir = Path(predict_dir)
    if not predict_dir.is_dir():
        raise TLError(f"data.predict_dir={str(predict_dir)!r} is not a folder.")
    paths = list_images(predict_dir, others_too=True)
    if not paths:
        raise TLError(f"data.predict_dir={str(predict_dir)!r} holds no images.")
    prep = exported.meta["tl_preprocessing"]
    dataset = ImageFiles([(p, -1) for p in paths], prep, crop_pipeline("none", prep), tolerant=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    normalize = Normalize(prep["mean"], prep["std"])
    probs, bad = [], []
    for x, label, index in loader:
        probs.append(exported(normalize(x)))
        bad += index[label == UNREADABLE].tolist()
    errors = {i: inspect_image(paths[i])["error"] or "unreadable" for i in bad}
    write_predictions(out, exported.meta["class_names"], paths, torch.cat(probs), errors=errors)
    return len(paths) - len(errors)
