"""Adapters that plug deepseek_kernels ops into other libraries (each imports its library lazily)."""
