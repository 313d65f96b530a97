"""Small Triton helpers shared by the kernels."""

import triton
import triton.language as tl


@triton.jit
def f32(x):
    """A float kernel argument as fp32. Triton types Python floats as fp32 when it launches a kernel
    itself, but torch.compile (inductor) passes them as fp64, which would turn the softmax state
    fp64 (a compile error for loop-carried values, slow math otherwise)."""
    return (tl.zeros((), tl.float32) + x).to(tl.float32)
