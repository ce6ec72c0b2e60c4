"""A plain Vision Transformer covering the CLIP/OpenCLIP, DINOv2, SigLIP and EVA (BLIP-2) variants.

One module, switched by :class:`~edgevlm.config.ViTConfig` fields rather than by family name::

    variant          class token  pre-norm  patch bias  layer scale  MLP            final norm
    CLIP / OpenCLIP  yes          ln_pre    no          no           quick_gelu     optional
    DINOv2           yes          no        yes         yes          gelu / SwiGLU  yes
    SigLIP           no           no        yes         no           gelu_tanh      yes
    EVA (BLIP-2)     yes          no        yes         no           gelu           yes

Output layout (the :class:`~edgevlm.config.EncoderConfig` contract): ``[N, T, width]`` with the class
token first when ``cfg.global_token`` and then the patch grid in row-major order.

Parameter names (what the readers in :mod:`edgevlm.runtime.readers` produce)::

    patch_embed.weight [W, 3, P, P]   patch_embed.bias [W]        (bias only if cfg.patch_bias)
    cls_token [1, 1, W]                                            (only if cfg.class_token)
    pos_embed [1, cls + G*G, W]       G = cfg.trained_grid, class position first
    norm_pre.weight/bias [W]                                       (only if cfg.pre_norm)
    blocks.{i}.norm1.weight/bias [W]
    blocks.{i}.attn.qkv.weight [3W, W]  blocks.{i}.attn.qkv.bias [3W]   rows ordered q, k, v
    blocks.{i}.attn.proj.weight [W, W]  blocks.{i}.attn.proj.bias [W]
    blocks.{i}.ls1 [W], blocks.{i}.ls2 [W]                         (only if cfg.layer_scale)
    blocks.{i}.norm2.weight/bias [W]
    blocks.{i}.mlp.fc1.weight [M, W] (SwiGLU: [2M, W], gate rows first, then up)
    blocks.{i}.mlp.fc2.weight [W, M]
    norm.weight/bias [W]                                           (only if cfg.final_norm)

Only the ``cfg.blocks_run`` blocks that the selected ``feature_layer`` needs are built, and the final
norm only when it is applied: LLaVA's penultimate-layer features then carry no dead weights. With
``feature_layers`` the outputs of several layers (each final-normed when ``final_norm``) are
concatenated on channels: ``[N, T, width * len(feature_layers)]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.config import ViTConfig
from edgevlm.errors import ShapeError
from edgevlm.kernels.attention import attention
from edgevlm.kernels.token_drop import gather_with_pos
from edgevlm.runtime.layers import activation


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (one GEMM instead of three)."""

    def __init__(self, width: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        # [N, T, 3W] -> [N, T, 3, H, D] -> [3, N, H, T, D]
        qkv = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o = attention(q, k, v)  # [N, H, T, D], scale D^-0.5; Triton on CUDA, SDPA elsewhere
        return self.proj(o.transpose(1, 2).reshape(n, t, c))


class MLP(nn.Module):
    """fc1 -> act -> fc2, or SwiGLU (DINOv2 ViT-g): fc1 gives [gate | up], silu(gate) * up -> fc2.

    The SwiGLU input projection stays fused (one [2M, W] GEMM), as in the DINOv2 checkpoints.
    """

    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.swiglu = act == "swiglu"
        self.fc1 = nn.Linear(width, 2 * hidden if self.swiglu else hidden)
        self.act = nn.SiLU() if self.swiglu else activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # [N, T, M] or [N, T, 2M]
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.fc2(h)  # [N, T, W]


class Block(nn.Module):
    """Pre-norm transformer block; DINOv2's layer scales multiply each branch before the residual add."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.attn = Attention(w, cfg.heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.mlp = MLP(w, cfg.mlp_dim, cfg.mlp_act)
        if cfg.layer_scale:
            self.ls1 = nn.Parameter(torch.ones(w))
            self.ls2 = nn.Parameter(torch.ones(w))
        else:
            self.ls1 = self.ls2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm1(x))
        x = x + (a * self.ls1 if self.ls1 is not None else a)
        m = self.mlp(self.norm2(x))
        return x + (m * self.ls2 if self.ls2 is not None else m)

    def forward_rows(self, x: torch.Tensor, parts: Sequence[tuple[torch.Tensor | None, "LayerKV"]]) -> torch.Tensor:
        """The block on some token rows of several views, packed: ``x [S, W]`` holds, view after view, the
        rows ``parts[i] = (rows [n_i], kv)`` of view i (``rows`` None: all its tokens, a whole encode).
        Each view's queries attend to every token of that view: the K/V of the rows computed here
        replace theirs in ``kv`` (a whole encode records them all), the others are the ones ``kv``
        kept from earlier frames. The projections and the MLP run once over all views' rows."""
        s, w = x.shape
        heads = self.attn.heads
        qkv = self.attn.qkv(self.norm1(x)).view(s, 3, heads, w // heads)  # [S, 3, H, D]
        outs, start = [], 0
        for rows, kv in parts:
            n = kv.tokens if rows is None else rows.shape[0]
            q, k, v = qkv[start:start + n].permute(1, 2, 0, 3).unbind(0)  # [H, n, D] each
            start += n
            if rows is None:
                kv.k, kv.v = k.contiguous(), v.contiguous()  # [H, T, D]
            else:
                kv.k[:, rows], kv.v[:, rows] = k, v
            o = attention(q[None], kv.k[None], kv.v[None])[0]  # [H, n, D]
            outs.append(o.transpose(0, 1).reshape(n, w))
        if start != s:
            raise ShapeError(f"forward_rows: the parts hold {start} rows, x has {s}")
        a = self.attn.proj(torch.cat(outs))
        x = x + (a * self.ls1 if self.ls1 is not None else a)
        m = self.mlp(self.norm2(x))
        return x + (m * self.ls2 if self.ls2 is not None else m)


@dataclass
class LayerKV:
    """One view's keys and values at one block, ``[H, T, D]`` each (None until recorded)."""

    tokens: int
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


@dataclass
class ViTState:
    """What one view's tokens were, kept so that a later frame re-encodes only some of them
    (:meth:`ViT.forward_rows`): every block's K/V, and the selected layers' outputs ``[T, W]`` (before
    the final norm)."""

    kv: list[LayerKV]
    picked: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        ts = [t for l in self.kv for t in (l.k, l.v) if t is not None] + list(self.picked.values())
        return sum(t.numel() * t.element_size() for t in ts)


class ViT(nn.Module):
    """pixels ``[N, 3, H, W]`` (normalised with ``cfg.mean``/``cfg.std``) -> tokens ``[N, T, width]``.

    ``H`` and ``W`` may be any sizes >= ``patch_size`` (the patch conv floors, as the reference
    implementations do); a grid other than the trained one gets an interpolated position table.
    ``T = cfg.global_token + (H // P) * (W // P)``.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        w, p, g = cfg.width, cfg.patch_size, cfg.trained_grid
        self.patch_embed = nn.Conv2d(3, w, kernel_size=p, stride=p, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, int(cfg.class_token) + g * g, w))
        self.norm_pre = nn.LayerNorm(w, eps=cfg.norm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks_run))
        self.norm = nn.LayerNorm(w, eps=cfg.norm_eps) if cfg.final_norm else None

    # -- embeddings ------------------------------------------------------------------------------

    def pos_embed_for(self, gh: int, gw: int) -> torch.Tensor:
        """Position table ``[1, cls + gh*gw, W]`` for a ``gh x gw`` patch grid.

        Off the trained grid, the patch part is resized as transformers' Dinov2 does it (bicubic,
        ``align_corners=False``, no antialias, in fp32 because bicubic in half precision shifts the
        table); the class position is kept as is. CLIP, SigLIP and BLIP-2 use the same recipe in
        transformers when ``interpolate_pos_encoding=True``.
        """
        g = self.cfg.trained_grid
        if (gh, gw) == (g, g):
            return self.pos_embed
        n_cls = int(self.cfg.class_token)
        cls_pos, patch_pos = self.pos_embed[:, :n_cls], self.pos_embed[:, n_cls:]
        w = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, g, g, w).permute(0, 3, 1, 2)  # [1, W, g, g]
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        patch_pos = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, w)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def embed(self, pixels: torch.Tensor, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Patchify, prepend the class token, add positions, apply the pre-norm: ``[N, T, W]``.

        This is layer 0 of ``feature_layer`` (transformers' ``hidden_states[0]``). With ``keep_ids``
        ``[N, K]`` (patch indices, row-major) only those patches go on, in that order, after the class
        token: ``[N, cls + K, W]``, gathered and position-added in one pass
        (:func:`edgevlm.kernels.token_drop.gather_with_pos`).
        """
        p = self.cfg.patch_size
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] < p or pixels.shape[3] < p:
            raise ShapeError(f"{self.cfg.name}: expected pixels [N, 3, H, W] with H, W >= {p}, "
                             f"got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # [N, W, gh, gw]
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [N, gh*gw, W], row-major grid
        if keep_ids is not None:
            x = gather_with_pos(x, self.pos_embed_for(gh, gw), keep_ids, self.cls_token)  # [N, cls + K, W]
        else:
            if self.cls_token is not None:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [N, 1 + gh*gw, W]
            x = x + self.pos_embed_for(gh, gw)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        return x

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, pixels: torch.Tensor, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        layers = self.cfg.selected_layers  # indices into [embeddings, block 1, ...]
        x = self.embed(pixels, keep_ids)  # [N, T0, W] (T0 = cls + K with keep_ids)
        picked = [x] if 0 in layers else []
        for i, blk in enumerate(self.blocks, start=1):  # cfg.blocks_run blocks: stops at the deepest layer
            x = blk(x)
            if len(layers) > 1 and i in layers:
                picked.append(x)
        if len(layers) > 1:
            return self._features(dict(zip(sorted(set(layers)), picked)))
        return self._features({layers[0]: x})

    def forward_rows(self, pixels: torch.Tensor, rows: Sequence[torch.Tensor | None],
                     states: Sequence[ViTState | None]) -> tuple[torch.Tensor, list[ViTState]]:
        """Temporal reuse: ``pixels [N, 3, H, W]`` -> (tokens ``[N, T, width]`` as :meth:`forward` gives
        them, each view's state), computing only token ``rows[i]`` (positions in the class token + patch
        sequence) of view i and taking the other tokens from ``states[i]``, the view's earlier frame.
        ``rows[i]`` None (and ``states[i]`` None) encodes view i whole and records its state.

        The recomputed rows attend to every token of their view, the kept ones through their recorded
        K/V: a kept token's values stay those of the frame it was last computed in (its pixels did not
        change, the context around it may have). All views' rows go through each layer's projections
        and MLP together. ``states`` are updated in place (a failure part-way leaves them mixed: encode
        those views whole next time)."""
        if len(rows) != pixels.shape[0] or len(states) != pixels.shape[0]:
            raise ShapeError(f"forward_rows: {pixels.shape[0]} views, {len(rows)} row sets, {len(states)} states")
        layers = self.cfg.selected_layers
        full = self.embed(pixels)  # [N, T, W]: the patch embedding is a small share of the encoder
        t = full.shape[1]
        for r, st in zip(rows, states):
            if (r is None) != (st is None):
                raise ShapeError("forward_rows: a view is encoded whole (rows None) exactly when it has no state")
        states = [ViTState([LayerKV(t) for _ in self.blocks]) if st is None else st for st in states]
        parts_rows = [None if r is None else r.to(full.device) for r in rows]
        x = torch.cat([f if r is None else f[r] for f, r in zip(full, parts_rows)])  # [S, W]
        sizes = [t if r is None else r.shape[0] for r in parts_rows]

        def record(layer: int, y: torch.Tensor) -> None:
            for st, r, part in zip(states, parts_rows, y.split(sizes)):
                if r is None:
                    st.picked[layer] = part.clone()
                else:
                    st.picked[layer][r] = part

        if 0 in layers:
            record(0, x)
        for i, blk in enumerate(self.blocks, start=1):
            x = blk.forward_rows(x, [(r, st.kv[i - 1]) for r, st in zip(parts_rows, states)])
            if i in layers:
                record(i, x)
        out = self._features({i: torch.stack([st.picked[i] for st in states]) for i in set(layers)})
        return out, states

    def _features(self, by_layer: dict[int, torch.Tensor]) -> torch.Tensor:
        """The selected layers' outputs ``{layer: [N, T0, W]}`` -> the encoder's tokens: final-normed,
        concatenated on channels in the config's order, class token dropped where the config says."""
        layers = self.cfg.selected_layers
        if len(layers) > 1:  # several layers, in the config's order: [N, T0, W * len(layers)]
            feats = [by_layer[i] for i in layers]
            if self.norm is not None:
                feats = [self.norm(f) for f in feats]
            x = torch.cat(feats, dim=-1)
        else:
            x = by_layer[layers[0]]
            if self.norm is not None:
                x = self.norm(x)
        if self.cls_token is not None and not self.cfg.keep_class_token:
            x = x[:, 1:]  # [N, gh*gw, feature_width]
        return x


__all__ = ["ViT", "Block", "Attention", "MLP", "ViTState", "LayerKV"]
