"""Writes that lose nothing and say nothing false (issue #13, items 1 to 3).

1. ``overwrite`` replaces only an output patchgrid wrote, never an input, never through a link.
2. SIGINT and SIGTERM leave no temporary files and an existing output intact, say so in one
   line and exit 130 / 143; what a SIGKILL left is removed by the next run.
3. An output that appears while another run writes it is kept, never silently replaced.

The signal tests run the ``patchgrid`` command in processes of its own through a small driver
that slows zarr's chunk writes (or the start-up) down and says when it has got there, so the
signal always lands mid-write, whatever the machine's speed. They all run at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

zarr = pytest.importorskip("zarr")
pytest.importorskip("nibabel")
pytest.importorskip("tifffile")
pytest.importorskip("h5py")

import patchgrid as pg  # noqa: E402
import patchgrid.io as pio  # noqa: E402
from patchgrid import _store, _writes  # noqa: E402
from patchgrid.cli import main  # noqa: E402

SHAPE = (16, 16, 16)


def _volume(seed=0):
    return np.random.default_rng(seed).random(SHAPE).astype(np.float32)


def _read(path):
    with pg.open(path) as img:
        return np.asarray(img)


def cli(capsys, *argv):
    """Run the command line in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _snapshot(path):
    """Every file and folder under ``path`` (or the file itself), with the files' bytes."""
    path = str(path)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return {"": f.read()}
    found = {}
    for root, folders, names in os.walk(path):
        for name in folders:
            found[os.path.relpath(os.path.join(root, name), path) + "/"] = None
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                found[os.path.relpath(full, path)] = f.read()
    return found


def _debris(folder):
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A working folder holding ``vol.npy``, made the current directory."""
    np.save(tmp_path / "vol.npy", _volume())
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------- 1. overwrite: only what we wrote


def test_extract_into_the_folder_holding_the_input_is_refused(capsys, folder):
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub").mkdir()
    before = _snapshot(folder)
    code, _, err = cli(
        capsys, "extract", "vol.npy", "--size", 8, "-o", "./", "--format", "npy", "--overwrite"
    )
    assert (code, err.count("\n")) == (1, 1)
    assert "holds the input" in err
    assert _snapshot(folder) == before


def test_extract_over_a_folder_of_other_files_is_refused(capsys, folder):
    out = folder / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    before = _snapshot(out)
    code, _, err = cli(
        capsys, "extract", "vol.npy", "--size", 8, "-o", "out/", "--format", "npy", "--overwrite"
    )
    assert (code, err.count("\n")) == (1, 1)
    assert "'notes.txt'" in err
    assert _snapshot(out) == before


FOREIGN_FOLDERS = [
    ({"patch_000_000_000.npy": b"x"}, "has no manifest.json", "patch-files-only"),
    ({"manifest.json": b'{"name": "mine"}'}, "has no manifest.json", "other-manifest"),
    ({"manifest.json": b"[1, 2]"}, "has no manifest.json", "manifest-a-list"),
    ({"manifest.json": b'{"patchgrid": {}}', "a.txt": b"x"}, "'a.txt'", "with-other-files"),
]


@pytest.mark.parametrize(
    ("files", "said"), [f[:2] for f in FOREIGN_FOLDERS], ids=[f[2] for f in FOREIGN_FOLDERS]
)
def test_a_patch_folder_is_ours_only_with_patchgrids_manifest(tmp_path, files, said):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    with pytest.raises(FileExistsError, match=said):
        pio.check_target(out, overwrite=True, kind="patches")


def test_a_patch_folder_with_patchgrids_manifest_is_ours(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"patchgrid": {"version": 1}}')
    (out / "patch_000_001.nii.gz").write_bytes(b"x")
    pio.check_target(out, overwrite=True, kind="patches")


@pytest.mark.parametrize("inside", ["p.zarr/zarr.json", "p.zarr/patches"])
def test_an_output_inside_an_input_folder_is_refused(capsys, folder, inside):
    cli(capsys, "extract", "vol.npy", "--size", 8, "-o", "p.zarr")
    with pytest.raises(pg.PatchgridError, match=r"lies inside the input 'p\.zarr'"):
        pio.check_target(inside, overwrite=True, inputs=["p.zarr"])


def test_merge_over_a_folder_named_like_a_file_is_refused(capsys, folder):
    cli(capsys, "extract", "vol.npy", "--size", 8, "-o", "p.zarr")
    (folder / "outdir.npy").mkdir()
    (folder / "outdir.npy" / "keep.txt").write_text("mine")
    code, _, err = cli(capsys, "merge", "p.zarr", "-o", "outdir.npy", "--overwrite")
    assert (code, err.count("\n")) == (1, 1)
    assert "is a folder, not a .npy file" in err
    assert (folder / "outdir.npy" / "keep.txt").read_text() == "mine"


def test_merge_over_its_own_input_is_refused(capsys, folder):
    cli(capsys, "extract", "vol.npy", "--size", 8, "-o", "p.zarr")
    before = _snapshot(folder / "p.zarr")
    code, _, err = cli(capsys, "merge", "p.zarr", "-o", "p.zarr", "--overwrite")
    assert (code, err.count("\n")) == (1, 1)
    assert "is the input" in err
    assert _snapshot(folder / "p.zarr") == before


def test_output_through_a_link_is_refused_before_any_work(capsys, folder, monkeypatch):
    np.save(folder / "other.npy", _volume(seed=1))
    os.symlink("other.npy", folder / "link.npy")
    cli(capsys, "extract", "vol.npy", "--size", 8, "-o", "p.zarr")

    def no_work(*args, **kwargs):
        raise AssertionError("the command started working")

    monkeypatch.setattr(pg, "open", no_work)
    code, _, err = cli(capsys, "merge", "p.zarr", "-o", "link.npy", "--overwrite")
    assert (code, err.count("\n")) == (1, 1)
    assert "symbolic link" in err
    assert np.array_equal(np.load(folder / "other.npy"), _volume(seed=1))


def test_overwrite_replaces_a_patch_folder_extract_made(capsys, folder):
    cli(capsys, "extract", "vol.npy", "--size", 8, "-o", "out/", "--format", "nii")
    code, _, err = cli(
        capsys, "extract", "vol.npy", "--size", 4, "-o", "out/", "--format", "npy", "--overwrite"
    )
    assert code == 0, err
    assert sorted(os.listdir(folder / "out"))[:2] == ["manifest.json", "patch_000_000_000.npy"]
    assert len(os.listdir(folder / "out")) == 1 + 64


def test_overwrite_fills_an_empty_folder(capsys, folder):
    (folder / "out").mkdir()
    code, _, err = cli(
        capsys, "extract", "vol.npy", "--size", 8, "-o", "out/", "--format", "npy", "--overwrite"
    )
    assert code == 0, err
    assert len(os.listdir(folder / "out")) == 1 + 8


def _not_of_the_format(path):
    if str(path).endswith(".zarr"):
        os.mkdir(path)
        with open(os.path.join(path, "notes.txt"), "w") as f:
            f.write("mine")
    else:
        with open(path, "w") as f:
            f.write("my notes, not an image")


FORMATS = ["npy", "nii.gz", "tif", "h5", "zarr"]


@pytest.mark.parametrize("ext", FORMATS)
def test_save_overwrite_refuses_a_file_of_another_format(tmp_path, ext):
    path = tmp_path / f"image.{ext}"
    _not_of_the_format(path)
    before = _snapshot(path)
    with pytest.raises(FileExistsError, match="replaces only an output that patchgrid wrote"):
        pg.save(path, _volume(), overwrite=True)
    assert _snapshot(path) == before


@pytest.mark.parametrize("ext", ["npy", "nii.gz", "tif", "h5"])
def test_save_overwrite_refuses_a_folder_where_a_file_goes(tmp_path, ext):
    path = tmp_path / f"image.{ext}"
    path.mkdir()
    (path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is a folder, not a"):
        pg.save(path, _volume(), overwrite=True)
    assert (path / "keep.txt").read_text() == "mine"


def test_save_overwrite_refuses_a_zarr_group_it_did_not_write(tmp_path):
    path = tmp_path / "image.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_array("mine", data=np.arange(3))
    with pytest.raises(FileExistsError, match="not a zarr array or a patch store"):
        pg.save(path, _volume(), overwrite=True)
    assert np.array_equal(zarr.open_group(str(path), mode="r")["mine"][:], np.arange(3))


@pytest.mark.parametrize("ext", FORMATS)
def test_save_overwrite_still_replaces_its_own_output(tmp_path, ext):
    path = tmp_path / f"image.{ext}"
    pg.save(path, _volume(seed=1))
    pg.save(path, _volume(seed=2), overwrite=True)
    assert np.array_equal(_read(path), _volume(seed=2))


@pytest.mark.parametrize("ext", FORMATS)
def test_save_over_the_image_it_reads_is_refused(tmp_path, ext):
    path = tmp_path / f"image.{ext}"
    pg.save(path, _volume(seed=1))
    with pg.open(path) as img, pytest.raises(ValueError, match="is the input"):
        pg.save(path, img, overwrite=True)
    assert np.array_equal(_read(path), _volume(seed=1))


def test_save_over_the_memmap_it_reads_is_refused(tmp_path):
    path = tmp_path / "image.npy"
    np.save(path, _volume(seed=1))
    with pytest.raises(ValueError, match="is the input"):
        pg.save(path, np.load(path, mmap_mode="r"), overwrite=True)
    assert np.array_equal(np.load(path), _volume(seed=1))


def test_save_another_dataset_of_the_input_file_is_allowed(tmp_path):
    path = tmp_path / "image.h5"
    pg.save(f"{path}:raw", _volume(seed=1))
    with pg.open(f"{path}:raw") as img:
        pg.save(f"{path}:copy", img)
    assert np.array_equal(_read(f"{path}:copy"), _read(f"{path}:raw"))


def test_save_over_the_dataset_it_reads_is_refused(tmp_path):
    path = tmp_path / "image.h5"
    pg.save(f"{path}:raw", _volume(seed=1))
    with pg.open(f"{path}:raw") as img, pytest.raises(ValueError, match="is the input"):
        pg.save(f"{path}:raw", img, overwrite=True)
    assert np.array_equal(_read(f"{path}:raw"), _volume(seed=1))


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_save_through_a_link_is_refused(tmp_path, overwrite):
    real = tmp_path / "real.npy"
    np.save(real, _volume(seed=1))
    os.symlink(real, tmp_path / "link.npy")
    with pytest.raises(ValueError, match="symbolic link"):
        pg.save(tmp_path / "link.npy", _volume(seed=2), overwrite=overwrite)
    assert np.array_equal(np.load(real), _volume(seed=1))


def test_save_to_a_dangling_link_is_refused(tmp_path):
    os.symlink(tmp_path / "nowhere.npy", tmp_path / "link.npy")
    with pytest.raises(ValueError, match="symbolic link"):
        pg.save(tmp_path / "link.npy", _volume())
    assert not os.path.exists(tmp_path / "nowhere.npy")


# --------------------------------------------- 3. an output that appears meanwhile is kept


def _appears_meanwhile(monkeypatch, fmt, make):
    """The writer of ``fmt`` finishes, then ``make(target)`` puts another output in place."""
    real = pio.WRITERS[fmt]

    def write(tmp, *args):
        real(tmp, *args)
        make(os.path.join(os.path.dirname(os.path.dirname(tmp)), os.path.basename(tmp)))

    monkeypatch.setitem(pio.WRITERS, fmt, write)


def _no_renameat2(monkeypatch):
    monkeypatch.setattr(_writes, "rename2", lambda *args: False)


def _no_links(monkeypatch):
    _no_renameat2(monkeypatch)

    def link(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", link)


MOVES = [
    pytest.param(lambda mp: None, id="renameat2"),
    pytest.param(_no_renameat2, id="rename"),
    pytest.param(_no_links, id="no-links"),
]


@pytest.mark.parametrize("moves", MOVES)
def test_a_file_that_appears_meanwhile_is_kept(tmp_path, monkeypatch, moves):
    moves(monkeypatch)
    _appears_meanwhile(monkeypatch, "npy", lambda target: np.save(target, _volume(seed=9)))
    with pytest.raises(FileExistsError, match="appeared while patchgrid was writing it"):
        pg.save(tmp_path / "out.npy", _volume())
    assert np.array_equal(np.load(tmp_path / "out.npy"), _volume(seed=9))
    assert os.listdir(tmp_path) == ["out.npy"]


@pytest.mark.parametrize("moves", MOVES[:2])
def test_a_store_that_appears_meanwhile_is_kept(tmp_path, monkeypatch, moves):
    moves(monkeypatch)
    _appears_meanwhile(
        monkeypatch, "zarr", lambda target: zarr.create_array(target, data=_volume(seed=9))
    )
    with pytest.raises(FileExistsError, match="appeared while patchgrid was writing it"):
        pg.save(tmp_path / "out.zarr", _volume())
    assert np.array_equal(_read(tmp_path / "out.zarr"), _volume(seed=9))
    assert os.listdir(tmp_path) == ["out.zarr"]


@pytest.mark.parametrize("moves", MOVES[:2])
def test_an_empty_folder_that_appears_meanwhile_is_kept(tmp_path, monkeypatch, moves):
    moves(monkeypatch)
    _appears_meanwhile(monkeypatch, "zarr", os.mkdir)
    with pytest.raises(FileExistsError, match="appeared while patchgrid was writing it"):
        pg.save(tmp_path / "out.zarr", _volume())
    assert os.listdir(tmp_path / "out.zarr") == []
    assert os.listdir(tmp_path) == ["out.zarr"]


def test_a_second_extract_to_the_same_store_fails(capsys, folder, monkeypatch):
    real = _store.write_store

    def first_run_finishes_meanwhile(tmp, *args):
        real(tmp, *args)
        target = os.path.join(os.path.dirname(os.path.dirname(tmp)), os.path.basename(tmp))
        zarr.create_array(target, data=_volume(seed=9))

    monkeypatch.setattr(_store, "write_store", first_run_finishes_meanwhile)
    code, _, err = cli(capsys, "extract", "vol.npy", "--size", 8, "-o", "p.zarr")
    assert (code, err.count("\n")) == (1, 1)
    assert "appeared while patchgrid was writing it" in err
    assert np.array_equal(_read(folder / "p.zarr"), _volume(seed=9))


# ------------------------------------------------------------- 2. interrupts, in process


def test_interrupt_during_the_move_into_place_waits_and_says_so(capsys, folder, monkeypatch):
    real = _writes.move_new

    def interrupted_meanwhile(tmp, target):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the signal is handled by now: held until the move is done
        real(tmp, target)

    monkeypatch.setattr(_writes, "move_new", interrupted_meanwhile)
    code, _, err = cli(capsys, "extract", "vol.npy", "--size", 8, "-o", "p.zarr")
    assert code == 130
    assert err == f"patchgrid extract: interrupted; wrote {folder / 'p.zarr'} before that\n"


def test_interrupt_before_the_output_is_in_place_leaves_nothing(capsys, folder, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(_writes, "move_new", interrupt)
    code, _, err = cli(capsys, "extract", "vol.npy", "--size", 8, "-o", "p.zarr")
    assert (code, err) == (130, "patchgrid extract: interrupted; nothing was written\n")
    assert os.listdir(folder) == ["vol.npy"]


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _scratch(folder, pid, host=None):
    path = folder / f".out.npy.patchgrid-{_writes.host() if host is None else host}-{pid}-ab_1.tmp"
    (path / "out.npy").mkdir(parents=True)
    return path.name


def test_next_write_removes_what_a_killed_run_left(tmp_path):
    _scratch(tmp_path, _dead_pid())
    pg.save(tmp_path / "other.npy", _volume())
    assert os.listdir(tmp_path) == ["other.npy"]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: _scratch(t, os.getppid()), id="live-process"),
        pytest.param(lambda t: _scratch(t, _dead_pid(), host="elsewhere"), id="other-host"),
        pytest.param(lambda t: (t / ".notes.tmp").mkdir() or ".notes.tmp", id="not-ours"),
    ],
)
def test_next_write_keeps_temporary_folders_it_cannot_tell_are_stale(tmp_path, make):
    name = make(tmp_path)
    pg.save(tmp_path / "other.npy", _volume())
    assert sorted(os.listdir(tmp_path)) == sorted([name, "other.npy"])


# ------------------------------------------------ 2. signals, in processes of their own

DRIVER = """
import os, sys, time

phase, flag = sys.argv[1], sys.argv[2]


def arrived():
    open(flag + ".ready", "w").close()


if phase in ("write", "read"):
    # Chunk writes (reads) on zarr's threads that go on only once the test has sent its signal.
    import zarr.storage._local as local

    name = "_put" if phase == "write" else "_get"
    real = getattr(local, name)

    def slow(path, *args, **kwargs):
        if "c" in path.parts:
            arrived()
            for _ in range(1000):
                if os.path.exists(flag + ".go"):
                    break
                time.sleep(0.01)
        return real(path, *args, **kwargs)

    setattr(local, name, slow)
else:
    import patchgrid.cli

    parser = patchgrid.cli.build_parser

    def slow_parser():
        arrived()
        time.sleep(30)
        return parser()

    patchgrid.cli.build_parser = slow_parser

sys.argv = ["patchgrid", *sys.argv[3:]]
from patchgrid.cli import console

console()
"""

EXTRACT = ["extract", "vol.npy", "--size", "4", "-o", "p.zarr"]
SCENARIOS = {
    "extract-sigint": ("write", EXTRACT, signal.SIGINT, None),
    "extract-sigterm": ("write", EXTRACT, signal.SIGTERM, None),
    "overwrite-sigint": ("write", [*EXTRACT, "--overwrite"], signal.SIGINT, "p.zarr"),
    "overwrite-sigterm": ("write", [*EXTRACT, "--overwrite"], signal.SIGTERM, "p.zarr"),
    "merge-sigint": ("write", ["merge", "s.zarr", "-o", "m.zarr"], signal.SIGINT, "s.zarr"),
    "merge-read-sigint": ("read", ["merge", "s.zarr", "-o", "m.npy"], signal.SIGINT, "s.zarr"),
    "start-sigint": ("start", EXTRACT, signal.SIGINT, None),
    "start-sigterm": ("start", EXTRACT, signal.SIGTERM, None),
    "extract-sigkill": ("write", EXTRACT, signal.SIGKILL, None),
}
WRITES = [n for n, s in SCENARIOS.items() if s[0] != "start" and s[2] != signal.SIGKILL]
STARTS = ["start-sigint", "start-sigterm"]
KILLED = [n for n in SCENARIOS if n != "extract-sigkill"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario run once, all at the same time: name -> (folder, exit code, stderr,
    the folder's files before the run, whether the signal came mid-work)."""
    driver = tmp_path_factory.mktemp("driver") / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = {}
    for name, (phase, argv, _, existing) in SCENARIOS.items():
        folder = tmp_path_factory.mktemp(name)
        np.save(folder / "vol.npy", _volume())
        if existing is not None:
            store = ["extract", folder / "vol.npy", "--size", 8, "-o", folder / existing]
            assert main([str(a) for a in store], quiet=True) == 0
        before = _snapshot(folder)
        flag = folder.parent / name
        command = [sys.executable, str(driver), phase, str(flag), *argv]
        proc = subprocess.Popen(command, cwd=folder, env=env, stderr=subprocess.PIPE, text=True)
        started[name] = (proc, folder, flag, before)
    signalled: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while len(signalled) < len(started) and time.monotonic() < deadline:
        for name, (proc, _, flag, _) in started.items():
            arrived = os.path.exists(f"{flag}.ready")
            if name not in signalled and (arrived or proc.poll() is not None):
                if arrived and proc.poll() is None:
                    proc.send_signal(SCENARIOS[name][2])
                signalled[name] = time.monotonic()
        time.sleep(0.01)
    # The writes under way finish a moment after the signal, as real ones do.
    time.sleep(max(0.0, 0.3 - (time.monotonic() - max(signalled.values(), default=0))))
    for _, _, flag, _ in started.values():
        open(f"{flag}.go", "w").close()
    done = {}
    for name, (proc, folder, flag, before) in started.items():
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        done[name] = (folder, proc.returncode, err, before, os.path.exists(f"{flag}.ready"))
    return done


@pytest.mark.parametrize("name", KILLED)
def test_signal_came_while_the_command_was_at_work(runs, name):
    assert runs[name][4], runs[name][2]


@pytest.mark.parametrize("name", KILLED)
def test_signal_exit_status_says_which(runs, name):
    expected = 143 if SCENARIOS[name][2] == signal.SIGTERM else 130
    assert runs[name][1] == expected, runs[name][2]


@pytest.mark.parametrize("name", WRITES)
def test_signal_message_is_one_true_line(runs, name):
    command, what = SCENARIOS[name][1][0], "terminated" if "sigterm" in name else "interrupted"
    assert runs[name][2] == f"patchgrid {command}: {what}; nothing was written\n"


@pytest.mark.parametrize("name", STARTS)
def test_signal_at_start_up_gives_one_line_and_no_traceback(runs, name):
    what = "terminated" if "sigterm" in name else "interrupted"
    assert runs[name][2] == f"patchgrid: {what}; nothing was written\n"


@pytest.mark.parametrize("name", KILLED)
def test_signal_leaves_no_temporary_files(runs, name):
    folder = runs[name][0]
    assert _debris(folder) == []


@pytest.mark.parametrize("name", KILLED)
def test_signal_leaves_the_folder_as_it_was(runs, name):
    folder, _, _, before, _ = runs[name]
    assert _snapshot(folder) == before


def test_sigkill_leaves_a_temporary_folder_the_next_run_removes(runs, capsys, monkeypatch):
    folder, code, _, _, _ = runs["extract-sigkill"]
    assert code == -signal.SIGKILL
    assert len(_debris(folder)) == 1
    monkeypatch.chdir(folder)
    code, _, err = cli(capsys, *EXTRACT)
    assert code == 0, err
    assert sorted(os.listdir(folder)) == ["p.zarr", "vol.npy"]
