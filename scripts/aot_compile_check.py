"""Compile Triton kernels for a GPU target without a GPU (ahead of time: Triton's own compiler and
ptxas), to catch what the interpreter cannot: unsupported ops, shared-memory overflows, type errors
in code paths the CPU tests never compile.

    python scripts/aot_compile_check.py [--arch 90] [--only NAME ...]

Each entry below is a kernel with example arguments (a tensor stands for its pointer type, ints
for i32, floats for fp32, constexpr parameters take their value) and launch options, optionally
followed by strings its PTX must contain (e.g. ``setmaxnreg``: warp specialization took effect). Prints one
line per kernel and exits non-zero if any fails. With another Triton on PYTHONPATH (e.g. the
H200's 3.6: ``pip install --target DIR triton==3.6.0``) it checks against that version.
"""

import argparse
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_TYPES = {torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.float32: "fp32", torch.float16: "fp16",
          torch.bfloat16: "bf16"}


def compile_for(fn, args: dict, arch: int, **options):
    """``fn`` (a @triton.jit kernel) compiled for ``cuda:arch`` with ``args`` by parameter name."""
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if name not in args and not p.has_default:
            raise KeyError(f"{fn.__name__}: no example value for {name}")
        v = args[name] if name in args else p.default
        # what a real launch specializes on: ints equal to 1 become constants, ints that are
        # multiples of 16 and (16-byte aligned) pointers carry a divisibility hint
        if p.is_constexpr or (type(v) is int and v == 1 and not p.do_not_specialize):
            sig[name] = "constexpr"
            constexprs[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, str):  # an explicit Triton type, e.g. a tensor descriptor
            sig[name] = v
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif type(v).__name__ == "TensorDescriptor":  # a host descriptor object: the type a launch gives it
            from triton.runtime.jit import mangle_type

            sig[name] = mangle_type(v)
        else:
            raise TypeError(f"{fn.__name__}: {name}={v!r}")
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn, signature=sig, constexprs=constexprs, attrs=attrs)
    else:
        src = ASTSource(fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_usage(kernel, arch: int) -> str:
    """Registers and spills of a compiled kernel, from ptxas -v on its PTX (Triton's bundled ptxas)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia as nv

    ptxas = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        arch_flag = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        log = subprocess.run([ptxas, "-v", f"-arch={arch_flag}", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (f"{regs.group(1) if regs else '?'} regs"
            + (f", spills {spills.group(1)}/{spills.group(2)} B st/ld" if spills else ""))


def _t(dtype):
    return torch.empty(1, dtype=dtype)


def cases():
    """(name, kernel, args, options) for the kernels whose compiled form matters most."""
    from deepseek_kernels.triton import hierarchical_attention as ha
    from deepseek_kernels.triton import hierarchical_decode as hd
    from deepseek_kernels.triton import int8_matmul as im
    from deepseek_kernels.triton import sparse_ffn as sf
    from deepseek_kernels.triton import window_attention as wa

    i8, i32, i64, f32, bf16 = (_t(d) for d in (torch.int8, torch.int32, torch.int64, torch.float32, torch.bfloat16))
    out = []
    mm = dict(a_ptr=i8, b_ptr=i8, out_ptr=bf16, a_scale_ptr=f32, b_scale_ptr=f32, bias_ptr=f32, M=8192, N=8192,
              K=8192, stride_am=8192, stride_ak=1, stride_bn=8192, stride_bk=1, stride_om=8192, stride_on=1,
              APPLY_EPILOGUE=True, HAS_BIAS=False, GROUP_M=8)
    for even in (True, False):
        cfg = im.launch_config(8192, 8192, 8192)
        w, st = cfg.pop("num_warps"), cfg.pop("num_stages")
        out.append((f"int8 GEMM 8192^3 even={even}", im._int8_matmul_kernel,
                    {**mm, **cfg, "EVEN_MN": even, "EVEN_K": even}, dict(num_warps=w, num_stages=st)))
    cfg = im.launch_config(1, 14336, 4096)
    w, st = cfg.pop("num_warps"), cfg.pop("num_stages")
    out.append(("int8 GEMV M1", im._int8_matmul_kernel, {**mm, **cfg, "EVEN_MN": False, "EVEN_K": True},
                dict(num_warps=w, num_stages=st)))
    # int8_linear with DSK_PDL=1: the GEMV as a programmatic dependent launch (griddepcontrol.wait)
    out.append(("int8 GEMV M1, programmatic dependent launch", im._int8_matmul_kernel,
                {**mm, **cfg, "EVEN_MN": False, "EVEN_K": True, "PDL": True},
                dict(num_warps=w, num_stages=st, launch_pdl=True)))
    tma = dict(mm, a_desc="tensordesc<i8[128, 128]>", b_desc="tensordesc<i8[256, 128]>", BLOCK_M=128, BLOCK_N=256,
               BLOCK_K=128)
    for k in ("a_ptr", "b_ptr", "stride_am", "stride_ak", "stride_bn", "stride_bk"):
        tma.pop(k)
    tma["TMA_STORE"] = False
    out.append(("int8 TMA GEMM", im._int8_matmul_tma_kernel, tma, dict(num_warps=8, num_stages=3)))
    out.append(("int8 TMA persistent GEMM (the eager default for M, N >= 8192)", im._int8_matmul_tma_persistent_kernel,
                dict(tma, NUM_PROGRAMS=132), dict(num_warps=8, num_stages=4)))
    # the TMA-store epilogue stages a 64 KiB output tile: 3 stages fit (214 KiB), 4 do not (263 KiB)
    store = dict(tma, out_ptr="tensordesc<bf16[128, 256]>", TMA_STORE=True, NUM_PROGRAMS=132)
    out.append(("int8 TMA persistent GEMM, TMA store (experiment)", im._int8_matmul_tma_persistent_kernel, store,
                dict(num_warps=8, num_stages=3)))

    from deepseek_kernels.triton import window_attention_sm90 as s9

    if s9.HAVE_GLUON:  # the Gluon Hopper window forward: warp-specialized (setmaxnreg), wgmma, within 227 KiB
        for D, dt in ((128, torch.bfloat16), (64, torch.float16)):
            bm, bn, st = s9.CONFIG[D]
            x = torch.empty(1, 256, 2, D, dtype=dt)
            args = dict(q_desc=s9._descriptor(x, bm // 2), k_desc=s9._descriptor(x, bn), v_desc=s9._descriptor(x, bn),
                        o_desc=s9._descriptor(x, bm // 2), LSE=f32, stride_lh=256, seq_len=256, qk_scale=0.1,
                        window=4096, sinks=0, HQ=2, REP=1, N_M=2, TOTAL=8, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
                        STAGES=st, CONSUMER_REGS=s9.CONSUMER_REGS)
            for pp, persistent, rescale, reverse in ((True, False, 0.0, False), (False, False, 0.0, False),
                                                     (True, True, 0.0, False), (True, False, 8.0, True),
                                                     (True, True, 8.0, True)):
                name = (f"window attention fwd sm90 (Gluon) D{D} pingpong={pp}" + (" persistent" if persistent else "")
                        + (f" rescale>{rescale:g}" if rescale else "") + (" reverse" if reverse else ""))
                out.append((name, s9._window_attn_fwd_sm90_kernel,
                            dict(args, PINGPONG=pp, PERSISTENT=persistent, RESCALE=rescale, REVERSE=reverse),
                            dict(num_warps=4, maxnreg=s9.MAXNREG), "setmaxnreg", "wgmma.mma_async"))
            bm, bn, st = s9.BWD_DQ_CONFIG[D]
            dq = dict(q_desc=s9._descriptor(x, bm // 2), do_desc=s9._descriptor(x, bm // 2), k_desc=s9._descriptor(x, bn),
                      v_desc=s9._descriptor(x, bn), dq_desc=s9._descriptor(x, bm // 2), LSE=f32, DELTA=f32, stride_lh=256,
                      seq_len=256, qk_scale=0.1, sm_scale=0.1, window=4096, sinks=0, HQ=2, REP=1, HEAD_DIM=D, BLOCK_M=bm,
                      BLOCK_N=bn, STAGES=st, PINGPONG=True, CONSUMER_REGS=s9.CONSUMER_REGS)
            out.append((f"window attention bwd dQ sm90 (Gluon) D{D}", s9._bwd_dq_kernel, dq,
                        dict(num_warps=4, maxnreg=s9.MAXNREG), "setmaxnreg", "wgmma.mma_async"))
            bn, bm, st = s9.BWD_DKDV_CONFIG[D]
            kv = dict(q_desc=s9._descriptor(x, bm), do_desc=s9._descriptor(x, bm), k_desc=s9._descriptor(x, bn // 2),
                      v_desc=s9._descriptor(x, bn // 2), dk_desc=s9._descriptor(x, bn // 2),
                      dv_desc=s9._descriptor(x, bn // 2), LSE=f32, DELTA=f32, stride_lh=256, seq_len=256, qk_scale=0.1,
                      sm_scale=0.1, window=4096, sinks=0, HKV=2, REP=1, HEAD_DIM=D, BLOCK_N=bn, BLOCK_M=bm, STAGES=st,
                      PINGPONG=True, CONSUMER_REGS=s9.CONSUMER_REGS)
            out.append((f"window attention bwd dK/dV sm90 (Gluon) D{D}", s9._bwd_dkdv_kernel, kv,
                        dict(num_warps=4, maxnreg=s9.MAXNREG), "setmaxnreg", "wgmma.mma_async"))
            if D in s9.BWD_FUSED_CONFIG:  # the one-kernel backward (dQ by TMA reduce-adds)
                bn, bm, st = s9.BWD_FUSED_CONFIG[D]
                acc = torch.empty(1, 256, 2, D, dtype=torch.float32)
                fu = dict(q_desc=s9._descriptor(x, bm), do_desc=s9._descriptor(x, bm), k_desc=s9._descriptor(x, bn),
                          v_desc=s9._descriptor(x, bn), dk_desc=s9._descriptor(x, bn // 2),
                          dv_desc=s9._descriptor(x, bn // 2), dq_desc=s9._descriptor_f32(acc, bm, D // 2),
                          lse_desc=s9._row_descriptor(torch.empty(2, 256), bm),
                          delta_desc=s9._row_descriptor(torch.empty(2, 256), bm), seq_len=256, NB=1, qk_scale=0.1, sm_scale=0.1, window=4096, sinks=0,
                          HKV=2, REP=1, HEAD_DIM=D, BLOCK_N=bn, BLOCK_M=bm, STAGES=st, CONSUMER_REGS=s9.CONSUMER_REGS)
                out.append((f"window attention bwd fused sm90 (Gluon, TMA reduce dQ) D{D}", s9._bwd_fused_kernel, fu,
                            dict(num_warps=4, maxnreg=s9.MAXNREG), "setmaxnreg", "wgmma.mma_async",
                            "cp.reduce.async.bulk.tensor"))

    qpt = dict(x_ptr=bf16, smooth_ptr=bf16, q_ptr=i8, scale_ptr=f32, K=4096, stride_xm=4096, stride_qm=4096,
               HAS_SMOOTH=False)
    from deepseek_kernels.ops.int8_matmul import quantize_launch

    out.append(("int8 per-token quantize K4096, programmatic dependent launch", im._quantize_per_token_kernel,
                dict(qpt, BLOCK_K=4096, PDL=True), dict(num_warps=8, launch_pdl=True)))
    for K_ in (4096, 14336, 20000):  # one tile (8 / 16 warps), two passes
        launch = quantize_launch(K_)
        out.append((f"int8 per-token quantize K{K_} tile {launch['BLOCK_K']}", im._quantize_per_token_kernel,
                    dict(qpt, K=K_, stride_xm=K_, stride_qm=K_, BLOCK_K=launch["BLOCK_K"]),
                    dict(num_warps=launch["num_warps"])))

    rt = dict(X=bf16, WR=bf16, BIAS=f32, IDX=i32, WOUT=f32, PROBS=f32, PART=f32, T=1, D=4096, NR=64,
              threshold=0.0, stride_xt=4096, stride_xd=1, stride_wn=4096, stride_wd=1, K=10, SOFTMAX=False,
              NORMALISE=True, HAS_BIAS=False, HAS_THRESHOLD=False, SPLITS=16, DOT_PRECISION="tf32", BLOCK_D=64,
              BLOCK_NR=64, BLOCK_K=16)
    split = dict(X=bf16, WR=bf16, PART=f32, T=1, D=4096, NR=64, d_per_split=256, stride_xt=4096, stride_xd=1,
                 stride_wn=4096, stride_wd=1, DOT_PRECISION="tf32", BLOCK_T=16, BLOCK_NR=64, BLOCK_NRS=16)
    out.append(("sparse router split logits, 64-wide d tiles", sf._sparse_ffn_router_split_kernel,
                dict(split, BLOCK_D=64), dict(num_warps=4)))
    out.append(("sparse router split logits, weight tile before the PDL wait (the decode default)",
                sf._sparse_ffn_router_split_kernel, dict(split, BLOCK_D=256, PDL=True, EARLY_W=True),
                dict(num_warps=4, launch_pdl=True)))
    out.append(("sparse router select, loop (after a split)", sf._sparse_ffn_router_kernel,
                dict(rt, BLOCK_T=16, SELECT=0), dict(num_warps=4)))
    out.append(("sparse router select, by rank", sf._sparse_ffn_router_kernel,
                dict(rt, BLOCK_T=2, SELECT=1), dict(num_warps=4)))
    out.append(("sparse router select, by sorting (the decode default)", sf._sparse_ffn_router_kernel,
                dict(rt, BLOCK_T=2, SELECT=2), dict(num_warps=4)))
    out.append(("sparse router select by sorting, programmatic dependent launch", sf._sparse_ffn_router_kernel,
                dict(rt, BLOCK_T=2, SELECT=2, PDL=True), dict(num_warps=4, launch_pdl=True)))
    out.append(("sparse router, one kernel (logits + loop)", sf._sparse_ffn_router_kernel,
                dict(rt, T=8192, SPLITS=0, BLOCK_T=32, SELECT=0), dict(num_warps=4)))

    dec = dict(X=bf16, WG=bf16, WU=bf16, IDX=i32, WT=f32, H=bf16, T=1, D=4096, BS=224, S=0, K=10, NB=64,
               stride_xt=4096, stride_xd=1, stride_wf=4096, stride_wd=1, DOT_PRECISION="tf32", BLOCK_T=16,
               BLOCK_KS=16, BLOCK_B=64)
    base = sf.decode_launch_config(1, 4096, 224)
    g = base["gate_up"]
    out.append(("sparse decode gate/up", sf._sparse_ffn_decode_gate_up_kernel,
                dict(dec, BLOCK_N=g["block_n"], BLOCK_K=g["block_k"]),
                dict(num_warps=g["num_warps"], num_stages=g["num_stages"])))
    out.append(("sparse decode gate/up, programmatic dependent launch", sf._sparse_ffn_decode_gate_up_kernel,
                dict(dec, BLOCK_N=g["block_n"], BLOCK_K=g["block_k"], PDL=True),
                dict(num_warps=g["num_warps"], num_stages=g["num_stages"], launch_pdl=True)))
    d = base["down"]
    down = dict(H=bf16, WD=bf16, IDX=i32, OUT=bf16, T=1, D=4096, BS=224, S=0, K=10, NB=64, NR=64, stride_wd=14336,
                stride_wf=1, stride_ot=4096, DOT_PRECISION="tf32", BLOCK_T=16, BLOCK_N=d["block_n"],
                BLOCK_K=d["block_k"], BLOCK_KS=16, BLOCK_B=64)
    out.append(("sparse decode down", sf._sparse_ffn_decode_down_kernel, down,
                dict(num_warps=d["num_warps"], num_stages=d["num_stages"])))
    out.append(("sparse decode down, programmatic dependent launch", sf._sparse_ffn_decode_down_kernel,
                dict(down, PDL=True), dict(num_warps=d["num_warps"], num_stages=d["num_stages"], launch_pdl=True)))
    out.append(("sparse decode down, programmatic dependent launch, first w tile before the wait",
                sf._sparse_ffn_decode_down_kernel, dict(down, PDL=True, EARLY_W=True),
                dict(num_warps=d["num_warps"], num_stages=d["num_stages"], launch_pdl=True)))
    out.append(("sparse decode down, programmatic dependent launch, first w tile before the wait, blocks by mask",
                sf._sparse_ffn_decode_down_kernel, dict(down, PDL=True, EARLY_W=True, BY_MASK=True),
                dict(num_warps=d["num_warps"], num_stages=d["num_stages"], launch_pdl=True)))
    out.append(("sparse decode down, 128-wide K tiles, 4 stages", sf._sparse_ffn_decode_down_kernel,
                dict(down, BLOCK_N=16, BLOCK_K=128), dict(num_warps=4, num_stages=4)))
    # the deepest pipelines tune_sparse_ffn.py --decode tries (session 9): they must fit the shared memory
    out.append(("sparse decode down, 16x128, 8 stages", sf._sparse_ffn_decode_down_kernel,
                dict(down, BLOCK_N=16, BLOCK_K=128), dict(num_warps=2, num_stages=8)))
    # w_down neuron-major (tune_sparse_ffn.py --down-layout, session 15: stride_wd 1, a tile row = BLOCK_N
    # contiguous outputs) with the widest tiles the tuner tries: they must fit the shared memory
    nm = dict(down, stride_wd=1, stride_wf=4096)
    out.append(("sparse decode down, neuron-major w_down, 128x128, 3 stages", sf._sparse_ffn_decode_down_kernel,
                dict(nm, BLOCK_N=128, BLOCK_K=128), dict(num_warps=8, num_stages=3)))
    out.append(("sparse decode down, neuron-major w_down, 64x256, 5 stages", sf._sparse_ffn_decode_down_kernel,
                dict(nm, BLOCK_N=64, BLOCK_K=256), dict(num_warps=4, num_stages=5)))
    # the split down projection (session 10, opt-in down.splits) and its finish kernel
    split = {k: v for k, v in down.items() if k not in ("OUT", "NR", "stride_ot")}
    out.append(("sparse decode down split, 16x128, 4 stages", sf._sparse_ffn_decode_down_split_kernel,
                dict(split, PART=f32, BLOCK_N=16, BLOCK_K=128), dict(num_warps=2, num_stages=4)))
    out.append(("sparse decode down split, neuron-major w_down, 128x128, 3 stages",
                sf._sparse_ffn_decode_down_split_kernel,
                dict(split, stride_wd=1, stride_wf=4096, PART=f32, BLOCK_N=128, BLOCK_K=128),
                dict(num_warps=4, num_stages=3)))
    out.append(("sparse decode down finish, 4 slices", sf._sparse_ffn_decode_down_finish_kernel,
                dict(PART=f32, IDX=i32, OUT=bf16, T=1, D=4096, K=10, NR=64, stride_ot=4096, SPLITS=4, BLOCK_T=16,
                     BLOCK_N=256, BLOCK_KS=16), dict(num_warps=4)))
    out.append(("sparse decode gate/up, 32x128, 8 stages", sf._sparse_ffn_decode_gate_up_kernel,
                dict(dec, BLOCK_N=32, BLOCK_K=128), dict(num_warps=4, num_stages=8)))
    out.append(("sparse decode gate/up, 32x256, 4 stages", sf._sparse_ffn_decode_gate_up_kernel,
                dict(dec, BLOCK_N=32, BLOCK_K=256), dict(num_warps=4, num_stages=4)))
    # the router's selection fused into gate/up (session 11, FUSED_ROUTE_TOKENS, on at 2 tokens since session 29)
    fused = dict(PART=f32, BIAS=f32, IDX=i32, WOUT=f32, PROBS=f32, X=bf16, WG=bf16, WU=bf16, H=bf16, T=1, D=4096,
                 BS=224, S=0, NR=64, threshold=0.0, stride_xt=4096, stride_xd=1, stride_wf=4096, stride_wd=1, K=10,
                 SOFTMAX=False, NORMALISE=True, HAS_BIAS=False, HAS_THRESHOLD=False, SPLITS=16, DOT_PRECISION="tf32",
                 BLOCK_TS=2, BLOCK_NR=64, BLOCK_KS=16, BLOCK_T=16, BLOCK_N=g["block_n"], BLOCK_K=g["block_k"],
                 BLOCK_B=64)
    out.append(("sparse decode route + gate/up fused", sf._sparse_ffn_decode_route_gate_up_kernel, fused,
                dict(num_warps=g["num_warps"], num_stages=g["num_stages"])))
    out.append(("sparse decode route + gate/up fused, programmatic dependent launch",
                sf._sparse_ffn_decode_route_gate_up_kernel, dict(fused, PDL=True),
                dict(num_warps=g["num_warps"], num_stages=g["num_stages"], launch_pdl=True)))

    H, D, W, B = 32, 128, 4096, 64
    strides = dict(stride_qt=H * D, stride_qh=D, stride_kt=H * D, stride_kh=D, stride_vt=H * D, stride_vh=D,
                   stride_st=H * D, stride_sh=D, stride_dot=H * D, stride_doh=D, stride_lh=131072)
    common = dict(sm_scale=0.088, nw=W // B, levels=5, block=B, sinks=0, HEAD_DIM=D, BLOCK_D=D)
    fwd = dict(Q=bf16, K=bf16, V=bf16, SK=f32, SV=f32, O=bf16, LSE=f32, cu=i32, stride_ot=H * D, stride_oh=D,
               T=131072, NSEQ=1, HQ=H, REP=1, BLOCK_M=64, BLOCK_N=64, BLOCK_S=32, qk_scale=0.127, **strides,
               **{k: v for k, v in common.items() if k != "sm_scale"})
    pool = dict(cu=i32, stride_dt=H * D, stride_dh=D, block=B, sinks=0, HKV=H, HEAD_DIM=D, BLOCK_D=D)
    out.append(("hierarchical pool, level 1 (16 groups per program)", ha._hier_pool_kernel,
                dict(pool, SRC_K=bf16, SRC_V=bf16, DST_K=f32, DST_V=f32, stride_skt=H * D, stride_skh=D,
                     stride_svt=H * D, stride_svh=D, src_off=0, dst_off=0, level=1, FROM_KEYS=True, FAN=2 * B,
                     BLOCK_G=16), dict(num_warps=4)))
    out.append(("hierarchical pool, level 2 (from level 1)", ha._hier_pool_kernel,
                dict(pool, SRC_K=f32, SRC_V=f32, DST_K=f32, DST_V=f32, stride_skt=H * D, stride_skh=D,
                     stride_svt=H * D, stride_svh=D, src_off=0, dst_off=4096, level=2, FROM_KEYS=False, FAN=2,
                     BLOCK_G=16), dict(num_warps=4)))
    out.append(("hierarchical fwd (default tiles)", ha._hier_attn_fwd_kernel, fwd, dict(num_warps=4, num_stages=3)))
    bwd = ha.bwd_launch_config(B, W, D)
    dq = dict(Q=bf16, K=bf16, V=bf16, SK=f32, SV=f32, DO=bf16, LSE=f32, DELTA=f32, DQ=bf16, cu=i32,
              stride_dqt=H * D, stride_dqh=D, T=131072, NSEQ=1, HQ=H, REP=1, **strides, **common)
    c = bwd["dq"]
    for stages in (c["num_stages"], 3):
        out.append((f"hierarchical bwd dq, {stages} stages", ha._hier_bwd_dq,
                    dict(dq, BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], BLOCK_S=c["block_s"]),
                    dict(num_warps=c["num_warps"], num_stages=stages)))
    c = bwd["dkdv"]
    dkdv = dict(Q=bf16, K=bf16, V=bf16, DO=bf16, LSE=f32, DELTA=f32, DSK=f32, DSV=f32, DK=bf16, DV=bf16, cu=i32,
                stride_dkt=H * D, stride_dkh=D, stride_dvt=H * D, stride_dvh=D, T=131072, NSEQ=1, HKV=H, REP=1,
                BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], **strides, **common)
    for bcast in (False, True):
        out.append((f"hierarchical bwd dkdv, bcast={bcast}", ha._hier_bwd_dkdv, dict(dkdv, BCAST=bcast),
                    dict(num_warps=c["num_warps"], num_stages=c["num_stages"])))
    c = bwd["dsum"]
    dsum = dict(Q=bf16, SK=f32, SV=f32, DO=bf16, LSE=f32, DELTA=f32, DSK=f32, DSV=f32, cu=i32, level=1, loff=0,
                out_loff=0, split_rows=4096, chunk=94, stride_ost=H * D, stride_osh=D, HKV=H, REP=1, BLOCK_M=c["block_m"], BLOCK_S=c["block_s"], **strides, **common)
    for bs in (c["block_s"], ha.bwd_launch_config(B, W, D, levels=7)["dsum"]["block_s"], 64):  # 16, 32 (6+ levels), 64
        out.append((f"hierarchical bwd dsum, summary tile {bs}", ha._hier_bwd_dsum, dict(dsum, BLOCK_S=bs),
                    dict(num_warps=c["num_warps"], num_stages=c["num_stages"])))
    bm, bn, w, st = wa.FWD_WIDE_CONFIG[D]
    wfwd = dict(Q=bf16, K=bf16, V=bf16, O=bf16, LSE=f32, cu_q=i32, cu_k=i32, K_DESC=bf16, V_DESC=bf16,
                stride_qt=H * D, stride_qh=D, stride_kt=H * D, stride_kh=D, stride_vt=H * D, stride_vh=D,
                stride_ot=H * D, stride_oh=D, stride_lh=131072, qk_scale=0.127, window=W, sinks=0, HQ=H, REP=1,
                HEAD_DIM=D, CAUSAL=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=D, PREC="tf32", USE_TMA=False)
    out.append(("window attention fwd (tuned wide-window tiles)", wa._window_attn_fwd_kernel, wfwd,
                dict(num_warps=w, num_stages=st)))
    desc = f"tensordesc<bf16[{bn}, {D}]>"
    out.append(("window attention fwd, TMA loads (experiment)", wa._window_attn_fwd_kernel,
                dict(wfwd, K_DESC=desc, V_DESC=desc, USE_TMA=True), dict(num_warps=w, num_stages=st)))
    # the one-loop warp-specialized forward (session 11, ws=True): the PTX must carry setmaxnreg (the
    # specialization applied; Triton falls back to a plain loop silently otherwise)
    bm, bn, w, st = wa.WS_FWD_CONFIG
    desc = f"tensordesc<bf16[{bn}, {D}]>"
    wsfwd = {k: v for k, v in wfwd.items() if k not in ("Q", "K", "V", "stride_qt", "stride_qh", "stride_kt",
                                                       "stride_kh", "stride_vt", "stride_vh", "BLOCK_D", "USE_TMA")}
    wsfwd["Q_DESC"] = f"tensordesc<bf16[{bm}, {D}]>"
    for causal in (True, False):
        out.append((f"window attention fwd, warp-specialized one loop, causal={causal}", wa._window_attn_fwd_ws_kernel,
                    dict(wsfwd, K_DESC=desc, V_DESC=desc, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, WARP_SPECIALIZE=True),
                    dict(num_warps=w, num_stages=st), "setmaxnreg"))
    out.append(("attention bwd delta", wa._bwd_delta_kernel,
                dict(O=bf16, DO=bf16, DELTA=f32, T=131072, stride_ot=H * D, stride_oh=D, stride_dot=H * D,
                     stride_doh=D, stride_lh=131072, HEAD_DIM=D, BLOCK_T=64, BLOCK_D=D), dict(num_warps=4)))
    hdec = dict(Q=bf16, CK=bf16, CV=bf16, POS=i64, SK=f32, SV=f32, GRP=i64, CNT=i64, SEQLENS=i64, LENS=i64, O=bf16,
                OPART=f32, MPART=f32, LPART=f32, stride_qb=H * D, stride_qt=H * D, stride_qh=D, stride_ob=H * D,
                stride_ot=H * D, stride_oh=D, sm_scale=0.088, T=1, HQ=32, HKV=8, REP=4, D=D, NS=4160, M=65, L=7,
                nw=64, block=64, sinks=0, tiles_per_split=3, NSPLIT=33, SPLIT=True, BLOCK_M=16, BLOCK_N=64,
                BLOCK_D=D)
    out.append(("hierarchical decode attention (default: 2 stages)", hd._hier_decode_kernel, hdec,
                dict(num_warps=4, num_stages=2)))
    out.append(("hierarchical decode merge", hd._hier_decode_combine_kernel,
                dict(OPART=f32, MPART=f32, LPART=f32, O=bf16, stride_ob=H * D, stride_ot=H * D, stride_oh=D, T=1,
                     HQ=32, D=D, NSPLIT=33, BLOCK_SPLIT=64, BLOCK_D=D), dict(num_warps=4)))
    # sparse FFN training GEMMs (T=8192, d_model 4096, d_ff 14336, 64 blocks: BS=224) at the default tiles
    D_, BS_, P_ = 4096, 224, 8192 * 19
    # the forward kernels with their resolved per-kernel defaults at T8192 (tiles, warps, stages)
    fbm, fkc = sf.resolve_config(sf.launch_config(8192, D_, BS_), sf.FWD_KERNELS)

    def fwd_entry(kern):
        k = fkc[kern]
        return (dict(DOT_PRECISION="tf32", BLOCK_M=fbm, BLOCK_N=k["block_n"], BLOCK_K=k["block_k"]),
                dict(num_warps=k["num_warps"], **({} if k["num_stages"] is None else {"num_stages": k["num_stages"]})))

    gemm, opts = fwd_entry("gate_up")
    out.append(("sparse FFN gate/up GEMM + SwiGLU", sf._sparse_ffn_gate_up_kernel,
                dict(gemm, X=bf16, WG=bf16, WU=bf16, H=bf16, ACT=bf16, SORTED_TOK=i32, TILE_BLOCK=i32, TILE_START=i32,
                     OFFSETS=i32, D=D_, BS=BS_, NB=64, stride_xt=D_, stride_xd=1, stride_wf=D_, stride_wd=1,
                     SAVE_ACT=True), opts))
    gemm, opts = fwd_entry("down")  # the plain kernel (where the persistent TMA one cannot run) at down's tiles
    out.append(("sparse FFN down GEMM", sf._sparse_ffn_down_kernel,
                dict(gemm, H=bf16, WD=bf16, Y=bf16, TILE_BLOCK=i32, TILE_START=i32, OFFSETS=i32, D=D_, BS=BS_, NB=64,
                     stride_wd=64 * BS_, stride_wf=1), opts))
    # the persistent TMA down projection (opt-in down.tma, session 16) at the forward's large-batch tiles, with the
    # K tile of 32 that divides the 224-neuron blocks
    for bn, bk, nw, st in ((128, 32, 8, 4), (256, 32, 8, 3), (128, 32, 4, 4)) if BS_ % 32 == 0 else ():
        desc = f"tensordesc<bf16[{bn}, {bk}]>"
        out.append((f"sparse FFN down GEMM, persistent TMA {bn}x{bk} w{nw} s{st}", sf._sorted_rows_tma_kernel,
                    dict(a_desc=f"tensordesc<bf16[128, {bk}]>", w_desc=desc, w2_desc=desc, OUT=bf16, TILE_BLOCK=i32,
                         TILE_START=i32, OFFSETS=i32, TILE_COUNT=i64, D=D_, BS=BS_, W_NK=True, DUAL=False,
                         DOT_PRECISION="tf32", BLOCK_M=128, BLOCK_N=bn, BLOCK_K=bk, NUM_PROGRAMS=132),
                    dict(num_warps=nw, num_stages=st)))
    # the Gluon forms of the down projection and dx (sm90 = True, session 30): warp-specialized, TMA ring, wgmma
    from deepseek_kernels.triton import sparse_ffn_sm90 as g9

    if g9.HAVE_GLUON and BS_ % 32 == 0:
        h = torch.empty(256, BS_, dtype=torch.bfloat16)
        act = torch.empty(256, 2 * BS_, dtype=torch.bfloat16)
        wdn = torch.empty(D_, 64 * BS_, dtype=torch.bfloat16)
        wgu = torch.empty(64 * BS_, D_, dtype=torch.bfloat16)
        for w_nk, bn, st in ((True, g9.CONFIG["block_n"], g9.CONFIG["stages"]), (True, 128, 10),
                             (False, g9.CONFIG["block_n"], g9.CONFIG["stages"]), (False, 128, 10)):
            a_t, w_t = (h, wdn) if w_nk else (act, wgu)
            w_box = [bn, 32] if w_nk else [32, bn]  # (K steps of 32: g9.CONFIG["block_k"])
            out.append((f"sparse FFN {'down' if w_nk else 'bwd dx'} GEMM sm90 (Gluon) {bn}x32 s{st}",
                        g9._sorted_rows_gemm_sm90_kernel,
                        dict(a_desc=g9._desc(a_t, [64, 32]), w_desc=g9._desc(w_t, w_box), w2_desc=g9._desc(w_t, w_box),
                             out_desc=g9._desc(torch.empty(256, D_, dtype=torch.bfloat16), [64, bn]), OUT=bf16, TILE_BLOCK=i32, TILE_START=i32, OFFSETS=i32, TILE_COUNT=i64, D=D_, BS=BS_,
                             W_NK=w_nk, DUAL=not w_nk, BLOCK_N=bn, BLOCK_K=32, STAGES=st,
                             CONSUMER_REGS=g9.CONSUMER_REGS),
                        dict(num_warps=4, maxnreg=g9.MAXNREG), "setmaxnreg", "wgmma.mma_async"))
        for w_nk in (True, False):  # the A-resident form (session 37; the down projection's default)
            c = g9.ar_config(BS_, not w_nk)
            a_t, w_t = (h, wdn) if w_nk else (act, wgu)
            w_box = [c["block_n"], c["block_k"]] if w_nk else [c["block_k"], c["block_n"]]
            out.append((f"sparse FFN {'down' if w_nk else 'bwd dx'} GEMM sm90 (Gluon, A resident) s{c['stages']}",
                        g9._rows_gemm_ar_sm90_kernel,
                        dict(a_desc=g9._desc(a_t, [64, c["block_k"]]), w_desc=g9._desc(w_t, w_box),
                             w2_desc=g9._desc(w_t, w_box),
                             out_desc=g9._desc(torch.empty(256, D_, dtype=torch.bfloat16), [64, c["block_n"]]),
                             OUT=bf16, TILE_BLOCK=i32, TILE_START=i32, OFFSETS=i32, TILE_COUNT=i64, D=D_, BS=BS_,
                             W_NK=w_nk, DUAL=not w_nk, BLOCK_N=c["block_n"], BLOCK_K=c["block_k"],
                             STAGES=c["stages"], UNIT_COLS=c["unit_cols"], O_BUFS=c["o_bufs"],
                             CONSUMER_REGS=g9.CONSUMER_REGS, PRODUCER_REGS=g9.AR_PRODUCER_REGS),
                        dict(num_warps=4, maxnreg=g9.MAXNREG), "setmaxnreg", "wgmma.mma_async"))
    if g9.HAVE_GLUON:  # the gathered gate/up (gate_up.sm90, the sm_90 default since session 31), its whole tiles
        # as one wide product (GATE_UP_WIDE, session 36) or two
        c = g9.GATE_UP_CONFIG
        wgu_t = torch.empty(64 * BS_, D_, dtype=torch.bfloat16)
        r0, r1 = g9.gate_up_pieces(BS_, c["block_n"])
        # (K steps of 32 in 8 slots: the GPU test's same-bits variant)
        for form, bk, st in (("wide, merged pieces", c["block_k"], c["stages"]), ("wide", c["block_k"], c["stages"]),
                             ("two products", c["block_k"], c["stages"]), ("wide, merged pieces, K 32 x 8", 32, 8)):
            wdesc = g9._desc(wgu_t, [c["block_n"], bk])
            wp = [g9._desc(wgu_t, [r or r0, bk]) for r in (r0, r1)]
            mp = form.startswith("wide, merged pieces")
            out.append((f"sparse FFN gate/up GEMM sm90 (Gluon, cp.async gather, {form})", g9._gate_up_sm90_kernel,
                        dict(w_desc_g=wdesc, w_desc_u=wdesc, wp_g0=wp[0] if mp else wdesc,
                             wp_u0=wp[0] if mp else wdesc, wp_g1=wp[1] if mp else wdesc, wp_u1=wp[1] if mp else wdesc,
                             MP=mp, X=bf16, H=bf16, ACT=bf16, SORTED_TOK=i32,
                             TILE_BLOCK=i32, TILE_START=i32, OFFSETS=i32, TILE_COUNT=i64, D=D_, BS=BS_, stride_xt=D_,
                             SAVE_ACT=True, BLOCK_K=bk, STAGES=st,
                             WIDE=not form.startswith("two products"),
                             ROTATE=g9.GATE_UP_ROTATE, CONSUMER_REGS=g9.GATHER_CONSUMER_REGS, PRODUCER_REGS=g9.PRODUCER_REGS,
                             **dict(zip(("R0", "R1"), g9.gate_up_pieces(BS_, c["block_n"])))),
                        dict(num_warps=4, maxnreg=g9.MAXNREG), "setmaxnreg", "wgmma.mma_async", "cp.async"))
    if g9.HAVE_GLUON:  # the gathered dact (dact.sm90, session 31), its epilogue in a fourth partition (session 36)
        c = g9.DACT_CONFIG
        wdn_t = torch.empty(D_, 64 * BS_, dtype=torch.bfloat16)
        r0, r1 = g9.tail_pieces(BS_ - c["block_n"])
        # (K steps of 64 in 3 slots, session 38's: the GPU test's same-bits variant)
        for prefetch, split, bk, st in ((True, False, c["block_k"], c["stages"]), (False, False, c["block_k"],
                                        c["stages"]), (True, True, c["block_k"], c["stages"]), (True, False, 64, 3)):
            wd = g9._desc(wdn_t, [bk, c["block_n"]])
            wd1, wd2 = g9._desc(wdn_t, [bk, r0]), g9._desc(wdn_t, [bk, r1])
            form = (f"{'prefetching ' if prefetch else ''}epilogue partition"
                    f"{', pieces in boxes of their own' if split else ''}{', K 64 x 3' if bk == 64 else ''}")
            out.append((f"sparse FFN bwd dact sm90 (Gluon, cp.async gather, {form})", g9._dact_sm90_kernel,
                        dict(w_desc=wd, w_desc1=wd1 if split else wd, w_desc2=wd2 if split else wd, SPLIT=split,
                             DO=bf16, ACT=bf16, WSORT="*fp32",
                             DACT=bf16, HW=bf16, DWP="*fp32", SORTED_TOK=i32, TILE_BLOCK=i32, TILE_START=i32,
                             OFFSETS=i32, TILE_COUNT=i64, D=D_, stride_dot=D_, BS=BS_, BLOCK_K=bk,
                             STAGES=g9.dact_stages(c["block_n"], bk, st, r0, r1, split),
                             CONSUMER_REGS=g9.EPI_CONSUMER_REGS, PRODUCER_REGS=g9.PRODUCER_REGS, EPI_REGS=g9.EPI_REGS, PREFETCH=prefetch, R0=r0, R1=r1),
                        dict(num_warps=4, maxnreg=g9.EPI_MAXNREG), "setmaxnreg", "wgmma.mma_async", "cp.async"))
    if g9.HAVE_GLUON:  # the gathered dW gate/up (dw_gate_up.sm90, session 31)
        c = g9.DW_GATE_UP_CONFIG
        dact_t = torch.empty(256, 2 * BS_, dtype=torch.bfloat16)
        out.append(("sparse FFN bwd dW gate/up sm90 (Gluon, cp.async gather)", g9._dw_gate_up_sm90_kernel,
                    dict(a_desc=g9._desc(dact_t, [c["block_k"], 64]), X=bf16, DWG=bf16, DWU=bf16, SORTED_TOK=i32,
                         OFFSETS=i32, NB=64, D=D_, stride_xt=D_, stride_wf=D_, BS=BS_, BLOCK_N=c["block_n"],
                         STAGES=c["stages"], CONSUMER_REGS=g9.GATHER_CONSUMER_REGS, PRODUCER_REGS=g9.PRODUCER_REGS),
                    dict(num_warps=4, maxnreg=g9.MAXNREG), "setmaxnreg", "wgmma.mma_async", "cp.async"))
    if g9.HAVE_GLUON:  # the gathered dW down (dw_down.sm90, session 31)
        c = g9.DW_DOWN_CONFIG
        hw_t = torch.empty(256, BS_, dtype=torch.bfloat16)
        out.append(("sparse FFN bwd dW down sm90 (Gluon, cp.async gather)", g9._dw_down_sm90_kernel,
                    dict(hw_desc=g9._desc(hw_t, [c["block_k"], 128]), DO=bf16, DWD=bf16, SORTED_TOK=i32,
                         OFFSETS=i32, NB=64, D=D_, stride_dot=D_, stride_wd=64 * BS_, BS=BS_, STAGES=c["stages"],
                         CONSUMER_REGS=g9.GATHER_CONSUMER_REGS, PRODUCER_REGS=g9.PRODUCER_REGS),
                    dict(num_warps=4, maxnreg=g9.MAXNREG), "setmaxnreg", "wgmma.mma_async", "cp.async"))
    if g9.HAVE_GLUON:  # the dW kernels with the neurons on N in pieces (dw_*.pieces, session 32, opt-in)
        pieces = [n for n in sf.k_pieces(BS_) if n] + [16] * 3
        for name, src, n_prod, transposed in (("gate/up", torch.empty(256, 2 * BS_, dtype=torch.bfloat16), 2, True),
                                              ("down", torch.empty(256, BS_, dtype=torch.bfloat16), 1, False)):
            c = g9.DW_PIECES_GU_CONFIG if transposed else g9.DW_PIECES_CONFIG  # (the launcher's ring depth)
            c = dict(c, stages=g9.dw_pieces_stages(BS_, c["block_k"], c["stages"], transposed))
            descs = {f"bd{i}": g9._desc(src, [c["block_k"], pieces[i]]) for i in range(3)}
            out.append((f"sparse FFN bwd dW {name} sm90 pieces (Gluon, cp.async gather)", g9._dw_pieces_sm90_kernel,
                        dict(descs, X=bf16, DW0=bf16, DW1=bf16, SORTED_TOK=i32, OFFSETS=i32, NB=64, D=D_,
                             stride_xt=D_, stride_w=D_ if transposed else 64 * BS_, BS=BS_, N_PROD=n_prod,
                             NP=len(sf.k_pieces(BS_)) - sf.k_pieces(BS_).count(0), B_BYTES=c["block_k"] * BS_ * 2,
                             TRANSPOSED=transposed, STAGES=c["stages"], CONSUMER_REGS=g9.GATHER_CONSUMER_REGS,
                             PRODUCER_REGS=g9.PRODUCER_REGS),
                        dict(num_warps=4, maxnreg=g9.MAXNREG), "setmaxnreg", "wgmma.mma_async", "cp.async"))
    # the backward kernels with their resolved per-kernel defaults at T8192 (tiles, warps, stages)
    bm, kc = sf.resolve_config(sf.bwd_launch_config(8192, D_, BS_), sf.BWD_KERNELS)

    def bwd_entry(kern):
        k = kc[kern]
        return dict(num_warps=k["num_warps"], **({} if k["num_stages"] is None else {"num_stages": k["num_stages"]}))

    gemm = dict(DOT_PRECISION="tf32", BLOCK_M=bm)
    out.append(("sparse FFN bwd dact", sf._sparse_ffn_bwd_dact_kernel,
                dict(gemm, DO=bf16, WD=bf16, ACT=bf16, WSORT=f32, SORTED_TOK=i32, TILE_BLOCK=i32, TILE_START=i32,
                     OFFSETS=i32, DACT=bf16, HW=bf16, DWP=f32, D=D_, BS=BS_, NB=64, P=P_, stride_dot=D_, stride_dod=1,
                     stride_wd=64 * BS_, stride_wf=1, BLOCK_N=kc["dact"]["block_n"], BLOCK_K=kc["dact"]["block_k"],
                     SPLIT_EPILOGUE=kc["dact"]["split_epilogue"]), bwd_entry("dact")))
    out.append(("sparse FFN bwd dact, one-piece epilogue", sf._sparse_ffn_bwd_dact_kernel,
                dict(out[-1][2], SPLIT_EPILOGUE=False), bwd_entry("dact")))
    out.append(("sparse FFN bwd dx", sf._sparse_ffn_bwd_dx_kernel,
                dict(gemm, DACT=bf16, WG=bf16, WU=bf16, DXR=bf16, TILE_BLOCK=i32, TILE_START=i32, OFFSETS=i32, D=D_,
                     BS=BS_, NB=64, stride_wf=D_, stride_wd=1, BLOCK_N=kc["dx"]["block_n"],
                     BLOCK_K=kc["dx"]["block_k"]), bwd_entry("dx")))
    # the persistent TMA dx (opt-in dx.tma, session 16) at dx's tiles and a narrower one
    for bn, bk, nw, st in ((256, 32, 8, 4), (256, 32, 8, 3), (128, 32, 8, 4)) if BS_ % 32 == 0 else ():
        out.append((f"sparse FFN bwd dx, persistent TMA {bn}x{bk} w{nw} s{st}", sf._sorted_rows_tma_kernel,
                    dict(a_desc=f"tensordesc<bf16[{bm}, {bk}]>", w_desc=f"tensordesc<bf16[{bk}, {bn}]>",
                         w2_desc=f"tensordesc<bf16[{bk}, {bn}]>", OUT=bf16, TILE_BLOCK=i32, TILE_START=i32,
                         OFFSETS=i32, TILE_COUNT=i64, D=D_, BS=BS_, W_NK=False, DUAL=True, DOT_PRECISION="tf32",
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_PROGRAMS=132), dict(num_warps=nw, num_stages=st)))
    # the full-block dact (dact.full_block, the T >= 4096 default since session 30): a block's 224 neurons as
    # accumulators of 128 + 64 + 32 columns
    n0, n1, n2 = sf.k_pieces(BS_) or (0, 0, 0)
    for bk, nw, st in ((64, 8, 3), (64, 8, 4)) if n0 else ():
        out.append((f"sparse FFN bwd dact, full block k{bk} w{nw} s{st}", sf._sparse_ffn_bwd_dact_full_kernel,
                    dict(gemm, DO=bf16, WD=bf16, ACT=bf16, WSORT=f32, SORTED_TOK=i32, TILE_BLOCK=i32,
                         TILE_START=i32, OFFSETS=i32, DACT=bf16, HW=bf16, DWP=f32, D=D_, BS=BS_, NB=64, P=P_,
                         stride_dot=D_, stride_dod=1, stride_wd=64 * BS_, stride_wf=1, N0=n0, N1=n1, N2=n2,
                         BLOCK_K=bk), dict(num_warps=nw, num_stages=st)))
    n = kc["dw_gate_up"]["block_n"]
    out.append(("sparse FFN bwd dW gate/up", sf._sparse_ffn_bwd_dw_gate_up_kernel,
                dict(DACT=bf16, X=bf16, SORTED_TOK=i32, OFFSETS=i32, DWG=bf16, DWU=bf16, D=D_, BS=BS_, stride_xt=D_,
                     stride_xd=1, stride_gf=D_, stride_gd=1, DOT_PRECISION="tf32", BLOCK_N=n, BLOCK_D=n,
                     BLOCK_K=kc["dw_gate_up"]["block_k"]), bwd_entry("dw_gate_up")))
    n = kc["dw_down"]["block_n"]
    out.append(("sparse FFN bwd dW down", sf._sparse_ffn_bwd_dw_down_kernel,
                dict(DO=bf16, HW=bf16, SORTED_TOK=i32, OFFSETS=i32, DWD=bf16, D=D_, BS=BS_, stride_dot=D_,
                     stride_dod=1, stride_wd=64 * BS_, stride_wf=1, DOT_PRECISION="tf32", BLOCK_D=n, BLOCK_N=n,
                     BLOCK_K=kc["dw_down"]["block_k"]), bwd_entry("dw_down")))

    # the grouping's counting sort (route_pairs, session 32) at the shape and the dweights gather
    nbp = 128
    ch = sf.GROUP_TILE // nbp
    keys = dict(IDX=i32, WTS=f32, T=8192, K=19, NB=64, SHARED=0, NBP=nbp, CHUNK=ch)
    out.append(("sparse FFN grouping count", sf._group_count_kernel, dict(keys, HIST=i32), dict(num_warps=4)))
    out.append(("sparse FFN grouping scan", sf._group_scan_kernel,
                dict(HIST=i32, TOTAL=i32, n_chunks=P_ // ch, NBP=nbp, BLOCK_C=sf.GROUP_SCAN_CHUNKS),
                dict(num_warps=4)))
    out.append(("sparse FFN grouping place", sf._group_place_kernel,
                dict(keys, BASE=i32, TOTAL=i32, ORDER=i64, SORTED_TOK=i32, INV=i64, W_FULL=f32, W_SORTED=f32,
                     OFFSETS=i32, TILE_BLOCK=i32, TILE_START=i32, TILE_COUNT=i64, n_chunks=P_ // ch, n_tiles=1280,
                     BLOCK_M=bm), dict(num_warps=4)))
    out.append(("sparse FFN router backward (dlogits)", sf._route_bwd_kernel,
                dict(PROBS=f32, IDX=i32, WTS=f32, GW=f32, GP=f32, DL=bf16, T=8192, NR=64, K=19, HAS_GW=True,
                     HAS_GP=False, SOFTMAX=False, BLOCK_T=64, BLOCK_NR=64), dict(num_warps=4)))
    out.append(("sparse FFN bwd dweights gather", sf._dweights_kernel,
                dict(DWP=f32, INV=i64, DW=f32, T=8192, K=19, P=P_, SHARED=0, N_TILES=1, BLOCK_T=64, BLOCK_K=32),
                dict(num_warps=4)))

    # session 16's tile orders (opt-in): the same kernels with the column tiles of a row tile together
    # (cols_first) and the weight-gradient kernels walking groups of 8 model-column tiles (d_group)
    named = {e[0]: e for e in out}
    for name in ("sparse FFN gate/up GEMM + SwiGLU", "sparse FFN down GEMM", "sparse FFN bwd dact", "sparse FFN bwd dx"):
        _, fn, args, opts = named[name][:4]
        out.append((name + ", cols_first", fn, dict(args, COLS_FIRST=True), opts))
    for name in ("sparse FFN bwd dW gate/up", "sparse FFN bwd dW down"):
        _, fn, args, opts = named[name][:4]
        out.append((name + ", d_group 8", fn, dict(args, NB=64, D_GROUP=8), opts))

    from deepseek_kernels.triton import window_decode as wd

    wsplit = dict(Q=bf16, K=bf16, V=bf16, POS=i64, SEQLENS=i64, LENGTHS=i64, O_PART=f32, ML_PART=f32,
                  stride_qb=H * D, stride_qt=H * D, stride_qh=D, stride_kb=4160 * 8 * D, stride_ks=8 * D, stride_kh=D,
                  stride_vb=4160 * 8 * D, stride_vs=8 * D, stride_vh=D, stride_pb=4160, T=1, HKV=8, REP=4,
                  SLOTS=4160, SLOTS_PER_SPLIT=128, qk_scale=0.127, window=W, sinks=0, HEAD_DIM=D, BLOCK_M=16,
                  BLOCK_N=64, BLOCK_D=D, PREC="tf32")
    out.append(("window decode split", wd._decode_split_kernel, wsplit, dict(num_warps=4, num_stages=2)))
    out.append(("window decode combine", wd._decode_combine_kernel,
                dict(O_PART=f32, ML_PART=f32, OUT=bf16, stride_ob=H * D, stride_ot=H * D, stride_oh=D, T=1, HQ=32,
                     NSPLIT=33, HEAD_DIM=D, BLOCK_D=D, BLOCK_S=64), dict(num_warps=4)))
    out += float32_cases({e[0]: e for e in out}, f32, bf16)
    return out


def float32_cases(named: dict, f32, bf16) -> list:
    """float32 inputs at the tiles the launchers choose for them: twice bf16's bytes per tile in shared memory
    (session 18's device-generic run found the sparse decode's 8 bf16-tuned stages at 280 KB in fp32). Each entry
    is a bf16 entry above with float32 operands (and full-precision dots where the launcher asks for them)."""
    from deepseek_kernels.triton import sparse_ffn as sf
    from deepseek_kernels.triton import window_attention as wa

    def as_f32(args: dict, **tiles) -> dict:
        prec = {k: "ieee" for k in ("DOT_PRECISION", "PREC") if k in args}
        return {**{k: f32 if v is bf16 else v for k, v in args.items()}, **prec, **tiles}

    out = []
    # the sparse decode at one token (its deepest pipelines), stages fitted to the H200's 227 KB per program
    cfg = sf.decode_launch_config(1, 4096, 224, 4, max_shared=232448)
    for name, kern in (("sparse decode gate/up", "gate_up"), ("sparse decode down", "down")):
        _, fn, args, _opts = named[name][:4]
        c = cfg[kern]
        out.append((f"{name}, float32 ({c['num_stages']} stages)", fn,
                    as_f32(args, BLOCK_N=c["block_n"], BLOCK_K=c["block_k"]),
                    dict(num_warps=c["num_warps"], num_stages=c["num_stages"])))
    # sparse FFN training at T8192 in float32: the mid-size tiles (the wide ones are for 2-byte operands)
    fbm, fkc = sf.resolve_config(sf.launch_config(8192, 4096, 224, wide=False), sf.FWD_KERNELS)
    bbm, bkc = sf.resolve_config(sf.bwd_launch_config(8192, 4096, 224, wide=False), sf.BWD_KERNELS)
    for name, kern, bm, kc, tiles in (
            ("sparse FFN gate/up GEMM + SwiGLU", "gate_up", fbm, fkc, ("BLOCK_N", "BLOCK_K")),
            ("sparse FFN down GEMM", "down", fbm, fkc, ("BLOCK_N", "BLOCK_K")),
            ("sparse FFN bwd dact", "dact", bbm, bkc, ("BLOCK_N", "BLOCK_K")),
            ("sparse FFN bwd dx", "dx", bbm, bkc, ("BLOCK_N", "BLOCK_K")),
            ("sparse FFN bwd dW gate/up", "dw_gate_up", None, bkc, ("BLOCK_N", "BLOCK_D", "BLOCK_K")),
            ("sparse FFN bwd dW down", "dw_down", None, bkc, ("BLOCK_D", "BLOCK_N", "BLOCK_K"))):
        _, fn, args, _opts = named[name][:4]
        c = kc[kern]
        t = {k: c["block_k"] if k == "BLOCK_K" else c["block_n"] for k in tiles}
        if bm is not None:
            t["BLOCK_M"] = bm
        if "SPLIT_EPILOGUE" in args:
            t["SPLIT_EPILOGUE"] = bool(c.get("split_epilogue")) and c["block_n"] >= 32
        stages = {} if c["num_stages"] is None else {"num_stages": c["num_stages"]}
        out.append((f"{name}, float32 (mid-size tiles)", fn, as_f32(args, **t),
                    dict(num_warps=c["num_warps"], **stages)))
    # attention: the window forward at its float32 tiles, the hierarchical kernels and both decodes at their defaults
    bm, bn, w, st = wa.SMALL_CONFIG
    _, fn, args, _opts = named["window attention fwd (tuned wide-window tiles)"][:4]
    out.append(("window attention fwd, float32", fn, as_f32(args, K_DESC=f32, V_DESC=f32, BLOCK_M=bm, BLOCK_N=bn),
                dict(num_warps=w, num_stages=st)))
    for name in ("hierarchical fwd (default tiles)", "hierarchical bwd dq, 2 stages",
                 "hierarchical bwd dkdv, bcast=True", "hierarchical bwd dsum, summary tile 16",
                 "hierarchical decode attention (default: 2 stages)", "window decode split"):
        _, fn, args, opts = named[name][:4]
        out.append((f"{name}, float32", fn, as_f32(args), opts))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: Hopper)")
    ap.add_argument("--only", nargs="*", help="substrings of the kernel names to compile")
    ap.add_argument("--verbose", action="store_true", help="print a failing kernel's whole error")
    ap.add_argument("--usage", action="store_true", help="also print registers and spills (ptxas -v)")
    ap.add_argument("--max-shared", type=int, default=232448,
                    help="shared memory a block may use, bytes (H100/H200: 227 KiB); a launch would fail above it")
    args = ap.parse_args()
    print(f"Triton {triton.__version__}, target sm_{args.arch}")
    failed = 0
    for name, fn, kwargs, options, *ptx_needs in cases():
        if args.only and not any(s in name for s in args.only):
            continue
        t0 = time.perf_counter()
        try:
            kernel = compile_for(fn, kwargs, args.arch, **options)
            shared = kernel.metadata.shared
            if shared > args.max_shared:
                raise RuntimeError(f"needs {shared} B of shared memory, more than the {args.max_shared} B a block gets")
            missing = [needle for needle in ptx_needs if needle not in kernel.asm["ptx"]]
            if missing:
                raise RuntimeError(f"the PTX lacks {missing}")
            usage = f", {ptxas_usage(kernel, args.arch)}" if args.usage else ""
            print(f"  ok    {name:<48} {time.perf_counter() - t0:5.1f} s  shared {shared} B{usage}")
        except Exception as e:  # report every kernel, not just the first failure
            failed += 1
            msg = str(e).strip().splitlines()
            if args.verbose:
                import traceback

                traceback.print_exception(e)
            print(f"  FAIL  {name:<48} {type(e).__name__}: {(msg[-1] if msg else '')[:300]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
