"""The Triton kernels compile for Hopper (sm_90) ahead of time, without a GPU: Triton's compiler
and ptxas catch what the interpreter cannot (ops it lacks, shared-memory overflows, layout
errors). Runs scripts/aot_compile_check.py in a subprocess (the interpreter must be off there)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "aot_compile_check.py"), "--arch", "90"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("  ok  ") >= 27, proc.stdout
    # the Gluon Hopper window forward (both ping-pong settings, one-tile and persistent, the conditional rescale and
    # the reversed tile order) and backward (dQ, dK/dV), D 128
    # and 64, and the one-kernel backward (dQ by TMA reduce-adds: the PTX must hold them), and the sparse FFN's
    # Gluon kernels, where this Triton has Gluon
    from deepseek_kernels.triton.window_attention_sm90 import HAVE_GLUON

    if HAVE_GLUON:
        assert sum("ok    window attention fwd sm90 (Gluon)" in ln for ln in proc.stdout.splitlines()) == 10, proc.stdout
        assert sum(ln.startswith("  ok") and "sm90 (Gluon)" in ln for ln in proc.stdout.splitlines()) == 18, proc.stdout
        assert "ok    window attention bwd fused sm90 (Gluon, TMA reduce dQ) D128" in proc.stdout, proc.stdout
        # the sparse FFN's Gluon kernels: down / dx (two tile widths each, and A resident) and the gathered gate/up
        # (its whole tiles as one wide product, its pieces merged or not, or two; K steps of 32), and the gathered
        # backward kernels (dact with its epilogue partition, prefetching or not, its pieces' boxes, K steps of 64;
        # dW gate/up, dW down, the dW kernels' pieces form)
        assert sum(ln.startswith("  ok") and "GEMM sm90 (Gluon" in ln for ln in proc.stdout.splitlines()) == 10, \
            proc.stdout
        for name in ("down", "bwd dx"):
            assert f"ok    sparse FFN {name} GEMM sm90 (Gluon, A resident)" in proc.stdout, proc.stdout
        for form in ("wide, merged pieces", "wide", "two products", "wide, merged pieces, K 32 x 8"):
            assert f"ok    sparse FFN gate/up GEMM sm90 (Gluon, cp.async gather, {form})" in proc.stdout, proc.stdout
        for form in ("prefetching epilogue partition", "epilogue partition",
                     "prefetching epilogue partition, pieces in boxes of their own",
                     "prefetching epilogue partition, K 64 x 3"):
            assert f"ok    sparse FFN bwd dact sm90 (Gluon, cp.async gather, {form})" in proc.stdout, proc.stdout
        for name in ("dW gate/up sm90", "dW down sm90", "dW gate/up sm90 pieces", "dW down sm90 pieces"):
            assert f"ok    sparse FFN bwd {name} (Gluon, cp.async gather)" in proc.stdout, proc.stdout
