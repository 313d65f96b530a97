"""Triton kernels (launched through ``torch.library.wrap_triton`` from ``deepseek_kernels.ops``).
On a machine without a GPU they run under the Triton interpreter (``TRITON_INTERPRET=1``)."""
