"""EfficientNet-Lite image encoder (Tan & Le 2019; the TF "lite" variants) in plain PyTorch.

Lite = EfficientNet-B0's MBConv stages with three edge-friendly changes: ReLU6 instead of swish,
no squeeze-excitation, and a stem (32 ch) and head (``head_width``, 1280) that are never scaled.
Only the MBConv stages follow ``width_mult`` / ``depth_mult`` (and the first and last stage keep
their repeat count, as TF's ``efficientnet_lite_builder`` does with ``fix_head_stem``).

::

    conv_stem, bn_stem      3x3 stride-2 conv -> BN -> ReLU6              [N,3,H,W] -> [N,32,H/2,W/2]
    stages.s.j              MBConv: conv_expand/bn_expand (1x1, when expand != 1) -> ReLU6
                                    conv_dw/bn_dw (kxk depthwise, stride on j == 0) -> ReLU6
                                    conv_project/bn_project (1x1, linear)  [+ identity skip]
    conv_head, bn_head      1x1 conv -> BN -> ReLU6                        [N, head_width, h, w]
    classifier              Linear(head_width, num_classes) on the global average (num_classes > 0)

Padding is TF's 'SAME', computed from the actual input at run time (asymmetric, extra pixel at the
bottom/right for stride 2 on even sizes), so any input size works and every stride-2 layer rounds
up: the output grid is ``ceil(H / 32) x ceil(W / 32)``. BatchNorm always uses its running
statistics (:class:`FrozenBatchNorm2d`): this is an inference runtime, and a training script that
calls ``.train()`` on a tower with a frozen encoder must not be able to drift its statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.config import EfficientNetConfig, round_filters
from edgevlm.errors import ConfigError, ShapeError

STEM_WIDTH = 32  # fixed in every Lite variant


@dataclass(frozen=True)
class StageSpec:
    """One MBConv stage after width/depth scaling."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


# EfficientNet-B0 (= Lite0) stages: (repeats, kernel, stride, expand ratio, in, out channels).
_B0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


def stage_specs(cfg: EfficientNetConfig) -> list[StageSpec]:
    """The scaled stage table for ``cfg`` (readers use it to map flat block indices)."""
    specs = []
    last = len(_B0_STAGES) - 1
    for i, (r, k, s, e, cin, cout) in enumerate(_B0_STAGES):
        # Lite keeps the first and last stage's depth (fix_head_stem) and feeds stage 0 from the
        # unscaled 32-channel stem.
        repeats = r if i in (0, last) else int(math.ceil(cfg.depth_mult * r))
        cin = STEM_WIDTH if i == 0 else round_filters(cin, cfg.width_mult)
        specs.append(StageSpec(repeats, k, s, e, cin, round_filters(cout, cfg.width_mult)))
    return specs


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) along one axis: output = ceil(size / s)."""
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TF 'SAME' padding derived from the input size at run time (no bias in Lite)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        ph, pw = _same_pad(x.shape[-2], k, s), _same_pad(x.shape[-1], k, s)
        if ph[0] == ph[1] and pw[0] == pw[1]:
            # Symmetric (every stride-1 layer): let the conv pad, saving a copy of the activation.
            return F.conv2d(x, self.weight, None, self.stride, (ph[0], pw[0]), 1, self.groups)
        x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d that always normalises with its running statistics (state-dict compatible with
    nn.BatchNorm2d minus ``num_batches_tracked``)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, eps: float):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self.conv_expand = SameConv2d(cin, mid, 1)
            self.bn_expand = FrozenBatchNorm2d(mid, eps)
        self.expand = expand != 1
        self.conv_dw = SameConv2d(mid, mid, k, stride=stride, groups=mid)
        self.bn_dw = FrozenBatchNorm2d(mid, eps)
        self.conv_project = SameConv2d(mid, cout, 1)
        self.bn_project = FrozenBatchNorm2d(cout, eps)
        self.skip = stride == 1 and cin == cout  # no drop-connect: inference only

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, cin, H, W] -> [N, cout, H/stride, W/stride]
        y = F.relu6(self.bn_expand(self.conv_expand(x))) if self.expand else x
        y = F.relu6(self.bn_dw(self.conv_dw(y)))
        y = self.bn_project(self.conv_project(y))  # linear bottleneck: no activation
        return x + y if self.skip else y


class EfficientNetLite(nn.Module):
    """``forward(pixels [N, 3, H, W]) -> map [N, cfg.width, ceil(H/32), ceil(W/32)]``.

    ``cfg.feature == "head"`` returns the ReLU6'd head conv (``head_width`` channels), ``"blocks"``
    the last MBConv stage (linear, ``round_filters(320)`` channels). ``classify`` gives ImageNet
    logits when ``num_classes > 0``. The head is built only if it is used (feature "head" or a
    classifier), so a "blocks" tower carries no dead weights.
    """

    def __init__(self, cfg: EfficientNetConfig):
        super().__init__()
        self.cfg = cfg
        eps = cfg.bn_eps
        self.conv_stem = SameConv2d(3, STEM_WIDTH, 3, stride=2)
        self.bn_stem = FrozenBatchNorm2d(STEM_WIDTH, eps)
        stages = []
        for sp in stage_specs(cfg):
            blocks = [MBConv(sp.in_ch if j == 0 else sp.out_ch, sp.out_ch, sp.kernel, sp.stride if j == 0 else 1,
                             sp.expand, eps) for j in range(sp.repeats)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.has_head = cfg.feature == "head" or cfg.num_classes > 0
        if self.has_head:
            self.conv_head = SameConv2d(stage_specs(cfg)[-1].out_ch, cfg.head_width, 1)
            self.bn_head = FrozenBatchNorm2d(cfg.head_width, eps)
        # Dropout before the classifier is the identity at inference, so it is not modelled.
        self.classifier = nn.Linear(cfg.head_width, cfg.num_classes) if cfg.num_classes > 0 else None

    def _blocks(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ShapeError(f"{self.cfg.name}: expected pixels [N, 3, H, W], got {tuple(pixels.shape)}")
        x = F.relu6(self.bn_stem(self.conv_stem(pixels)))  # [N, 32, ceil(H/2), ceil(W/2)]
        return self.stages(x)  # [N, 320*, ceil(H/32), ceil(W/32)]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.bn_head(self.conv_head(x)))  # [N, head_width, h, w]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self._blocks(pixels)
        return self._head(x) if self.cfg.feature == "head" else x

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [N, num_classes] (global average of the head map, then the classifier)."""
        if self.classifier is None:
            raise ConfigError(f"{self.cfg.name}: classify() needs num_classes > 0")
        x = self._blocks(pixels)
        return self.classifier(self._head(x).mean(dim=(-2, -1)))  # [N, head_width] -> [N, classes]


__all__ = ["EfficientNetLite", "MBConv", "SameConv2d", "FrozenBatchNorm2d", "StageSpec", "stage_specs"]
