"""The one-kernel Gluon backward at head dim 64 (not yet enabled): against float32 autograd of the reference,
then timed next to the Triton backwards (S8192 B4 H32 W4096)."""
import torch
import triton.testing

from deepseek_kernels.reference.attention import window_attention_ref
from deepseek_kernels.triton import window_attention as wa
from deepseek_kernels.triton import window_attention_sm90 as s9

s9.BWD_FUSED_CONFIG[64] = (128, 64, 2)
for B, S, Hq, Hkv, W, sinks in ((2, 17, 4, 1, 1, 0), (1, 300, 8, 2, 17, 4), (2, 555, 4, 4, 129, 0), (1, 1000, 4, 2, 1000, 3)):
    for dtype in (torch.bfloat16, torch.float16):
        q = torch.randn(B, S, Hq, 64, device="cuda", dtype=dtype)
        k, v = (torch.randn(B, S, Hkv, 64, device="cuda", dtype=dtype) for _ in range(2))
        do = torch.randn_like(q)
        out, lse = s9.window_attention_fwd_sm90(q, k, v, window=W, sinks=sinks)
        got = s9.window_attention_bwd_sm90(do, q, k, v, out, lse, window=W, sinks=sinks, deterministic=False)
        qr, kr, vr = (t.float().requires_grad_() for t in (q, k, v))
        want = torch.autograd.grad(window_attention_ref(qr, kr, vr, window=W, sinks=sinks), (qr, kr, vr), do.float())
        errs = [((g.float() - w).norm() / w.norm().clamp_min(1e-6)).item() for g, w in zip(got, want)]
        absm = [(g.float() - w).abs().max().item() for g, w in zip(got, want)]
        print((B, S, Hq, Hkv, W, sinks), str(dtype), " ".join(f"{e:.1e}/{a:.1e}" for e, a in zip(errs, absm)), flush=True)
B, S, H, W = 4, 8192, 32, 4096
q, k, v, do = (torch.randn(B, S, H, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
out, lse = s9.window_attention_fwd_sm90(q, k, v, window=W)
for name, fn in (("gluon fused", lambda: s9.window_attention_bwd_sm90(do, q, k, v, out, lse, window=W, deterministic=False)),
                 ("triton atomic", lambda: wa.window_attention_bwd(do, q, k, v, out, lse, window=W, sm90=False,
                                                                   deterministic=False)),
                 ("triton det", lambda: wa.window_attention_bwd(do, q, k, v, out, lse, window=W, sm90=False))):
    print(name, f"{triton.testing.do_bench(fn, warmup=5, rep=25):.3f} ms", flush=True)
