"""The build, the extension's schemas, info() and the command line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepseek_kernels as dk
from deepseek_kernels import _extension
from deepseek_kernels.ops import quantization

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not _extension.available(), reason="CUDA extension not built")
@pytest.mark.parametrize("name,schema", [
    ("quantize_blockwise", quantization.QUANTIZE_SCHEMA),
    ("dequantize_blockwise", quantization.DEQUANTIZE_SCHEMA),
])
def test_python_schema_copy_matches_cpp(name, schema):
    registered = getattr(torch.ops.deepseek_kernels, name).default._schema
    assert str(registered) == str(torch._C.parse_schema(f"deepseek_kernels::{name}{schema}"))


@pytest.mark.skipif(not _extension.available(), reason="CUDA extension not built")
def test_build_info_names_architectures():
    info = _extension.build_info()
    assert info["built"] and info["cuda_arch_list"] and info["torch_version"]


def test_info_prints_versions_and_paths(capsys):
    d = dk.info()
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    assert "CUDA extension:" in out
    for op in ("quantize_blockwise", "dequantize_blockwise"):
        assert op in d["op_paths"] and op in out


def _run(*args, env=None, cwd=ROOT):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_cli_info():
    r = _run(sys.executable, "-m", "deepseek_kernels.cli", "info")
    assert r.returncode == 0, r.stderr
    assert "deepseek_kernels" in r.stdout and "op paths here" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cli_bench_without_gpu_checks_accuracy_and_exits_0(tmp_path):
    r = _run(sys.executable, "-m", "deepseek_kernels.cli", "bench", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "timing needs a CUDA GPU" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert "False" not in r.stdout  # every accuracy row is bit-exact against the reference
    assert not list(tmp_path.iterdir())  # no timing JSON pretends to exist


def test_cli_bench_unknown_suite_is_a_clear_error():
    r = _run(sys.executable, "-m", "deepseek_kernels.cli", "bench", "no-such-suite")
    assert r.returncode == 2 and "available" in r.stderr


def test_forced_cuda_build_without_toolkit_fails_loudly(tmp_path):
    r = _run(sys.executable, "setup.py", "--name", env={"DSK_BUILD_CUDA": "1", "CUDA_HOME": str(tmp_path)})
    assert r.returncode != 0
    assert "DSK_BUILD_CUDA=1 but the CUDA extension cannot be built" in r.stderr + r.stdout


def test_cuda_build_can_be_switched_off():
    r = _run(sys.executable, "setup.py", "--name", env={"DSK_BUILD_CUDA": "0"})
    assert r.returncode == 0, r.stderr
    assert "building without the CUDA extension (DSK_BUILD_CUDA=0)" in r.stderr


def test_bad_build_switch_value():
    r = _run(sys.executable, "setup.py", "--name", env={"DSK_BUILD_CUDA": "yes"})
    assert r.returncode != 0 and "DSK_BUILD_CUDA must be 0 or 1" in r.stderr + r.stdout
