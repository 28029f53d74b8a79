"""Imported by the DataLoader workers' fork server (`tl_cli.datasets.worker_context`) only.

SLURM signals every process of a job step, and ``--signal=SIGUSR1@90`` would kill the fork
server (default action), so that any loader started after a preemption notice could not start
its workers. The workers ignore it too (`ignore_preemption_signal`); the ranks handle it."""

import signal

signal.signal(signal.SIGUSR1, signal.SIG_IGN)
