"""The feature-extraction head as a tuned linear probe: multinomial logistic regression on the
cached backbone features, trained to convergence, its L2 strength chosen on the validation split.

A linear head on frozen features is a convex problem; a fixed number of mini-batch epochs only
approaches its optimum, with an implicit regularisation nobody chose. On cached features the
optimum costs a second: full-batch L-BFGS on standardised features (folded back into the head,
which still takes raw features), one fit per strength from strong to weak, each warm-started
from the previous. Which strength wins depends on the validation split's size. From
`ACCURACY_FROM` images on, the highest validation accuracy wins (ties: loss), as in the tuned
probes the field reports (CLIP's linear probes, scikit-learn's LogisticRegressionCV): a few
images of hundreds then separate the grid's strengths, and accuracy is what users compare. On a
smaller split one image is several points of accuracy, so the lowest validation loss wins
(ties: accuracy), which moves smoothly. The objective is scikit-learn's (L2 on the weights, not
the bias; ``C = 1 / (lambda n)``), with the training loss's class weights and label smoothing,
and one copy of the features, standardised in float64 (`_standardised`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

#: scikit-learn's C (inverse L2 strength) from strong to weak regularisation
C_GRID = tuple(float(c) for c in torch.logspace(-4, 3, 15, dtype=torch.float64))

#: validation images from which the probe's strength is chosen by accuracy (below: by loss): one
#: image is then at most half a point (the measurements: bench/README.md, "tl's probe: which C")
ACCURACY_FROM = 200


@dataclass
class Probe:
    weight: torch.Tensor  # [classes, features], for raw (unstandardised) features
    bias: torch.Tensor  # [classes]
    c: float  # the chosen inverse regularisation strength
    val_acc: float
    val_loss: float
    chosen_by: Literal["accuracy", "loss"]  # by the validation split's size
    table: list[tuple[float, float, float]]  # (C, val acc, val loss) of every fit


#: rows converted to float64 at a time while standardising
BLOCK = 4096


def _blocks(x: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, len(x), BLOCK):
        yield x[start : start + BLOCK].double()


def _standardised(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` in float64, filled a block at a time: the one copy of the features
    the fit holds (converting all of `x` first would hold a second). Not no copy at all: the
    fit's many evaluations, each converting float32 blocks again, take several times longer."""
    out = torch.empty(x.shape, dtype=torch.float64)
    for start, block in zip(range(0, len(x), BLOCK), _blocks(x), strict=True):
        out[start : start + BLOCK] = (block - mean) / std
    return out


def _fit(z: torch.Tensor, y: torch.Tensor, lam: float, w: torch.Tensor, b: torch.Tensor, loss_args: dict) -> None:
    """Minimise mean cross-entropy + lam/2 ||w||^2 in place (full batch, L-BFGS)."""
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y, **loss_args) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w.requires_grad_(False)
    b.requires_grad_(False)


def fit_linear_probe(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    classes: int,
    weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    grid: tuple[float, ...] = C_GRID,
) -> Probe:
    """The L2-regularised multinomial logistic regression on `x_train` whose strength does best
    on `x_val`: highest accuracy, then lowest loss, from `ACCURACY_FROM` validation images on;
    lowest loss, then highest accuracy, below. Runs in float64 on the CPU."""
    x, xv = x_train.detach().cpu(), x_val.detach().cpu()
    mean = sum(block.sum(0) for block in _blocks(x)) / len(x)
    std = (sum(((block - mean) ** 2).sum(0) for block in _blocks(x)) / len(x)).sqrt().clamp(min=1e-8)
    z, zv = _standardised(x, mean, std), _standardised(xv, mean, std)
    y, yv = y_train.long().cpu(), y_val.long().cpu()
    train_args = {"weight": None if weight is None else weight.double().cpu(), "label_smoothing": label_smoothing}
    val_args = {"weight": train_args["weight"]}
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64)
    b = torch.zeros(classes, dtype=torch.float64)
    by_accuracy = len(yv) >= ACCURACY_FROM

    def score(acc: float, loss: float) -> tuple[float, float]:
        return (acc, -loss) if by_accuracy else (-loss, acc)

    best, table = None, []
    with torch.enable_grad():
        for c in grid:
            _fit(z, y, 1.0 / (c * len(y)), w, b, train_args)
            logits = zv @ w.T + b
            acc = float((logits.argmax(1) == yv).double().mean())
            loss = float(F.cross_entropy(logits, yv, **val_args))
            table.append((c, acc, loss))
            if best is None or score(acc, loss) > score(best[1], best[2]):
                best = (c, acc, loss, w.clone(), b.clone())
    c, acc, loss, w, b = best
    weight_raw = w / std  # fold the standardisation into the head: w (x - m) / s + b
    return Probe(
        weight_raw.float(), (b - weight_raw @ mean).float(), c, acc, loss, "accuracy" if by_accuracy else "loss", table
    )
