"""Local work of the quantized DDP hook per 25 MiB fp32 bucket (both hops, error feedback on).

One GPU, no transfer: the all-to-all and all-gather are replaced by buffers of the sizes they
would deliver, so the row is exactly the compute a rank adds to a DDP step. Bytes count what each
kernel reads and writes (L bucket elements, P = L here, S = P / W, block B = 128):
  hop 1 quantize + EF      4L (grad) + 4L (residual) + 4L (residual out) + L (codes) + 4L/B
  dequantize W shards      P + 4P/B + 4P (fp32)
  mean over W              4P + 4S
  hop 2 quantize + EF      4S + 4S + 4S + S + 4S/B
  dequantize gathered      P + 4P/B + 4P
Baseline: the same pipeline through the plain-PyTorch reference ops (eager), same inputs.
"""

import torch

from deepseek_kernels.bench.harness import Case, Impl
from deepseek_kernels.distributed import FAST_OPS, QuantizedGradState, _Plan, compress_bucket, decompress_bucket, reduce_shard
from deepseek_kernels.reference.quantization import dequantize_blockwise_ref, quantize_blockwise_ref

NAME = "comm_hook"
TITLE = "Quantized DDP hook, local work per 25 MiB fp32 bucket (both hops, EF on)"
BUCKET = 25 * 2**20 // 4  # fp32 elements in a 25 MiB bucket (DDP's default bucket_cap_mb)
OURS = FAST_OPS
REFERENCE = (quantize_blockwise_ref, dequantize_blockwise_ref)


def _bytes(plan: _Plan) -> int:
    L, P, S, B = plan.length, plan.padded, plan.shard, plan.block
    return (13 * L + 4 * L // B) + (5 * P + 4 * P // B) + (4 * P + 4 * S) + (13 * S + 4 * S // B) + (5 * P + 4 * P // B)


def pipeline(state, plan, grad, e1, e2, ops):
    codes, scales = compress_bucket(state, grad, plan, e1, seed=1, ops=ops)
    # all-to-all stand-in: W shards of this rank's size arrive (this rank's own, W times)
    q2, s2 = reduce_shard(state, codes, scales, plan, e2, seed=2, ops=ops)
    # all-gather stand-in: W reduced shards arrive (q2 repeated)
    gathered_codes, gathered_scales = q2.repeat(plan.world), s2.repeat(plan.world)
    return decompress_bucket(state, gathered_codes, gathered_scales, plan, torch.float32, ops=ops)


def cases(quick: bool = False) -> list[Case]:
    n = BUCKET // 16 if quick else BUCKET
    out = []
    for fmt in ("int8", "fp8_e4m3"):
        for world in (2, 8):
            plan = _Plan.of(n, world, 128)
            state = QuantizedGradState(fmt=fmt, block=128)

            def make_inputs(plan=plan):
                grad = torch.randn(plan.length, device="cuda")
                return grad, torch.randn_like(grad) * 1e-3, torch.randn(plan.shard, device="cuda") * 1e-3

            def check(inputs, state=state, plan=plan):
                grad, e1, e2 = inputs
                r1, r2 = e1.clone(), e2.clone()
                ours = pipeline(state, plan, grad, e1.clone(), e2.clone(), OURS)
                ref = pipeline(state, plan, grad, r1, r2, REFERENCE)
                if not torch.equal(ours, ref):
                    raise AssertionError(f"hook pipeline {state.fmt}: kernels differ from the reference")

            out.append(Case(
                name=f"{fmt} W={world}",
                make_inputs=make_inputs,
                ours=Impl("deepseek_kernels", lambda g, e1, e2, state=state, plan=plan: pipeline(state, plan, g, e1, e2, OURS)),
                baseline=Impl("eager reference", lambda g, e1, e2, state=state, plan=plan: pipeline(state, plan, g, e1, e2, REFERENCE)),
                bytes=_bytes(plan),
                params={"fmt": fmt, "world": world, "bucket_mib": n * 4 / 2**20, "block": 128},
                check=check,
            ))
    return out


def accuracy(device: torch.device) -> list[dict]:
    """The local pipeline through the op path vs through the reference, bit for bit (W=4 with
    stand-in transfers), and the round-trip error of a real one-rank reduction (W=1: out ~ grad)."""
    from deepseek_kernels import explain

    rows = []
    for fmt in ("int8", "fp8_e4m3", "fp8_e5m2"):
        state = QuantizedGradState(fmt=fmt, block=128)
        exact, err = True, 0.0
        for world in (4, 1):
            plan = _Plan.of(5000, world, 128)
            g = torch.randn(plan.length, device=device)
            e1, e2 = torch.zeros_like(g), torch.zeros(plan.shard, device=device)
            ours = pipeline(state, plan, g, e1.clone(), e2.clone(), OURS)
            exact &= torch.equal(ours, pipeline(state, plan, g, e1.clone(), e2.clone(), REFERENCE))
            if world == 1:
                err = ((ours - g).norm() / g.norm()).item()
        rows.append({
            "case": f"hook pipeline {fmt}",
            "path": explain("quantize_blockwise", g, fmt, 128).split(":")[0],
            "matches_reference": exact,
            "roundtrip_rel_error": err,
        })
    return rows
