"""Local work of the quantized DDP hook per 25 MiB fp32 bucket (both hops, error feedback on).

One GPU, no transfer: the all-to-all and all-gather are replaced by buffers of the sizes they
would deliver (the all-to-all stand-in is this rank's own send buffer, the all-gather stand-in a
prepared [P] buffer of codes and scales), so a row is exactly the compute a rank adds to a DDP
step. Three pipelines on the same inputs:

- ``fused`` (the hook now): quantize_blockwise_into (hop 1 + EF, straight into the padded send
  buffer) -> requantize_sum_blockwise (dequantize W shards + fp32 sum + / W + hop 2 + EF, one
  kernel) -> dequantize_blockwise of the gathered shards. Three kernels (+ pad memsets).
- ``unfused`` (the hook before, commit 2c5f0f4): quantize -> pad copies -> dequantize W shards to
  fp32 -> mean -> quantize -> dequantize. About ten torch ops.
- ``graphed`` rows (``graph=True``: :func:`~deepseek_kernels.bench.harness.time_cuda_graph`, as every
  suite's graphed rows): fused vs unfused, each captured with the buckets back to back in one graph,
  so a row is the GPU time per bucket of the kernels and the gaps between them, without CPU launch
  cost and without a graph launch's head per bucket (what a step's many buckets see on the GPU).
  Issue 7's "70 % of copy counting all bytes each kernel reads and writes" is read on these rows.
- ``CUDA graph per bucket``: the fused pipeline captured once per input set and replayed one graph
  launch per bucket (vs the fused eager calls): the same kernels plus a graph launch's head on the
  GPU each (~3 us on the H200, session 23) -- the yardstick sessions 8-22 used, kept for comparison.

Bytes count what each kernel of the *fused* pipeline reads and writes (L bucket elements,
P = padded bucket, S = P / W, block B = 128), and every row's GB/s and % of copy bandwidth use
that count (so the unfused row's rate is "equivalent": the same useful work):
  hop 1 quantize_into + EF   4L (grad) + 4L (residual) + 4L (residual out) + L (codes) + 4L/B
                             + (P - L)(1 + 4/B) (padding memsets)
  requantize_sum + EF        P (W shards of codes) + 4P/B + 4S (residual) + 4S (residual out)
                             + S (codes) + 4S/B
  dequantize gathered        P + 4P/B + 4P (fp32 out)
The unfused pipeline moves more: + 4P (fp32 shards written) + 4P + 4S (mean read/written)
+ 4S (mean re-read) and the pad copies (``unfused_bytes`` in each row).
"""

import torch

from deepseek_kernels.bench.harness import Case, Impl
from deepseek_kernels.distributed import (
    FAST_OPS,
    REFERENCE_OPS,
    QuantizedGradState,
    _Plan,
    compress_bucket,
    decompress_bucket,
    reduce_shard,
)
from deepseek_kernels.reference.quantization import FORMATS, quantize_blockwise_ref

NAME = "comm_hook"
TITLE = "Quantized DDP hook, local work per 25 MiB fp32 bucket (both hops, EF on)"
BUCKET = 25 * 2**20 // 4  # fp32 elements in a 25 MiB bucket (DDP's default bucket_cap_mb)
BLOCK = 128


def fused_bytes(plan: _Plan) -> int:
    L, P, S, B = plan.length, plan.padded, plan.shard, plan.block
    hop1 = 13 * L + 4 * L // B + (P - L) + 4 * (P - L) // B
    reduce = P + 4 * P // B + 13 * S + 4 * S // B
    decompress = 5 * P + 4 * P // B
    return hop1 + reduce + decompress


def unfused_bytes(plan: _Plan) -> int:
    L, P, S, B = plan.length, plan.padded, plan.shard, plan.block
    pad = 0 if P == L else 2 * (L + P) + 2 * 4 * (L + P) // B  # F.pad reads and writes codes + scales
    return (13 * L + 4 * L // B) + pad + (5 * P + 4 * P // B) + (4 * P + 4 * S) + (13 * S + 4 * S // B) \
        + (5 * P + 4 * P // B)


def fused_pipeline(state, plan, grad, e1, e2, gathered_codes, gathered_scales, ops=FAST_OPS):
    codes, scales = compress_bucket(state, grad, plan, e1, seed=1, ops=ops)
    # all-to-all stand-in: W shards of this rank's size arrive (this rank's own send buffer)
    q2, s2 = reduce_shard(state, codes, scales, plan, e2, seed=2, ops=ops)
    # all-gather stand-in: W reduced shards arrive in a [P] buffer
    out = decompress_bucket(state, gathered_codes, gathered_scales, plan, torch.float32, ops=ops)
    return out, q2, s2


def unfused_pipeline(state, plan, grad, e1, e2, gathered_codes, gathered_scales):
    """The hook's local work before the fused ops (commit 2c5f0f4), kernels called directly."""
    quantize = torch.ops.deepseek_kernels.quantize_blockwise.default
    dequantize = torch.ops.deepseek_kernels.dequantize_blockwise.default
    code_dtype = FORMATS[state.fmt].dtype
    q, s = quantize(grad, state.fmt, plan.block, state.stochastic, 1, e1)
    codes = q.view(torch.uint8)
    if plan.padded != codes.numel():
        codes = torch.nn.functional.pad(codes, (0, plan.padded - codes.numel()))
        s = torch.nn.functional.pad(s, (0, plan.padded // plan.block - s.numel()))
    parts = dequantize(codes.view(code_dtype).view(plan.world, plan.shard), s.view(plan.world, -1), plan.block,
                       torch.float32)
    mean = parts.mean(0)
    q2, s2 = quantize(mean, state.fmt, plan.block, state.stochastic, 2, e2)
    out = dequantize(gathered_codes.view(code_dtype).view(plan.world, plan.shard),
                     gathered_scales.view(plan.world, -1), plan.block, torch.float32)
    return out.view(-1)[: plan.length], q2.view(torch.uint8), s2


class GraphReplay:
    """``fn(*inputs)`` captured in a CUDA graph once per input set (keyed by the first input's
    address; the warm-up calls capture) and replayed after that."""

    def __init__(self, fn):
        self.fn, self.graphs = fn, {}

    def __call__(self, *inputs):
        key = inputs[0].data_ptr()
        if key not in self.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.fn(*[t.clone() if t.dtype == torch.float32 else t for t in inputs])  # warm-up, no side effects
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn(*inputs)
            self.graphs[key] = (graph, out)
        graph, out = self.graphs[key]
        graph.replay()
        return out


def _inputs(plan: _Plan, fmt: str, device="cuda"):
    grad = torch.randn(plan.length, device=device)
    x = torch.randn(plan.padded, device=device)
    gq, gs = quantize_blockwise_ref(x, fmt, plan.block)
    return grad, torch.randn_like(grad) * 1e-3, torch.randn(plan.shard, device=device) * 1e-3, gq.view(torch.uint8), gs


def _same(a, b) -> bool:
    return all(torch.equal(x.view(torch.uint8) if x.dtype != torch.float32 else x,
                           y.view(torch.uint8) if y.dtype != torch.float32 else y) for x, y in zip(a, b))


def cases(quick: bool = False) -> list[Case]:
    n = BUCKET // 16 if quick else BUCKET
    out = []
    for fmt in ("int8", "fp8_e4m3", "fp8_e5m2"):
        for world in (2, 8):
            plan = _Plan.of(n, world, BLOCK)
            state = QuantizedGradState(fmt=fmt, block=BLOCK)

            def make_inputs(plan=plan, fmt=fmt):
                return _inputs(plan, fmt)

            def check(inputs, state=state, plan=plan):
                grad, e1, e2, gc, gs = inputs
                r1, r2 = e1.clone(), e2.clone()
                ours = fused_pipeline(state, plan, grad, e1.clone(), e2.clone(), gc, gs)
                ref = fused_pipeline(state, plan, grad, r1, r2, gc, gs, ops=REFERENCE_OPS)
                if not _same(ours, ref):
                    raise AssertionError(f"fused hook pipeline {state.fmt} W={plan.world}: kernels differ from the reference")

            fused = lambda *i, state=state, plan=plan: fused_pipeline(state, plan, *i)  # noqa: E731
            unfused = lambda *i, state=state, plan=plan: unfused_pipeline(state, plan, *i)  # noqa: E731
            params = {"fmt": fmt, "world": world, "bucket_mib": n * 4 / 2**20, "block": BLOCK,
                      "unfused_bytes": unfused_bytes(plan)}
            ours, theirs = Impl("fused (3 kernels)", fused), Impl("unfused (~10 torch ops)", unfused)
            common = dict(make_inputs=make_inputs, bytes=fused_bytes(plan))
            out += [
                # eager calls (host time included), checked against the reference first
                Case(name=f"{fmt} W={world}", ours=ours, baseline=theirs, params=params, check=check, **common),
                # GPU time per bucket, buckets back to back in one graph (issue 7's target is read here)
                Case(name=f"{fmt} W={world} graphed", ours=ours, baseline=theirs, params=params, graph=True, **common),
                # one graph launch per bucket: the same kernels plus a graph launch's head each
                Case(name=f"{fmt} W={world} CUDA graph per bucket",
                     ours=Impl("fused, a CUDA-graph replay per bucket", GraphReplay(fused)),
                     baseline=Impl("fused, eager", fused), params={**params, "graph_per_bucket": True}, **common),
            ]
    return out


def accuracy(device: torch.device) -> list[dict]:
    """The fused local pipeline through the op path vs through the reference, bit for bit (W=4 with
    stand-in transfers), and the round-trip error of a real one-rank reduction (W=1: out ~ grad)."""
    from deepseek_kernels import explain

    rows = []
    for fmt in ("int8", "fp8_e4m3", "fp8_e5m2"):
        state = QuantizedGradState(fmt=fmt, block=BLOCK)
        exact, err = True, 0.0
        for world in (4, 1):
            plan = _Plan.of(5000, world, BLOCK)
            g, e1, e2, gc, gs = _inputs(plan, fmt, device)
            ours = fused_pipeline(state, plan, g, e1.clone(), e2.clone(), gc, gs)
            exact &= _same(ours, fused_pipeline(state, plan, g, e1.clone(), e2.clone(), gc, gs, ops=REFERENCE_OPS))
            if world == 1:  # a real one-rank reduction: what was sent is what comes back
                codes, scales = compress_bucket(state, g, plan, None, seed=1)
                q2, s2 = reduce_shard(state, codes, scales, plan, None, seed=2)
                back = decompress_bucket(state, q2, s2, plan, torch.float32)
                err = ((back - g).norm() / g.norm()).item()
        q = torch.zeros(4, 256, dtype=FORMATS[fmt].dtype, device=device)
        rows.append({
            "case": f"hook pipeline {fmt}",
            "path": explain("requantize_sum_blockwise", q, torch.zeros(4, 2, device=device), BLOCK).split(":")[0],
            "matches_reference": exact,
            "roundtrip_rel_error": err,
        })
    return rows
