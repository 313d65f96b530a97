# session 23 call 5 (throwaway): T1 sparse FFN decode, eager calls, for Nsight Compute on its kernels
import torch
import deepseek_kernels as dk
from deepseek_kernels.reference.sparse_ffn import n_active  # noqa: F401
D, F_, NB, dt = 4096, 14336, 64, torch.bfloat16
torch.manual_seed(0)
x = torch.randn(1, D, device="cuda", dtype=dt)
wr = torch.randn(NB, D, device="cuda", dtype=dt) * D**-0.5
wg, wu = (torch.randn(F_, D, device="cuda", dtype=dt) * D**-0.5 for _ in range(2))
wd = torch.randn(D, F_, device="cuda", dtype=dt) * F_**-0.5
with torch.no_grad():
    for _ in range(4):
        dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=0.15)
torch.cuda.synchronize()
print("done")
