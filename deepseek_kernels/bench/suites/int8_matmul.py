"""W8A8 INT8 matmul (epilogue included) vs cuBLAS bf16 and vs torch._int_mm + separate dequant,
and end to end: a stack of transformer-sized linears after ``quantize_model`` vs the same stack
in bf16.

FLOPs: 2·M·N·K (useful multiply-adds). Decode rows (M <= 16) are weight-bandwidth bound: their
bytes count the int8 weight once (N·K), the activations, scales and the output. Decode rows are
timed twice: eager (one Python call per repeat, launch overhead included) and as CUDA-graph
replays (the GPU time, as a serving engine runs decode); both implementations the same way.
"""

import torch

import deepseek_kernels as dk
from deepseek_kernels.bench.harness import Case, Impl
from deepseek_kernels.ops._registry import pdl_enabled
from deepseek_kernels.ops.int8_matmul import _gemv_ready, _int8_matmul_impl
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
    for M, N, K, base, graph in [(*sh, False) for sh in shapes] + [(*sh, True) for sh in shapes if sh[0] <= 16]:
        decode = M <= 16
        rested = M >= 8192
        out.append(Case(
            name=f"M{M} N{N} K{K} vs {'cuBLAS bf16' if base == 'bf16' else '_int_mm+dequant'}"
                 + (" (graphed)" if graph else "") + (f" (rested {REST_S:g} s)" if rested else ""),
            make_inputs=_inputs(M, N, K),
            ours=Impl("deepseek_kernels", _ours),
            baseline=Impl("cuBLAS bf16" if base == "bf16" else "torch._int_mm + eager dequant",
                          _bf16 if base == "bf16" else _int_mm),
            bytes=N * K + M * K + 4 * (M + N) + 2 * N + 2 * M * N if decode else None,
            flops=None if decode else 2 * M * N * K,
            params={"M": M, "N": N, "K": K, "baseline": base},
            check=_check,
            graph=graph,
            rest_s=REST_S if rested else 0.0,
            sample_clocks=rested,
        ))
    if not quick:
        out += _sustained_cases()
        out += _decode_path_cases()
        out += _linear_decode_cases()
        out += _end_to_end_cases()
    return out


SUSTAIN_S = 2.0
# The M8192 rows near the H200's power limit, timed two ways: each side from a rested GPU (REST_S idle before
# every round: what a bursty server sees) and at its own sustained steady state (SUSTAIN_S of back-to-back calls
# first: a training job or a busy prefill server). Plain alternating rounds mixed two states of ours (session 12:
# 8192^3 ours 0.837 ms in its first round, 1.016 ms right after the baseline's rounds, both at a reported 1980 MHz;
# cuBLAS 1.34 ms throughout), so their median was neither.
REST_S = 1.0


def _sustained_cases() -> list[Case]:
    """The M8192 shapes with each side timed after SUSTAIN_S seconds of its own back-to-back calls in every
    round: both at their steady state under the GPU's power limit, as a training job runs them (the rows
    above time each side from a rested GPU; see REST_S)."""
    out = []
    for M, N, K in [(8192, 8192, 8192)] + [(8192, N, K) for N, K in LLM]:
        out.append(Case(
            name=f"M{M} N{N} K{K} vs cuBLAS bf16 (sustained {SUSTAIN_S:g} s)",
            make_inputs=_inputs(M, N, K),
            ours=Impl("deepseek_kernels", _ours),
            baseline=Impl("cuBLAS bf16", _bf16),
            flops=2 * M * N * K,
            params={"M": M, "N": N, "K": K, "baseline": "bf16"},
            check=_check,
            sustain_s=SUSTAIN_S,
            sample_clocks=True,
        ))
    return out


def _triton_path(a, b, sa, sb, bias, x, w):
    """int8_matmul's eager path before the C++ decode kernel: the Triton kernel, launched directly (as a
    programmatic dependent launch where int8_matmul makes it one)."""
    return _int8_matmul_impl(a, b, sa, sb, bias, torch.bfloat16, direct=True, pdl=pdl_enabled(a, "int8_matmul"))


def _gemv_op(a, b, sa, sb, bias, x, w):
    """The extension's C++ decode op itself, launched as int8_matmul launches it (eager int8_matmul takes it;
    under graph capture it does not)."""
    return torch.ops.deepseek_kernels.int8_gemv.default(a, b, sa, sb, bias, torch.bfloat16,
                                                        pdl_enabled(a, "int8_matmul"))


def _decode_path_cases() -> list[Case]:
    """The extension's C++ decode op (``int8_gemv``: eager int8_matmul's path for M <= 16) vs the Triton
    kernel's direct launch (the path under CUDA-graph capture), eager (host time included) and graphed
    (the GPU time alone). Only where the decode kernel runs (the extension built, sm_80+, not ``DSK_INT8_GEMV=0``)."""
    if not (torch.cuda.is_available() and _gemv_ready(torch.empty(0, device="cuda"))):
        return []
    out = []
    for M, N, K in [(1, 14336, 4096), (16, 14336, 4096), (1, 4096, 14336)]:
        for graph in (False, True):
            out.append(Case(
                name=f"M{M} N{N} K{K} C++ decode kernel vs Triton launch" + (" (graphed)" if graph else ""),
                make_inputs=_inputs(M, N, K),
                ours=Impl("int8_gemv (C++ op)", _gemv_op),
                baseline=Impl("Triton kernel, direct launch", _triton_path),
                bytes=N * K + M * K + 4 * (M + N) + 2 * N + 2 * M * N,
                params={"M": M, "N": N, "K": K, "baseline": "triton"},
                check=_check,
                graph=graph,
            ))
    return out


def _linear_decode_cases() -> list[Case]:
    """One decode linear as a model runs it: bf16 activations in, bf16 out, the per-token
    quantization included (``int8_linear``: quantize + GEMM; eager <= 16 rows: the C++ decode op) vs bf16 F.linear."""
    N, K = 14336, 4096
    out = []
    for M in (1, 4, 16):
        def make(M=M):
            w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
            return (torch.randn(M, K, device="cuda", dtype=torch.bfloat16), w, torch.rand(N, device="cuda") * 1e-3,
                    torch.randn(N, K, device="cuda", dtype=torch.bfloat16))

        def ours(x, w, ws, wb):
            return dk.int8_linear(x, w, ws)

        def base(x, w, ws, wb):
            return torch.nn.functional.linear(x, wb)

        def check(inputs):
            x, w, ws, _ = inputs
            xq, xs = dk.quantize_per_token(x)
            want = int8_matmul_ref(xq.cpu(), w.cpu(), xs.cpu(), ws.cpu(), None, torch.float64)
            got = ours(*inputs).double().cpu()
            err = ((got - want).norm() / want.norm()).item()
            if not err < 2**-7:
                raise AssertionError(f"int8_linear differs from quantize + reference matmul: {err:.2e}")

        for graph in (False, True):
            out.append(Case(
                name=f"int8_linear M{M} N{N} K{K} (quantize incl.) vs bf16 linear" + (" (graphed)" if graph else ""),
                make_inputs=make, ours=Impl("int8_linear (quantize + GEMM)", ours),
                baseline=Impl("cuBLAS bf16", base), bytes=N * K + 2 * M * K + 4 * N + 2 * M * N,
                params={"M": M, "N": N, "K": K, "baseline": "bf16", "quantize_included": True},
                check=check, graph=graph,
            ))
    return out


# ---- end to end: quantize_model on a stack of transformer-sized linears ----------------------------

D_MODEL, D_FF, D_KV, LAYERS = 4096, 14336, 1024, 4  # Llama-3-8B-sized projections


class _Block(torch.nn.Module):
    """The linear layers of one transformer block, chained as a block uses them (attention itself
    left out: this measures the projections): h = x + o(qkv(x)[:, :d]); h + down(silu(gate h) * up h)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(D_MODEL, D_MODEL + 2 * D_KV, bias=False)
        self.o = torch.nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.gate = torch.nn.Linear(D_MODEL, D_FF, bias=False)
        self.up = torch.nn.Linear(D_MODEL, D_FF, bias=False)
        self.down = torch.nn.Linear(D_FF, D_MODEL, bias=False)

    def forward(self, x):
        h = x + self.o(self.qkv(x)[..., :D_MODEL])
        return h + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def _stacks():
    """(bf16 stack, the same stack after quantize_model), built once and shared by the cases."""
    if not hasattr(_stacks, "cache"):
        torch.manual_seed(0)
        ref = torch.nn.Sequential(*[_Block() for _ in range(LAYERS)]).to("cuda", torch.bfloat16)
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=m.in_features**-0.5 / 4)
        import copy

        q = copy.deepcopy(ref)
        report = dk.quantize_model(q)
        _stacks.cache = (ref, q, report)
    return _stacks.cache


def _compiled_stacks():
    """Both stacks under ``torch.compile(mode="reduce-overhead")`` (inductor + CUDA-graph trees: the one-line way a
    user decodes without per-call host time), compiled once on first use."""
    if not hasattr(_compiled_stacks, "cache"):
        ref, q, _ = _stacks()
        _compiled_stacks.cache = tuple(torch.compile(m, mode="reduce-overhead", fullgraph=True, dynamic=False)
                                       for m in (ref, q))
    return _compiled_stacks.cache


def _end_to_end_cases() -> list[Case]:
    per_layer = D_MODEL * (D_MODEL + 2 * D_KV) + D_MODEL * D_MODEL + 3 * D_MODEL * D_FF
    out = []
    for tokens, mode in ((1, "graphed"), (1, "compiled"), (1, "eager"), (8192, "eager")):
        def make(tokens=tokens):
            return (torch.randn(tokens, D_MODEL, device="cuda", dtype=torch.bfloat16),)

        def ours(x, mode=mode):
            with torch.no_grad():
                return (_compiled_stacks() if mode == "compiled" else _stacks())[1](x)

        def base(x, mode=mode):
            with torch.no_grad():
                return (_compiled_stacks() if mode == "compiled" else _stacks())[0](x)

        def check(inputs, ours=ours, base=base):
            a, b = ours(*inputs).float(), base(*inputs).float()  # .float() copies: a CUDA-graph tree reuses outputs
            err = ((a - b).norm() / b.norm()).item()
            if not err < 5e-2:
                raise AssertionError(f"quantized stack differs from bf16 by {err:.2e} (relative)")

        label = {"graphed": " (graphed)", "compiled": " (torch.compile reduce-overhead)", "eager": ""}[mode]
        out.append(Case(
            name=f"e2e {LAYERS} blocks, {tokens} token{'s' if tokens > 1 else ''}{label}",
            make_inputs=make, ours=Impl("quantize_model (int8)", ours), baseline=Impl("bf16 nn.Linear", base),
            bytes=LAYERS * per_layer if tokens == 1 else None,  # the int8 weights, read once
            flops=None if tokens == 1 else 2 * tokens * LAYERS * per_layer,
            params={"M": tokens, "layers": LAYERS, "end_to_end": True, "compiled": mode == "compiled"}, check=check,
            graph=mode == "graphed",
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
