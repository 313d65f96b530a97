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
from deepseek_kernels.ops._registry import interpreting

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not _extension.available(), reason="CUDA extension not built")
@pytest.mark.parametrize("name,schema", sorted(quantization.SCHEMAS.items()))
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
    # the launch settings that change eager timings are reported (and land in every benchmark JSON)
    from deepseek_kernels.ops._registry import programmatic_launches

    assert set(d["launch"]) == {"direct_launch", "programmatic_dependent_launch"}
    assert any(f"programmatic dependent launches {s}" in out for s in ("auto", "on", "off"))
    with programmatic_launches(True), open(os.devnull, "w") as devnull:
        assert dk.info(file=devnull)["launch"]["programmatic_dependent_launch"] == ("off" if interpreting() else "on")


def _run(*args, env=None, cwd=ROOT):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_pdl_setting_reads_dsk_pdl(monkeypatch):
    """DSK_PDL: auto (default) / 1 / 0; anything else is a clear error; chains are named."""
    from deepseek_kernels.ops._registry import pdl_enabled, pdl_setting, refresh_pdl

    try:
        for raw, want in ((None, "auto"), ("auto", "auto"), ("1", "on"), ("0", "off")):
            if raw is None:
                monkeypatch.delenv("DSK_PDL", raising=False)
            else:
                monkeypatch.setenv("DSK_PDL", raw)
            refresh_pdl()
            assert pdl_setting() == ("off" if interpreting() else want)
        monkeypatch.setenv("DSK_PDL", "yes")
        refresh_pdl()
        with pytest.raises(ValueError, match="DSK_PDL must be auto, 1 or 0"):
            pdl_setting()
        monkeypatch.setenv("DSK_PDL", "1")
        refresh_pdl()
        with pytest.raises(ValueError, match="chain must be one of"):
            pdl_enabled(torch.zeros(1), "attention")
        assert not pdl_enabled(torch.zeros(1), "int8_linear")  # a CPU tensor never launches programmatically
    finally:
        monkeypatch.delenv("DSK_PDL", raising=False)
        refresh_pdl()


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


def test_package_works_without_the_extension():
    """What a CPU-only install (DSK_BUILD_CUDA=0) gets: schemas defined from Python, the reference
    as the kernel, fake impls for torch.compile, and info/explain that say so."""
    code = r"""
import sys
sys.modules["deepseek_kernels._C"] = None  # import of the extension fails, as when it was not built
import torch
import deepseek_kernels as dk
from deepseek_kernels import _extension
assert not _extension.available()
x = torch.randn(3, 300)
q, s = dk.quantize_blockwise(x, "fp8_e4m3", 128, stochastic=True, seed=1)
out = dk.dequantize_blockwise(q, s, 128)
assert ((out - x).norm() / x.norm()) < 0.1
torch.library.opcheck(torch.ops.deepseek_kernels.quantize_blockwise.default, (x, "int8", 128, False, 0, None))
f = torch.compile(lambda x: dk.dequantize_blockwise(*dk.quantize_blockwise(x, "int8", 64), 64), fullgraph=True)
assert torch.equal(f(x), dk.dequantize_blockwise(*dk.quantize_blockwise(x, "int8", 64), 64))
d = dk.info()
assert not d["extension"]["built"] and "reference" in dk.explain("quantize_blockwise", x)
print("OK")
"""
    r = _run(sys.executable, "-c", code)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
    assert "CUDA extension: not available" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU paths")
def test_ops_on_cpu_without_the_triton_interpreter():
    """The Triton-backed ops take their reference path on CPU when the interpreter is off (what a
    CPU user gets); the rest of the suite runs them under the interpreter."""
    r = _run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_window_attention_op.py",
             "tests/test_int8_matmul.py", "-m", "not gpu", env={"TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


@pytest.mark.parametrize("archs,cap,ok", [
    ("8.0;9.0a", (9, 0), True), ("8.0;9.0a", (8, 6), True), ("8.0;9.0a", (8, 9), True),
    ("8.0;9.0a", (10, 0), False), ("9.0a", (8, 0), False), ("8.6", (8, 0), False),
    ("8.0+PTX", (10, 0), True), ("9.0a", (9, 0), True), ("7.5 8.0", (8, 0), True),
])
def test_arch_compatibility_rule(archs, cap, ok):
    assert _extension.runs_on(archs, *cap) is ok
