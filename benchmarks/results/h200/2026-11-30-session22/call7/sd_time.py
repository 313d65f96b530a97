# session 22 (throwaway): one-token sparse decode, Triton pair vs the C++ pair, graphed (bench harness timer)
import torch
import deepseek_kernels as dk
from deepseek_kernels.bench.harness import time_cuda_graph
from deepseek_kernels.reference.sparse_ffn import n_active, swiglu_ffn_ref
from deepseek_kernels.triton import sparse_ffn as tk
import sys
sys.path.insert(0, "benchmarks")
from _tuning import kernel_times, print_kernel_times, sets_for

D, F_, NB, dt, ratio = 4096, 14336, 64, torch.bfloat16, 0.15
k = n_active(ratio, NB)
torch.manual_seed(0)
n = sets_for(int(k / NB * 3 * F_ * D * 2))
sets = []
for _ in range(n):
    x = torch.randn(1, D, device="cuda", dtype=dt)
    wr = torch.randn(NB, D, device="cuda", dtype=dt) * D**-0.5
    wg, wu = (torch.randn(F_, D, device="cuda", dtype=dt) * D**-0.5 for _ in range(2))
    wd = torch.randn(D, F_, device="cuda", dtype=dt) * F_**-0.5
    idx, w, _ = tk.sparse_ffn_route(x, wr, k=k, gate="sigmoid", weighting="gate")
    sets.append((x, wr, wg, wu, wd, idx, w))
used_bytes = k * (F_ // NB) * D * 2 * 3
def dec(x, wr, wg, wu, wd, idx, w):
    return tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=NB, direct=True)
def op(x, wr, wg, wu, wd, *_):
    return dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=ratio)
with torch.no_grad():
    tk.CUDA_DECODE_T1 = True
    a = dec(*sets[0]); tk.CUDA_DECODE_T1 = False; b = dec(*sets[0])
    print("rel diff C++ vs Triton", ((a.float() - b.float()).norm() / b.float().norm()).item())
    dense = time_cuda_graph(lambda x, wr, wg, wu, wd, *_: swiglu_ffn_ref(x, wg, wu, wd), sets[:1])["ms"] * 1e3
    for r in range(2):
        for on in (False, True):
            tk.CUDA_DECODE_T1 = on
            td = time_cuda_graph(dec, sets)["ms"] * 1e3
            to = time_cuda_graph(op, sets)["ms"] * 1e3
            print(f"r{r} {'C++   ' if on else 'Triton'} decode kernels {td:6.1f} us ({used_bytes / td / 1e6:5.0f} GB/s)"
                  f"  whole op {to:6.1f} us  dense {dense:6.1f} us  op vs dense {dense / to:4.2f}x")
    for on in (False, True):
        tk.CUDA_DECODE_T1 = on
        print("per kernel,", "C++" if on else "Triton")
        print_kernel_times(kernel_times(lambda: op(*sets[0]), steps=20))
