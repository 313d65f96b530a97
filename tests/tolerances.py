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


# The hierarchical attention kernels run float32 dots in TF32 on a GPU (documented on the op: ~1e-3
# relative); the interpreter and the CPU paths compute them in full float32.
TF32_REL_TOL = 2e-3


def f32_tol(t: torch.Tensor, exact: float, tf32: float = TF32_REL_TOL) -> float:
    """``exact`` where the kernels run on the CPU (interpreter or reference), ``tf32`` where ``t`` (an input of
    the kernel) is a CUDA tensor: the device-generic tests run on the GPU there (conftest)."""
    return tf32 if t.is_cuda else exact


def kernel_rel_tol(dtype: torch.dtype, t: torch.Tensor) -> float:
    """:data:`REL_TOL` of ``dtype``, with float32 on a CUDA ``t`` at the TF32 tolerance (:func:`f32_tol`)."""
    return f32_tol(t, REL_TOL[dtype]) if dtype == torch.float32 else REL_TOL[dtype]
