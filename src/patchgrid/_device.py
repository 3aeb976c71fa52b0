"""Layer L1: batches read in host memory sent to a model on a device (``apply(..., device=)``).

What lives here: :func:`model_device`, which settles ``device=`` against the image once, and
:class:`Upload`, which sends each batch read on the host to the device: from page-locked
(pinned) buffers, without blocking, on a stream of its own, so that the next batch is read and
sent while the model runs on this one (the reader thread of :mod:`patchgrid._batches` calls
:meth:`Upload.send`; the model's thread waits for the copy on the device, never on the host).

Imports: NumPy and the L0 modules ``_checks`` and ``backends``; torch only once a ``device=``
is given (``pip install 'patchgrid[torch]'``).
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from ._checks import PatchgridError
from .backends import Backend, backend_of


def model_device(image: Any, device: Any) -> tuple[Any, Any]:
    """``device=`` checked against ``image``: ``(device, host)``, where ``device`` is the
    torch device the model runs on (None where the batches stay where the image is: no
    ``device=``, or a tensor already there) and ``host`` the image as a host array to read
    batches from (a CPU tensor's NumPy view)."""
    if device is None:
        return None, image
    try:
        import torch
    except ImportError:
        raise PatchgridError(
            f"device={device!r} runs the model with torch, which is not installed: "
            f"pip install 'patchgrid[torch]'"
        ) from None
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise PatchgridError(
            f"device must be a torch device such as 'cuda', 'cuda:1' or 'cpu', got {device!r}"
        ) from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise PatchgridError(f"device={device!r}: torch sees no CUDA device on this machine")
    if isinstance(image, torch.Tensor):
        here = image.device
        if here.type == where.type and (where.index is None or here.index == where.index):
            return None, image  # the tensor is on the model's device already
        if here.type != "cpu":
            raise PatchgridError(
                f"device={device!r} runs the model on another device than the image's "
                f"({here}); move the tensor first (image.to({str(where)!r})) or give it on "
                f"the host"
            )
        host = backend_of(image).host(image)
        if host is None:
            raise PatchgridError(
                f"a CPU tensor of dtype {image.dtype} (or one that requires grad) cannot be "
                f"read as host memory for device={device!r}; pass image.detach() in a dtype "
                f"NumPy has, or move it to the device first"
            )
        return where, host
    return where, image


class Upload:
    """Sends host batches to ``device``: :meth:`send` in the reader's thread (a pinned
    buffer's copy queued on a side stream), :meth:`ready` in the model's (its stream waits for
    that copy). On the CPU, the batch is the host buffer itself, wrapped without a copy."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.xp: Backend = backend_of(torch.empty(0))
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        # Host tensors whose copy is still queued: they hold their pinned buffers, so that
        # the batch pool does not hand one out again before the device has read it.
        self._pending: collections.deque[tuple[Any, Any]] = collections.deque()

    def host_buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A host buffer for batches: page-locked for a CUDA device (copies from it need no
        staging and do not block), plain otherwise."""
        if not self.cuda:
            return np.empty(shape, dtype)
        t = self.torch
        pinned = t.empty(shape, dtype=self.xp.as_dtype(dtype), pin_memory=True)
        buf: np.ndarray = pinned.numpy()  # holds the pinned tensor
        return buf

    def prune(self) -> None:
        """Let go of the host batches whose copies are done (their buffers can be reused)."""
        while self._pending and self._pending[0][1].query():
            self._pending.popleft()

    def send(self, batch: np.ndarray) -> tuple[Any, Any]:
        """Queue ``batch``'s copy to the device: ``(tensor, event)`` (no event on the CPU)."""
        t = self.torch
        host = t.from_numpy(batch)
        if not self.cuda:
            return host.to(self.device), None
        with t.cuda.stream(self.stream):
            moved = host.to(self.device, non_blocking=True)
            event = t.cuda.Event()
            event.record(self.stream)
        self._pending.append((host, event))
        return moved, event

    def ready(self, sent: tuple[Any, Any]) -> Any:
        """The batch on the device, for the model's stream to use once the copy is done."""
        moved, event = sent
        if event is not None:
            stream = self.torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            moved.record_stream(stream)  # made on the side stream, used on this one
        return moved
