"""Sliding-window attention vs FlexAttention (compiled, block mask) on the same inputs.

bf16, H=32 (and GQA 32/8), D=128, causal window W; batch chosen so B*S >= 32k tokens.
FLOPs count useful work only: forward 4*B*H*D*pairs with pairs = W*S - W(W-1)/2 (the in-window
(query, key) pairs), forward + backward 3.5x that.
"""

import torch

import deepseek_kernels as dk
from deepseek_kernels.bench.harness import Case, Impl, compiled_baseline
from deepseek_kernels.reference.attention import attended_pairs, flops

NAME = "attention"
TITLE = "Sliding-window attention (bf16, D=128) vs FlexAttention"


def _flex(window: int, sinks: int, seq: int, heads: int, gqa: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx < sinks))

    compiled = compiled_baseline(flex_attention)
    state = {}

    def run(q, k, v):  # flash layout in, flash layout out
        if "mask" not in state:  # built on first use: case construction must not touch the GPU
            # compiled mask construction: the eager one materializes a seq x seq grid (17 GB at 128k)
            state["mask"] = create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq, KV_LEN=seq, device="cuda",
                                              _compile=seq > 32768)
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=state["mask"],
                       enable_gqa=gqa)
        return out.transpose(1, 2)

    return run


def cases(quick: bool = False) -> list[Case]:
    configs = [(1024, 1, 1024, 8, 8)] if quick else [
        # (S, B, W, Hq, Hkv)
        (8192, 4, 1024, 32, 32), (8192, 4, 4096, 32, 32), (32768, 1, 1024, 32, 32), (32768, 1, 4096, 32, 32),
        (32768, 1, 4096, 32, 8), (131072, 1, 1024, 32, 32), (131072, 1, 4096, 32, 32), (131072, 1, 4096, 32, 8),
    ]
    out = []
    D, sinks = 128, 0
    for S, B, W, Hq, Hkv in configs:
        flex = _flex(W, sinks, S, Hq, Hq != Hkv)
        pairs = attended_pairs(S, S, window=W)

        def make(B=B, S=S, Hq=Hq, Hkv=Hkv):
            mk = lambda h: torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
            return mk(Hq), mk(Hkv), mk(Hkv), torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16)

        def ours_fwd(q, k, v, do, W=W):
            return dk.window_attention(q, k, v, window=W)

        def flex_fwd(q, k, v, do, flex=flex):
            return flex(q, k, v)

        def ours_bwd(q, k, v, do, W=W):
            return torch.autograd.grad(dk.window_attention(q, k, v, window=W), (q, k, v), do)

        def flex_bwd(q, k, v, do, flex=flex):
            return torch.autograd.grad(flex(q, k, v), (q, k, v), do)

        def check(inputs, ours_fwd=ours_fwd, flex_fwd=flex_fwd):
            with torch.no_grad():
                a, b = ours_fwd(*inputs).float(), flex_fwd(*inputs).float()
            err = ((a - b).norm() / b.norm()).item()
            if not err < 2e-2:
                raise AssertionError(f"window_attention differs from FlexAttention: relative error {err:.2e}")

        tag = f"S{S} B{B} W{W} H{Hq}/{Hkv}"
        params = {"S": S, "B": B, "W": W, "Hq": Hq, "Hkv": Hkv, "D": D}
        out.append(Case(f"fwd {tag}", make, Impl("deepseek_kernels", ours_fwd), Impl("FlexAttention", flex_fwd),
                        flops=flops(B, Hq, D, pairs), params={**params, "pass": "fwd"}, check=check))
        out.append(Case(f"fwd+bwd {tag}", make, Impl("deepseek_kernels", ours_bwd), Impl("FlexAttention", flex_bwd),
                        flops=flops(B, Hq, D, pairs, backward=True), params={**params, "pass": "fwd+bwd"}))
        # the deterministic backward (two kernels, no atomics: bitwise reproducible) next to the default (one
        # kernel, dQ added by TMA reduce-adds on sm_90; FlashAttention's default)
        def ours_bwd_det(q, k, v, do, W=W):
            out = dk.window_attention(q, k, v, window=W, deterministic=True)
            return torch.autograd.grad(out, (q, k, v), do)

        out.append(Case(f"fwd+bwd {tag} deterministic", make, Impl("deepseek_kernels (deterministic=True)",
                                                                   ours_bwd_det),
                        Impl("FlexAttention", flex_bwd), flops=flops(B, Hq, D, pairs, backward=True),
                        params={**params, "pass": "fwd+bwd", "deterministic": True}))
    out += decode_cases(quick)
    return out


def decode_cases(quick: bool = False) -> list[Case]:
    """One new token per sequence against a RollingKVCache (window 4096) vs SDPA over the full KV
    cache of the same context; both CUDA-graph timed, as a serving engine decodes. Bytes: the K/V
    each implementation must read (ours: the window; SDPA: the whole context)."""
    from deepseek_kernels.decode import RollingKVCache, window_attention_decode

    B, Hq, Hkv, D, W = 8, 32, 8, 128, 4096
    contexts = [8192] if quick else [8192, 32768, 131072]
    out = []
    for ctx in contexts:
        def make(ctx=ctx):
            cache = RollingKVCache(B, Hkv, D, window=W, sinks=0, max_step=1, dtype=torch.bfloat16, device="cuda")
            k = torch.randn(B, ctx, Hkv, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            cache.prefill(k[:, :-1], v[:, :-1])
            cache.append(k[:, -1:], v[:, -1:])
            q = torch.randn(B, 1, Hq, D, device="cuda", dtype=torch.bfloat16)
            return q, cache, k.transpose(1, 2), v.transpose(1, 2)  # full cache in SDPA's [B, H, S, D]

        def ours(q, cache, k_full, v_full):
            return window_attention_decode(q, cache)

        def sdpa(q, cache, k_full, v_full):
            return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k_full, v_full,
                                                                    enable_gqa=True).transpose(1, 2)

        def check(inputs, W=W):
            q, cache, k_full, v_full = inputs
            ref = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2).float(), k_full[:, :, -W:].float(), v_full[:, :, -W:].float(),
                enable_gqa=True).transpose(1, 2)
            err = ((ours(*inputs).float() - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                raise AssertionError(f"window_attention_decode differs from SDPA over the window: {err:.2e}")

        out.append(Case(f"decode ctx{ctx // 1024}k B{B} W{W} H{Hq}/{Hkv}", make,
                        Impl("deepseek_kernels (rolling cache)", ours), Impl("SDPA full KV cache", sdpa),
                        bytes=2 * B * W * Hkv * D * 2, params={"S": ctx, "B": B, "W": W, "Hq": Hq, "Hkv": Hkv, "D": D,
                                                                "pass": "decode"},
                        check=check, graph=True))
    return out


def accuracy(device: torch.device) -> list[dict]:
    """The op (forward and gradients) against the float64 reference on small odd shapes."""
    from deepseek_kernels.reference.attention import window_attention_bwd_ref, window_attention_ref

    rows = []
    for S, W, sinks, causal in ((17, 5, 0, True), (40, 7, 3, True), (33, 6, 2, False)):
        q, k, v, do = (torch.randn(1, S, h, 16, device=device) for h in (4, 2, 2, 4))
        out = dk.window_attention(q, k, v, window=W, sinks=sinks, causal=causal)
        ref = window_attention_ref(q.double(), k.double(), v.double(), window=W, sinks=sinks, causal=causal,
                                   compute_dtype=torch.float64)
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        grads = torch.autograd.grad(dk.window_attention(qg, kg, vg, window=W, sinks=sinks, causal=causal), (qg, kg, vg), do)
        ref_grads = window_attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), window=W, sinks=sinks,
                                             causal=causal, compute_dtype=torch.float64)
        err = max([((out - ref).norm() / ref.norm()).item()] +
                  [((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads)])
        rows.append({
            "case": f"S{S} W{W} sinks{sinks} {'causal' if causal else 'symmetric'}",
            "path": dk.explain("window_attention", q).split(":")[0],
            "matches_reference": err < 1e-4,  # fp32 inputs: agreement to ~1e-6 expected
            "roundtrip_rel_error": err,
        })
    return rows
