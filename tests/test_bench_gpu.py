"""Smoke test of benchmarks/bench_gpu.py: one small job on the CPU, in a few seconds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["bench_gpu"]
        raise
    return module


def test_bench_gpu_cpu_quick(capsys, tmp_path):
    bench = load_script()
    md = tmp_path / "gpu.md"
    argv = ["--device", "cpu", "--quick", "--repeats", "1", "--jobs", "identity-256", "merge-256"]
    assert bench.main([*argv, "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| identity-256 |")]
    assert len(rows) == 1
    assert "64^3, 16^3, batch 4" in rows[0]
    assert any(line.startswith("| merge-256 |") for line in out.splitlines())
    assert "| identity-256 |" in md.read_text()


def test_bench_gpu_without_cuda(capsys):
    bench = load_script()
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    assert bench.main(["--jobs", "merge-256"]) == 0
    assert "no CUDA device" in capsys.readouterr().out
