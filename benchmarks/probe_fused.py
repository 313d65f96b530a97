"""Which shapes make the one-kernel Gluon backward fail (each case in its own process)."""
import subprocess
import sys

CASES = [(2, 17, 4, 1, 1, 0), (1, 17, 4, 4, 16, 0), (1, 64, 4, 4, 16, 0), (1, 128, 4, 4, 16, 0), (2, 128, 4, 1, 1, 0),
         (1, 200, 4, 4, 64, 0), (2, 1000, 4, 4, 128, 0), (1, 4097, 4, 2, 1000, 0), (1, 256, 4, 4, 16, 0),
         (1, 192, 4, 4, 16, 0), (1, 4096, 4, 4, 256, 0), (1, 4096, 2, 2, 4096, 0)]
if len(sys.argv) > 1:
    import torch
    from deepseek_kernels.triton import window_attention_sm90 as s9
    B, S, Hq, Hkv, W, sinks = map(int, sys.argv[1:])
    q = torch.randn(B, S, Hq, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, S, Hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    out, lse = s9.window_attention_fwd_sm90(q, k, v, window=W, sinks=sinks)
    for ov in (0, 2, 1):
        try:
            g = s9.window_attention_bwd_sm90(do, q, k, v, out, lse, window=W, sinks=sinks, deterministic=False,
                                             config_fused=(128, 64, 2, ov))
            torch.cuda.synchronize()
            r = s9.window_attention_bwd_sm90(do, q, k, v, out, lse, window=W, sinks=sinks)
            err = max(((a.float() - b.float()).norm() / (b.float().norm() + 1e-9)).item() for a, b in zip(g, r))
            print(f"  overlap={ov} ok err {err:.2e}", flush=True)
        except Exception as e:
            print(f"  overlap={ov} FAIL {str(e).splitlines()[0][:90]}", flush=True)
            break
else:
    for c in CASES:
        p = subprocess.run([sys.executable, __file__, *map(str, c)], capture_output=True, text=True, timeout=120)
        print(c, p.returncode, p.stdout.strip().replace("\n", " |"), p.stderr.strip().splitlines()[-1:] if p.returncode else "")
