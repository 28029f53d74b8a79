"""tl's Lightning callbacks: freezing and unfreezing the backbone (listed in the configs), and
the ones tl's trainer always adds (preemption, exact resume, progress, expected duration, metric sync)."""

from tl_cli.callbacks.checkpoint import BestAndLast
from tl_cli.callbacks.freezing import BackboneFreezing, FreezeBackbone, UnfreezeSchedule
from tl_cli.callbacks.preemption import PreemptionCheckpoint
from tl_cli.callbacks.progress import ExpectedDuration, PlainProgress, SyncEpochMetrics, TLRichProgressBar
from tl_cli.callbacks.resume import ExactResume, ReplanSchedule

__all__ = [
    "BackboneFreezing",
    "BestAndLast",
    "ExactResume",
    "ExpectedDuration",
    "FreezeBackbone",
    "PlainProgress",
    "PreemptionCheckpoint",
    "ReplanSchedule",
    "SyncEpochMetrics",
    "TLRichProgressBar",
    "UnfreezeSchedule",
]
