"""Vision encoders in plain PyTorch, built from their configs through a lazy registry."""

from __future__ import annotations

import importlib

from torch import nn

from edgevlm.config import EncoderConfig
from edgevlm.errors import ConfigError

# config kind -> "module:class"; each class takes its config and maps pixels [N, 3, H, W] to
# tokens [N, T, C] (ViTs) or maps [N, C, h, w] (CNNs), as EncoderConfig documents.
ENCODERS: dict[str, str] = {
    "vit": "edgevlm.runtime.vision.vit:ViT",
    "convnext": "edgevlm.runtime.vision.convnext:ConvNeXt",
    "efficientnet": "edgevlm.runtime.vision.efficientnet:EfficientNetLite",
}


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    try:
        spec = ENCODERS[cfg.kind]
    except KeyError:
        raise ConfigError(f"no encoder implementation for kind {cfg.kind!r}; known: {sorted(ENCODERS)}") from None
    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)(cfg)


__all__ = ["ENCODERS", "build_encoder"]
