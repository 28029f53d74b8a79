"""What a model leaves in its run folder: learning curves after ``fit``, the test reports
after ``test``, predictions.csv after ``predict``.

Under DDP every rank saw a shard, and the distributed sampler pads shards to equal length
with repeated samples; reports need every sample exactly once, so each rank's outputs are
gathered (on tl's own CPU channel) and de-duplicated by sample index before rank 0 writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tl_cli.cluster import distributed


def gather_outputs(outputs: list[dict[str, torch.Tensor]], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """This epoch's outputs from every rank, each sample once, in dataset order."""
    empty = {k: torch.empty(0, dtype=torch.long) for k in keys}
    local = {k: torch.cat([o[k] for o in outputs]) for k in keys} if outputs else empty
    parts = [p for p in distributed.on_every_rank(lambda: local, 1800.0) if len(p["index"])]
    merged = {k: torch.cat([p[k] for p in parts]) for k in keys} if parts else empty
    order = torch.argsort(merged["index"], stable=True)
    index = merged["index"][order]
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    keep = order[first]
    return {k: v[keep] for k, v in merged.items()}


class Reporting:
    """Mixin for `Classifier`: the history and curves of a fit, the test and predict reports."""

    # declared by the host (`Classifier`), besides LightningModule's own
    history: list[dict[str, float]]  # one row per training epoch, kept in checkpoints
    outputs: list[dict[str, Any]]  # this test or predict epoch's outputs, on the CPU
    class_names: Optional[list[str]]
    preprocessing: Optional[dict[str, Any]]
    predict_logits: Callable[[torch.Tensor], torch.Tensor]
    logits_module: Callable[[], nn.Module]
    accumulate: Callable[..., None]

    def out_dir(self) -> Path:
        """The run folder (a collective under DDP: every rank must ask, not only rank 0)."""
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    # -- fit: learning curves ------------------------------------------------------------------

    def record_epoch(self) -> None:
        """Add this epoch's losses and accuracies to `history`."""
        metrics = self.trainer.callback_metrics
        row = {"epoch": self.current_epoch}
        for key in ("train/loss_epoch", "train/acc", "val/loss", "val/acc"):
            if key in metrics:
                row[key.replace("_epoch", "")] = float(metrics[key])
        self.history.append(row)

    def write_curves(self) -> None:
        """curves.svg in the run folder, from `history`."""
        out_dir = self.out_dir()
        if self.trainer.is_global_zero and self.history:
            from tl_cli.reports.curves import curves_svg

            (out_dir / "curves.svg").write_text(curves_svg(self.history))
            self.print(f"tl: learning curves in {out_dir / 'curves.svg'}")

    # -- test ----------------------------------------------------------------------------------

    def collect_test(self, batch: Any, dataloader_idx: int) -> None:
        """Score a test batch and keep its class probabilities for the reports."""
        x, y, index = batch
        logits = self.predict_logits(x)
        self.accumulate("test" if dataloader_idx == 0 else "test_target", F.cross_entropy(logits, y), logits, y)
        probs = logits.float().softmax(1)
        self.outputs.append({"probs": probs.cpu(), "target": y.cpu(), "index": index.cpu(), "loader": dataloader_idx})

    def report_test(self) -> None:
        """Write the test reports of each domain (rank 0) from every rank's outputs."""
        from tl_cli.reports.files import write_test_reports

        out_dir, dm = self.out_dir(), self.trainer.datamodule
        loaders = self.trainer.test_dataloaders
        splits = [("source", "test", out_dir), ("target", "target_test", out_dir / "target")]
        splits = splits[: len(loaders) if isinstance(loaders, (list, tuple)) else 1]
        summary = {}
        for idx, (name, split, folder) in enumerate(splits):  # every rank takes part in each gather
            got = gather_outputs([o for o in self.outputs if o["loader"] == idx], ("probs", "target", "index"))
            if not self.trainer.is_global_zero or not len(got["index"]):
                continue
            paths = dm.paths(split)
            if len(splits) > 1:
                self.print(f"\n== {name} domain ==")
            metrics = write_test_reports(
                folder,
                class_names=self.class_names,
                paths=[paths[i] for i in got["index"].tolist()],
                target=got["target"],
                probs=got["probs"],
                checkpoint=str(self.trainer.ckpt_path) if self.trainer.ckpt_path else None,
                print_fn=self.print,
                preprocessing=self.preprocessing,
                history=self.history,
                model=self.logits_module().eval(),
                tta=self.hparams.get("tta", "none"),
                about={
                    "model": {"class": type(self).__name__}
                    | {k: self.hparams[k] for k in ("backbone", "weights", "init_from") if k in self.hparams},
                    "data": {"root": str(dm.target_root if name == "target" else dm.root), "split": split},
                },
            )
            summary[name] = metrics["accuracy"]
        if len(summary) > 1:
            self.print("tl: accuracy " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
        self.outputs = []

    # -- predict -------------------------------------------------------------------------------

    def collect_predictions(self, batch: Any) -> torch.Tensor:
        """A predict batch's class probabilities, kept for predictions.csv."""
        from tl_cli.data.datasets import UNREADABLE

        x, label, index = batch
        probs = self.predict_logits(x).float().softmax(1)
        self.outputs.append({"probs": probs.cpu(), "index": index.cpu(), "unreadable": (label == UNREADABLE).cpu()})
        return probs

    def report_predictions(self) -> None:
        """Write predictions.csv (rank 0) from every rank's outputs."""
        from tl_cli.data.screening import inspect_image
        from tl_cli.reports.files import write_predictions

        got = gather_outputs(self.outputs, ("probs", "index", "unreadable"))
        self.outputs = []
        out = self.out_dir() / "predictions.csv"
        if not self.trainer.is_global_zero:
            return
        paths = self.trainer.datamodule.paths("predict")
        files = [paths[i] for i in got["index"].tolist()]
        bad = got["unreadable"].nonzero().flatten().tolist()
        errors = {row: inspect_image(files[row], digest=False)["error"] or "unreadable" for row in bad}
        write_predictions(out, self.class_names, files, got["probs"], errors=errors)
        self.print(f"tl: predictions for {len(files) - len(errors)} images written to {out}")
        for row, problem in errors.items():
            self.print(f"tl: warning: {files[row]}: {problem} (an error row in predictions.csv)")
