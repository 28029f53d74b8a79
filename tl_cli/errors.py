"""User-facing errors: one clear paragraph, no traceback."""


class TLError(Exception):
    """A mistake in the user's input (data, config, files) that tl explains and stops on.

    `tl` prints the message alone and exits with status 2; everything else is a bug and keeps
    its traceback.
    """


class WeightsUnavailableError(TLError):
    """Pretrained weights were asked for but cannot be downloaded or found in the cache."""
