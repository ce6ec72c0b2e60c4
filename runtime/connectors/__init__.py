"""Connectors: encoder features -> LLM-width visual tokens, built through a lazy registry.

Every connector module has the same call signature::

    forward(features: dict[str, Tensor], masks: dict[str, Tensor] | None = None)
        -> Tensor [n_views, tower.tokens_per_view, out_width]

``features[name]`` is what encoder ``name`` returned for all views: tokens ``[N, T, C]`` for ViTs,
maps ``[N, C, h, w]`` for CNNs. ``masks[name]`` (optional) is ``[N, T]`` bool, True = real token.

Every connector derives from :class:`~.base.Connector`, which also splits it for training on frozen
encoders: ``prepare(features, masks)`` (no parameters, cached once per image) then
``from_prepared(prepared)`` (every parameter); see :mod:`.base`.
"""

from __future__ import annotations

import importlib

from torch import nn

from edgevlm.config import ConnectorConfig, TowerConfig
from edgevlm.errors import ConfigError

CONNECTORS: dict[str, str] = {
    "linear": "edgevlm.runtime.connectors.projectors:LinearConnector",
    "mlp": "edgevlm.runtime.connectors.projectors:MLPConnector",
    "qformer": "edgevlm.runtime.connectors.projectors:QFormerConnector",
    "resampler": "edgevlm.runtime.connectors.resampler:ResamplerConnector",
    "sphinx": "edgevlm.runtime.connectors.sphinx:SphinxFusion",
}


def build_connector(cfg: ConnectorConfig, tower: TowerConfig) -> nn.Module:
    """Build the connector; it receives the whole tower config to learn its encoders' layouts."""
    try:
        spec = CONNECTORS[cfg.kind]
    except KeyError:
        raise ConfigError(f"no connector implementation for kind {cfg.kind!r}; known: {sorted(CONNECTORS)}") from None
    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)(cfg, tower)


__all__ = ["CONNECTORS", "build_connector"]
