"""The GPU's quantised linear: :class:`TritonInt4Linear` runs :mod:`edgevlm.kernels.int4_gemv`'s
Triton kernel, and :func:`swap_linears_for_triton` applies it to a finished decoder from outside, as
:func:`~.apply.quantize_decoder` does for the CPU. :func:`pack_for_triton` converts the CPU's packed
int4 layout (:mod:`.formats`) to the kernel's, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from edgevlm.errors import ConfigError, ShapeError
from edgevlm.kernels.int4_gemv import GROUPS, TritonInt4Weight, int4_matmul, int4_matmul_reference, pack_codes_int32
from edgevlm.kernels.triton_support import interpreting

from .formats import Packed, quantize_int4, unlanes, unpack_codes


def pack_for_triton(p: Packed) -> TritonInt4Weight:
    """A CPU-layout int4 :class:`~.formats.Packed` -> the Triton kernel's layout, bit for bit."""
    if p.bits != 4 or p.zeros is None:
        raise ConfigError(f"pack_for_triton takes int4 weights with zero points, got {p.bits}-bit {p.source!r}")
    if p.group not in GROUPS:
        raise ConfigError(f"the Triton int4 kernel supports groups {GROUPS}, got {p.group} ({p.source!r})")
    return TritonInt4Weight(p.n, p.k, p.group, pack_codes_int32(unpack_codes(p)),
                            unlanes(p.scales, p.n).contiguous(), unlanes(p.zeros, p.n).contiguous())


class TritonInt4Linear(nn.Module):
    """A drop-in for ``nn.Linear`` holding a :class:`TritonInt4Weight`. Input ``[..., K]`` -> ``[..., N]``
    in the input's dtype. On CUDA (or under ``TRITON_INTERPRET=1``) it runs :func:`int4_matmul`; on
    other devices the reference (correct, not fast), as :class:`~.cpu_linear.QuantLinear` does off-CPU."""

    def __init__(self, weight: TritonInt4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = weight.k, weight.n, weight.group
        self.register_buffer("qweight", weight.qweight)  # int32 [N, K/8]
        self.register_buffer("scales", weight.scales)  # fp16 [N, K/G]
        self.register_buffer("zeros", weight.zeros)  # fp16 [N, K/G]
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())  # fp32 [N]

    @property
    def weight4(self) -> TritonInt4Weight:
        return TritonInt4Weight(self.out_features, self.in_features, self.group, self.qweight, self.scales,
                                self.zeros)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4-g{self.group} (triton)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"TritonInt4Linear expects [..., {self.in_features}] inputs, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if x.device.type == "cuda" or interpreting():
            out = int4_matmul(x2, self.weight4, self.bias)
        else:
            out = int4_matmul_reference(x2, self.weight4, self.bias)
        return out.view(*lead, self.out_features)


def swap_linears_for_triton(decoder: nn.Module, group: int = 32) -> nn.Module:
    """Quantise every ``nn.Linear`` of ``decoder`` (projections and ``lm_head``) to int4 with ``group``
    on the host and replace it, in place, by a :class:`TritonInt4Linear` on the layer's device; returns
    the decoder. Every shape is checked first (ConfigError), so a refusal changes nothing. Modules that
    are already quantised (:class:`~.cpu_linear.QuantLinear`) are not ``nn.Linear`` and are left as they are."""
    if group not in GROUPS:
        raise ConfigError(f"the Triton int4 kernel supports groups {GROUPS}, got {group}")
    targets = [(name, mod) for name, mod in decoder.named_modules() if isinstance(mod, nn.Linear)]
    for name, lin in targets:
        if lin.in_features % group:
            raise ConfigError(f"{name}: {lin.in_features} inputs is not a multiple of group {group}")
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = decoder.get_submodule(parent_name) if parent_name else decoder
        packed = quantize_int4(lin.weight.detach().float().cpu(), group, name)
        new = TritonInt4Linear(pack_for_triton(packed).to(lin.weight.device), lin.bias)
        setattr(parent, child, new.to(lin.weight.device))
    return decoder


__all__ = ["TritonInt4Linear", "pack_for_triton", "swap_linears_for_triton"]
