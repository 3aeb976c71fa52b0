"""L0: the one progress helper, for ``apply`` (``progress=``), the Dask path and the CLI.

What the ``progress`` option means, decided here once: ``None`` shows a tqdm bar when stderr
is a terminal, ``True`` always, ``False`` never, and a callable is called as
``progress(done, total)``. tqdm is imported only when a bar is shown.

Imports only the standard library (and tqdm, lazily).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class Progress:
    """Counts patches done out of ``total`` and shows them as ``progress`` asks.

    ``update(n)`` adds ``n`` done; ``reached(done, total)`` sets both (a total that grows, as
    where a patch is read once per tile it reaches); ``close()`` ends a bar. A context manager
    that closes on exit.
    """

    def __init__(self, progress: Any, total: int, desc: str = "patchgrid") -> None:
        self.callback: Callable[[int, int], Any] | None = progress if callable(progress) else None
        self.total = total
        self.done = 0
        self.bar: Any = None
        show = sys.stderr.isatty() if progress is None else bool(progress)
        if self.callback is None and show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="patch", desc=desc, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)
        elif self.bar is not None:
            self.bar.update(n)

    def reached(self, done: int, total: int) -> None:
        step, self.done, self.total = done - self.done, done, total
        if self.callback is not None:
            self.callback(done, total)
        elif self.bar is not None:
            self.bar.total = total
            self.bar.update(step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def steps(
    progress: Any, total: int, desc: str = "patchgrid"
) -> tuple[Callable[[int], None], Callable[[], None]]:
    """``(update, close)`` for the ``progress`` option: ``update(n)`` adds ``n`` patches done."""
    counter = Progress(progress, total, desc)
    return counter.update, counter.close
