"""Triton kernels, each beside its PyTorch reference, plus dispatch (see the Triton-kernels issue)."""
