"""``python -m patchgrid``: the command line."""

from .cli import console

console()
