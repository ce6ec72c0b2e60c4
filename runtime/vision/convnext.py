"""ConvNeXt image encoder (Liu et al. 2022) in plain PyTorch: pixels -> stride-32 feature map.

Layout follows transformers' ``ConvNextModel`` and timm's ``ConvNeXt`` (they compute the same
function). Parameter names mirror timm's, because the ConvNeXt that SPHINX runs (OpenCLIP
``convnext_xxlarge``) *is* a timm model: its trunk loads after stripping a prefix, and transformers
checkpoints are renamed by :mod:`edgevlm.runtime.readers.hf_convnext`.

::

    stem.0            Conv2d(3, d0, 4, stride 4)            [N,3,H,W] -> [N,d0,H/4,W/4]
    stem.1            LayerNorm2d(d0)
    stages.i          (i > 0) downsample.0 LayerNorm2d, downsample.1 Conv2d(d_{i-1}, d_i, 2, stride 2)
                      blocks.j: conv_dw (7x7 depthwise) -> norm (LN, channels-last) -> mlp.fc1 (C->4C)
                                -> GELU -> mlp.fc2 (4C->C) -> * gamma -> + residual
    head.norm         (final_norm only) LayerNorm2d(d_last) on the output map, timm's head norm

Spatial sizes floor at every strided conv, so the output grid is ``(H // 32, W // 32)`` for four
stages (``H // cfg.stride`` in general), exactly as in transformers and timm.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.config import ConvNeXtConfig
from edgevlm.errors import ConfigError, ShapeError

from edgevlm.runtime.layers import LayerNorm2d


class ConvNeXtMlp(nn.Module):
    """The inverted-bottleneck MLP of a block, on channels-last tensors [N, H, W, C]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # erf GELU: both transformers ("gelu") and timm use the exact form
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, eps: float, layer_scale: bool):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        # The block norm runs channels-last (a plain LayerNorm over the last dim) because the MLP
        # that follows is two Linears on [N, H, W, C]; one permute in, one out.
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = ConvNeXtMlp(dim, 4 * dim)
        # Layer scale: a per-channel multiplier on the residual branch (absent in some configs).
        self.gamma = nn.Parameter(torch.ones(dim)) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W]
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # [N, H, W, C]
        y = self.mlp(self.norm(y))
        if self.gamma is not None:
            y = y * self.gamma
        return x + y.permute(0, 3, 1, 2)  # [N, C, H, W]


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, eps: float, layer_scale: bool, downsample: bool):
        super().__init__()
        # Stage 0 keeps the stem's resolution; later stages halve it with a 2x2/2 conv preceded by
        # a channel LayerNorm (timm and transformers both normalise before, not after, the conv).
        self.downsample = (nn.Sequential(LayerNorm2d(in_dim, eps=eps), nn.Conv2d(in_dim, dim, 2, stride=2))
                           if downsample else nn.Identity())
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, eps, layer_scale) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    """``forward(pixels [N, 3, H, W]) -> map [N, dims[-1], H // stride, W // stride]``.

    ``pixels`` are already normalised with ``cfg.mean`` / ``cfg.std``. With ``cfg.final_norm`` the
    returned map is channel-LayerNormed (``head.norm``), as SPHINX's OpenCLIP/timm trunk returns it.
    """

    def __init__(self, cfg: ConvNeXtConfig):
        super().__init__()
        self.cfg = cfg
        d0, eps = cfg.dims[0], cfg.norm_eps
        self.stem = nn.Sequential(nn.Conv2d(3, d0, kernel_size=4, stride=4), LayerNorm2d(d0, eps=eps))
        dims_in = (d0,) + tuple(cfg.dims[:-1])
        self.stages = nn.Sequential(*[
            ConvNeXtStage(dims_in[i], cfg.dims[i], cfg.depths[i], eps, cfg.layer_scale, downsample=i > 0)
            for i in range(len(cfg.dims))
        ])
        # timm names it head.norm (followed by global_pool/fc, which SPHINX replaces by Identity);
        # transformers calls the same weights `layernorm` and applies them to the pooled vector only.
        self.head = (nn.Sequential(OrderedDict(norm=LayerNorm2d(cfg.dims[-1], eps=eps)))
                     if cfg.final_norm else None)

    def _check(self, pixels: torch.Tensor) -> None:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ShapeError(f"{self.cfg.name}: expected pixels [N, 3, H, W], got {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if h < self.cfg.stride or w < self.cfg.stride:
            raise ShapeError(f"{self.cfg.name}: input {h}x{w} is smaller than the encoder stride {self.cfg.stride}")

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The last stage's map before any final norm (transformers' ``last_hidden_state``)."""
        self._check(pixels)
        return self.stages(self.stem(pixels))  # [N, dims[-1], H // stride, W // stride]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.features(pixels)
        return self.head(x) if self.head is not None else x

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """transformers' ``pooler_output``: mean over H, W of the pre-norm map, then the final
        LayerNorm -> [N, dims[-1]]. Needs ``cfg.final_norm`` (that is where the norm weights live)."""
        if self.head is None:
            raise ConfigError(f"{self.cfg.name}: pooled() needs the final norm; build with final_norm=True")
        x = self.features(pixels).mean(dim=(-2, -1))  # [N, C]
        norm = self.head.norm
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


__all__ = ["ConvNeXt", "ConvNeXtBlock", "ConvNeXtStage"]
