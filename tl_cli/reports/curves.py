"""Learning curves as SVG (after `tl fit`, and in report.html)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence


def curves_svg(history: Sequence[dict[str, float]]) -> str:
    """Loss and accuracy per epoch, train and val, side by side, as an SVG document.

    Written by hand rather than with matplotlib, whose import and rendering at the end of every
    `tl fit` would cost more than a cached-feature run's whole training.
    """
    width, height, pad = 420, 300, 48
    colours = {"train": "#1f77b4", "val": "#ff7f0e"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{height}" font-family="sans-serif" font-size="12">'
    ]
    parts.append(f'<rect width="{2 * width}" height="{height}" fill="white"/>')
    epochs = [row["epoch"] for row in history] or [0]
    x0, x1 = min(epochs), max(max(epochs), min(epochs) + 1)
    for panel, (metric, title) in enumerate((("loss", "loss"), ("acc", "accuracy"))):
        left = panel * width + pad
        plot_w, plot_h = width - pad - 16, height - 2 * pad
        series = {
            split: [
                (row["epoch"], row[f"{split}/{metric}"])
                for row in history
                if math.isfinite(row.get(f"{split}/{metric}", math.nan))  # a diverged run logs NaN
            ]
            for split in ("train", "val")
        }
        values = [v for points in series.values() for _, v in points] or [0.0, 1.0]
        lo, hi = min(values), max(values)
        if metric == "acc":
            lo, hi = min(lo, 0.0), max(hi, 1.0)
        hi = hi if hi > lo else lo + 1.0

        def xy(e: float, v: float, left=left, plot_w=plot_w, plot_h=plot_h, lo=lo, hi=hi) -> tuple[float, float]:
            return left + (e - x0) / (x1 - x0) * plot_w, pad + (1 - (v - lo) / (hi - lo)) * plot_h

        parts.append(f'<text x="{left + plot_w / 2}" y="{pad - 18}" text-anchor="middle" font-size="14">{title}</text>')
        parts.append(f'<rect x="{left}" y="{pad}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>')
        decimals = max(2, 1 - math.floor(math.log10((hi - lo) / 4)))  # ticks that differ
        for i in range(5):
            v = lo + (hi - lo) * i / 4
            _, y = xy(x0, v)
            parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{v:.{decimals}f}</text>')
        step = max(1, round((x1 - x0) / 8))
        for e in range(int(x0), int(x1) + 1, step):
            x, _ = xy(e, lo)
            parts.append(f'<text x="{x:.1f}" y="{pad + plot_h + 16}" text-anchor="middle">{e}</text>')
        parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">epoch</text>')
        for n, (split, points) in enumerate(series.items()):
            if not points:
                continue
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(e, v) for e, v in points))
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colours[split]}" stroke-width="2"/>')
            for e, v in points:
                x, y = xy(e, v)
                parts.append(
                    f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colours[split]}"><title>{html.escape(split)} {e}: {v:.4f}</title></circle>'
                )
            ly = pad + 14 + 16 * n
            parts.append(
                f'<line x1="{left + plot_w - 60}" y1="{ly - 4}" x2="{left + plot_w - 44}" y2="{ly - 4}" stroke="{colours[split]}" stroke-width="2"/>'
            )
            parts.append(f'<text x="{left + plot_w - 40}" y="{ly}">{split}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
