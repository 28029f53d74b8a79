"""report.html: what `tl test` leaves for a person, opened in a real headless browser, and the
class-activation maps pointing where the evidence is."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.helpers import REPO, fit_tiny, tl
from tl_cli.reports.html import class_activation_maps


class ObjectNet(nn.Module):
    """Class 1 is "something bright": the mean of a ReLU map; class 0 its opposite."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, 1, 1] = 1.0
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = torch.relu(self.conv(x)).mean((1, 2, 3))
        return torch.stack([-score, score], 1)


def test_activation_maps_point_at_the_evidence():
    x = torch.zeros(2, 3, 32, 32)
    x[0, :, :12, :12] = 1.0  # the object: top left in one image, bottom right in the other
    x[1, :, 20:, 20:] = 1.0
    cams = class_activation_maps(ObjectNet(), x, [1, 1])
    assert cams.shape == (2, 32, 32) and cams.min() >= 0 and cams.max() <= 1
    assert cams[0, :10, :10].mean() > 0.9 and cams[0, 16:, 16:].mean() < 0.05
    assert cams[1, 22:, 22:].mean() > 0.9 and cams[1, :16, :16].mean() < 0.05


def test_test_writes_a_self_contained_report(tiny_data):
    best = fit_tiny(tiny_data, 2)
    assert tl("test", "--ckpt_path", best, "--data.root", tiny_data, "--data.num_workers", "0", "-o", "t") == 0
    page = Path("t/latest/report.html").read_text()
    metrics = json.loads(Path("t/latest/metrics.json").read_text())
    for section in ("per-class", "confusion-matrix", "confused", "mistakes", "<svg"):
        assert section in page
    assert f"{metrics['accuracy']:.4f}" in page
    assert not re.search(r"""(src|href)=["']https?://""", page)  # nothing from the network
    wrong = sum(row[j] for i, row in enumerate(metrics["confusion_matrix"]) for j in range(len(row)) if i != j)
    assert page.count("<figure>") == min(12, wrong)


def _browser() -> str | None:
    found = subprocess.run(["bash", str(REPO / "scripts/browser.sh"), "path"], capture_output=True, text=True)
    return found.stdout.strip() or None


@pytest.mark.slow
@pytest.mark.skipif(_browser() is None, reason="no chromium: scripts/browser.sh install (CI does)")
def test_report_renders_in_a_headless_browser(tiny_data, tmp_path):
    best = fit_tiny(tiny_data, 3)
    assert tl("test", "--ckpt_path", best, "--data.root", tiny_data, "--data.num_workers", "0", "-o", "t") == 0
    report = Path("t/latest/report.html").resolve()
    images = report.read_text().count("<img ")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [_browser(), *flags, "--virtual-time-budget=10000", "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    # the page's own check: every picture decoded in the browser
    assert f"<title>tl report: {images}/{images} images</title>" in dom, dom[:500]
    assert 'id="confusion-matrix"' in dom and "Most confident mistakes" in dom
    shot = tmp_path / "report.png"
    subprocess.run(
        [_browser(), *flags, "--window-size=1200,2000", f"--screenshot={shot}", report.as_uri()],
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2000, 1200)
    assert pixels.std() > 20  # text, tables, curves, pictures: not a blank page
