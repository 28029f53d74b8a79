"""The feature-extraction head starts as a linear probe: scikit-learn's logistic regression on
the cached features, its regularisation chosen on the validation split."""

from __future__ import annotations

import re

import pytest
import torch

from tests.helpers import fit_tiny


def test_linear_probe_is_scikit_learns_logistic_regression_with_c_chosen_on_val():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from tl_cli.models.probe import fit_linear_probe

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 20, generator=g) * 0.7
    scale = torch.rand(20, generator=g) * 5 + 0.1  # unequal feature scales: standardisation matters

    def blobs(n):
        y = torch.arange(n) % 3
        return (centres[y] + torch.randn(n, 20, generator=g)) * scale + 3, y

    (x, y), (xv, yv), (xt, _) = blobs(60), blobs(60), blobs(300)
    probe = fit_linear_probe(x, y, xv, yv, 3)
    # the chosen C is the grid's best on val (loss, then accuracy), and the head is sklearn's model there
    assert min(probe.table, key=lambda r: (r[2], -r[1]))[0] == probe.c
    assert max(r[2] for r in probe.table) > probe.val_loss + 0.05  # the choice mattered
    scaler = StandardScaler().fit(x.numpy())
    ref = LogisticRegression(C=probe.c, max_iter=10000, tol=1e-8).fit(scaler.transform(x.numpy()), y.numpy())
    ours = (xt @ probe.weight.T + probe.bias).softmax(1)
    theirs = torch.from_numpy(ref.predict_proba(scaler.transform(xt.numpy()))).float()
    assert torch.allclose(ours, theirs, atol=2e-3)


def test_probe_strength_is_chosen_by_accuracy_on_a_large_val_split_and_by_loss_on_a_small_one():
    from tl_cli.models.probe import ACCURACY_FROM, fit_linear_probe

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 20, generator=g) * 0.5  # overlapping classes: the two rules disagree
    scale = torch.rand(20, generator=g) * 5 + 0.1

    def blobs(n):
        y = torch.arange(n) % 3
        return (centres[y] + torch.randn(n, 20, generator=g)) * scale + 3, y

    (x, y), (xv, yv) = blobs(60), blobs(ACCURACY_FROM)
    large = fit_linear_probe(x, y, xv, yv, 3)
    small = fit_linear_probe(x, y, xv[:-1], yv[:-1], 3)  # one image fewer than the threshold
    assert (large.chosen_by, small.chosen_by) == ("accuracy", "loss")
    assert large.c == max(large.table, key=lambda r: (r[1], -r[2]))[0]
    assert (large.val_acc, large.val_loss) == next((a, lo) for c, a, lo in large.table if c == large.c)
    assert small.c == min(small.table, key=lambda r: (r[2], -r[1]))[0]
    assert large.c != small.c  # the data make the rules disagree, so each assertion above can fail
    # the head is the chosen strength's fit: its validation accuracy is the one reported
    acc = float(((xv @ large.weight.T + large.bias).argmax(1) == yv).double().mean())
    assert acc == pytest.approx(large.val_acc, abs=1e-9)


def test_probe_holds_one_float64_copy_of_the_features_and_fits_as_without_blocks(monkeypatch):
    """The fit's memory beyond the cached features is one standardised float64 copy (per image:
    8 bytes a feature), built a block of rows at a time; the blocks change no result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import tl_cli.models.probe as probe_module

    g = torch.Generator().manual_seed(1)
    y = torch.arange(90) % 3
    centres = torch.randn(3, 12, generator=g) * 2
    x = centres[y] + torch.randn(90, 12, generator=g) * 2 + 5
    yv = torch.arange(30) % 3
    xv = centres[yv] + torch.randn(30, 12, generator=g) * 2 + 5
    weight = torch.tensor([1.0, 2.0, 0.5])
    whole = probe_module.fit_linear_probe(x, y, xv, yv, 3, weight, 0.1)

    class Copies(TorchDispatchMode):  # every float64 tensor of the training features' shape
        made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == x.shape:
                Copies.made += 1
            return out

    monkeypatch.setattr(probe_module, "BLOCK", 7)  # 90 rows: 13 blocks, the last one short
    with Copies():
        blocked = probe_module.fit_linear_probe(x, y, xv, yv, 3, weight, 0.1)
    assert Copies.made == 1
    assert blocked.c == whole.c and [v for row in blocked.table for v in row] == pytest.approx(
        [v for row in whole.table for v in row], rel=1e-9
    )
    assert torch.allclose(blocked.weight, whole.weight) and torch.allclose(blocked.bias, whole.bias)


def test_feature_extraction_head_starts_as_the_tuned_probe(tiny_data, capsys):
    fit_tiny(tiny_data, 1, "feature_extract.yaml", "-o", "probe")
    out = capsys.readouterr().out
    probe = re.search(
        r"tl: head = tuned linear probe on 24 cached features: L2 C=\S+ chosen on val/ by loss \(\d+ images; val acc ([\d.]+), val loss ([\d.]+)\)",
        out,
    )
    start = re.search(r"tl: starting point: val/loss ([\d.]+), val/acc ([\d.]+)", out)
    assert probe and start, out[-3000:]
    # the model validated before the first step is the probe (a random head would score otherwise)
    assert float(start[1]) == pytest.approx(float(probe[2]), abs=2e-4)
    assert float(start[2]) == pytest.approx(float(probe[1]), abs=1e-4)
    fit_tiny(tiny_data, 1, "feature_extract.yaml", "-o", "random", "--model.head_init", "random")
    out = capsys.readouterr().out
    assert "tuned linear probe" not in out and "tl: starting point: val/loss" in out
