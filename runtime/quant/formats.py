"""Weight formats of the quantised decoder: one packed layout for the CPU kernel, three ways in.

- ``int8``: symmetric int8, one fp32 scale per output channel (or per group of inputs);
- ``int4``: asymmetric 4-bit codes with an fp16 scale and zero point per group of 32/64/128 inputs
  (``w = scale * q + zero``, q in 0..15);
- GGUF ``Q8_0`` / ``Q4_0`` / ``Q4_1`` blocks, repacked as they are: Q8_0 is int8 with group 32,
  Q4_0 is int4 with ``zero = -8 * scale``, Q4_1 is int4 with its own ``m`` as zero. Every value is
  reproduced bit for bit, so a GGUF model is never quantised twice.

Packed layouts (rows padded to a multiple of 16; each row block keeps 16 rows side by side so one
512-bit register of ``cpp_ext/qgemm.cpp`` holds 16 rows' partial sums):

    int8  qweight uint8 [N16, K/4, 16, 4]   byte = int8 + 128
          scales  fp32  [N16, K/G, 16]
    int4  qweight uint8 [N16, K/8, 16, 4]   byte j of a lane holds k = 8c+j (low nibble), 8c+4+j (high)
          scales, zeros fp16 [N16, K/G, 16]

The GPU's int4 layout is the Triton kernel's own (:mod:`edgevlm.kernels.int4_gemv`);
:func:`edgevlm.runtime.quant.triton_linear.pack_for_triton` converts to it bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgevlm.errors import CheckpointError, ConfigError

LANES = 16  # rows per row block
ACT_BLOCK = 32  # activation quantisation block (inputs), also the smallest weight group


def _pad_rows(t: torch.Tensor, n16: int) -> torch.Tensor:
    return t if t.shape[0] == n16 else torch.cat([t, t.new_zeros(n16 - t.shape[0], *t.shape[1:])])


def lanes(t: torch.Tensor, n16: int) -> torch.Tensor:
    """Per-row values ``[N, C]`` -> ``[N16/16, C, 16]`` (padded rows are 0)."""
    t = _pad_rows(t, n16)
    return t.view(n16 // LANES, LANES, t.shape[1]).transpose(1, 2).contiguous()


def unlanes(t: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`lanes`: ``[N16/16, C, 16]`` -> ``[N, C]``."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n]


@dataclass(frozen=True)
class Packed:
    """One quantised weight matrix in the kernel's layout (see the module docstring)."""

    bits: int
    n: int
    k: int
    group: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    source: str  # "int8", "int4", "gguf Q4_1", ... (shown by `edgevlm info`)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)


def pack_int8_codes(codes: torch.Tensor, scales: torch.Tensor, group: int, source: str) -> Packed:
    """int8 codes ``[N, K]`` and fp32 scales ``[N, K/group]`` -> :class:`Packed`."""
    n, k = codes.shape
    n16 = -(-n // LANES) * LANES
    u8 = (codes.to(torch.int16) + 128).to(torch.uint8)
    u8 = _pad_rows(u8, n16).masked_fill(torch.arange(n16)[:, None] >= n, 128)  # padded rows decode to 0
    qw = u8.view(n16 // LANES, LANES, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    return Packed(8, n, k, group, qw, lanes(scales.float(), n16), None, source)


def pack_int4_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                    source: str) -> Packed:
    """4-bit codes ``[N, K]`` (0..15) with fp16 scales and zeros ``[N, K/group]`` -> :class:`Packed`."""
    n, k = codes.shape
    n16 = -(-n // LANES) * LANES
    c = _pad_rows(codes.to(torch.uint8), n16).view(n16, k // 8, 2, 4)  # k = 8c + 4h + j
    byte = c[:, :, 0] | (c[:, :, 1] << 4)  # [N16, K/8, 4]
    qw = byte.view(n16 // LANES, LANES, k // 8, 4).permute(0, 2, 1, 3).contiguous()
    return Packed(4, n, k, group, qw, lanes(scales.half(), n16), lanes(zeros.half(), n16), source)


def unpack_codes(p: Packed) -> torch.Tensor:
    """The integer codes ``[N, K]``: int8 (-127..127 for ours, -128.. for GGUF) or 0..15."""
    n16 = p.qweight.shape[0] * LANES
    if p.bits == 8:
        return (p.qweight.permute(0, 2, 1, 3).reshape(n16, p.k).to(torch.int16) - 128)[:p.n]
    b = p.qweight.permute(0, 2, 1, 3).reshape(n16, p.k // 8, 4)
    return torch.stack([b & 0x0F, b >> 4], dim=2).reshape(n16, p.k)[:p.n].to(torch.int16)


def dequantize(p: Packed) -> torch.Tensor:
    """float32 ``[N, K]`` weights the packed matrix stands for."""
    q = unpack_codes(p).float().view(p.n, p.k // p.group, p.group)
    s = unlanes(p.scales, p.n).float()[..., None]
    w = q * s
    if p.zeros is not None:
        w = w + unlanes(p.zeros, p.n).float()[..., None]
    return w.view(p.n, p.k)


# ---- quantisers ---------------------------------------------------------------------------------

def check_shape(w: torch.Tensor, group: int, what: str) -> None:
    n, k = w.shape
    if k % ACT_BLOCK:
        raise ConfigError(f"{what}: {k} inputs is not a multiple of {ACT_BLOCK}; it cannot be quantised")
    if group and k % group:
        raise ConfigError(f"{what}: {k} inputs is not a multiple of group {group}; pick a group that divides it "
                          f"({', '.join(str(g) for g in (32, 64, 128) if k % g == 0)})")


def quantize_int8(w: torch.Tensor, group: int = 0, what: str = "weight") -> Packed:
    """Symmetric int8: ``scale = max|w| / 127`` per output channel (``group=0``) or per group."""
    check_shape(w, group, what)
    n, k = w.shape
    g = group or k
    wg = w.detach().float().view(n, k // g, g)
    scales = wg.abs().amax(-1) / 127.0  # [N, K/g]
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    codes = torch.round(wg * inv[..., None]).clamp_(-127, 127).to(torch.int8).view(n, k)
    return pack_int8_codes(codes, scales, g, "int8" + (f"-g{group}" if group else ""))


def quantize_int4(w: torch.Tensor, group: int = 64, what: str = "weight") -> Packed:
    """Asymmetric 4-bit per group: ``zero = min``, ``scale = (max - min) / 15``, both rounded to fp16
    first so the codes are chosen against the values the kernel will use."""
    check_shape(w, group, what)
    n, k = w.shape
    wg = w.detach().float().view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15.0).half()
    zeros = lo.half()
    s, z = scales.float(), zeros.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = torch.round((wg - z[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8).view(n, k)
    return pack_int4_codes(codes, scales, zeros, group, f"int4-g{group}")


def gguf_packable(ggml_type, shape: tuple[int, ...]) -> bool:
    """Whether :func:`from_gguf` packs a GGUF tensor of this type and shape (Q8_0 / Q4_0 / Q4_1 matrices
    whose rows are whole activation blocks); others stay float."""
    from gguf import GGMLQuantizationType as T

    return len(shape) == 2 and ggml_type in (T.Q8_0, T.Q4_0, T.Q4_1) and shape[1] % ACT_BLOCK == 0


def from_gguf(ggml_type, data: np.ndarray, shape: tuple[int, int], what: str = "weight") -> Packed | None:
    """GGUF Q8_0 / Q4_0 / Q4_1 rows (``data`` uint8 ``[N, row_bytes]``) -> :class:`Packed`, bit-exact.
    None for other types (the caller keeps those in float)."""
    from gguf import GGMLQuantizationType as T

    n, k = shape
    if not gguf_packable(ggml_type, shape):
        return None
    name = T(ggml_type).name
    size = {T.Q8_0: 34, T.Q4_0: 18, T.Q4_1: 20}[ggml_type]
    blk = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True).reshape(n, k // 32, size))
    d = blk[..., :2].contiguous().view(torch.float16)[..., 0]  # [N, K/32]
    if ggml_type == T.Q8_0:
        codes = blk[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        return pack_int8_codes(codes, d.float(), 32, f"gguf {name}")
    qs = blk[..., 4:] if ggml_type == T.Q4_1 else blk[..., 2:]  # [N, K/32, 16]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, k)  # low nibbles are elements 0..15
    if ggml_type == T.Q4_1:
        zeros = blk[..., 2:4].contiguous().view(torch.float16)[..., 0]
    else:
        zeros = d * -8.0  # exact in fp16: a power-of-two multiple
        if not torch.isfinite(zeros).all():
            raise CheckpointError(f"{what}: a Q4_0 scale overflows fp16 when multiplied by -8")
    return pack_int4_codes(codes, d, zeros, 32, f"gguf {name}")


__all__ = ["LANES", "ACT_BLOCK", "Packed", "lanes", "unlanes", "pack_int8_codes", "pack_int4_codes", "unpack_codes",
           "dequantize", "check_shape", "quantize_int8", "quantize_int4", "gguf_packable", "from_gguf"]
