"""Imported by the DataLoader workers' fork server (`tl_cli.data.datasets.worker_context`) only.

SLURM signals every process of a job step (``--signal=SIGUSR1@90``), whose default action
would kill the fork server, and then no loader could start workers after a preemption notice.
`worker_context` starts the server with SIGUSR1 blocked; this covers a server that
multiprocessing relaunches on its own later, outside that block. The workers ignore it too
(`ignore_preemption_signal`); the ranks handle it."""

import signal

signal.signal(signal.SIGUSR1, signal.SIG_IGN)
