"""What `tl test` and `tl predict` leave behind: metrics.json, confusion_matrix.png, predictions.csv."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import torch


def classification_metrics(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro averages and the confusion matrix
    (torchmetrics). ``confusion_matrix[i][j]`` counts images of true class i predicted as class
    j. Balanced accuracy is the mean recall over the classes present in `target` (as
    scikit-learn defines it); macro F1 the mean F1 over all classes."""
    from torchmetrics.functional.classification import (
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    target, pred = target.long(), pred.long()
    args = {"num_classes": num_classes, "average": None}
    cm = (
        multiclass_confusion_matrix(pred, target, num_classes) if len(target) else torch.zeros(num_classes, num_classes)
    )
    precision = multiclass_precision(pred, target, **args) if len(target) else torch.zeros(num_classes)
    recall = multiclass_recall(pred, target, **args) if len(target) else torch.zeros(num_classes)
    f1 = multiclass_f1_score(pred, target, **args) if len(target) else torch.zeros(num_classes)
    support = cm.sum(1).long()
    present = support > 0
    n = int(support.sum())
    return {
        "accuracy": float(cm.diag().sum() / max(n, 1)),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1.mean()),
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
        "f1": [float(v) for v in f1],
        "support": [int(v) for v in support],
        "confusion_matrix": cm.long().tolist(),
        "n_samples": n,
    }


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion `correct`/`n` (95 % for the default `z`): unlike
    the normal approximation it stays inside [0, 1] and is honest on a few dozen images."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def chance_level(support: Sequence[int], class_names: Sequence[str]) -> tuple[float, str]:
    """The accuracy of always answering the most frequent class, and that class."""
    n = sum(support)
    top = max(range(len(support)), key=lambda i: support[i]) if support else 0
    return (support[top] / n if n else 0.0), (class_names[top] if class_names else "")


def checkpoint_facts(path: Optional[str]) -> dict:
    """The checkpoint a report is of: its path, the epoch and step it was saved at, and the run
    folder it belongs to (``.../version_N`` above ``checkpoints/``)."""
    if not path:
        return {}
    facts: dict = {"path": str(path)}
    resolved = Path(path).resolve()
    if resolved.parent.name == "checkpoints":
        facts["run_folder"] = str(resolved.parent.parent)
    try:
        ckpt = torch.load(resolved, map_location="cpu", weights_only=True, mmap=True)
        facts.update(epoch=int(ckpt.get("epoch", -1)), global_step=int(ckpt.get("global_step", -1)))
    except Exception:  # a report never fails on what it only describes
        pass
    return facts


def software() -> dict:
    """The versions that made a report, and when."""
    import datetime

    import lightning

    from tl_cli import __version__

    return {
        "versions": {"tl": __version__, "torch": torch.__version__, "lightning": lightning.__version__},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def format_test_report(metrics: dict, class_names: Sequence[str]) -> str:
    width = max(12, *(len(c) for c in class_names))
    lines = [
        f"accuracy {metrics['accuracy']:.4f} on {metrics['n_samples']} images "
        f"(balanced {metrics['balanced_accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f})",
    ]
    if "accuracy_ci95" in metrics:
        low, high = metrics["accuracy_ci95"]
        lines.append(
            f"95 % interval {low:.3f}-{high:.3f}; chance level {metrics['chance_accuracy']:.4f} "
            f"(always {metrics['majority_class']!r})"
            + (": not shown to beat it" if low <= metrics["chance_accuracy"] else "")
        )
    lines += [""]
    lines.append(f"{'class':<{width}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for i, name in enumerate(class_names):
        lines.append(
            f"{name:<{width}} {metrics['precision'][i]:>9.4f} {metrics['recall'][i]:>9.4f} "
            f"{metrics['f1'][i]:>9.4f} {metrics['support'][i]:>8d}"
        )
    lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
    cell = max(6, *(len(str(v)) for row in metrics["confusion_matrix"] for v in row)) + 1
    lines.append(" " * width + "".join(f"{c[: cell - 1]:>{cell}}" for c in class_names))
    for name, row in zip(class_names, metrics["confusion_matrix"], strict=False):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{cell}d}" for v in row))
    return "\n".join(lines)


def plot_confusion_matrix(cm: list[list[int]], class_names: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    fig, ax = plt.subplots(figsize=(2 + 0.6 * n, 1.6 + 0.6 * n), dpi=120)
    ax.imshow(cm, cmap="Blues")
    peak = max(max(row) for row in cm) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i][j]), ha="center", va="center", color="white" if cm[i][j] > peak / 2 else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_predictions(
    path: Path,
    class_names: Sequence[str],
    files: Sequence[Path],
    probs: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    errors: Optional[dict[int, str]] = None,
) -> None:
    """``file, [true,] predicted, <one probability column per class>[, error]``, one row per image.

    Rows listed in `errors` (prediction only: files that could not be decoded) have empty
    prediction and probability cells and the problem in the ``error`` column.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    pred = probs.argmax(1)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        header = (
            ["file"] + (["true"] if target is not None else []) + ["predicted"] + [f"prob_{c}" for c in class_names]
        )
        writer.writerow(header + (["error"] if errors is not None else []))
        for i, file in enumerate(files):
            row = [str(file)]
            if target is not None:
                row.append(class_names[int(target[i])])
            if errors is not None and i in errors:
                row += [""] * (1 + len(class_names)) + [errors[i]]
            else:
                row.append(class_names[int(pred[i])])
                row += [f"{float(p):.6f}" for p in probs[i]]
                if errors is not None:
                    row.append("")
            writer.writerow(row)


def plot_mistakes(
    paths: Sequence[Path],
    target: torch.Tensor,
    probs: torch.Tensor,
    class_names: Sequence[str],
    path: Path,
    limit: int = 16,
) -> int:
    """A grid of the most confidently misclassified images; returns how many it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tl_cli.data.transforms import load_rgb

    conf, pred = probs.max(1)
    wrong = (pred != target).nonzero().flatten().tolist()
    wrong.sort(key=lambda i: -float(conf[i]))
    shown = wrong[:limit]
    cols = min(4, max(1, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not shown:
        axes[0][0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    for ax, i in zip(axes.flat, shown, strict=False):
        image = load_rgb(paths[i])
        image.thumbnail((256, 256))
        ax.imshow(image)
        ax.set_title(
            f"true: {class_names[int(target[i])]}\npred: {class_names[int(pred[i])]} ({float(conf[i]):.2f})", fontsize=9
        )
    fig.suptitle(f"most confident mistakes ({len(shown)} of {len(wrong)})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(shown)


def write_test_reports(
    out_dir: Path,
    *,
    class_names: Sequence[str],
    paths: Sequence[Path],
    target: torch.Tensor,
    probs: torch.Tensor,
    checkpoint: Optional[str],
    print_fn: Callable[[str], None] = print,
    preprocessing: Optional[dict] = None,
    history: Sequence[dict[str, float]] = (),
    model: Optional[torch.nn.Module] = None,
    tta: str = "none",
    about: Optional[dict] = None,
) -> dict:
    """Write metrics.json, confusion_matrix.png, mistakes.png, predictions.csv and (with the
    preprocessing) report.html into `out_dir`; return the metrics.

    The metrics carry what they are of: `about` (``model``: class, backbone, weights; ``data``:
    folder, split) with the images per class, the checkpoint's epoch and run folder, the versions
    and the date; and beside the accuracy its 95 % Wilson interval and the chance level (always
    the most frequent class)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = classification_metrics(target, probs.argmax(1), len(class_names))
    correct = sum(row[i] for i, row in enumerate(metrics["confusion_matrix"]))
    chance, majority = chance_level(metrics["support"], class_names)
    extra = {"accuracy_ci95": list(wilson_interval(correct, metrics["n_samples"]))}
    extra.update(chance_accuracy=chance, majority_class=majority)
    about = dict(about or {})
    about["data"] = {
        **about.get("data", {}),
        "images_per_class": dict(zip(class_names, metrics["support"], strict=True)),
    }
    about.update(checkpoint_info=checkpoint_facts(checkpoint), **software())
    metrics = {"classes": list(class_names), **metrics, **extra, "checkpoint": checkpoint, "tta": tta, **about}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_confusion_matrix(metrics["confusion_matrix"], class_names, out_dir / "confusion_matrix.png")
    write_predictions(out_dir / "predictions.csv", class_names, paths, probs, target)
    plot_mistakes(paths, target, probs, class_names, out_dir / "mistakes.png")
    written = "metrics.json, confusion_matrix.png, mistakes.png, predictions.csv"
    if preprocessing is not None:
        from tl_cli.reports.html import write_report

        write_report(
            out_dir / "report.html",
            metrics=metrics,
            class_names=class_names,
            paths=paths,
            target=target,
            probs=probs,
            preprocessing=preprocessing,
            history=history,
            model=model,
        )
        written += ", report.html"
    print_fn(format_test_report(metrics, class_names))
    print_fn(f"\ntl: test reports ({written}) in {out_dir}")
    return metrics
