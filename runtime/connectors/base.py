"""The connector base class: the call every connector keeps, and the split that training uses.

Training a connector on frozen encoders runs the encoders once per image and keeps what they give;
every step then runs only the part of the connector that has parameters. Each connector says where
that line is, as two methods with ``forward(f, m) == from_prepared(prepare(f, m))``::

    prepare(features, masks) -> {key: [N, ...]}     no trainable parameter: cached once per image
    from_prepared(prepared)  -> [N, tokens_per_view, out_width]    every parameter lives here

The default (:class:`Connector`) prepares nothing: the prepared tensors are the connector's encoders'
outputs as :meth:`~edgevlm.runtime.tower.VisionTowerModel.encode` returns them, plus their token masks
(``anyres`` padding) under ``mask.<encoder>``. SPHINX fusion overrides it: its grid resizing and
channel concatenation run once and its ``"aligned"`` tokens are cached.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgevlm.config import ConnectorConfig
from edgevlm.errors import ConfigError, ShapeError

MASK_PREFIX = "mask."  # prepared key of encoder e's token mask: "mask.e"

Prepared = dict[str, torch.Tensor]  # every tensor [N, ...]: views first, so rows can be cached and gathered


def split_prepared(prepared: Prepared) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Prepared tensors -> (features, masks or None), as ``forward`` takes them."""
    feats = {k: v for k, v in prepared.items() if not k.startswith(MASK_PREFIX)}
    masks = {k[len(MASK_PREFIX):]: v for k, v in prepared.items() if k.startswith(MASK_PREFIX)}
    return feats, masks or None


class Connector(nn.Module):
    """Base of every connector module; subclasses set ``self.cfg`` and define ``forward(features, masks=None)``."""

    cfg: ConnectorConfig

    def prepare(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> Prepared:
        """The frozen part: here, the outputs (and token masks) of the encoders this connector reads."""
        out: Prepared = {}
        for name in self.cfg.encoder_names():
            if name not in features:
                raise ShapeError(f"{self.cfg.kind} connector reads encoder {name!r}, but features has only "
                                 f"{sorted(features)}")
            out[name] = features[name]
            m = None if masks is None else masks.get(name)
            if m is not None:
                out[MASK_PREFIX + name] = m
        return out

    def from_prepared(self, prepared: Prepared) -> torch.Tensor:
        """The trainable part: ``[N, tokens_per_view, out_width]``."""
        feats, masks = split_prepared(prepared)
        return self(feats, masks)

    @torch.no_grad()
    def scale_output_(self, factor: float) -> None:
        """Multiply every output token by ``factor`` by scaling the parameters that make it (a training-time
        initialisation, e.g. to start visual tokens at the LLM's embedding scale); the architecture is
        unchanged. Connectors whose output is not a plain affine image of their parameters refuse."""
        raise ConfigError(f"the {self.cfg.kind!r} connector cannot rescale its output")

    def prepare_key(self) -> Any:
        """JSON-able: what, besides the encoders' and views' configs, decides :meth:`prepare`'s output. A
        feature cache is keyed on it, so changing a trainable part keeps the cache and nothing else does."""
        return list(self.cfg.encoder_names())


__all__ = ["Connector", "Prepared", "MASK_PREFIX", "split_prepared"]
