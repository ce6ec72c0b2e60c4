"""SPHINX mixing of visual encoders (reference/architecture.md §1.3-1.5).

Per view::

    for each encoder in cfg.encoders:            # brought to one layout, [global] + grid x grid
        ViT tokens [N, T, C]  -> class token (or mean of the grid tokens) + grid map [N, C, gh, gw]
        CNN map    [N, C, h, w]
        map -> resize_grid(map, cfg.grid) -> row-major tokens [N, g*g, C]
        CNN: global token = mean of the resized grid tokens (SPHINX's ConvNeXt "gap as cls token")
    aligned = cat(encoders, dim=channels)                      # [N, 1 + g*g, sum(in_widths)]
    fused   = visual_proj(aligned)  (Linear -> LayerNorm)      # [N, 1 + g*g, out]
                (proj_hidden > 0: Linear -> GELU -> Linear -> LayerNorm, not in SPHINX)
    qf      = qformer_proj(qformer(tokens))                    # [N, Q, out]       (if cfg.qformer)
    out     = [start_img] qf fused [end_img]                   # [N, tokens_per_view, out]

Parameter names match LLaMA2-Accessory's ``llama_ens*.py`` (``visual_proj.{0,1}``,
``qformer_proj.{0,1}``, ``start_img``, ``end_img``) so SPHINX checkpoints map over directly; SPHINX's
``qformer`` is a whole ``Blip2Model`` whose Q-Former converts with
:func:`edgevlm.runtime.readers.hf_connectors.qformer_from_hf` (prefix ``qformer.qformer.``, query
tokens ``qformer.query_tokens``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.config import EncoderConfig, SphinxFusionConfig, TowerConfig
from edgevlm.errors import ConfigError, ShapeError

from .base import MASK_PREFIX, Connector, Prepared, split_prepared
from .projectors import MAP_KINDS, as_tokens, check_layout, encoder_features, encoder_mask
from .qformer import QFormer


def resize_grid(m: torch.Tensor, g: int) -> torch.Tensor:
    """Resize a map ``[N, C, h, w]`` to ``[N, C, g, g]``.

    Equal -> unchanged; a whole-multiple shrink -> average pooling (each output token is the mean of
    the block it covers); a whole-multiple growth -> nearest repeat (SPHINX's ``repeat_interleave``
    of ConvNeXt 8x8 -> 16x16); anything else -> antialiased bilinear (align_corners=False).
    """
    # Spatial sizes are fixed by the encoder's resolution; int() keeps them constants when traced.
    h, w = (int(d) for d in m.shape[-2:])
    if (h, w) == (g, g):
        return m
    if h % g == 0 and w % g == 0:
        return F.avg_pool2d(m, kernel_size=(h // g, w // g))
    if g % h == 0 and g % w == 0:
        # Broadcast-and-reshape rather than repeat_interleave, which ONNX export turns into a broken Concat.
        n, c = m.shape[:2]
        ry, rx = g // h, g // w
        return m[:, :, :, None, :, None].expand(n, c, h, ry, w, rx).reshape(n, c, g, g)
    return F.interpolate(m, size=(g, g), mode="bilinear", align_corners=False, antialias=True)


def to_fusion_layout(x: torch.Tensor, enc: EncoderConfig, g: int, who: str = "sphinx fusion",
                     cells: torch.Tensor | None = None) -> torch.Tensor:
    """One encoder's output -> ``[N, 1 + g*g, C]``: global token then the g x g grid, row-major.

    With ``cells [N, K]`` (token dropping, :mod:`edgevlm.runtime.token_keep`) -> ``[N, 1 + K, C]``,
    the kept cells only: a CNN map is resized whole and the cells picked from it; a ViT ran on the r x r
    patches of each kept cell (cell-major) and they are averaged per cell, which is what the
    average-pool resize gives for those cells. Its global token is then the class token or, without
    one, the mean of the kept patches.
    """
    if cells is not None and enc.kind not in MAP_KINDS:
        return _kept_vit_layout(x, enc, g, cells, who)
    check_layout(x, enc, who)
    gh, gw = enc.grid
    if enc.kind in MAP_KINDS:
        grid = resize_grid(x, g).flatten(2).transpose(1, 2)  # [N, g*g, C]
        glob = grid.mean(dim=1, keepdim=True)  # [N, 1, C]
        if cells is not None:
            grid = grid.gather(1, cells[..., None].expand(-1, -1, grid.shape[-1]))  # [N, K, C]
    else:
        n, _, c = x.shape
        src = x[:, 1:] if enc.global_token else x  # [N, gh*gw, C]
        # Without a class token the mean of the encoder's own grid stands in for it (DINO/SigLIP-style
        # pooling); it equals the mean of the resized grid whenever the resize is a pool or a repeat.
        glob = x[:, :1] if enc.global_token else src.mean(dim=1, keepdim=True)
        m = src.transpose(1, 2).reshape(n, c, gh, gw)  # row-major tokens -> map
        grid = resize_grid(m, g).flatten(2).transpose(1, 2)
    return torch.cat([glob, grid], dim=1)


def _kept_vit_layout(x: torch.Tensor, enc: EncoderConfig, g: int, cells: torch.Tensor, who: str) -> torch.Tensor:
    gh, gw = enc.grid
    if gh != gw or gh % g:
        raise ConfigError(f"{who}: token dropping needs encoder {enc.name!r}'s grid ({gh}x{gw}) to be a square "
                          f"whole multiple of the fused {g}x{g} grid")
    r2 = (gh // g) ** 2
    n, k = cells.shape
    c = int(enc.global_token)
    if x.ndim != 3 or x.shape[1] != c + k * r2 or x.shape[2] != enc.feature_width:
        raise ShapeError(f"{who}: encoder {enc.name!r} kept {k} cells x {r2} patches, so its tokens should be "
                         f"[N, {c + k * r2}, {enc.feature_width}]; got {list(x.shape)}")
    src = x[:, c:]  # [N, K*r2, C], cell-major
    glob = x[:, :1] if c else src.mean(dim=1, keepdim=True)
    grid = src.reshape(n, k, r2, -1).mean(dim=2)  # [N, K, C]
    return torch.cat([glob, grid], dim=1)


def sincos_2d(g: int, d: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table ``[1, 1 + g*g, d]``: row 0 (the global token) is zero, then the grid
    row-major; half the channels encode y, half x, at geometric frequencies."""
    q = d // 4
    freq = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float32) / max(1, q)))  # [q]
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):  # [g*g]
        ang = coord[:, None] * freq[None]  # [g*g, q]
        parts += [ang.sin(), ang.cos()]
    table = torch.cat(parts, dim=1)  # [g*g, 4q]
    table = F.pad(table, (0, d - table.shape[1]))
    return torch.cat([torch.zeros(1, d), table])[None]  # [1, 1 + g*g, d]


class SphinxFusion(Connector):
    """``forward(features, masks=None) -> [N, tokens_per_view, out_width]`` (see the module docstring)."""

    def __init__(self, cfg: SphinxFusionConfig, tower_cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        self.encs = [tower_cfg.encoder(n) for n in cfg.encoders]
        d = cfg.out_width
        if cfg.proj_hidden:  # keys visual_proj.{0,2,3}: the MLP's two Linears, then the norm
            self.visual_proj = nn.Sequential(nn.Linear(cfg.fused_width, cfg.proj_hidden), nn.GELU(),
                                             nn.Linear(cfg.proj_hidden, d), nn.LayerNorm(d, eps=cfg.norm_eps))
        else:  # SPHINX's own keys, visual_proj.{0,1}
            self.visual_proj = nn.Sequential(nn.Linear(cfg.fused_width, d), nn.LayerNorm(d, eps=cfg.norm_eps))
        if cfg.qformer is not None:
            self.qformer_enc = tower_cfg.encoder(cfg.qformer.encoder)
            self.qformer = QFormer(cfg.qformer)
            self.qformer_proj = nn.Sequential(nn.Linear(cfg.qformer.hidden, d), nn.LayerNorm(d, eps=cfg.norm_eps))
        if cfg.pos_embed:
            self.pos_embed = nn.Parameter(sincos_2d(cfg.grid, d))  # [1, 1 + g*g, out], unit scale like the LN output
        if cfg.separators:
            # One shared pair wraps every view; torch.rand init as SPHINX (trained values replace it).
            self.start_img = nn.Parameter(torch.rand(1, 1, d))
            self.end_img = nn.Parameter(torch.rand(1, 1, d))

    @torch.no_grad()
    def scale_output_(self, factor: float) -> None:
        # every output token is a LayerNorm's affine output (+ the position table) or a separator
        for p in (*self.visual_proj[-1].parameters(),
                  *(self.qformer_proj[1].parameters() if self.cfg.qformer is not None else ()),
                  *((self.pos_embed,) if self.cfg.pos_embed else ()),
                  *((self.start_img, self.end_img) if self.cfg.separators else ())):
            p.mul_(factor)

    def aligned_tokens(self, features: dict[str, torch.Tensor], cells: torch.Tensor | None = None) -> torch.Tensor:
        """Channel concatenation of all fusion encoders, before ``visual_proj``: ``[N, 1 + g*g, sum(in_widths)]``
        (``[N, 1 + K, ...]`` with kept ``cells [N, K]``)."""
        parts = [to_fusion_layout(encoder_features(features, e.name, "sphinx fusion"), e, self.cfg.grid,
                                  cells=cells) for e in self.encs]
        # Under tracing a size is a tensor, so the set would not collapse; the graph's inputs share one
        # dynamic axis there anyway.
        n = {int(p.shape[0]) for p in parts} if not torch.jit.is_tracing() else {0}
        if len(n) != 1:
            raise ShapeError(f"sphinx fusion: encoders returned different view counts "
                             f"{dict(zip(self.cfg.encoders, (p.shape[0] for p in parts)))}")
        dtype = self.visual_proj[0].weight.dtype
        return torch.cat([p.to(dtype) for p in parts], dim=-1)

    def forward(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
                cells: torch.Tensor | None = None):
        return self.from_aligned(self.aligned_tokens(features, cells), features, masks, cells)

    # The training split (base.Connector): the grid layout and channel concat hold no parameter, so
    # training caches their result, "aligned" [N, 1 + g*g, sum(in_widths)], and the Q-Former's encoder tokens.
    def prepare(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> Prepared:
        out = {"aligned": self.aligned_tokens(features)}
        if self.cfg.qformer is not None:
            name = self.cfg.qformer.encoder
            out[name] = encoder_features(features, name, "sphinx q-former")
            if encoder_mask(masks, name) is not None:
                out[MASK_PREFIX + name] = masks[name]
        return out

    def from_prepared(self, prepared: Prepared) -> torch.Tensor:
        feats, masks = split_prepared(prepared)
        return self.from_aligned(feats.pop("aligned"), feats, masks)

    def prepare_key(self) -> list:
        return [list(self.cfg.encoders), self.cfg.grid]

    def from_aligned(self, aligned: torch.Tensor, features: dict[str, torch.Tensor] | None = None,
                     masks: dict[str, torch.Tensor] | None = None, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Everything after :meth:`aligned_tokens`: ``[N, 1 + g*g, sum(in_widths)]`` -> ``[N, tokens_per_view, out]``.

        Training with frozen encoders caches ``aligned`` once per image and runs only this part;
        ``features`` is needed only for the Q-Former's encoder tokens.
        """
        # Grid encoders see whole views, so masks only reach the Q-Former's cross-attention.
        fused = self.visual_proj(aligned)  # [N, 1 + g*g, out]
        if self.cfg.pos_embed:
            pe = self.pos_embed  # [1, 1 + g*g, out]
            if cells is not None:  # the kept cells' positions: [N, 1 + K, out]
                pe = torch.cat([pe[:, :1].expand(cells.shape[0], -1, -1), pe[0, 1:][cells]], dim=1)
            fused = fused + pe
        n = fused.shape[0]
        parts = [fused]
        if self.cfg.qformer is not None:
            name = self.cfg.qformer.encoder
            if features is None:
                raise ShapeError(f"sphinx fusion with a Q-Former needs the features of encoder {name!r}")
            x = as_tokens(encoder_features(features, name, "sphinx q-former"), self.qformer_enc, "sphinx q-former")
            if not torch.jit.is_tracing() and x.shape[0] != n:
                raise ShapeError(f"sphinx fusion: Q-Former encoder {name!r} has {x.shape[0]} views, the grid "
                                 f"encoders {n}")
            parts.insert(0, self.qformer_proj(self.qformer(x, encoder_mask(masks, name))))  # [N, Q, out]
        if self.cfg.separators:
            parts = [self.start_img.expand(n, -1, -1), *parts, self.end_img.expand(n, -1, -1)]
        return torch.cat(parts, dim=1)  # [N, 2*sep + Q + 1 + g*g, out]


__all__ = ["SphinxFusion", "resize_grid", "to_fusion_layout", "sincos_2d"]
