"""Hierarchical attention vs sliding-window attention (same window) and full causal SDPA (flash).

bf16, H=32 (GQA 32/8 as a second case against the window op), D=128, W=4096, block=64,
levels=None (every past token seen once), B=1, S = 8k..512k (SDPA up to 128k). FlexAttention is
not a baseline here: its block mask selects tokens and cannot express pooled summaries.

FLOPs count useful work only: ``4·B·H·D·pairs`` forward, 3.5x that for forward + backward, where
``pairs`` counts (query, exact key) and (query, summary) pairs
(``deepseek_kernels.reference.hierarchical_attention.attended_pairs``). The baseline's TFLOP/s
column uses the same count, so it reads as "effective" throughput; compare the times.

Also: decode of one token (append + attend) at 8k..512k context against the bounded cache
(``HierarchicalKVCache``: the Triton append and split-cache decode kernels) vs the rolling window
cache, the cache-size reduction against a full KV cache (``summary()``, printed and stored in the
JSON; needs no GPU), and ``plot()``: time per token against log2(S) for forward, forward + backward
and decode, ours next to window_attention (``hierarchical_scaling.png`` beside the JSON).
"""

import torch

import deepseek_kernels as dk
from deepseek_kernels.bench.harness import Case, Impl
from deepseek_kernels.reference.hierarchical_attention import attended_pairs, flops

NAME = "hierarchical"
TITLE = "Hierarchical attention (bf16, D=128, W=4096, block=64) vs window attention and SDPA flash"

D, BLOCK = 128, 64


def _sdpa_causal(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # flash or an error, never a silent fallback
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def _check_prefix(W):
    """Queries of the first W tokens see every earlier key exactly (s_0 = 0), so there the op is
    plain causal attention, as are both baselines: compare that prefix, and the rest for finiteness."""

    def check(inputs, ours=None, base=None):
        q, k, v, _ = inputs
        with torch.no_grad():
            a = dk.hierarchical_attention(q, k, v, window=W, block=BLOCK).float()
            rep = q.shape[2] // k.shape[2]  # SDPA flash wants equal head counts: expand the GQA groups
            kx, vx = (t[:, :W].repeat_interleave(rep, dim=2) for t in (k, v))
            b = _sdpa_causal(q[:, :W], kx, vx).float()
        err = ((a[:, :W] - b).norm() / b.norm()).item()
        if not err < 2e-2 or not torch.isfinite(a).all():
            raise AssertionError(f"hierarchical_attention prefix differs from causal attention: relative error {err:.2e}")

    return check


def cases(quick: bool = False) -> list[Case]:
    # (S, W, Hq, Hkv, vs SDPA)
    configs = [(8192, 1024, 8, 8, True)] if quick else [
        (8192, 4096, 32, 32, True), (32768, 4096, 32, 32, True), (131072, 4096, 32, 32, True),
        (131072, 4096, 32, 8, False), (524288, 4096, 32, 32, False),
    ]
    out = []
    B = 1
    for S, W, Hq, Hkv, vs_sdpa in configs:
        pairs = attended_pairs(S, window=W, block=BLOCK, levels=None)

        def make(S=S, Hq=Hq, Hkv=Hkv):
            mk = lambda h: torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
            return mk(Hq), mk(Hkv), mk(Hkv), torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16)

        def ours_fwd(q, k, v, do, W=W):
            return dk.hierarchical_attention(q, k, v, window=W, block=BLOCK)

        def ours_bwd(q, k, v, do, W=W):
            return torch.autograd.grad(dk.hierarchical_attention(q, k, v, window=W, block=BLOCK), (q, k, v), do)

        def win_fwd(q, k, v, do, W=W):
            return dk.window_attention(q, k, v, window=W)

        def win_bwd(q, k, v, do, W=W):
            return torch.autograd.grad(dk.window_attention(q, k, v, window=W), (q, k, v), do)

        def sdpa_fwd(q, k, v, do):
            return _sdpa_causal(q, k, v)

        def sdpa_bwd(q, k, v, do):
            return torch.autograd.grad(_sdpa_causal(q, k, v), (q, k, v), do)

        tag = f"S{S} W{W} H{Hq}/{Hkv}"
        params = {"S": S, "B": B, "W": W, "block": BLOCK, "Hq": Hq, "Hkv": Hkv, "D": D, "pairs": pairs}
        baselines = [("window", Impl("window_attention", win_fwd), Impl("window_attention", win_bwd))]
        if vs_sdpa:
            baselines.append(("sdpa", Impl("SDPA flash causal", sdpa_fwd), Impl("SDPA flash causal", sdpa_bwd)))
        for label, fwd, bwd in baselines:
            check = _check_prefix(W)
            out.append(Case(f"fwd {tag} vs {label}", make, Impl("deepseek_kernels", ours_fwd), fwd,
                            flops=flops(B, Hq, D, pairs), params={**params, "pass": "fwd", "baseline": label},
                            check=check))
            out.append(Case(f"fwd+bwd {tag} vs {label}", make, Impl("deepseek_kernels", ours_bwd), bwd,
                            flops=flops(B, Hq, D, pairs, backward=True),
                            params={**params, "pass": "fwd+bwd", "baseline": label}))
    for context in (8192,) if quick else (8192, 32768, 131072, 524288):
        for graph in (False, True):
            out.append(_decode_case(context, 1024 if quick else 4096, graph))
    return out


def _decode_case(context: int, W: int, graph: bool = False) -> Case:
    """One new token per step at ``context`` tokens: append + attend, hierarchical vs rolling window;
    eager, or both as CUDA-graph replays (each replay appends one more token on the GPU)."""
    Hq, Hkv = 32, 8

    def make():
        from deepseek_kernels.decode import RollingKVCache
        from deepseek_kernels.hierarchical_decode import HierarchicalKVCache

        kw = dict(device="cuda", dtype=torch.bfloat16)
        k, v = torch.randn(1, context, Hkv, D, **kw), torch.randn(1, context, Hkv, D, **kw)
        hc = HierarchicalKVCache(1, Hkv, D, window=W, block=BLOCK, max_seqlen=2 * context, **kw)
        rc = RollingKVCache(1, Hkv, D, window=W, max_step=1, **kw)
        hc.prefill(k, v)
        rc.prefill(k, v)
        return hc, rc, torch.randn(1, 1, Hq, D, **kw), torch.randn(1, 1, Hkv, D, **kw)

    def ours(hc, rc, q, kn):
        hc.append(kn, kn)
        return dk.hierarchical_attention_decode(q, hc)

    def base(hc, rc, q, kn):
        rc.append(kn, kn)
        return dk.window_attention_decode(q, rc)

    return Case(f"decode 1 token @ {context} W{W} H{Hq}/{Hkv}" + (" (graphed)" if graph else ""), make,
                Impl("deepseek_kernels", ours), Impl("window_attention_decode", base), graph=graph,
                params={"S": context, "W": W, "Hq": Hq, "Hkv": Hkv, "pass": "decode", "baseline": "window"})


def summary() -> dict:
    """Cache sizes against a full KV cache (bf16, Hkv=8, D=128, W=4096, block=64, 4 sinks)."""
    from deepseek_kernels.hierarchical_decode import hierarchical_cache_size

    rows = [hierarchical_cache_size(s, window=4096, block=BLOCK, sinks=4, num_kv_heads=8, head_dim=D)
            for s in (8192, 32768, 100_000, 131072, 524288)]
    lines = [f"  decode cache at {r['seqlen']:>7} tokens: {r['cache_bytes'] / 2**20:7.1f} MiB vs full KV "
             f"{r['full_kv_bytes'] / 2**20:8.1f} MiB ({100 * r['reduction']:.1f} % smaller, {r['levels']} levels)"
             for r in rows]
    return {"cache_size": rows, "text": "\n".join(lines)}


def accuracy(device: torch.device) -> list[dict]:
    """The op (forward and gradients) against the float64 reference on small odd shapes."""
    from deepseek_kernels.reference.hierarchical_attention import (
        hierarchical_attention_bwd_ref,
        hierarchical_attention_ref,
    )

    rows = []
    for S, W, block, sinks, levels in ((77, 16, 16, 0, None), (150, 32, 16, 3, None), (130, 32, 32, 1, 1)):
        q, k, v, do = (torch.randn(1, S, h, 16, device=device) for h in (4, 2, 2, 4))
        kw = dict(window=W, block=block, sinks=sinks, levels=levels)
        out = dk.hierarchical_attention(q, k, v, **kw)
        ref = hierarchical_attention_ref(q.double(), k.double(), v.double(), compute_dtype=torch.float64, **kw)
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        grads = torch.autograd.grad(dk.hierarchical_attention(qg, kg, vg, **kw), (qg, kg, vg), do)
        ref_grads = hierarchical_attention_bwd_ref(do.double(), q.double(), k.double(), v.double(),
                                                   compute_dtype=torch.float64, **kw)
        err = max([((out - ref).norm() / ref.norm()).item()] +
                  [((g - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads)])
        rows.append({
            "case": f"S{S} W{W} block{block} sinks{sinks} L{levels}",
            "path": dk.explain("hierarchical_attention", q).split(":")[0],
            # fp32 inputs: ~1e-6 under the interpreter / reference; tl.dot rounds fp32 to tf32 on a GPU
            "matches_reference": err < (5e-3 if device.type == "cuda" else 1e-4),
            "roundtrip_rel_error": err,
        })
    return rows


def scaling(rows: list[dict]) -> dict:
    """``{pass: {"S": [...], "ours_us": [...], "window_us": [...]}}``: microseconds per token (forward
    and forward + backward: time / (B S); decode: time per step) of the H32/32 rows (decode: its
    only shape) timed against window_attention, sorted by S. CUDA-graph rows go under
    ``"<pass> (graphed)"``."""
    out = {}
    for r in rows:
        if r.get("baseline") != "window" or "ours_ms" not in r:
            continue
        if r["pass"] != "decode" and r.get("Hq") != r.get("Hkv"):
            continue
        tokens = 1 if r["pass"] == "decode" else r["S"] * r.get("B", 1)
        d = out.setdefault(r["pass"] + (" (graphed)" if r.get("graph") else ""),
                           {"S": [], "ours_us": [], "window_us": []})
        d["S"].append(r["S"])
        d["ours_us"].append(1e3 * r["ours_ms"] / tokens)
        d["window_us"].append(1e3 * r["baseline_ms"] / tokens if "baseline_ms" in r else float("nan"))
    for d in out.values():
        order = sorted(range(len(d["S"])), key=d["S"].__getitem__)
        for key in d:
            d[key] = [d[key][i] for i in order]
    return out


def plot(path, rows: list[dict], title: str = TITLE) -> bool:
    """Time per token vs log2(S), one panel per pass (forward, forward + backward, decode), ours
    and window_attention, with a dashed ``∝ log2 S`` line through our smallest S (the issue's
    bound: per-token time may grow no faster). False without matplotlib or timed rows."""
    import math
    from pathlib import Path

    data = scaling(rows)
    if not data:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    passes = [p for p in ("fwd", "fwd+bwd", "decode", "decode (graphed)") if p in data]
    fig, axes = plt.subplots(1, len(passes), figsize=(4.6 * len(passes), 4.2), squeeze=False)
    for ax, name in zip(axes[0], passes):
        d = data[name]
        xs = [math.log2(s) for s in d["S"]]
        decode = name.startswith("decode")
        ax.plot(xs, d["ours_us"], "o-", label="hierarchical decode" if decode else "hierarchical_attention")
        ax.plot(xs, d["window_us"], "s--", label="window decode" if decode else "window_attention")
        y0, x0 = d["ours_us"][0], xs[0]
        ax.plot(xs, [y0 * x / x0 for x in xs], ":", color="gray", label="∝ log2 S (bound)")
        for x, a, b in zip(xs, d["ours_us"], d["window_us"]):
            if b == b and b > 0:
                ax.annotate(f"{a / b:.2f}x", (x, a), textcoords="offset points", xytext=(0, 6), ha="center",
                            fontsize=7)
        ax.set_xlabel("log2(context)" if decode else "log2(S)")
        ax.set_ylabel("µs per token")
        ax.set_title(name, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title, width=int(60 * len(passes)))), fontsize=9)  # fits one panel
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
