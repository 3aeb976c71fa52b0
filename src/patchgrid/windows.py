"""Blending windows: the weight each voxel of a patch gets when overlapping patches are merged.

L0 (imports only :mod:`patchgrid._checks`): the named windows (uniform, gaussian, hann,
triangular), their per-axis profiles where they are separable, and arrays checked against the
patch size. A merge checks its window once, through :func:`patchgrid._plan.checked_window`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _checks
from ._checks import PatchgridError

__all__ = ["WINDOWS", "window"]

WINDOWS = ("uniform", "gaussian", "hann", "triangular", "monai-gaussian")

# MONAI's gaussian: sigma = 0.125 * n per axis, and a floor of 1e-3 on the product.
MONAI_SIGMA_SCALE = 0.125
MONAI_FLOOR = 1e-3


def monai_gaussian(size: Sequence[int]) -> np.ndarray:
    """MONAI's gaussian importance map (``compute_importance_map(size, "gaussian")``), made as
    MONAI makes it: per axis ``exp(x**2 / (-2 sigma**2))`` over ``x = -(n-1)/2 .. (n-1)/2`` in
    float32 with ``sigma = 0.125 n``, their product, and every weight raised to at least
    ``max(min, 1e-3)``. The floor makes it not separable. Float64 values of float32 weights
    (NumPy's ``exp`` may differ from torch's in the last float32 bit)."""
    out: np.ndarray | None = None
    for n in size:
        sigma = n * MONAI_SIGMA_SCALE
        x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)
        x = np.exp(x**2 / np.float32(-2 * sigma**2))
        out = x if out is None else out[..., None] * x
    assert out is not None
    floor = np.float32(max(float(out.min()), MONAI_FLOOR))
    floored: np.ndarray = np.maximum(out, floor).astype(np.float64)
    return floored


def _profile(name: str, n: int) -> np.ndarray:
    """One axis of a named, separable window of length ``n`` (float64, never zero)."""
    i = np.arange(n, dtype=np.float64)
    c = (n - 1) / 2
    if name == "uniform":
        return np.ones(n)
    if name == "gaussian":
        s = n / 8
        return np.exp(-((i - c) ** 2) / (2 * s * s))
    if name == "hann":
        return np.sin(np.pi * (i + 1) / (n + 1)) ** 2
    return 1 - np.abs(2 * i - (n - 1)) / (n + 1)


def profiles(window: Any, size: Sequence[int]) -> list[np.ndarray] | None:
    """Per-axis profiles of a separable window, or None for an array window.

    ``None`` and ``"uniform"`` give profiles of ones.
    """
    if window is None:
        window = "uniform"
    if isinstance(window, str):
        _checks.choice(window, WINDOWS, "window")
        if window == "monai-gaussian":
            return None  # its floor makes it an array window
        return [_profile(window, n) for n in size]
    return None


def as_window_array(window: Any, size: Sequence[int]) -> np.ndarray:
    """Check an array window: finite, non-negative, not all zero, of the patch's tiled shape."""
    if isinstance(window, str) and window == "monai-gaussian":
        return monai_gaussian(size)
    if isinstance(window, str) or window is None:
        return window_nd(profiles(window, size))  # type: ignore[arg-type]
    try:
        arr = np.asarray(window, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"window must be None, one of {WINDOWS} or an array, got {type(window).__name__}"
        ) from None
    if arr.shape != tuple(size):
        raise PatchgridError(
            f"window must have the patch's shape along the tiled axes, {tuple(size)}, "
            f"got an array of shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise PatchgridError("window must hold finite, non-negative weights")
    if not np.any(arr > 0):
        raise PatchgridError("window must have at least one positive weight, got all zeros")
    return arr


def window_nd(profs: Sequence[np.ndarray]) -> np.ndarray:
    """Outer product of per-axis profiles."""
    out = np.ones(())
    for p in profs:
        out = np.multiply.outer(out, p)
    return out


def window(name: str, size: int | Sequence[int]) -> np.ndarray:
    """The blending window ``name`` for a patch of ``size``, as a float64 array.

    Parameters
    ----------
    name : {"uniform", "gaussian", "hann", "triangular", "monai-gaussian"}
        Per axis of length ``n``, with ``i = 0 .. n-1`` and ``c = (n - 1) / 2``:

        - uniform: ``1``
        - gaussian: ``exp(-(i - c)**2 / (2 s**2))`` with ``s = n / 8`` (nnU-Net's and MONAI's)
        - hann: ``sin(pi (i + 1) / (n + 1))**2``, a Hann window of ``n + 2`` without its zeros
        - triangular: ``1 - |2i - (n - 1)| / (n + 1)``
        - monai-gaussian: MONAI's own (``compute_importance_map``): the gaussian with
          ``s = n / 8`` made in float32, the product raised to at least ``max(min, 1e-3)``,
          so that blends equal MONAI's ``sliding_window_inference(mode="gaussian")``

        The N-D window is the outer product of the per-axis ones (monai-gaussian: with its
        floor). None is zero anywhere, so a blended merge never blanks the image's border.
    size : int or sequence of int
        Patch size along each tiled axis; an int gives a 1-D window.

    Returns
    -------
    numpy.ndarray
        Shaped ``size``, peak value 1 at the centre for odd sizes.

    Examples
    --------
    >>> import patchgrid as pg
    >>> pg.window("triangular", 3)
    array([0.5, 1. , 0.5])
    >>> pg.window("hann", (2, 2))
    array([[0.5625, 0.5625],
           [0.5625, 0.5625]])
    """
    sizes = _checks.per_axis(size, 1 if np.ndim(size) == 0 else len(size), "size")  # type: ignore[arg-type]
    if not sizes:
        raise PatchgridError("size must have at least one entry, got ()")
    return as_window_array(_checks.choice(name, WINDOWS, "window"), sizes)
