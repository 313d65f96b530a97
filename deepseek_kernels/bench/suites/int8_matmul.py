"""W8A8 INT8 matmul (epilogue included) vs cuBLAS bf16 and vs torch._int_mm + separate dequant.

FLOPs: 2·M·N·K (useful multiply-adds). Decode rows (M <= 16) are weight-bandwidth bound: their
bytes count the int8 weight once (N·K), the activations, scales and the output.
"""

import torch

import deepseek_kernels as dk
from deepseek_kernels.bench.harness import Case, Impl
from deepseek_kernels.reference.int8_matmul import int8_matmul_ref

NAME = "int8_matmul"
TITLE = "W8A8 int8 matmul (dequant + bias epilogue fused)"
LLM = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (N, K)


def _inputs(M, N, K):
    def make():
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        return (a, b, torch.rand(M, 1, device="cuda") * 1e-3, torch.rand(N, device="cuda") * 1e-3,
                torch.randn(N, device="cuda", dtype=torch.bfloat16),
                torch.randn(M, K, device="cuda", dtype=torch.bfloat16), torch.randn(N, K, device="cuda", dtype=torch.bfloat16))
    return make


def _ours(a, b, sa, sb, bias, x, w):
    return dk.int8_matmul(a, b, sa, sb, bias=bias, out_dtype=torch.bfloat16)


def _bf16(a, b, sa, sb, bias, x, w):
    return torch.nn.functional.linear(x, w, bias)


def _int_mm(a, b, sa, sb, bias, x, w):
    return (torch._int_mm(a, b.t()).float() * sa * sb + bias.float()).to(torch.bfloat16)


def _check(inputs):
    a, b, sa, sb, bias = inputs[:5]
    m = min(a.shape[0], 64)
    out = _ours(*inputs)[:m].double().cpu()
    ref = int8_matmul_ref(a[:m].cpu(), b.cpu(), sa[:m].cpu(), sb.cpu(), bias.cpu(), torch.float64)
    err = ((out - ref).norm() / ref.norm()).item()
    if not err < 2**-7:
        raise AssertionError(f"int8_matmul differs from the reference: relative error {err:.2e}")


def cases(quick: bool = False) -> list[Case]:
    shapes = [(1024, 1024, 1024, "bf16")] if quick else (
        [(8192, 8192, 8192, "bf16"), (8192, 8192, 8192, "int_mm")]
        + [(M, N, K, "bf16") for M in (2048, 8192) for N, K in LLM]
        + [(M, 14336, 4096, "bf16") for M in (1, 4, 16)]
    )
    out = []
    for M, N, K, base in shapes:
        decode = M <= 16
        out.append(Case(
            name=f"M{M} N{N} K{K} vs {'cuBLAS bf16' if base == 'bf16' else '_int_mm+dequant'}",
            make_inputs=_inputs(M, N, K),
            ours=Impl("deepseek_kernels", _ours),
            baseline=Impl("cuBLAS bf16" if base == "bf16" else "torch._int_mm + eager dequant",
                          _bf16 if base == "bf16" else _int_mm),
            bytes=N * K + M * K + 4 * (M + N) + 2 * N + 2 * M * N if decode else None,
            flops=None if decode else 2 * M * N * K,
            params={"M": M, "N": N, "K": K, "baseline": base},
            check=_check,
        ))
    return out


def accuracy(device: torch.device) -> list[dict]:
    rows = []
    for M, N, K in ((1, 64, 64), (17, 136, 1000)):
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device=device)
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=device)
        sa, sb = torch.rand(M, 1, device=device), torch.rand(N, device=device)
        exact = torch.equal(dk.int8_mm(a, b).cpu(), (a.cpu().double() @ b.cpu().double().t()).to(torch.int32))
        out = dk.int8_matmul(a, b, sa, sb, out_dtype=torch.float32).double().cpu()
        ref = int8_matmul_ref(a.cpu(), b.cpu(), sa.cpu(), sb.cpu(), None, torch.float64)
        rows.append({
            "case": f"int8_mm M{M} N{N} K{K}",
            "path": dk.explain("int8_matmul", a, b).split(":")[0],
            "matches_reference": exact,
            "roundtrip_rel_error": ((out - ref).norm() / ref.norm()).item(),
        })
    return rows
