"""L5: the command line: the argument parser, :func:`main`, :func:`console` and signals.

``patchgrid COMMAND``: one subparser per command (info, extract, merge, apply, preview, demo),
each running its function in ``_commands``; the patch store is ``_store``'s. :func:`main`
refuses an output it must not write before any work, and reports what went wrong on stderr:
a library error in one line, its Python names rewritten as flags (:data:`TO_FLAGS`, applied by
:func:`shell_words`; warnings too); an error in the user's own code (``--model``) with the
frames of the user's files; with ``--debug`` (or ``PATCHGRID_DEBUG=1``) every frame. After an
interrupt it says what was left (as a rule, nothing: outputs move into place only when
complete, ``_writes``); a closed stdout (``| head``) ends it quietly. :func:`console` is the
script's entry: SIGTERM raised as an interrupt, the allocator tuned for a process of its own.

Imports: the public API as ``pg``, ``_commands``, ``io``, ``_writes``, ``_checks``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import re
import signal
import sys
import sysconfig
import traceback
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import patchgrid as pg

from . import _commands as commands
from . import _writes, io
from ._checks import PatchgridError, PatchgridWarning


def _ints(text: str) -> tuple[int, ...] | int:
    """``64`` or ``64,64,32``."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer or comma-separated integers like 64,64,32, got {text!r}"
        ) from None
    return parts[0] if len(parts) == 1 else tuple(parts)


def _positive_int(text: str) -> int:
    """A count such as ``--batch 16``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _positive_ints(text: str) -> tuple[int, ...] | int:
    """A shape such as ``--shape 64,64,32``: every length at least 1."""
    value = _ints(text)
    if any(v < 1 for v in (value if isinstance(value, tuple) else (value,))):
        raise argparse.ArgumentTypeError(
            f"expected lengths of at least 1 like 64 or 64,64,32, got {text!r}"
        )
    return value


def _numbers(text: str) -> Any:
    """``2``, ``0.25``, ``1/4`` or ``2,2,1``."""
    try:
        parts = [Fraction(p) for p in text.split(",")]
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected numbers like 2, 0.25 or 1/4, got {text!r}"
        ) from None
    values = [int(p) if p.denominator == 1 else p for p in parts]
    return values[0] if len(values) == 1 else tuple(values)


def _shard(text: str) -> tuple[int, int]:
    """``--shard 1/4``: part 1 of 4 (0-based)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N like 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return i, n


def _edges(text: str) -> str | tuple[str, ...]:
    parts = text.split(",")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _grid_args(p: argparse.ArgumentParser, *, size_required: bool = True) -> None:
    p.add_argument("--size", type=_ints, required=size_required, help="patch size: 64 or 64,64,32")
    p.add_argument(
        "--stride", type=_ints, default=None, help="step between patches (default: size)"
    )
    p.add_argument(
        "--edge",
        type=_edges,
        default="shift",
        help="drop, pad, shift or even, or one per axis: shift,shift,pad (default: shift, "
        "the last patch moved back to end at the border)",
    )
    p.add_argument(
        "--axes",
        type=_ints,
        default=None,
        help="tiled axes, e.g. 0,1,2 (default: a NIfTI file's spatial axes, the first three "
        "or as many as --size has entries; for other images every axis, or the last ones, as "
        "many as --size has entries)",
    )
    p.add_argument(
        "--pad-mode", default="constant", help="a numpy.pad mode for --edge pad (default: constant)"
    )
    p.add_argument(
        "--pad-value", type=float, default=0, help="value of --pad-mode constant (default: 0)"
    )


def _blend_args(p: argparse.ArgumentParser) -> None:
    """--window and --reduce, as merge and apply take them (the library's defaults)."""
    p.add_argument(
        "--window",
        default="uniform",
        help="uniform, gaussian, hann, triangular or monai-gaussian (MONAI's own, with its 1e-3 "
        "floor) (default: uniform)",
    )
    p.add_argument("--reduce", default="mean", help="mean, sum, max, min or argmax (default: mean)")


def build_parser() -> argparse.ArgumentParser:
    """The ``patchgrid`` parser: one subcommand each, its ``run`` the function to call."""
    parser = argparse.ArgumentParser(
        prog="patchgrid",
        description="Cut N-dimensional images into patches and put them back together.",
        epilog="Run 'patchgrid COMMAND --help' for each command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"patchgrid {pg.__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_info_args, _extract_args, _merge_args, _apply_args, _preview_args, _demo_args):
        add(sub)
    for command in sub.choices.values():  # --debug after the command too; SUPPRESS keeps one
        command.add_argument(  # given before it
            "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
        )
    return parser


def _command(sub: Any, name: str, help: str, epilog: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog
    )
    return parser


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output that patchgrid wrote (default: off)",
    )


def _info_args(sub: Any) -> None:
    p = _command(
        sub,
        "info",
        "describe a grid over an image: counts, coverage, padding, memory",
        "example:\n  patchgrid info scan.nii.gz --size 64 --stride 32 --edge shift\n"
        "  patchgrid info --shape 256,256,256 --size 64 --stride 48",
    )
    p.add_argument(
        "image", nargs="?", help="image file (.nii, .nii.gz, .tif, .zarr, .h5:dataset, .npy)"
    )
    p.add_argument(
        "--shape",
        type=_positive_ints,
        default=None,
        help="describe a grid over this shape instead of a file (default: none, give IMAGE)",
    )
    p.add_argument("--dtype", default="float32", help="dtype for --shape (default: float32)")
    _grid_args(p)
    p.set_defaults(run=commands.info)


def _extract_args(sub: Any) -> None:
    p = _command(
        sub,
        "extract",
        "cut an image into patches: one zarr store, or one file per patch",
        "examples:\n"
        "  patchgrid extract scan.nii.gz --size 64 --stride 32 -o patches.zarr\n"
        "  patchgrid extract scan.nii.gz --size 64 -o patches/ --format nii",
    )
    p.add_argument("image", help="image file")
    p.add_argument("-o", "--output", required=True, help="OUT.zarr, or a folder (with --format)")
    p.add_argument(
        "--format",
        choices=sorted(commands.SUFFIX),
        default=None,
        help="one file per patch in a folder (default: none, one .zarr store)",
    )
    p.add_argument(
        "--batch",
        type=_positive_int,
        default=16,
        help="patches read and written at a time (default: 16)",
    )
    _overwrite_arg(p)
    _grid_args(p)
    p.set_defaults(run=commands.extract)


def _merge_args(sub: Any) -> None:
    p = _command(
        sub,
        "merge",
        "put patches from 'extract' back into an image",
        "example:\n  patchgrid merge patches.zarr -o restored.nii.gz --window gaussian",
    )
    p.add_argument(
        "patches", help="a .zarr store or a folder of patch files written by 'patchgrid extract'"
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output image (.nii.gz, .tif, .zarr, .h5:dataset, .npy)",
    )
    _blend_args(p)
    p.add_argument(
        "--dtype", default=None, help="output dtype (default: the source's, for mean, max, min)"
    )
    p.add_argument(
        "--fill", type=float, default=0, help="value of voxels no patch covers (default: 0)"
    )
    p.add_argument(
        "--batch", type=_positive_int, default=16, help="patches read at a time (default: 16)"
    )
    _overwrite_arg(p)
    p.set_defaults(run=commands.merge)


def _apply_args(sub: Any) -> None:
    p = _command(
        sub,
        "apply",
        "run a function over every patch and blend the outputs",
        "example:\n"
        "  patchgrid apply scan.nii.gz --model mymodels.py:segment --size 96 --stride 48 \\\n"
        "      --axes 0,1,2 --reduce argmax -o labels.nii.gz\n"
        "The function takes a batch (B, *patch) as a NumPy array and returns (B, *out_patch).",
    )
    p.add_argument("image", help="image file")
    p.add_argument("--model", required=True, help="module:function or path/file.py:function")
    p.add_argument("-o", "--output", required=True, help="output image")
    _blend_args(p)
    p.add_argument(
        "--batch-size", type=_positive_int, default=4, help="patches per call (default: 4)"
    )
    p.add_argument(
        "--margin", type=_ints, default=0, help="voxels per side the model leaves out (default: 0)"
    )
    p.add_argument(
        "--scale",
        type=_numbers,
        default=1,
        help="output voxels per input voxel: 2, 0.25 (default: 1)",
    )
    p.add_argument("--dtype", default=None, help="output dtype (default: the model's)")
    p.add_argument(
        "--fill", type=float, default=0, help="value of voxels no patch covers (default: 0)"
    )
    p.add_argument(
        "--tta",
        choices=["flips"],
        default=None,
        help="flips: average the model over every mirroring of the tiled axes (default: none)",
    )
    p.add_argument(
        "--mask",
        default=None,
        help="an image file: run only the patches whose core holds foreground (> 0) in it, at "
        "the image's shape or coarser by an integer factor (default: every patch)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="a .zarr output records the rows it finished; run again with --resume to go on "
        "where a killed run stopped (default: off)",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        default=None,
        help="I/N: write the I-th of N parts of a .zarr output (0-based); N processes make "
        "the whole (default: the whole)",
    )
    _overwrite_arg(p)
    _grid_args(p)
    p.set_defaults(run=commands.apply)


def _preview_args(sub: Any) -> None:
    p = _command(
        sub,
        "preview",
        "draw the grid over three orthogonal slices (PNG)",
        "example:\n  patchgrid preview scan.nii.gz --size 64 --stride 48 --edge shift -o grid.png",
    )
    p.add_argument("image", help="image file")
    p.add_argument("-o", "--output", required=True, help="a .png file")
    _overwrite_arg(p)
    _grid_args(p)
    p.set_defaults(run=commands.preview)


def _demo_args(sub: Any) -> None:
    p = _command(
        sub,
        "demo",
        "extract, merge and preview a built-in synthetic volume",
        "example:\n  patchgrid demo\n"
        "  patchgrid demo --shape 10,20,30 --size 4 --stride 2 --window gaussian",
    )
    p.add_argument(
        "--shape",
        type=_positive_ints,
        default=(10, 20, 30),
        help="volume shape (default: 10,20,30)",
    )
    p.add_argument("--size", type=_ints, default=4, help="patch size (default: 4)")
    p.add_argument("--stride", type=_ints, default=2, help="stride (default: 2)")
    p.add_argument(
        "--edge", type=_edges, default="shift", help="drop, pad, shift or even (default: shift)"
    )
    p.add_argument(
        "--window",
        default="uniform",
        help="uniform, gaussian, hann, triangular or monai-gaussian (MONAI's own, with its 1e-3 "
        "floor) (default: uniform)",
    )
    p.add_argument(
        "--dir",
        default="patchgrid-demo",
        help="where to write the demo's files (default: patchgrid-demo)",
    )
    # The demo runs the command line itself, for its files.
    p.set_defaults(run=functools.partial(commands.demo, main=main))


DEBUG_HELP = "on an error, print the whole traceback (default: off; PATCHGRID_DEBUG=1 turns it on)"


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, Slurm, Docker), raised as an interrupt so that the same clean-up runs."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def console() -> None:
    """The ``patchgrid`` command: :func:`main` in a process of its own."""
    try:
        signal.signal(signal.SIGTERM, _terminate)
        pg.tune_allocator()  # the command owns its process: keep resident memory flat
        code = main()
    except KeyboardInterrupt as exc:  # before main could say so itself
        code = _interrupted("patchgrid", exc, 0)
    # The work is done: a signal now would only cut the interpreter's shutdown short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


def _interrupted(command: str, exc: BaseException, mark: int) -> int:
    """Say in one line that the command was stopped and what it left (as a rule, nothing:
    outputs are moved into place only when complete); the exit status of the signal."""
    with _writes.signals_held(resend=False):  # a second Ctrl-C does not cut this short
        _writes.settle_writers()  # zarr's writes under way end before the process does
        left = [path for path in _writes.written[mark:] if os.path.lexists(path)]
        what = f"wrote {', '.join(left)} before that" if left else "nothing was written"
        word = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"{command}: {word}; {what}", file=sys.stderr)
    return 128 + (15 if isinstance(exc, Terminated) else 2)


def check_output(args: argparse.Namespace) -> None:
    """Refuse, before any work, an output the command must not write: a link, its input,
    or (even with --overwrite) an existing file or folder that is not patchgrid's output."""
    out = getattr(args, "output", None)
    if out is None or not hasattr(args, "overwrite"):
        return
    inputs = [getattr(args, "patches", None) or args.image]
    if getattr(args, "resume", False) or getattr(args, "shard", None) is not None:
        if os.path.islink(out.rstrip("/")):
            raise PatchgridError(f"-o {out} is a symbolic link; give the .zarr folder itself")
        return  # an output of a run in parts is checked as ours when it is opened
    if args.command == "extract":
        store = args.format is None and out.rstrip("/").lower().endswith(".zarr")
        if store or args.format is not None or out.endswith(("/", os.sep)):
            kind = "zarr" if store else "patches"
            io.check_target(
                out.rstrip("/") or out, overwrite=args.overwrite, kind=kind, inputs=inputs
            )
    elif args.command == "preview":
        if out.lower().endswith(".png"):
            io.check_target(out, overwrite=args.overwrite, kind="file", inputs=inputs)
    else:
        try:
            io.split_path(out)
        except PatchgridError:
            return  # the command says so, in its turn
        io.check_output(out, overwrite=args.overwrite, inputs=inputs)


# The library's messages name Python's parameters; the command line's name its flags. Each rule
# is (pattern, replacement), applied in order by shell_words.
_PARAMS = "overwrite|edge|axes|size|stride|pad_mode|pad_value|window|reduce|dtype|fill|margin|scale"
_VALUE = r"'[^']*'(?:(?:,| or| and) '[^']*')*|\([^()]*\)|[^\s,;()]+"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _typed(value: str) -> str:
    """A value as Python shows it, as it is typed: 'pad' -> pad, (1, 2) -> 1,2, 300.0 -> 300."""
    if value.startswith("("):
        return ",".join(_typed(v.strip()) for v in value[1:-1].split(",") if v.strip())
    value = re.sub(r"'([^']*)'", r"\1", value)
    return value[:-2] if re.fullmatch(r"-?\d+\.0", value) else value


def _assignment(m: re.Match[str]) -> str:
    """``edge='pad'`` -> ``--edge pad``, ``overwrite=True`` -> ``--overwrite``, ``dtype=`` ->
    ``--dtype``."""
    value = m.group(2)
    return _flag(m.group(1)) + ("" if value in (None, "True") else f" {_typed(value)}")


def _axes_hint(m: re.Match[str]) -> str:
    """A patch larger than a short axis: that axis may be one not to tile."""
    if "--axes" in m.string:
        return m.group(0)
    return (
        f"{m.group(0)}; if axis {m.group(1)} holds channels or time, leave it out of the tiled "
        f"axes with --axes"
    )


def _listed(m: re.Match[str]) -> str:
    """``size (8, 8, 8)`` -> ``size 8,8,8``; choices ``('drop', 'pad')`` -> ``drop, pad``."""
    words = m.group(2)
    return m.group(1) + (
        re.sub(r"'([^']*)'", r"\1", words[1:-1]) if "'" in words else _typed(words)
    )


TO_FLAGS: list[tuple[str, str | Callable[[re.Match[str]], str]]] = [
    (r"\b\w+=True \((--[\w-]+)\)", r"\1"),  # overwrite=True (--overwrite) -> --overwrite
    (r"Fraction\((-?\d+), (\d+)\)", r"\1/\2"),  # Fraction(1, 3) -> 1/3
    (r" \(or an out=\)", ""),  # the command line has no out=
    (r"\ban int size\b", "a single --size"),
    (r"\b(size as a tuple \(here )(\([\d, ]+\))", _listed),
    (r"\bsize as a tuple\b", "--size per axis"),
    (r"\ba fill that\b", "a --fill that"),
    (rf"\b({_PARAMS})=({_VALUE})?", _assignment),  # edge='pad' -> --edge pad
    (rf"^({_PARAMS})\b", lambda m: _flag(m.group(1))),  # a message about a parameter
    (r"\b(pad_mode|pad_value|batch_size)\b", lambda m: _flag(m.group(1))),
    (r"\b((?:size|stride|axes|margin) )(\(\d+(?:, \d+)*,?\))", _listed),
    (r"\b(got )(\(\d+(?:, \d+)*,?\))", _listed),  # got (0, 0) -> got 0,0
    (r"()(\('[^']*'(?:, '[^']*')+\))", _listed),  # ('drop', 'pad') -> drop, pad
    (r"on axis (\d+) is larger than the image there.*", _axes_hint),
]


def shell_words(text: str) -> str:
    """A library message as the command line says it: Python's parameters as flags
    (``edge='pad'`` -> ``--edge pad``, ``axes=(0, 1, 2)`` -> ``--axes 0,1,2``,
    ``batch_size`` -> ``--batch-size``), tuples of sizes as comma lists."""
    for pattern, replacement in TO_FLAGS:
        text = re.sub(pattern, replacement, text)
    return text


# Files of patchgrid itself, of installed packages and of Python's own library.
_NOT_USERS = tuple(
    os.path.join(os.path.abspath(p), "")
    for p in {
        os.path.dirname(__file__),
        *(sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")),
    }
)


def _users_file(path: str | None) -> bool:
    if not path or path.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return False
    return not os.path.abspath(path).startswith(_NOT_USERS)


def user_frames(exc: BaseException) -> list[traceback.FrameSummary]:
    """The frames of the user's own files (a ``--model``) that ``exc`` went through."""
    return [f for f in traceback.extract_tb(exc.__traceback__) if _users_file(f.filename)]


def report(command: str, exc: BaseException, debug: bool) -> None:
    """Say what went wrong on stderr: an error in the user's code with its frames (patchgrid's
    left out), any other in one line with the flags' names; with ``debug``, every frame."""
    if debug:
        traceback.print_exception(exc)
    frames = user_frames(exc)
    syntax = isinstance(exc, SyntaxError) and _users_file(exc.filename)
    if frames or syntax:
        if not debug:
            print(
                f"{command}: error in your code (--debug shows patchgrid's frames too):\n"
                "Traceback (most recent call last):\n"
                + "".join(traceback.format_list(frames))
                + "".join(traceback.format_exception_only(exc)).rstrip(),
                file=sys.stderr,
            )
        return
    text = shell_words(str(exc))
    known = (PatchgridError, ValueError, TypeError, OSError, ImportError, EOFError)
    kind = "" if isinstance(exc, known) else f"{type(exc).__name__}: "
    print(f"{command}: error: {kind}{text}", file=sys.stderr)


def _warn(command: str) -> Callable[..., None]:
    """Warnings as the command line says them: ``patchgrid merge: warning: ...``, in flags."""
    python = warnings.showwarning

    def show(message: Any, category: Any, *args: Any, **kw: Any) -> None:
        if not issubclass(category, PatchgridWarning):
            return python(message, category, *args, **kw)
        print(f"{command}: warning: {shell_words(str(message))}", file=sys.stderr)

    return show


def _pipe_closed() -> int:
    """stdout's reader went away (``patchgrid demo | head``): stop quietly, as Unix tools do
    (they die of SIGPIPE), sending what is left to /dev/null rather than failing again on
    the way out."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + 13  # SIGPIPE


def _debug(args: Any) -> bool:
    env = os.environ.get("PATCHGRID_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return bool(getattr(args, "debug", False)) or env


def main(argv: Sequence[str] | None = None, *, quiet: bool = False) -> int:
    """Run the command line; returns the exit status. Errors print one line with the flags'
    names, an error in the user's code its own frames, ``--debug`` (or ``PATCHGRID_DEBUG=1``)
    every frame; an interrupt (Ctrl-C, or SIGTERM under :func:`console`) leaves nothing and
    returns 130 (143); a closed stdout (``| head``) ends quietly with 141."""
    mark, command, args = len(_writes.written), "patchgrid", None
    try:
        args = build_parser().parse_args(argv)
        command = f"patchgrid {args.command}"
        # The command line reports file errors itself, in one line: quiet the readers' logs.
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)
        check_output(args)
        with warnings.catch_warnings():
            if not _debug(args):
                warnings.showwarning = _warn(command)
            if quiet:
                with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                    return int(args.run(args))
            code = int(args.run(args))
        sys.stdout.flush()  # here, not on the way out, so that a closed pipe is caught
        return code
    except KeyboardInterrupt as exc:
        if quiet:
            raise
        if _debug(args):
            traceback.print_exception(exc)
        return _interrupted(command, exc, mark)
    except Exception as exc:
        if quiet:
            raise
        if isinstance(exc, BrokenPipeError) and not user_frames(exc):
            return _pipe_closed()
        report(command, exc, _debug(args))
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
