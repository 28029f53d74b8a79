"""Loaded by every Python process of a test that puts this folder first on PYTHONPATH: logs each
file opened under $TL_AUDIT_ROOT to $TL_AUDIT_LOG.<pid> (Python's audit hooks see builtins.open
and os.open, so PIL, shutil and the DataLoader workers alike)."""

import os
import sys

_ROOT = os.environ.get("TL_AUDIT_ROOT")
_LOG = os.environ.get("TL_AUDIT_LOG")


def _hook(event, args):
    if event == "open" and _ROOT and _LOG:
        path = args[0]
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if isinstance(path, str) and os.path.abspath(path).startswith(_ROOT + os.sep):
            with open(f"{_LOG}.{os.getpid()}", "a") as log:
                log.write(os.path.abspath(path) + "\n")


if _ROOT and _LOG:
    sys.addaudithook(_hook)
