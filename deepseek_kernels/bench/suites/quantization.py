"""Blockwise INT8/FP8 quantization: ours (CUDA kernel) vs torch.compile of the same math.

Workload: a 512 MiB bf16 tensor ([16384, 16384]), block 128. Memory bound, so the rate is
useful bytes over time: each input read once and each output written once, scales included:
  quantize        2N (x) + N (codes) + 4N/128 (scales)
  dequantize      N (codes) + 4N/128 (scales) + 2N (bf16 out)
  quantize + EF   2N (x) + 4N (fp32 residual read) + 4N (residual written) + N + 4N/128
The ceiling is the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import torch

import deepseek_kernels as dk
from deepseek_kernels.bench.harness import Case, Impl, compiled_baseline
from deepseek_kernels.reference import FORMATS, dequantize_blockwise_ref, quantize_blockwise_ref

NAME = "quantization"
TITLE = "Blockwise quantization, bf16 [16384, 16384], block 128"
BLOCK = 128
FMTS = ("int8", "fp8_e4m3")


def _bits(t):
    return t.view(torch.uint8) if t.dtype != torch.int8 else t


def _assert_same_quantization(ours, ref, what):
    (q, s), (q_ref, s_ref) = ours, ref
    if not (torch.equal(_bits(q), _bits(q_ref)) and torch.equal(s, s_ref)):
        mism = (_bits(q) != _bits(q_ref)).float().mean().item()
        raise AssertionError(f"{what}: kernel differs from the reference ({mism:.2e} of codes)")


def cases(quick: bool = False) -> list[Case]:
    rows, cols = (2048, 8192) if quick else (16384, 16384)
    n = rows * cols
    scale_bytes = 4 * n // BLOCK
    compiled_q = compiled_baseline(quantize_blockwise_ref)
    compiled_dq = compiled_baseline(dequantize_blockwise_ref)
    size = f"{n * 2 / 2**20:.0f}MiB"
    out: list[Case] = []

    def x_inputs():
        return (torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16),)

    for fmt in FMTS:

        def check_q(inputs, fmt=fmt):
            _assert_same_quantization(dk.quantize_blockwise(*inputs, fmt, BLOCK),
                                      quantize_blockwise_ref(*inputs, fmt, BLOCK), f"quantize {fmt}")

        out.append(Case(
            name=f"quantize {fmt}",
            make_inputs=x_inputs,
            ours=Impl("deepseek_kernels", lambda x, fmt=fmt: dk.quantize_blockwise(x, fmt, BLOCK)),
            baseline=Impl("torch.compile", lambda x, fmt=fmt: compiled_q(x, fmt, BLOCK)),
            bytes=2 * n + n + scale_bytes,
            params={"op": "quantize", "fmt": fmt, "dtype": "bf16", "size": size, "block": BLOCK},
            check=check_q,
        ))

        def qs_inputs(fmt=fmt):
            x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
            return dk.quantize_blockwise(x, fmt, BLOCK)

        def check_dq(inputs):
            q, s = inputs
            ours = dk.dequantize_blockwise(q, s, BLOCK, torch.bfloat16)
            if not torch.equal(ours, dequantize_blockwise_ref(q, s, BLOCK, torch.bfloat16)):
                raise AssertionError("dequantize: kernel differs from the reference")

        out.append(Case(
            name=f"dequantize {fmt}",
            make_inputs=qs_inputs,
            ours=Impl("deepseek_kernels", lambda q, s: dk.dequantize_blockwise(q, s, BLOCK, torch.bfloat16)),
            baseline=Impl("torch.compile", lambda q, s: compiled_dq(q, s, BLOCK, torch.bfloat16)),
            bytes=n + scale_bytes + 2 * n,
            params={"op": "dequantize", "fmt": fmt, "dtype": "bf16", "size": size, "block": BLOCK},
            check=check_dq,
        ))

        def xe_inputs():
            x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
            return x, torch.randn(rows, cols, device="cuda") * 0.01

        def check_ef(inputs, fmt=fmt):
            x, e = inputs
            e_ref = e.clone()
            ours = dk.quantize_blockwise(x, fmt, BLOCK, error=e)
            _assert_same_quantization(ours, quantize_blockwise_ref(x, fmt, BLOCK, error=e_ref), f"EF {fmt}")
            if not torch.equal(e, e_ref):
                raise AssertionError(f"EF {fmt}: residual differs from the reference")

        out.append(Case(
            name=f"quantize+EF {fmt}",
            make_inputs=xe_inputs,
            ours=Impl("deepseek_kernels", lambda x, e, fmt=fmt: dk.quantize_blockwise(x, fmt, BLOCK, error=e)),
            baseline=Impl("torch.compile", lambda x, e, fmt=fmt: compiled_q(x, fmt, BLOCK, error=e)),
            bytes=2 * n + 4 * n + 4 * n + n + scale_bytes,
            params={"op": "quantize_ef", "fmt": fmt, "dtype": "bf16", "residual": "fp32", "size": size,
                    "block": BLOCK},
            check=check_ef,
        ))
    return out


def accuracy(device: torch.device) -> list[dict]:
    """Each format x dtype on a small odd-shaped input: op vs reference (bit for bit) and the
    round-trip error ||deq(q) - x|| / ||x||. Runs on any device."""
    rows = []
    for fmt in FORMATS:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = (torch.randn(37, 1000, device=device) * 4).to(dtype)
            for stochastic in (False, True):
                q, s = dk.quantize_blockwise(x, fmt, BLOCK, stochastic=stochastic, seed=17)
                q_ref, s_ref = quantize_blockwise_ref(x.cpu(), fmt, BLOCK, stochastic=stochastic, seed=17)
                exact = torch.equal(_bits(q).cpu(), _bits(q_ref)) and torch.equal(s.cpu(), s_ref)
                deq = dk.dequantize_blockwise(q, s, BLOCK)
                rel = ((deq - x.float()).norm() / x.float().norm()).item()
                rows.append({
                    "case": f"{fmt} {str(dtype).replace('torch.', '')} {'stochastic' if stochastic else 'nearest'}",
                    "path": dk.explain("quantize_blockwise", x, fmt, BLOCK).split(":")[0],
                    "matches_reference": exact,
                    "roundtrip_rel_error": rel,
                })
    return rows
