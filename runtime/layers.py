"""Small building blocks shared by the model files (activations, norms)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.errors import ConfigError


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    """Activation module by the names configs use: gelu (erf), gelu_tanh, quick_gelu, relu, relu6, silu."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    if name == "relu":
        return nn.ReLU()
    if name == "relu6":
        return nn.ReLU6()
    if name == "silu":
        return nn.SiLU()
    raise ConfigError(f"unknown activation {name!r}; known: gelu, gelu_tanh, quick_gelu, relu, relu6, silu")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W]
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
