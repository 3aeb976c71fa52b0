"""L0: what the file formats need beyond their libraries: NIfTI headers carried from a source,
what is wrong with a ``.npy`` file NumPy refused, a TIFF file's spacing.

**A NIfTI header carried.** A patch, a merged image or a model's output keeps the source's
whole header (codes, units, description, intent, extensions...); :func:`carry` changes only
what the new array changes:

- the shape, and the data type (stored unscaled: ``scl_slope``/``scl_inter`` are left for
  nibabel to write as 1 and 0, never a rescaling that would round the data);
- the qform and the sform, each moved by the voxel transform that takes the source's affine
  to the new one (a patch's offset, a finer voxel size), each keeping its code;
- ``cal_min``/``cal_max`` (the display range), cleared when the values are of another type
  than the source's (labels, probabilities); the slice timing (``slice_start``,
  ``slice_end``, ``slice_code``, ``slice_duration``), cleared when the slice axis is cut or
  moved, where it no longer describes the slices; ``toffset`` moved with a cut time axis.

:func:`to_text` and :func:`from_text` keep a header (with its extensions) in JSON, for the
patch stores and folders of ``patchgrid extract``; :func:`read` and :func:`write` are
``io``'s NIfTI reader and writer.

Imports NumPy and the standard library only: nibabel and tifffile's objects come in as
arguments (``io.need`` imports them).
"""

from __future__ import annotations

import ast
import base64
import builtins
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

SLICE_TIMING = ("slice_start", "slice_end", "slice_code", "slice_duration")


def carry(
    nib: Any,
    source: Any,
    values: Any,
    data: np.ndarray,
    spacing: Sequence[float],
    affine: np.ndarray | None,
    corner: Sequence[int] | None = None,
) -> Any:
    """A copy of the ``source`` header for ``data``.

    ``values`` is the dtype of the source's values (after its scaling), ``spacing`` and
    ``affine`` the new image's, ``corner`` where the new image starts in the source (a
    patch), in voxels along every axis.
    """
    header = source.copy()
    old_shape = header.get_data_shape()
    if old_shape != data.shape:
        unused = header["pixdim"][len(old_shape) + 1 :].copy()  # set_data_shape makes them 1
        header.set_data_shape(data.shape)
        if data.ndim == len(old_shape):
            header["pixdim"][data.ndim + 1 :] = unused
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(None, None)  # nibabel writes 1, 0: the values as they are
    if np.dtype(values).newbyteorder("=") != data.dtype.newbyteorder("="):
        header["cal_min"] = header["cal_max"] = 0
    if affine is not None:
        _move_forms(header, np.asarray(affine, dtype=np.float64))
    corner = [0] * data.ndim if corner is None else list(corner)
    axis = header.get_dim_info()[2]
    if axis is not None and (
        axis >= data.ndim or old_shape[axis] != data.shape[axis] or corner[axis] != 0
    ):
        for key in SLICE_TIMING:
            header[key] = 0
    if data.ndim > 3 and len(corner) > 3 and corner[3]:
        header["toffset"] = header["toffset"] + corner[3] * header.get_zooms()[3]
    zooms = tuple(float(s) for s in spacing[: data.ndim])
    if len(zooms) == data.ndim and zooms != tuple(float(z) for z in header.get_zooms()):
        header.set_zooms(zooms)
    return header


def _move_forms(header: Any, affine: np.ndarray) -> None:
    """Move the qform and the sform by the voxel transform from the header's affine to
    ``affine``; where that cannot say it (a header with neither form), set the sform."""
    best = header.get_best_affine()
    if np.allclose(best, affine, rtol=1e-6, atol=1e-6):
        return
    try:
        move = np.linalg.solve(best, affine)
    except np.linalg.LinAlgError:
        move = None
    if move is not None:
        for form in ("qform", "sform"):
            code = int(header[f"{form}_code"])
            moved = getattr(header, f"get_{form}")() @ move
            if code > 0 and form == "qform" and np.allclose(move[:3, :3], np.eye(3)):
                # A shift (a patch): only the offset changes, the quaternion stays as it was.
                for axis, value in zip("xyz", moved[:3, 3]):
                    header[f"qoffset_{axis}"] = value
            elif code > 0:
                getattr(header, f"set_{form}")(moved, code=code)
    if not np.allclose(header.get_best_affine(), affine, rtol=1e-5, atol=1e-4):
        header.set_sform(affine, code=int(header["sform_code"]) or "aligned")


def to_text(header: Any) -> str:
    """The header and its extensions, as base64 text."""
    out = io.BytesIO()
    header.copy().write_to(out)
    return base64.b64encode(out.getvalue()).decode("ascii")


def from_text(nib: Any, text: str) -> Any:
    """The header :func:`to_text` wrote."""
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    kind = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
    header = kind.from_fileobj(io.BytesIO(raw))
    header["vox_offset"] = 0  # nibabel places the data after the extensions when it writes
    return header


def read(nib: Any, file: str) -> tuple[Any, list[float], np.ndarray, dict[str, Any]]:
    """A NIfTI file's lazy data (nibabel's proxy), spacing, affine, and ``meta``: the dtype
    of its values (a float type where the file scales them) and its header."""
    img = nib.load(file)
    proxy = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    scaled = (slope != 1.0 and not np.isnan(slope)) or (inter != 0.0 and not np.isnan(inter))
    dtype = np.asarray(proxy[(0,) * len(img.shape)]).dtype if scaled else img.get_data_dtype()
    zooms = img.header.get_zooms()
    spacing = [float(z) for z in zooms] + [1.0] * (len(img.shape) - len(zooms))
    return proxy, spacing, img.affine, {"dtype": dtype, "header": img.header}


def write(
    nib: Any,
    path: str,
    data: np.ndarray,
    spacing: Sequence[float],
    affine: Any,
    like: Any,
    corner: Sequence[int] | None = None,
) -> None:
    """``data`` as a NIfTI file. With ``like`` a NIfTI image (an ``io.Image`` or
    ``io.Metadata`` whose ``meta`` holds a header), its whole header, adjusted (:func:`carry`);
    else a new header with ``spacing`` and ``affine`` (spacing on the diagonal if None)."""
    source = like.meta.get("header") if getattr(like, "format", None) == "nifti" else None
    if source is not None:
        header = carry(nib, source, like.dtype, data, spacing, affine, corner)
        kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        nib.save(kind(data, None, header=header), path)
        return
    if affine is None:
        affine = np.diag([*spacing[:3], *([1.0] * (3 - min(3, len(spacing)))), 1.0])
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(data.dtype)
    img.header.set_zooms(tuple(spacing[: data.ndim]))
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, path)


def npy_problem(file: str, exc: Exception) -> str:
    """What is wrong with a ``.npy`` file that NumPy refused, in one line: NumPy's own words
    name a tokenizer or a mmap, not the file's header or length."""
    magic = b"\x93NUMPY"
    with builtins.open(file, "rb") as f:
        prefix = f.read(12)
        if not prefix.startswith(magic):
            return f"it does not start with the .npy signature {magic!r} (got {prefix[:8]!r})"
        major = prefix[6] if len(prefix) > 6 else -1
        if major not in (1, 2, 3) or len(prefix) < 10:
            return f"unknown .npy format version {major} (NumPy writes 1, 2 and 3)"
        width = 2 if major == 1 else 4
        length = int.from_bytes(prefix[8 : 8 + width], "little")
        f.seek(8 + width)
        text = f.read(length)
        data_bytes = os.fstat(f.fileno()).st_size - (8 + width + length)
    if len(text) < length:
        return f"its header should be {length} bytes long but the file ends after {len(text)}"
    if length > 10_000:
        return f"its header is {length:,} bytes long, more than the 10,000 NumPy accepts"
    shown = text.decode("latin1").strip()
    try:
        header = ast.literal_eval(shown)
        ok = isinstance(header, dict) and {"descr", "fortran_order", "shape"} <= set(header)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        ok = False
    if not ok:
        cut = shown if len(shown) <= 80 else shown[:77] + "..."
        return (
            f"its header is not a .npy header, a dict like {{'descr': '<f4', "
            f"'fortran_order': False, 'shape': (2, 3)}}: got {cut!r}"
        )
    try:
        dtype = np.dtype(header["descr"])
        need = math.prod(header["shape"]) * dtype.itemsize
    except Exception:
        return f"its header describes no array NumPy knows: {' '.join(str(exc).split())}"
    if data_bytes < need:
        return (
            f"its header says shape {tuple(header['shape'])} {dtype}, {need:,} bytes of data, "
            f"but the file holds {max(data_bytes, 0):,} (truncated?)"
        )
    return " ".join(str(exc).split()) or type(exc).__name__


def tiff_spacing(tif: Any, series: Any, meta: dict[str, Any], ndim: int) -> tuple[float, ...]:
    """Spacing from our own metadata, else ImageJ's z spacing and the x/y resolution tags."""
    if "spacing" in meta and len(meta["spacing"]) == ndim:
        return tuple(float(s) for s in meta["spacing"])
    spacing = [1.0] * ndim
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    tags = page.tags
    for name, axis in (("XResolution", ndim - 1), ("YResolution", ndim - 2)):
        if name in tags and axis >= 0:
            num, den = tags[name].value
            if num:
                spacing[axis] = den / num
    ij = tif.imagej_metadata or {}
    if "spacing" in ij and ndim >= 3:
        spacing[ndim - 3] = float(ij["spacing"])
    return tuple(spacing)
