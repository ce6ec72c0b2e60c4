"""Fused non-causal attention for the vision tower, in Triton, beside its PyTorch reference.

One kernel serves the three attention shapes of the tower:

* ViT self-attention over the (kept) patch tokens: ``attention(q, k, v)``;
* the Q-Former's queries -> image tokens cross-attention, with a key padding mask:
  ``attention(q, k_img, v_img, key_mask=mask)``;
* the perceiver resampler's latents -> ``concat(media, latents)``: ``attention(q, k_media, v_media,
  k2=k_lat, v2=v_lat, key_mask=media_mask)``. The kernel runs its online softmax over the media keys
  and then over the latent keys, reading the two tensors where they lie: the concatenation is never
  materialised.

Shapes: ``q [N, H, L, D]``, ``k/v [N, H, T, D]``, ``k2/v2 [N, H, T2, D]``, ``key_mask [N, T]`` bool
(True = attend; it covers ``k`` only, the second source is always attended). Any strides with the
head dim innermost, any lengths, head dims up to 256 (64, 72, 88, 96, 128 are the towers'; a dim that
is not a power of two runs as two power-of-two blocks where that pads less, :func:`head_dim_blocks`). Scale ``D**-0.5`` unless given. fp32 accumulation;
fp32 inputs use IEEE products (no TF32), 16-bit inputs tensor-core dots. A query whose every key is
masked gets zeros (PyTorch's SDPA gives NaN there; the reference below matches the kernel).

:func:`attention` dispatches: on CUDA tensors with Triton importable, the kernel for the shapes where a
measurement found it faster than SDPA (eagerly or inside a CUDA graph: the table of
:mod:`~edgevlm.kernels.attention_dispatch`), the reference (:func:`attention_reference`, PyTorch SDPA)
for every other shape and everywhere else: CPU, and Jetson, where Triton has no wheel.
:func:`~edgevlm.kernels.triton_support.kernel_backend` says whether the kernels can run, decided once
per process (``edgevlm info`` shows it); ``EDGEVLM_KERNELS=torch`` forces the references,
``EDGEVLM_KERNELS=triton`` the kernel. :func:`triton_attention` runs the kernel directly (CPU tensors
under ``TRITON_INTERPRET=1``, for the tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgevlm.errors import ShapeError

from .attention_dispatch import use_kernel
from .triton_support import check_runnable, jit, kernel_backend, triton_module

tl = None  # triton.language, bound by triton_support.jit
WHAT = "the Triton attention kernel"
MAX_HEAD_DIM = 256


# ---- the reference -----------------------------------------------------------------------------

def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k2: torch.Tensor | None = None,
                        v2: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                        scale: float | None = None) -> torch.Tensor:
    """What the kernel computes, in PyTorch: explicit concatenation, SDPA with a boolean mask, and
    zeros for queries with no key to attend (SDPA's NaN there)."""
    _check(q, k, v, k2, v2, key_mask)
    if k2 is not None:
        k, v = torch.cat([k, k2], dim=2), torch.cat([v, v2], dim=2)  # [N, H, T+T2, D]
    mask = None
    if key_mask is not None:
        if k2 is not None:
            key_mask = torch.cat([key_mask, key_mask.new_ones(key_mask.shape[0], k2.shape[2])], dim=1)
        mask = key_mask[:, None, None, :]  # [N, 1, 1, T(+T2)]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None:
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # [N, 1, 1, 1]: rows with no key
    return out


def _check(q, k, v, k2, v2, key_mask) -> None:
    if torch.jit.is_tracing():  # sizes are tensors while exporting; the traced model was checked eagerly
        return
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"attention expects q, k, v [N, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    n, h, _, d = q.shape
    if k.shape[:2] != (n, h) or k.shape[3] != d or v.shape != k.shape:
        raise ShapeError(f"k and v must be [{n}, {h}, T, {d}] like each other; got {tuple(k.shape)}, {tuple(v.shape)}")
    if (k2 is None) != (v2 is None):
        raise ShapeError("k2 and v2 come together (the resampler's second key/value source)")
    if k2 is not None and (k2.shape[:2] != (n, h) or k2.shape[3] != d or v2.shape != k2.shape):
        raise ShapeError(f"k2 and v2 must be [{n}, {h}, T2, {d}]; got {tuple(k2.shape)}, {tuple(v2.shape)}")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (n, k.shape[2])):
        raise ShapeError(f"key_mask must be bool [{n}, {k.shape[2]}] (True = attend), got {key_mask.dtype} "
                         f"{tuple(key_mask.shape)}")


# ---- the kernel --------------------------------------------------------------------------------

def _attention_fwd_kernel(q_ptr, k_ptr, v_ptr, k2_ptr, v2_ptr, mask_ptr, o_ptr,
                          sqn, sqh, sql, skn, skh, skt, svn, svh, svt,
                          s2kn, s2kh, s2kt, s2vn, s2vh, s2vt, smn, son, soh, sol,
                          H, L, T, T2, D, qk_scale,
                          HAS_K2: tl.constexpr, HAS_MASK: tl.constexpr, FP32_DOT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_D2: tl.constexpr, HAS_D2: tl.constexpr):
    # Grid: (N * H, cdiv(L, BLOCK_M)) (N * H on axis 0, which has no 65535 limit). Each program owns
    # BLOCK_M queries of one (image, head) and streams the T + T2 keys in BLOCK_N blocks with an online
    # softmax (running max m_i, sum l_i), in the log2 domain. Key j < T comes from (k, v), key j >= T
    # from (k2, v2) at j - T: a block that straddles the two sources takes each lane from its own
    # tensor, so nothing is concatenated.
    # The head dim is one power-of-two block, or with HAS_D2 two (72 = 64 + 16 of which 8 padded,
    # 88 = 64 + 32, 96 = 64 + 32): the scores are the sum of the two parts' dots, and each part keeps
    # its own accumulator, so a head dim of 72 does the work of 80 instead of 128.
    pid_nh = tl.program_id(0)
    pid_m = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = tl.arange(0, BLOCK_N)  # [BN]
    offs_d = tl.arange(0, BLOCK_D)  # [BD]
    offs_e = BLOCK_D + tl.arange(0, BLOCK_D2)  # [BD2]: the second part of the head dim
    d_ok = offs_d[None, :] < D  # [1, BD]; a head dim below 16 is padded with zeros
    e_ok = offs_e[None, :] < D  # [1, BD2]
    m_ok = offs_m[:, None] < L
    q_base = q_ptr + n * sqn + h * sqh + offs_m[:, None] * sql
    q = tl.load(q_base + offs_d[None, :], mask=m_ok & d_ok, other=0.0)
    if HAS_D2:
        qe = tl.load(q_base + offs_e[None, :], mask=m_ok & e_ok, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    acc_e = tl.zeros((BLOCK_M, BLOCK_D2), tl.float32)
    for t0 in range(0, T + T2, BLOCK_N):
        keys = t0 + offs_n  # [BN]
        in1 = keys < T
        ok = in1
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + n * smn + keys, mask=in1, other=0) != 0)
        k_base = k_ptr + n * skn + h * skh + keys[:, None] * skt
        v_base = v_ptr + n * svn + h * svh + keys[:, None] * svt
        k = tl.load(k_base + offs_d[None, :], mask=in1[:, None] & d_ok, other=0.0)
        v = tl.load(v_base + offs_d[None, :], mask=in1[:, None] & d_ok, other=0.0)
        if HAS_D2:
            ke = tl.load(k_base + offs_e[None, :], mask=in1[:, None] & e_ok, other=0.0)
            ve = tl.load(v_base + offs_e[None, :], mask=in1[:, None] & e_ok, other=0.0)
        if HAS_K2:
            in2 = (keys >= T) & (keys < T + T2)
            ok = ok | in2
            j = keys - T
            k2_base = k2_ptr + n * s2kn + h * s2kh + j[:, None] * s2kt
            v2_base = v2_ptr + n * s2vn + h * s2vh + j[:, None] * s2vt
            k += tl.load(k2_base + offs_d[None, :], mask=in2[:, None] & d_ok, other=0.0)
            v += tl.load(v2_base + offs_d[None, :], mask=in2[:, None] & d_ok, other=0.0)
            if HAS_D2:
                ke += tl.load(k2_base + offs_e[None, :], mask=in2[:, None] & e_ok, other=0.0)
                ve += tl.load(v2_base + offs_e[None, :], mask=in2[:, None] & e_ok, other=0.0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BM, BN]; no TF32 for fp32 inputs
            if HAS_D2:
                s += tl.dot(qe, tl.trans(ke), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
            if HAS_D2:
                s += tl.dot(qe, tl.trans(ke))
        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [BM]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: keep exp2 finite
        p = tl.exp2(s - m_safe[:, None])  # [BM, BN]; 0 for masked keys
        alpha = tl.exp2(m_i - m_safe)  # [BM]; 0 while the row had nothing
        if FP32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            if HAS_D2:
                acc_e = acc_e * alpha[:, None] + tl.dot(p, ve, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            if HAS_D2:
                acc_e = acc_e * alpha[:, None] + tl.dot(p.to(ve.dtype), ve)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    norm = tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no key at all -> 0
    o_base = o_ptr + n * son + h * soh + offs_m[:, None] * sol
    tl.store(o_base + offs_d[None, :], (acc / norm).to(o_ptr.dtype.element_ty), mask=m_ok & d_ok)
    if HAS_D2:
        tl.store(o_base + offs_e[None, :], (acc_e / norm).to(o_ptr.dtype.element_ty), mask=m_ok & e_ok)


def head_dim_blocks(d: int) -> tuple[int, int]:
    """The kernel's head-dim blocks for ``d``: ``(BLOCK_D, BLOCK_D2)``, powers of two of at least 16
    (what ``tl.dot`` takes), ``BLOCK_D2 = 0`` for one block. Two blocks when they pad less than the
    next power of two: 72 -> (64, 16), 88 -> (64, 32), 96 -> (64, 32); 64 -> (64, 0), 120 -> (128, 0)."""
    whole = max(16, 1 << (d - 1).bit_length())
    if d <= 16 or whole == d:
        return whole, 0
    first = 1 << (d.bit_length() - 1)  # the largest power of two below d
    second = max(16, 1 << (d - first - 1).bit_length())
    return (first, second) if first + second < whole else (whole, 0)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k2: torch.Tensor | None = None,
                     v2: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """The Triton kernel itself (see the module docstring): CUDA tensors, or CPU under TRITON_INTERPRET=1."""
    triton = triton_module(WHAT)
    _check(q, k, v, k2, v2, key_mask)
    check_runnable(q.device, WHAT, "attention_reference")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ShapeError(f"attention takes fp16/bf16/fp32, got {q.dtype}")
    n, h, length, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ShapeError(f"head dim {d} > {MAX_HEAD_DIM} is not supported by the kernel")
    tensors = [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, k2, v2)]
    q, k, v, k2, v2 = tensors
    out = torch.empty(n, h, length, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    mask = key_mask.contiguous().view(torch.int8) if key_mask is not None else None  # same bytes, no copy kernel
    k2_, v2_ = (k2, v2) if k2 is not None else (k, v)  # placeholders, never read without HAS_K2
    block_d, block_d2 = head_dim_blocks(d)
    width = block_d + block_d2  # what a program's q, k, v and accumulator tiles span
    # Few queries (Q-Former 32, resampler latents) -> short query blocks; keys in 64s.
    block_m = 16 if length <= 16 else (32 if length <= 32 or width > 128 else 64)
    block_n = 32 if width > 128 else 64
    if q.dtype == torch.float32:
        # fp32 tiles are twice the bytes and its IEEE dots run on the CUDA cores: 64 x 128 fp32 tiles
        # of q, k, v and the accumulator overflow the registers (the H200 run: 6-40x slower than SDPA).
        # Halved tiles; not yet timed, so the dispatch table still sends fp32 to SDPA.
        block_m, block_n = min(block_m, 32), 32
    scale = d ** -0.5 if scale is None else scale
    grid = (n * h, triton.cdiv(length, block_m))
    jit(_attention_fwd_kernel, WHAT)[grid](
        q, k, v, k2_, v2_, mask if mask is not None else out, out,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *k2_.stride()[:3], *v2_.stride()[:3],
        mask.stride(0) if mask is not None else 0, *out.stride()[:3],
        h, length, k.shape[2], k2.shape[2] if k2 is not None else 0, d, scale * math.log2(math.e),
        HAS_K2=k2 is not None, HAS_MASK=mask is not None, FP32_DOT=q.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_D2=max(block_d2, 16), HAS_D2=block_d2 > 0,
        num_warps=4 if width <= 64 else 8,
        # fp32 or wide heads: 32 KB k and v tiles; two stages keep the pipeline within shared memory.
        num_stages=2 if width > 64 or q.dtype == torch.float32 else 3)
    return out


# ---- dispatch ----------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, k2: torch.Tensor | None = None,
              v2: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """The fused kernel where it runs (CUDA tensors, Triton present) and was measured faster for this
    shape (:mod:`.attention_dispatch`), the PyTorch reference everywhere else."""
    if q.is_cuda and kernel_backend() == "triton" and use_kernel(q, k, k2, key_mask):
        return triton_attention(q, k, v, k2=k2, v2=v2, key_mask=key_mask, scale=scale)
    return attention_reference(q, k, v, k2=k2, v2=v2, key_mask=key_mask, scale=scale)


__all__ = ["attention", "attention_reference", "triton_attention", "head_dim_blocks", "MAX_HEAD_DIM"]
