"""User-facing errors (one clear paragraph, no traceback) and deprecation notices."""

import os
import sys


class TLError(Exception):
    """A mistake in the user's input (data, config, files) that tl explains and stops on.

    `tl` prints the message alone and exits with status 2; everything else is a bug and keeps
    its traceback.
    """


class WeightsUnavailableError(TLError):
    """Pretrained weights were asked for but cannot be downloaded or found in the cache."""


def described(exc: BaseException, limit: int = 200) -> str:
    """``Name: first line of the message`` (just the name when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return type(exc).__name__ + (f": {lines[0][:limit]}" if lines else "")


def find_tl_error(exc: BaseException) -> "TLError | None":
    """The user mistake behind `exc`, if any (jsonargparse wraps errors raised while it
    instantiates a class into its own)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, TLError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def warn_deprecated(old: str, new: str) -> None:
    """Say, in one line on standard error, that config key `old` is now `new`.

    Printed once per run: by rank 0 only (the rank variables of torchrun and SLURM).
    """
    rank = next((os.environ[k] for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK") if os.environ.get(k, "").isdigit()), "0")
    if int(rank) == 0:
        print(f"tl: {old} is deprecated and will be removed in the next release: use {new}", file=sys.stderr)
