"""Token-wise projectors (linear, LLaVA's mlp2x_gelu) and the BLIP-2 Q-Former connector.

All follow the connector contract of :mod:`edgevlm.runtime.connectors`:
``forward(features, masks=None) -> [n_views, tower.tokens_per_view, out_width]``.
This module also holds the small helpers every connector uses to read its encoders' features.
"""

from __future__ import annotations

import torch
from torch import nn

from edgevlm.config import (
    EncoderConfig, LinearConnectorConfig, MLPConnectorConfig, QFormerConnectorConfig, TowerConfig,
)
from edgevlm.errors import ConfigError, ShapeError
from edgevlm.runtime.layers import activation

from .base import Connector
from .qformer import QFormer

TOKEN_KINDS = ("vit",)  # encoders returning tokens [N, T, C]
MAP_KINDS = ("convnext", "efficientnet")  # encoders returning maps [N, C, h, w]


def encoder_features(features: dict[str, torch.Tensor], name: str, who: str) -> torch.Tensor:
    try:
        return features[name]
    except KeyError:
        raise ShapeError(f"{who} reads encoder {name!r}, but features has only {sorted(features)}") from None


def check_layout(x: torch.Tensor, enc: EncoderConfig, who: str, kept: int | None = None) -> None:
    """Raise ShapeError unless ``x`` has the layout ``enc`` promises (tokens or map); ``kept``: a ViT ran on
    that many of its patches (token dropping), so it has ``global token + kept`` tokens."""
    gh, gw = enc.grid
    if kept is not None and enc.kind not in TOKEN_KINDS:
        raise ShapeError(f"{who}: encoder {enc.name!r} ({enc.kind}) returns whole maps; only ViTs run on kept patches")
    if enc.kind in TOKEN_KINDS:
        want = ("N", enc.tokens if kept is None else int(enc.global_token) + kept, enc.feature_width)
        ok = x.ndim == 3 and tuple(x.shape[1:]) == want[1:]
    elif enc.kind in MAP_KINDS:
        want = ("N", enc.feature_width, gh, gw)
        ok = x.ndim == 4 and tuple(x.shape[1:]) == want[1:]
    else:
        raise ConfigError(f"{who}: encoder {enc.name!r} has kind {enc.kind!r}; known: {TOKEN_KINDS + MAP_KINDS}")
    if not ok:
        raise ShapeError(f"{who}: features of encoder {enc.name!r} ({enc.kind}) should be "
                         f"[{', '.join(map(str, want))}], got {list(x.shape)}")


def as_tokens(x: torch.Tensor, enc: EncoderConfig, who: str, cells: torch.Tensor | None = None) -> torch.Tensor:
    """Encoder output -> tokens ``[N, T, C]``; CNN maps are flattened row-major (T = h*w). With kept
    ``cells [N, K]`` of the encoder's own patch grid (token dropping) a ViT's ``[N, cls + K, C]``."""
    check_layout(x, enc, who, kept=None if cells is None else cells.shape[1])
    if enc.kind in MAP_KINDS:
        return x.flatten(2).transpose(1, 2)  # [N, C, h, w] -> [N, h*w, C]
    return x


def encoder_mask(masks: dict[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
    return None if masks is None else masks.get(name)


class LinearConnector(Connector):
    """``proj``: Linear(in_width -> out_width) on every token of one encoder."""

    def __init__(self, cfg: LinearConnectorConfig, tower_cfg: TowerConfig):
        super().__init__()
        self.cfg, self.enc = cfg, tower_cfg.encoder(cfg.encoder)
        self.proj = nn.Linear(cfg.in_width, cfg.out_width, bias=cfg.bias)

    def forward(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
                cells: torch.Tensor | None = None):
        # Token-wise: padded tokens are projected too; the mask only matters to attention-based connectors.
        # With kept cells (token dropping) the encoder's cls + K tokens give cls + K outputs.
        x = as_tokens(encoder_features(features, self.cfg.encoder, "linear connector"), self.enc, "linear connector",
                      cells)
        return self.proj(x)  # [N, T, out_width]

    @torch.no_grad()
    def scale_output_(self, factor: float) -> None:
        for p in self.proj.parameters():
            p.mul_(factor)


class MLPConnector(Connector):
    """LLaVA's ``mlp2x_gelu``: ``fc2(act(fc1(x)))`` on every token (transformers: linear_1/linear_2)."""

    def __init__(self, cfg: MLPConnectorConfig, tower_cfg: TowerConfig):
        super().__init__()
        self.cfg, self.enc = cfg, tower_cfg.encoder(cfg.encoder)
        self.fc1 = nn.Linear(cfg.in_width, cfg.hidden, bias=cfg.bias)
        self.act = activation(cfg.act)
        self.fc2 = nn.Linear(cfg.hidden, cfg.out_width, bias=cfg.bias)

    def forward(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
                cells: torch.Tensor | None = None):
        # With kept cells (token dropping) the encoder's cls + K tokens give cls + K outputs: LLaVA's
        # decoder then gets K image positions.
        x = as_tokens(encoder_features(features, self.cfg.encoder, "mlp connector"), self.enc, "mlp connector", cells)
        return self.fc2(self.act(self.fc1(x)))  # [N, T, out_width]

    @torch.no_grad()
    def scale_output_(self, factor: float) -> None:
        for p in self.fc2.parameters():
            p.mul_(factor)


class QFormerConnector(Connector):
    """BLIP-2 / MiniGPT-4 / InstructBLIP: ``proj(qformer(tokens[, instruction]))``; ``proj`` is
    transformers' ``language_projection``. ``text = (ids [N, L], mask [N, L])``, one row per view, is the
    instruction of an InstructBLIP Q-Former (``cfg.qformer.text`` set)."""

    def __init__(self, cfg: QFormerConnectorConfig, tower_cfg: TowerConfig):
        super().__init__()
        self.cfg, self.enc = cfg, tower_cfg.encoder(cfg.qformer.encoder)
        self.qformer = QFormer(cfg.qformer)
        self.proj = nn.Linear(cfg.qformer.hidden, cfg.out_width)

    def forward(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
                text: tuple[torch.Tensor, torch.Tensor | None] | None = None, cells: torch.Tensor | None = None):
        # With kept cells (token dropping) the queries cross-attend to cls + K image keys: same output shape.
        name = self.cfg.qformer.encoder
        x = as_tokens(encoder_features(features, name, "qformer connector"), self.enc, "qformer connector", cells)
        ids, text_mask = (None, None) if text is None else text
        return self.proj(self.qformer(x, encoder_mask(masks, name), ids, text_mask))  # [N, num_queries, out_width]

    @torch.no_grad()
    def scale_output_(self, factor: float) -> None:
        for p in self.proj.parameters():
            p.mul_(factor)


__all__ = ["LinearConnector", "MLPConnector", "QFormerConnector", "as_tokens", "check_layout",
           "encoder_features", "encoder_mask", "TOKEN_KINDS", "MAP_KINDS"]
