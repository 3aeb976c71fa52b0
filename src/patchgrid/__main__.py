"""``python -m patchgrid``: the command line (L5, :func:`patchgrid.cli.console`)."""

from .cli import console

console()
