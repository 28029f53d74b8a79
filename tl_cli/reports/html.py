"""``report.html``: one self-contained page a person reads after ``tl test``.

Metrics and the per-class table, the confusion matrix, the learning curves of the run that
made the checkpoint, the most confused class pairs, and the most confident mistakes, each
with a class-activation map (Grad-CAM, from captum) over the image. Everything is inline
(SVG, PNG as data URIs): the page needs no network and no other file.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from tl_cli.reports.curves import curves_svg

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 4px 10px; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
.cm td { min-width: 3em; text-align: center; } .summary td { text-align: left; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.gallery figure { margin: 0; width: 232px; } .gallery img { width: 224px; border: 1px solid #ccc; }
figcaption { font-size: 0.85em; }
"""

# Reports whether every picture decoded; the browser test reads the title.
CHECK = """
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.title = `tl report: ${ok}/${imgs.length} images`;
  document.body.dataset.imagesOk = String(ok);
});
"""


def _png(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def cam_layer(model: nn.Module, images: torch.Tensor) -> Optional[nn.Module]:
    """The last module of `model` whose output is a spatial map (``[B, C, H, W]``, H, W > 1):
    where a class-activation map can still say where in the image the evidence is."""
    found: list[nn.Module] = []
    hooks = []
    for module in model.modules():
        if len(list(module.children())) == 0 and not isinstance(module, (nn.Dropout, nn.Identity)):
            hooks.append(
                module.register_forward_hook(
                    lambda m, a, out: (
                        found.append(m)
                        if isinstance(out, torch.Tensor) and out.ndim == 4 and min(out.shape[-2:]) > 1
                        else None
                    )
                )
            )
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return found[-1] if found else None


def class_activation_maps(model: nn.Module, images: torch.Tensor, classes: Sequence[int]) -> Optional[np.ndarray]:
    """Grad-CAM of `classes` for `images` (``[B, 3, H, W]``, normalised), as ``[B, H, W]`` in 0-1."""
    from captum.attr import LayerAttribution, LayerGradCam

    layer = cam_layer(model, images)
    if layer is None:
        return None
    with torch.inference_mode(False), torch.enable_grad():
        inputs = images.clone().requires_grad_(True)
        cam = LayerGradCam(model, layer).attribute(inputs, target=list(classes), relu_attributions=True)
        cam = LayerAttribution.interpolate(cam, tuple(images.shape[-2:]), interpolate_mode="bilinear")
    cam = cam.detach().float().squeeze(1)
    peak = cam.flatten(1).max(1).values.clamp(min=1e-12).view(-1, 1, 1)
    return (cam / peak).clamp(0, 1).cpu().numpy()


def _overlay(image: torch.Tensor, cam: Optional[np.ndarray]) -> np.ndarray:
    """uint8 ``[3, H, W]`` image, with the heat map blended over it."""
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    if cam is None:
        return rgb.astype(np.uint8)
    from matplotlib import colormaps

    heat = colormaps["jet"](cam)[..., :3] * 255.0
    return (0.55 * rgb + 0.45 * heat).clip(0, 255).astype(np.uint8)


def explain_threshold(num_classes: int) -> float:
    """The confidence from which a prediction gets a class-activation map: halfway from chance
    (1/K) to certainty. A map of a near-chance prediction shows no evidence, only noise."""
    return (1 + 1 / max(num_classes, 1)) / 2


def _mistakes(
    model: Optional[nn.Module],
    paths: Sequence[Path],
    target: torch.Tensor,
    probs: torch.Tensor,
    class_names: Sequence[str],
    preprocessing: dict[str, Any],
    limit: int,
) -> list[str]:
    from tl_cli.data.transforms import Normalize, crop_pipeline, decode_resized

    conf, pred = probs.max(1)
    wrong = sorted((pred != target).nonzero().flatten().tolist(), key=lambda i: -float(conf[i]))[:limit]
    if not wrong:
        return []
    crop = crop_pipeline("none", preprocessing)
    pictures = torch.stack([crop(decode_resized(paths[i], preprocessing)) for i in wrong])
    threshold = explain_threshold(len(class_names))
    explained = [n for n, i in enumerate(wrong) if float(conf[i]) >= threshold]
    cams: dict[int, np.ndarray] = {}
    if model is not None and explained:
        normalise = Normalize(preprocessing["mean"], preprocessing["std"])
        device = next(model.parameters()).device
        batch = normalise(pictures[explained]).to(device)
        maps = class_activation_maps(model, batch, [int(pred[wrong[n]]) for n in explained])
        cams = {} if maps is None else dict(zip(explained, maps, strict=True))
    figures = []
    for n, i in enumerate(wrong):
        picture = _overlay(pictures[n], cams.get(n))
        caption = (
            f"{html.escape(Path(paths[i]).name)}<br>true <b>{html.escape(class_names[int(target[i])])}</b>, "
            f"predicted <b>{html.escape(class_names[int(pred[i])])}</b> ({float(conf[i]):.2f})"
        )
        if model is not None and n not in cams:
            caption += f"<br><i>no heat map: below {threshold:.2f}</i>"
        figures.append(
            f'<figure><img src="{_png(picture)}" alt="mistake {n + 1}" data-cam="{int(n in cams)}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return figures


def _what_it_is(metrics: dict[str, Any]) -> list[str]:
    """The table that says what the report is of: model, checkpoint, data, software, date."""
    model = metrics.get("model") or {}
    ckpt = metrics.get("checkpoint_info") or {}
    data = metrics.get("data") or {}
    versions = metrics.get("versions") or {}
    rows = {
        "model": ", ".join(f"{k} {v}" for k, v in model.items() if v not in (None, "")) or "-",
        "checkpoint": ckpt.get("path", "-")
        + (f" (epoch {ckpt['epoch']}, step {ckpt['global_step']})" if "epoch" in ckpt else ""),
        "run folder": ckpt.get("run_folder", "-"),
        "data": f"{data.get('root', '-')} ({data.get('split', 'test')})",
        "images per class": ", ".join(f"{k} {v}" for k, v in (data.get("images_per_class") or {}).items()),
        "software": ", ".join(f"{k} {v}" for k, v in versions.items()) or "-",
        "date": metrics.get("date", "-"),
    }
    out = ["<table class='summary' id='about'>"]
    out += [f"<tr><th class='name'>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items()]
    return out + ["</table>"]


def _beside_accuracy(metrics: dict[str, Any]) -> dict[str, str]:
    if "accuracy_ci95" not in metrics:
        return {}
    low, high = metrics["accuracy_ci95"]
    chance = metrics["chance_accuracy"]
    verdict = " (the interval reaches it: not shown to beat chance)" if low <= chance else ""
    return {
        "95 % interval (Wilson)": f"{low:.3f} - {high:.3f}",
        "chance level": f"{chance:.4f}, always answering {metrics['majority_class']!r}{verdict}",
    }


def write_report(
    path: Path,
    *,
    metrics: dict[str, Any],
    class_names: Sequence[str],
    paths: Sequence[Path],
    target: torch.Tensor,
    probs: torch.Tensor,
    preprocessing: dict[str, Any],
    history: Sequence[dict[str, float]] = (),
    model: Optional[nn.Module] = None,
    title: str = "tl test report",
    limit: int = 12,
) -> Path:
    """Write the page; `model` (images -> logits, eval mode) draws the activation maps."""
    names = [html.escape(c) for c in class_names]
    cm = metrics["confusion_matrix"]
    peak = max((v for row in cm for v in row), default=1) or 1
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{STYLE}</style><script>{CHECK}</script></head><body>")
    parts.append(f"<h1>{html.escape(title)}</h1>")
    parts += _what_it_is(metrics)
    summary = {
        "checkpoint": metrics.get("checkpoint") or "-",
        "images": metrics["n_samples"],
        "accuracy": f"{metrics['accuracy']:.4f}",
        **_beside_accuracy(metrics),
        "balanced accuracy": f"{metrics['balanced_accuracy']:.4f}",
        "macro F1": f"{metrics['macro_f1']:.4f}",
        "test-time augmentation": metrics.get("tta", "none"),
    }
    parts.append("<table class='summary' id='summary'>")
    parts += [f"<tr><th class='name'>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items()]
    parts.append("</table><h2>Per class</h2><table id='per-class'><tr><th class='name'>class</th>")
    parts.append("<th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>")
    for i, name in enumerate(names):
        cells = "".join(f"<td>{metrics[k][i]:.4f}</td>" for k in ("precision", "recall", "f1"))
        parts.append(f"<tr><td class='name'>{name}</td>{cells}<td>{metrics['support'][i]}</td></tr>")
    parts.append("</table><h2>Confusion matrix</h2><p>rows: true class, columns: predicted</p>")
    parts.append(
        "<table class='cm' id='confusion-matrix'><tr><th></th>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>"
    )
    for name, row in zip(names, cm, strict=True):
        cells = "".join(
            f"<td style='background: rgba(31,119,180,{v / peak:.2f}); color: {'white' if v > peak / 2 else 'black'}'>{v}</td>"
            for v in row
        )
        parts.append(f"<tr><th class='name'>{name}</th>{cells}</tr>")
    parts.append("</table>")
    pairs = sorted(
        ((cm[i][j], i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i][j]), reverse=True
    )[:8]
    parts.append(
        "<h2>Most confused</h2><table id='confused'><tr><th class='name'>true</th><th class='name'>predicted as</th><th>images</th></tr>"
    )
    parts += [
        f"<tr><td class='name'>{names[i]}</td><td class='name'>{names[j]}</td><td>{n}</td></tr>" for n, i, j in pairs
    ]
    parts.append("</table>" if pairs else "</table><p>No confusions.</p>")
    parts.append("<h2>Learning curves</h2>")
    parts.append(curves_svg(history) if history else "<p>The checkpoint holds no training history.</p>")
    figures = _mistakes(model, paths, target, probs, class_names, preprocessing, limit)
    wrong = int((probs.argmax(1) != target).sum())
    parts.append(f"<h2>Most confident mistakes ({len(figures)} of {wrong})</h2>")
    threshold = explain_threshold(len(class_names))
    parts.append(
        "<p>Heat: where the evidence for the predicted class lies (Grad-CAM), drawn only where the "
        f"prediction's confidence is at least {threshold:.2f}, halfway from chance (1/{len(class_names)}) "
        "to certainty: a map of a near-chance prediction shows noise, not evidence.</p>"
        if figures and model is not None
        else ""
    )
    parts.append(
        "<div class='gallery' id='mistakes'>" + "".join(figures) + "</div>" if figures else "<p>No mistakes.</p>"
    )
    parts.append(f"<script type='application/json' id='metrics'>{json.dumps(metrics)}</script></body></html>")
    path.write_text("\n".join(parts))
    return path
