"""Int4 group-wise weight-only matmul for the CUDA decode step, in Triton, beside its PyTorch reference.

The CPU kernel's :class:`~edgevlm.runtime.quant.Packed` layout interleaves 16 rows per register, which
suits AVX-512 and nothing else; this kernel reads its own layout (:class:`TritonInt4Weight`), built once
on the host by :func:`edgevlm.runtime.quant.pack_for_triton`:

    qweight int32 [N, K/8]    word j of row n holds k = 8j + i in bits 4i..4i+3 (i = 0..7)
    scales  fp16  [N, K/G]    w[n, k] = scales[n, k // G] * q[n, k] + zeros[n, k // G]
    zeros   fp16  [N, K/G]

Row-major with K innermost, so the program that owns a block of N rows reads its weights as one
contiguous run per row, and a group's 8-nibble words sit next to each other.

Two layers, as in the other kernel files:

- ``_int4_matmul_fwd_kernel``: one program per ``BLOCK_N`` output rows (and per row of ``x``, or per
  ``BLOCK_M`` rows on the tensor-core path used for prefill), walking K in steps of whole groups
  (``BLOCK_K`` inputs, each weight dequantised with its group's scale and zero) with fp32 accumulation;
- :func:`int4_matmul`: the launcher (checks, allocation, block size and warps).

The ``nn.Module`` over it and the transform that applies it to a finished decoder
(``TritonInt4Linear``, ``swap_linears_for_triton``) live with the other quantised linears in
:mod:`edgevlm.runtime.quant.triton_linear`.

:func:`int4_matmul_reference` (dequantise, then matmul) is the oracle. Triton is optional: it is
imported on first use, and a missing install raises :class:`~edgevlm.errors.BackendUnavailableError`.
Run the kernel on CPU tensors with ``TRITON_INTERPRET=1``, set before triton is first imported (slow;
the tests do it on small shapes). The block sizes are first guesses, not tuned on a GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgevlm.errors import ShapeError

from .triton_support import check_runnable, jit, triton_module

NIBBLES = 8  # 4-bit codes per int32 word
GROUPS = (32, 64, 128)  # the groups quantize_int4 / GGUF use; each a multiple of NIBBLES and <= BLOCK_K
DOT_MIN_M = 16  # tl.dot needs >= 16 rows; below that (decode) the kernel is a GEMV

# `triton.language`, bound by triton_support.jit when the kernel is first compiled (the module imports
# without triton).
tl = None

WHAT = "the int4 Triton kernel"


def _triton():
    return triton_module(WHAT)


# ---- the GPU layout -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TritonInt4Weight:
    """One int4 matrix ``[N, K]`` in the GPU layout (see the module docstring)."""

    n: int
    k: int
    group: int
    qweight: torch.Tensor  # int32 [N, K/8]
    scales: torch.Tensor  # fp16 [N, K/G]
    zeros: torch.Tensor  # fp16 [N, K/G]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def to(self, device: torch.device | str) -> "TritonInt4Weight":
        return TritonInt4Weight(self.n, self.k, self.group, self.qweight.to(device), self.scales.to(device),
                                self.zeros.to(device))


def pack_codes_int32(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, K]`` (0..15) -> int32 words ``[N, K/8]``, k = 8j + i in bits 4i..4i+3."""
    n, k = codes.shape
    if k % NIBBLES:
        raise ShapeError(f"int4 codes need K divisible by {NIBBLES}, got [N={n}, K={k}]")
    c = codes.to(torch.int64).view(n, k // NIBBLES, NIBBLES)  # [N, K/8, 8]
    shifts = torch.arange(0, 4 * NIBBLES, 4, dtype=torch.int64, device=codes.device)  # [8]
    words = (c << shifts).sum(-1)  # [N, K/8], 0 .. 2^32 - 1 (int64 so nibble 7 cannot overflow)
    # int32 has no unsigned form in torch: wrap the top bit into the sign, as the kernel's loads see it.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes_int32(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes_int32`: int32 ``[N, K/8]`` -> int16 codes ``[N, K]``."""
    n, w = qweight.shape
    shifts = torch.arange(0, 4 * NIBBLES, 4, dtype=torch.int64, device=qweight.device)  # [8]
    # & 0xF after the (arithmetic) shift drops the sign bits a negative word drags in, as the kernel does.
    return ((qweight.to(torch.int64)[..., None] >> shifts) & 0xF).view(n, w * NIBBLES).to(torch.int16)


def dequantize_triton(w: TritonInt4Weight) -> torch.Tensor:
    """fp32 ``[N, K]`` weights that ``w`` stands for (same arithmetic as the kernel)."""
    q = unpack_codes_int32(w.qweight).float().view(w.n, w.k // w.group, w.group)  # [N, K/G, G]
    return (q * w.scales.float()[..., None] + w.zeros.float()[..., None]).view(w.n, w.k)


def int4_matmul_reference(x: torch.Tensor, w: TritonInt4Weight, bias: torch.Tensor | None = None,
                          upcast: bool = False) -> torch.Tensor:
    """``x [M, K] @ dequant(w).T (+ bias)`` -> ``[M, N]`` in fp32: the oracle for :func:`int4_matmul`.
    Returns fp32 with ``upcast``, else ``x.dtype`` like the kernel."""
    out = F.linear(x.float(), dequantize_triton(w).to(x.device), None if bias is None else bias.float())
    return out if upcast else out.to(x.dtype)


# ---- the kernel -------------------------------------------------------------------------------

def _int4_matmul_fwd_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K,
                            stride_xm, stride_qn, stride_sn, stride_om,
                            GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, HAS_BIAS: tl.constexpr):
    # Decorated with triton.jit by _kernel() (triton is imported lazily). Grid: (cdiv(N, BLOCK_N),
    # M for the GEMV, cdiv(M, BLOCK_M) for the dot path). Each program owns BLOCK_N output rows and
    # walks K in BLOCK_K steps; K is a multiple of GROUP, so every group met is whole.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output rows of this program
    mask_n = rn < N
    rk = tl.arange(0, BLOCK_K)  # [BK]
    # The 8 lanes that share a word (and the G lanes that share a scale) load the same address: a
    # broadcast served by one transaction, after which each keeps its own nibble.
    shifts = (rk % 8) * 4  # [BK]
    if USE_DOT:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        mask_m = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk  # [BK]
        mask_k = kk < K
        mask_w = mask_n[:, None] & mask_k[None, :]  # [BN, BK]
        words = tl.load(qw_ptr + rn[:, None] * stride_qn + (kk // 8)[None, :], mask=mask_w, other=0)
        q = ((words >> shifts[None, :]) & 0xF).to(tl.float32)  # [BN, BK]; & 0xF undoes the sign extension
        g_off = rn[:, None] * stride_sn + (kk // GROUP)[None, :]  # [BN, BK]
        s = tl.load(s_ptr + g_off, mask=mask_w, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g_off, mask=mask_w, other=0.0).to(tl.float32)
        w = q * s + z  # [BN, BK] dequantised, fp32
        if USE_DOT:
            # Prefill: dequantise the tile once and let the tensor cores reuse it for BLOCK_M rows.
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :],
                         other=0.0)  # [BM, BK]
            acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))  # [BM, BN]
        else:
            xk = tl.load(x_ptr + pid_m * stride_xm + kk, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
            acc += tl.sum(w * xk[None, :], axis=1)  # [BN]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)  # broadcasts over BM too
    if USE_DOT:
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
    else:
        tl.store(out_ptr + pid_m * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def _kernel():
    return jit(_int4_matmul_fwd_kernel, WHAT)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _gemv_block_n(n: int, device: torch.device) -> int:
    """Rows per program for the decode GEMV. It is memory-bound: it needs enough programs to keep
    every SM's loads in flight (about 2 per SM), so a small N gets small blocks rather than a few big
    ones; 16 x BLOCK_K fp32 values is the most a 4-warp program holds without spilling."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1
    for b in (16, 8):
        if -(-n // b) >= 2 * sms:
            return b
    return 4


def int4_matmul(x: torch.Tensor, w: TritonInt4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` (fp16 / bf16 / fp32) times the int4 matrix ``w [N, K]`` -> ``[M, N]`` in ``x.dtype``,
    accumulated in fp32 by the Triton kernel. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    triton = _triton()
    if x.dim() != 2 or x.shape[1] != w.k:
        raise ShapeError(f"int4_matmul expects x [M, {w.k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ShapeError(f"int4_matmul takes fp16/bf16/fp32 inputs, got {x.dtype}")
    for name, t in (("qweight", w.qweight), ("scales", w.scales), ("zeros", w.zeros), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ShapeError(f"int4_matmul: {name} is on {t.device}, x on {x.device}")
    check_runnable(x.device, WHAT, "int4_matmul_reference")
    x = x if x.stride(1) == 1 else x.contiguous()
    m = x.shape[0]
    out = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    # The dot path only for 16-bit inputs: an fp32 tl.dot runs in TF32 and would break the fp32 contract.
    use_dot = m >= DOT_MIN_M and x.dtype != torch.float32
    if use_dot:  # prefill: [BM, 64] x [64, BN] tensor-core tiles
        block_n, block_m, block_k = 64 if w.n >= 64 else 16, 16 if m < 64 else 64, 64
        grid = (triton.cdiv(w.n, block_n), triton.cdiv(m, block_m))
    else:  # decode: long K steps so each program has a few KB of weights in flight per iteration
        block_n, block_m, block_k = _gemv_block_n(w.n, x.device), 1, min(256, triton.next_power_of_2(w.k))
        grid = (triton.cdiv(w.n, block_n), m)
    _kernel()[grid](x, w.qweight, w.scales, w.zeros, bias if bias is not None else w.scales, out, m, w.n, w.k,
                    x.stride(0), w.qweight.stride(0), w.scales.stride(0), out.stride(0),
                    GROUP=w.group, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k, USE_DOT=use_dot,
                    HAS_BIAS=bias is not None, num_warps=4)
    return out


__all__ = ["TritonInt4Weight", "pack_codes_int32", "unpack_codes_int32", "dequantize_triton", "int4_matmul",
           "int4_matmul_reference", "GROUPS"]
