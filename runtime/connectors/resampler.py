"""BLIP-3 / xGen-MM perceiver resampler (reference/architecture.md §3.1).

Learned latents cross-attend to ``concat(media, latents)``; each view (base image or anyres tile)
is resampled independently to ``num_latents`` tokens, and a padding mask over the media keys drops
the padded border of anyres tiles.

Key names follow open_flamingo's ``PerceiverResampler`` where it has names (``latents``,
``norm_media``, ``norm_latents``, ``to_q``, ``to_kv``, ``to_out``, ``norm``, ``projection``); its
unnamed nesting ``layers.{i}.0`` / ``layers.{i}.1.{0,1,3}`` becomes ``layers.{i}.attn`` /
``layers.{i}.ff.{0,1,3}`` here, a pure rename for a checkpoint converter.
"""

from __future__ import annotations

import torch
from torch import nn

from edgevlm.config import ResamplerConnectorConfig, TowerConfig
from edgevlm.errors import ShapeError
from edgevlm.kernels.attention import attention

from .base import Connector
from .projectors import as_tokens, encoder_features, encoder_mask
from .qformer import bool_key_mask


def resampler_attention(q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_lat: torch.Tensor,
                        v_lat: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Latents attend to media keys and their own keys.

    q, k_lat, v_lat: ``[N, H, L, D]``; k_media, v_media: ``[N, H, T, D]``; mask: ``[N, T]`` bool
    (True = real media token) or None. Returns ``[N, H, L, D]``. Scale ``D^-0.5``.

    :func:`edgevlm.kernels.attention.attention` runs it: on CUDA a Triton kernel whose softmax walks
    the media keys and then the latent keys without concatenating them; elsewhere SDPA over the
    explicit concatenation. The latent keys are always present, so even a fully padded view has a
    finite softmax.
    """
    return attention(q, k_media, v_media, k2=k_lat, v2=v_lat, key_mask=mask)


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim, eps=eps)
        self.norm_latents = nn.LayerNorm(dim, eps=eps)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)  # [k; v] stacked on the output dim, as open_flamingo
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [N, S, H*D] -> [N, H, S, D]
        n, s, _ = x.shape
        return x.view(n, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, media: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # media [N, T, dim], latents [N, L, dim], mask [N, T] bool -> [N, L, dim]
        media, latents = self.norm_media(media), self.norm_latents(latents)
        # to_kv is token-wise, so to_kv(cat(media, latents)) == cat(to_kv(media), to_kv(latents)):
        # projecting the two parts apart avoids concatenating the (wide) inputs.
        k_m, v_m = self.to_kv(media).chunk(2, dim=-1)
        k_l, v_l = self.to_kv(latents).chunk(2, dim=-1)
        out = resampler_attention(self._heads(self.to_q(latents)), self._heads(k_m), self._heads(v_m),
                                  self._heads(k_l), self._heads(v_l), mask)  # [N, H, L, D]
        n, _, l_len, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(n, l_len, self.heads * self.head_dim))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int, eps: float):
        super().__init__()
        self.attn = PerceiverAttention(dim, heads, head_dim, eps)
        # Sequential keeps open_flamingo's FeedForward key names (ff.0 = LN, ff.1 / ff.3 = Linear).
        self.ff = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, ff_mult * dim, bias=False), nn.GELU(),
                                nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, media: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        latents = self.attn(media, latents, mask) + latents
        return self.ff(latents) + latents


class PerceiverResampler(nn.Module):
    """``forward(media [N, T, dim], mask [N, T] bool | None) -> [N, num_latents, out_width]``."""

    def __init__(self, dim: int, out_width: int, depth: int, heads: int, head_dim: int, num_latents: int,
                 ff_mult: int = 4, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.latents = nn.Parameter(torch.randn(num_latents, dim))  # [L, dim], randn as open_flamingo
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads, head_dim, ff_mult, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.projection = nn.Linear(dim, out_width)  # with bias (xgenmm's dim_inner projection)

    def forward(self, media: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if media.ndim != 3 or media.shape[-1] != self.dim:
            raise ShapeError(f"resampler: expected media [N, T, {self.dim}], got {tuple(media.shape)}")
        n, t, _ = media.shape
        if mask is not None:
            bool_key_mask(mask, n, t, "resampler media mask")  # validates dtype and shape
        media = media.to(self.latents.dtype)
        latents = self.latents.expand(n, -1, -1)  # [N, L, dim]
        for layer in self.layers:
            latents = layer(media, latents, mask)
        return self.projection(self.norm(latents))  # [N, L, out_width]


class ResamplerConnector(Connector):
    """Connector wrapper: reads ``cfg.encoder``'s tokens (maps are flattened) and its optional mask."""

    def __init__(self, cfg: ResamplerConnectorConfig, tower_cfg: TowerConfig):
        super().__init__()
        self.cfg, self.enc = cfg, tower_cfg.encoder(cfg.encoder)
        self.resampler = PerceiverResampler(cfg.in_width, cfg.out_width, cfg.depth, cfg.heads, cfg.head_dim,
                                            cfg.num_latents, cfg.ff_mult, cfg.norm_eps)

    def forward(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
                cells: torch.Tensor | None = None):
        # A global token, if the encoder keeps one, is just another media token to the resampler; with
        # kept cells (token dropping) the latents attend to cls + K media tokens: same output shape.
        x = as_tokens(encoder_features(features, self.cfg.encoder, "resampler"), self.enc, "resampler", cells)
        return self.resampler(x, encoder_mask(masks, self.cfg.encoder))  # [N, num_latents, out_width]


__all__ = ["resampler_attention", "PerceiverAttention", "PerceiverLayer", "PerceiverResampler", "ResamplerConnector"]
