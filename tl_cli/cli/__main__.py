"""``python -m tl_cli.cli``: the ``tl`` command."""

from tl_cli.cli.main import run

run()
