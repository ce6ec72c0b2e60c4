"""BLIP-2 Q-Former (reference/architecture.md §2.2, §2.4), with InstructBLIP's optional instruction.

Query path (BLIP-2): what transformers' ``Blip2QFormerModel`` computes inside
``Blip2ForConditionalGeneration``: the learned queries go through an embedding LayerNorm, then
``layers`` BERT-style post-norm blocks. Every block runs self-attention over the queries; blocks with
``layer_idx % cross_attention_every == 0`` then cross-attend to the image tokens; every block ends
with the *query* feed-forward (``intermediate_query``/``output_query``).

Instruction path (``QFormerConfig.text`` set; transformers' ``InstructBlipQFormerModel``): the
instruction's tokens get word + absolute position embeddings (positions from 0), are appended AFTER
the queries and go through the same embedding LayerNorm. Self-attention then runs over
``[queries ; text]`` with the text padding masked out as keys; cross-attention and the query FFN act
on the query rows only, the text rows get the text FFN (``intermediate``/``output``). Only the query
rows are returned. In the last block the text rows feed nobody, so they are not computed there.

Key names (``query_tokens``, ``ln_query``, ``layers.{i}.self_attn.{q,k,v,o}_proj``, ``...norm``,
``layers.{i}.cross_attn...``, ``layers.{i}.fc1/fc2/ffn_norm``; with text also ``text_embed``,
``text_pos_embed``, ``layers.{i}.text_fc1/text_fc2/text_ffn_norm``) are edgevlm's; the transformers
mapping lives in :mod:`edgevlm.runtime.readers.hf_connectors`. Without ``text`` the module and its
state dict are exactly BLIP-2's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.config import QFormerConfig
from edgevlm.errors import ConfigError, ShapeError
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
        if cfg.text is not None:  # the instruction tokens' own feed-forward (transformers: intermediate/output)
            self.text_fc1 = nn.Linear(h, cfg.intermediate)
            self.text_fc2 = nn.Linear(cfg.intermediate, h)
            self.text_ffn_norm = nn.LayerNorm(h, eps=cfg.norm_eps)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The query feed-forward with its post-norm: ``[N, Q, hidden] -> [N, Q, hidden]``."""
        return self.ffn_norm(self.fc2(self.act(self.fc1(x))) + x)

    def text_ffn(self, t: torch.Tensor) -> torch.Tensor:
        """The instruction tokens' feed-forward with its post-norm: ``[N, L, hidden] -> [N, L, hidden]``."""
        return self.text_ffn_norm(self.text_fc2(self.act(self.text_fc1(t))) + t)

    def forward(self, x: torch.Tensor, image: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        # x [N, Q, hidden]; queries see each other without a mask (no text, no padding among queries)
        x = self.self_attn(x, x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, image, image_mask)
        return self.ffn(x)

    def forward_with_text(self, x: torch.Tensor, n_queries: int, key_mask: torch.Tensor, image: torch.Tensor,
                          image_mask: torch.Tensor | None, *, queries_only: bool = False) -> torch.Tensor:
        """One block over ``x [N, Q + L, hidden]`` (queries, then instruction tokens).

        ``key_mask [N, 1, 1, Q + L]`` bool hides the instruction's padding from every row. Returns
        ``[N, Q + L, hidden]``, or only the query rows ``[N, Q, hidden]`` with ``queries_only`` (the
        last block: the text rows' attention and FFN would feed nothing).
        """
        rows = x[:, :n_queries] if queries_only else x
        y = self.self_attn(rows, x, key_mask)  # [N, Q(+L), hidden]
        q = y[:, :n_queries]
        if self.cross_attn is not None:
            q = self.cross_attn(q, image, image_mask)
        q = self.ffn(q)
        if queries_only:
            return q
        return torch.cat([q, self.text_ffn(y[:, n_queries:])], dim=1)


class QFormer(nn.Module):
    """``forward(image_tokens [N, T, encoder_width], image_mask [N, T] bool | None, text_ids [N, L] | None,
    text_mask [N, L] | None) -> [N, num_queries, hidden]``.

    ``text_ids``/``text_mask`` (the instruction, integer ids and bool with True = real token) need a
    Q-Former built with ``QFormerConfig.text``; without them such a Q-Former runs the query path alone.
    A view whose image mask is all False has nothing to attend to and yields NaN (SDPA semantics);
    callers never pass fully padded views. An instruction row may be all padding (the queries are
    always there to attend to).
    """

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        # [1, Q, hidden] like transformers' query_tokens; BLIP-2 initialises them N(0, 0.02).
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.hidden) * 0.02)
        self.ln_query = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)  # InstructBLIP: shared by the text tokens
        if cfg.text is not None:
            self.text_embed = nn.Embedding(cfg.text.vocab_size, cfg.hidden, padding_idx=cfg.text.pad_id)
            self.text_pos_embed = nn.Embedding(cfg.text.max_positions, cfg.hidden)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, cross=(i % cfg.cross_attention_every == 0)) for i in range(cfg.layers))

    @property
    def takes_text(self) -> bool:
        return self.cfg.text is not None

    def initial_queries(self, n: int) -> torch.Tensor:
        """The normalised learned queries for ``n`` items: ``[N, Q, hidden]`` (LN is per token, so expand after)."""
        return self.ln_query(self.query_tokens).expand(n, -1, -1)

    def check_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None, n: int) -> torch.Tensor:
        """Validate an instruction batch for ``n`` items; returns its mask as bool ``[N, L]``."""
        cfg = self.cfg
        if cfg.text is None:
            raise ConfigError(f"this Q-Former (over {cfg.encoder!r}) takes no instruction: its QFormerConfig.text is "
                              "None (BLIP-2); InstructBLIP checkpoints set it")
        if not isinstance(text_ids, torch.Tensor) or text_ids.ndim != 2 or text_ids.shape[0] != n \
                or text_ids.dtype.is_floating_point or text_ids.dtype.is_complex or text_ids.dtype == torch.bool:
            got = (f"{text_ids.dtype} {tuple(text_ids.shape)}" if isinstance(text_ids, torch.Tensor)
                   else type(text_ids).__name__)
            raise ShapeError(f"Q-Former instruction ids: expected integer ids of shape ({n}, L) with "
                             f"L <= {cfg.text.max_positions} (one row per view), got {got}")
        l_text = text_ids.shape[1]
        if l_text > cfg.text.max_positions:
            raise ShapeError(f"Q-Former instruction ids: expected shape ({n}, L) with L <= {cfg.text.max_positions} "
                             f"(max_positions), got {tuple(text_ids.shape)}")
        if text_mask is None:
            text_mask = torch.ones(n, l_text, dtype=torch.bool, device=text_ids.device)
        if not isinstance(text_mask, torch.Tensor) or tuple(text_mask.shape) != (n, l_text) \
                or text_mask.dtype.is_floating_point or text_mask.dtype.is_complex:
            got = (f"{text_mask.dtype} {tuple(text_mask.shape)}" if isinstance(text_mask, torch.Tensor)
                   else type(text_mask).__name__)
            raise ShapeError(f"Q-Former instruction mask: expected a bool (or 0/1 integer) mask of shape "
                             f"({n}, {l_text}) like the ids {tuple(text_ids.shape)}, got {got}")
        if not torch.jit.is_tracing() and text_ids.numel() and \
                (int(text_ids.min()) < 0 or int(text_ids.max()) >= cfg.text.vocab_size):
            raise ShapeError(f"Q-Former instruction ids must lie in [0, {cfg.text.vocab_size}), got "
                             f"[{int(text_ids.min())}, {int(text_ids.max())}]")
        return text_mask if text_mask.dtype == torch.bool else text_mask != 0

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Word + absolute position embeddings (positions 0..L-1), before the shared LayerNorm: ``[N, L, hidden]``."""
        pos = torch.arange(text_ids.shape[1], device=text_ids.device)
        return self.text_embed(text_ids) + self.text_pos_embed(pos)[None]

    def forward(self, image_tokens: torch.Tensor, image_mask: torch.Tensor | None = None,
                text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        if image_tokens.ndim != 3 or image_tokens.shape[-1] != cfg.encoder_width:
            raise ShapeError(f"Q-Former over {cfg.encoder!r}: expected image tokens [N, T, {cfg.encoder_width}], "
                             f"got {tuple(image_tokens.shape)}")
        n, t, _ = image_tokens.shape
        mask = bool_key_mask(image_mask, n, t, f"Q-Former mask for {cfg.encoder!r}")
        image_tokens = image_tokens.to(self.query_tokens.dtype)
        if text_ids is None:
            if text_mask is not None:
                raise ShapeError("Q-Former: text_mask given without text_ids")
            x = self.initial_queries(n)  # [N, Q, hidden]
            for layer in self.layers:
                x = layer(x, image_tokens, mask)
            return x

        valid = self.check_text(text_ids, text_mask, n)  # [N, L] bool
        q = cfg.num_queries
        text = self.embed_text(text_ids).to(self.query_tokens.dtype)  # [N, L, hidden]
        x = self.ln_query(torch.cat([self.query_tokens.expand(n, -1, -1), text], dim=1))  # [N, Q + L, hidden]
        queries_valid = torch.ones(n, q, dtype=torch.bool, device=valid.device)
        key_mask = torch.cat([queries_valid, valid], dim=1)[:, None, None, :]  # [N, 1, 1, Q + L]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer.forward_with_text(x, q, key_mask, image_tokens, mask, queries_only=(i == last))
        return x  # [N, Q, hidden]


__all__ = ["QFormer", "QFormerLayer", "QFormerAttention", "bool_key_mask"]
