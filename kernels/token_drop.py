"""Token dropping's fused gather + position add for the vision encoders, in Triton, beside its reference.

Which patches to keep is the tower's policy (:mod:`edgevlm.runtime.token_keep`: cells of the fused
grid -> patch ids per encoder). Given those ids, a ViT's kept tokens are

    tokens [N, cls + K, W] = (class token + pos[0]) then patches[ids] + pos[1 + ids]

:func:`gather_with_pos` is that step fused: one read of each kept patch embedding and its position
row, one write, instead of the gather, the concatenation and the add over the full grid. A Triton
kernel runs it on CUDA; :func:`gather_with_pos_reference` is the PyTorch oracle, used on CPU.
"""
from __future__ import annotations

import torch

from edgevlm.errors import ShapeError

from .triton_support import check_runnable, jit, kernel_backend, triton_module

tl = None  # triton.language, bound by triton_support.jit
WHAT = "the Triton token-gather kernel"


# ---- the fused gather -------------------------------------------------------------------------

def gather_with_pos_reference(patches: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor,
                              cls: torch.Tensor | None = None) -> torch.Tensor:
    """``patches [N, L, W]``, ``pos [1, c + L, W]`` (c = 1 with a class token), ``ids [N, K]``,
    ``cls [1, 1, W]`` or None -> ``[N, c + K, W]``: class token + pos[0], then patches[ids] + pos[c + ids]."""
    _check(patches, pos, ids, cls)
    n, _, w = patches.shape
    c = 0 if cls is None else 1
    idx = ids[..., None].expand(-1, -1, w)  # [N, K, W]
    kept = patches.gather(1, idx) + pos[0, c:].expand(n, -1, -1).gather(1, idx)
    if cls is None:
        return kept
    return torch.cat([(cls + pos[:, :1]).expand(n, -1, -1), kept], dim=1)


def _check(patches, pos, ids, cls) -> None:
    if patches.dim() != 3 or ids.dim() != 2 or ids.shape[0] != patches.shape[0]:
        raise ShapeError(f"expected patches [N, L, W] and ids [N, K]; got {tuple(patches.shape)}, {tuple(ids.shape)}")
    n, length, w = patches.shape
    c = 0 if cls is None else 1
    if tuple(pos.shape) != (1, c + length, w):
        raise ShapeError(f"pos must be [1, {c + length}, {w}], got {tuple(pos.shape)}")
    if ids.dtype != torch.int64:
        raise ShapeError(f"ids must be int64, got {ids.dtype}")


def _gather_pos_kernel(p_ptr, pos_ptr, ids_ptr, cls_ptr, o_ptr, K, W, C,
                       spn, spl, sin, son, sot,
                       HAS_CLS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    # Grid: (N, cdiv(C + K, BLOCK_T)). Output row t of image n: t < C is the class token + pos[0];
    # else patch ids[t - C] + pos[C + ids[t - C]]. Rows are contiguous in W, so each is one coalesced read.
    n = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT] output rows
    t_ok = t < C + K
    is_patch = t >= C
    j = tl.where(is_patch, t - C, 0)
    pid = tl.load(ids_ptr + n * sin + j, mask=t_ok & is_patch, other=0)  # [BT] patch index
    for w0 in range(0, W, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)  # [BW]
        w_ok = w[None, :] < W
        patch_ok = (t_ok & is_patch)[:, None] & w_ok
        x = tl.load(p_ptr + n * spn + pid[:, None] * spl + w[None, :], mask=patch_ok, other=0.0)
        prow = tl.where(is_patch, C + pid, 0)  # position row: C + id for patches, 0 for the class token
        x += tl.load(pos_ptr + prow[:, None] * W + w[None, :], mask=t_ok[:, None] & w_ok, other=0.0)
        if HAS_CLS:
            cls_ok = (t_ok & (t < C))[:, None] & w_ok
            x += tl.load(cls_ptr + w[None, :] + 0 * t[:, None], mask=cls_ok, other=0.0)
        tl.store(o_ptr + n * son + t[:, None] * sot + w[None, :], x.to(o_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & w_ok)


def triton_gather_with_pos(patches: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor,
                           cls: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1); same contract as the reference."""
    triton = triton_module(WHAT)
    _check(patches, pos, ids, cls)
    check_runnable(patches.device, WHAT, "gather_with_pos_reference")
    patches = patches if patches.stride(-1) == 1 else patches.contiguous()
    pos = pos.to(patches.dtype).contiguous()
    ids = ids.contiguous()
    n, _, w = patches.shape
    c = 0 if cls is None else 1
    k = ids.shape[1]
    out = torch.empty(n, c + k, w, dtype=patches.dtype, device=patches.device)
    if out.numel() == 0:
        return out
    cls_t = cls.to(patches.dtype).reshape(-1).contiguous() if cls is not None else pos
    block_w = min(256, triton.next_power_of_2(w))
    grid = (n, triton.cdiv(c + k, 16))
    jit(_gather_pos_kernel, WHAT)[grid](patches, pos, ids, cls_t, out, k, w, c,
                                        patches.stride(0), patches.stride(1), ids.stride(0), out.stride(0),
                                        out.stride(1), HAS_CLS=cls is not None, BLOCK_T=16, BLOCK_W=block_w)
    return out


def gather_with_pos(patches: torch.Tensor, pos: torch.Tensor, ids: torch.Tensor,
                    cls: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernel on CUDA (when :func:`kernel_backend` chose Triton), the reference elsewhere."""
    if patches.is_cuda and kernel_backend() == "triton":
        return triton_gather_with_pos(patches, pos, ids, cls)
    return gather_with_pos_reference(patches, pos, ids, cls)


__all__ = ["gather_with_pos", "gather_with_pos_reference", "triton_gather_with_pos"]
