"""The feature-extraction head as a tuned linear probe: trained to convergence on the cached
backbone features, its regularisation chosen on the validation split.

Why not just the epochs of `tl fit`: a linear head on frozen features is a convex problem
(multinomial logistic regression), and the tuned probe the literature reports (and
scikit-learn's ``LogisticRegression`` with ``C`` chosen on validation) is its *regularised
optimum*. Mini-batch AdamW for a fixed number of epochs reaches something near it, with
an implicit regularisation set by the learning rate, the epochs and early stopping, which
are not chosen on anything. On cached features the whole training split fits in memory, so
the optimum itself costs a second: full-batch L-BFGS on standardised features (the
standardisation folded back into the head afterwards, so the head still takes raw
features), one fit per L2 strength from strong to weak (each warm-started from the
previous), and the strength whose model has the lowest ``val/`` loss wins (ties: accuracy).
The loss, not the accuracy, because it is what ``best.ckpt`` is chosen by afterwards (the
probe competes with the epochs on it) and because on a small validation split accuracy moves
in coarse steps: choosing by it favours the strongest regularisation among many ties, whose
under-confident head the first epoch then beats on loss. Measured on 9 real-image splits
(bench/accuracy.py sets, EfficientNet-Lite0): test accuracy 0.731 choosing by loss, 0.721 by
accuracy (scikit-learn's usual choice).
scikit-learn is not used because tl must also run it under DDP on GPU machines without a
copy of every feature in NumPy, with class weights and label smoothing as the training loss
has them; this is the same objective (L2 on the weights, not the bias; ``C = 1 / (lambda n)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

#: scikit-learn's C (inverse L2 strength) from strong to weak regularisation
C_GRID = tuple(float(c) for c in torch.logspace(-4, 3, 15, dtype=torch.float64))


@dataclass
class Probe:
    weight: torch.Tensor  # [classes, features], for raw (unstandardised) features
    bias: torch.Tensor  # [classes]
    c: float  # the chosen inverse regularisation strength
    val_acc: float
    val_loss: float
    table: list[tuple[float, float, float]]  # (C, val acc, val loss) of every fit


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
    on `x_val` (lowest loss, then highest accuracy). Runs in float64 on the CPU."""
    x, xv = x_train.detach().double().cpu(), x_val.detach().double().cpu()
    y, yv = y_train.long().cpu(), y_val.long().cpu()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-8)
    z, zv = (x - mean) / std, (xv - mean) / std
    train_args = {"weight": None if weight is None else weight.double().cpu(), "label_smoothing": label_smoothing}
    val_args = {"weight": train_args["weight"]}
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64)
    b = torch.zeros(classes, dtype=torch.float64)
    best, table = None, []
    with torch.enable_grad():
        for c in grid:
            _fit(z, y, 1.0 / (c * len(y)), w, b, train_args)
            logits = zv @ w.T + b
            acc = float((logits.argmax(1) == yv).double().mean())
            loss = float(F.cross_entropy(logits, yv, **val_args))
            table.append((c, acc, loss))
            if best is None or (-loss, acc) > (-best[2], best[1]):
                best = (c, acc, loss, w.clone(), b.clone())
    c, acc, loss, w, b = best
    weight_raw = w / std  # fold the standardisation into the head: w (x - m) / s + b
    return Probe(weight_raw.float(), (b - weight_raw @ mean).float(), c, acc, loss, table)
