"""One tolerance table per dtype: relative error ||out - ref|| / ||ref|| allowed against an fp32/fp64
reference. Ops that define bit-exact results (quantization) are compared exactly instead."""

import torch

REL_TOL = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
