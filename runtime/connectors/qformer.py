"""BLIP-2 Q-Former, query path only (reference/architecture.md §2.2, §2.4).

What transformers' ``Blip2QFormerModel`` computes inside ``Blip2ForConditionalGeneration`` when no
text is given: the learned queries go through an embedding LayerNorm, then ``layers`` BERT-style
post-norm blocks. Every block runs self-attention over the queries; blocks with
``layer_idx % cross_attention_every == 0`` then cross-attend to the image tokens; every block ends
with the *query* feed-forward (``intermediate_query``/``output_query``). The text-only parts
(word/position embeddings, the text FFN) never touch the queries and are left out.

Key names (``query_tokens``, ``ln_query``, ``layers.{i}.self_attn.{q,k,v,o}_proj``, ``...norm``,
``layers.{i}.cross_attn...``, ``layers.{i}.fc1/fc2/ffn_norm``) are edgevlm's; the transformers
mapping lives in :mod:`edgevlm.runtime.readers.hf_connectors`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.config import QFormerConfig
from edgevlm.errors import ShapeError
from edgevlm.kernels.attention import attention


def bool_key_mask(mask: torch.Tensor | None, n: int, t: int, what: str) -> torch.Tensor | None:
    """``[N, T]`` bool (True = real token) -> ``[N, 1, 1, T]`` for SDPA (True = may attend).

    Checked here because SDPA would silently broadcast a wrong shape or treat a float mask as additive.
    """
    if mask is None:
        return None
    if mask.dtype != torch.bool or tuple(mask.shape) != (n, t):
        raise ShapeError(f"{what}: expected a bool mask of shape ({n}, {t}), got {mask.dtype} {tuple(mask.shape)}")
    return mask[:, None, None, :]


class QFormerAttention(nn.Module):
    """Multi-head attention + BERT "SelfOutput": ``LayerNorm(o_proj(attn) + x)`` (post-norm)."""

    def __init__(self, hidden: int, kv_width: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(kv_width, hidden)
        self.v_proj = nn.Linear(kv_width, hidden)
        self.o_proj = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x [N, Q, hidden], kv [N, S, kv_width], mask [N, 1, 1|Q, S] bool (True = may attend) or None;
        # per-query rows are how Q-Former pre-training applies its ITC/ITM/ITG masks.
        n, q_len, hidden = x.shape
        s = kv.shape[1]
        hd = hidden // self.heads
        q = self.q_proj(x).view(n, q_len, self.heads, hd).transpose(1, 2)  # [N, H, Q, hd]
        k = self.k_proj(kv).view(n, s, self.heads, hd).transpose(1, 2)  # [N, H, S, hd]
        v = self.v_proj(kv).view(n, s, self.heads, hd).transpose(1, 2)
        if mask is None or mask.shape[2] == 1:  # no mask, or one key mask for every query: the fused kernel
            a = attention(q, k, v, key_mask=None if mask is None else mask[:, 0, 0, :])  # [N, H, Q, hd]
        else:  # per-query masks (pre-training's ITC/ITM/ITG) stay on SDPA
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale hd^-0.5
        a = a.transpose(1, 2).reshape(n, q_len, hidden)
        return self.norm(self.o_proj(a) + x)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, cross: bool):
        super().__init__()
        h = cfg.hidden
        self.self_attn = QFormerAttention(h, h, cfg.heads, cfg.norm_eps)
        # None in layers without cross-attention, so the state dict lists only weights that exist.
        self.cross_attn = QFormerAttention(h, cfg.encoder_width, cfg.heads, cfg.norm_eps) if cross else None
        self.fc1 = nn.Linear(h, cfg.intermediate)
        self.act = nn.GELU()  # BLIP-2's hidden_act "gelu" is the exact erf form
        self.fc2 = nn.Linear(cfg.intermediate, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.norm_eps)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The query feed-forward with its post-norm: ``[N, Q, hidden] -> [N, Q, hidden]``."""
        return self.ffn_norm(self.fc2(self.act(self.fc1(x))) + x)

    def forward(self, x: torch.Tensor, image: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        # x [N, Q, hidden]; queries see each other without a mask (no text, no padding among queries)
        x = self.self_attn(x, x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, image, image_mask)
        return self.ffn(x)


class QFormer(nn.Module):
    """``forward(image_tokens [N, T, encoder_width], image_mask [N, T] bool | None) -> [N, num_queries, hidden]``.

    A view whose mask is all False has nothing to attend to and yields NaN (SDPA semantics); callers
    never pass fully padded views.
    """

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        # [1, Q, hidden] like transformers' query_tokens; BLIP-2 initialises them N(0, 0.02).
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.hidden) * 0.02)
        self.ln_query = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, cross=(i % cfg.cross_attention_every == 0)) for i in range(cfg.layers))

    def initial_queries(self, n: int) -> torch.Tensor:
        """The normalised learned queries for ``n`` items: ``[N, Q, hidden]`` (LN is per token, so expand after)."""
        return self.ln_query(self.query_tokens).expand(n, -1, -1)

    def forward(self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        if image_tokens.ndim != 3 or image_tokens.shape[-1] != cfg.encoder_width:
            raise ShapeError(f"Q-Former over {cfg.encoder!r}: expected image tokens [N, T, {cfg.encoder_width}], "
                             f"got {tuple(image_tokens.shape)}")
        n, t, _ = image_tokens.shape
        mask = bool_key_mask(image_mask, n, t, f"Q-Former mask for {cfg.encoder!r}")
        image_tokens = image_tokens.to(self.query_tokens.dtype)
        x = self.initial_queries(n)  # [N, Q, hidden]
        for layer in self.layers:
            x = layer(x, image_tokens, mask)
        return x


__all__ = ["QFormer", "QFormerLayer", "QFormerAttention", "bool_key_mask"]
