"""LoRA adapters on the decoder, applied and merged from outside the model.

Training swaps the targeted ``nn.Linear`` modules for :class:`LoRALinear` (frozen base + trainable
``lora_A [r, in]`` and ``lora_B [out, r]``); inference and export merge ``W += scale * B @ A`` back into
plain ``nn.Linear`` weights, so a tuned model runs (and quantises, and exports) exactly like any
other. Checkpoints store only the factors, under the module path of the layer they adapt:
``layers.3.attn.q_proj.lora_A`` / ``.lora_B``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.config import LoRAConfig
from edgevlm.errors import CheckpointError

LORA_SUFFIXES = (".lora_A", ".lora_B")


class LoRALinear(nn.Module):
    """``base(x) + scale * (x @ A^T) @ B^T``; ``B`` starts at zero so training starts from the base model."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.base = base
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    enabled = True  # toggled by :func:`lora_disabled` to run the base model through the same modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if not self.enabled:
            return self.base(x)
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            w = self.base.weight.double() + self.scale * (self.lora_B.double() @ self.lora_A.double())
            out.weight.copy_(w.to(out.weight.dtype))  # rounded once, like merge_lora_weights
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _targets(model: nn.Module, cfg: LoRAConfig) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, full name) of every Linear whose attribute name is a target."""
    found = []
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if attr in cfg.targets and isinstance(child, (nn.Linear, LoRALinear)):
                found.append((module, attr, f"{name}.{attr}" if name else attr))
    return found


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Swap the targeted Linear layers for :class:`LoRALinear` in place; returns their names.
    Base weights are frozen; only the factors require grad."""
    names = []
    for parent, attr, name in _targets(model, cfg):
        child = getattr(parent, attr)
        if isinstance(child, LoRALinear):
            continue
        child.weight.requires_grad_(False)
        if child.bias is not None:
            child.bias.requires_grad_(False)
        setattr(parent, attr, LoRALinear(child, cfg.rank, cfg.scale))
        names.append(name)
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` with its merged ``nn.Linear`` (in place; returns ``model``)."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, attr, child.merged())
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run ``model`` as its base (adapters bypassed) inside the block: the frozen reference that a
    distillation loss compares the adapted model with, without a second copy of the weights."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA factors, keyed ``<layer path>.lora_A`` / ``.lora_B``."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith(LORA_SUFFIXES)}


def merge_lora_weights(model: nn.Module, factors: dict[str, torch.Tensor], cfg: LoRAConfig) -> int:
    """Add ``scale * B @ A`` from ``factors`` into the dense Linear weights of ``model`` in place (the
    runtime path: no wrapper modules). Every targeted layer must have both factors of rank
    ``cfg.rank``; returns the number of layers merged."""
    expected = {name for _, _, name in _targets(model, cfg)}
    checked = _checked_factors(model, factors, cfg, expected)
    for _, lin, a, b in checked:  # every layer checked first: a bad one changes nothing
        with torch.no_grad():  # in float64, so the merged weight is W + s*B@A rounded once
            w = lin.weight.detach().to("cpu", torch.float64)
            merged = w + (b.to(torch.float64) @ a.to(torch.float64)) * cfg.scale
            lin.weight.copy_(merged.to(lin.weight.dtype))
    return len(checked)


def _checked_factors(model: nn.Module, factors: dict[str, torch.Tensor], cfg: LoRAConfig,
                     expected: set[str]) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """(layer name, module, A, B) for every adapted layer, after checking that ``factors`` covers
    exactly ``expected`` with both factors of rank ``cfg.rank`` in the module's shapes."""
    modules = dict(model.named_modules())
    layers = sorted({k.rsplit(".", 1)[0] for k in factors if k.endswith(LORA_SUFFIXES)})
    if set(layers) != expected:
        missing, extra = sorted(expected - set(layers)), sorted(set(layers) - expected)
        raise CheckpointError(f"LoRA factors do not match targets {cfg.targets}: missing {missing[:3]} "
                              f"({len(missing)}), unexpected {extra[:3]} ({len(extra)})")
    checked = []
    for name in layers:
        mod = modules[name]
        a, b = factors.get(name + ".lora_A"), factors.get(name + ".lora_B")
        if a is None or b is None:
            raise CheckpointError(f"LoRA layer {name!r} lacks {'lora_A' if a is None else 'lora_B'}")
        want_a, want_b = (cfg.rank, mod.in_features), (mod.out_features, cfg.rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise CheckpointError(f"LoRA layer {name!r}: factors {tuple(a.shape)} / {tuple(b.shape)}, "
                                  f"expected {want_a} / {want_b}")
        checked.append((name, mod, a, b))
    return checked


class LoRASide(nn.Module):
    """A trained adapter kept beside a base projection that cannot absorb it: ``base(x) + scale * (x @
    A^T) @ B^T``. Used when the base is quantised: a rank-8 update is far smaller than one int4 step, so
    merging it before quantising rounds most of the tuning away (measured on the demo model: held-out
    accuracy fell by half), while two thin fp32 matmuls beside the kernel keep it exact."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = a.shape[1], b.shape[0]
        self.register_buffer("lora_A", a.detach().float().contiguous())
        self.register_buffer("lora_B", b.detach().float().contiguous())
        self.scale = scale
        self.register_buffer("_scaled_B", self.lora_B * scale, persistent=False)  # 3 ops per call, not 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if x.dtype != torch.float32:
            side = F.linear(F.linear(x.float(), self.lora_A), self._scaled_B)
            return self.base(x) + side.to(x.dtype)
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self._scaled_B)


def attach_lora(model: nn.Module, factors: dict[str, torch.Tensor], cfg: LoRAConfig) -> int:
    """Add the adapters of ``factors`` beside every targeted projection of ``model`` (float or
    quantised); same checks as :func:`merge_lora_weights`. Returns the number of layers.

    Projections that are slices of one fused quantised matrix (q/k/v, gate/up) get one side path on
    the fused module: stacked ``A`` and a block-diagonal ``B``, two matmuls instead of two per slice.
    Others are wrapped in :class:`LoRASide`."""
    from .quant import QuantSlice

    modules = dict(model.named_modules())
    # by name: after quantisation a target may be a QuantLinear, a QuantSlice or still an nn.Linear
    expected = {n for n in modules if n.rsplit(".", 1)[-1] in cfg.targets and n.startswith("layers.")}
    checked = _checked_factors(model, factors, cfg, expected)
    fused: dict[int, list] = {}
    for name, mod, a, b in checked:  # everything checked: now change the model
        if isinstance(mod, QuantSlice):
            fused.setdefault(id(mod.fused), []).append((mod, a, b))
        else:
            parent_name, attr = name.rsplit(".", 1)
            setattr(modules[parent_name], attr, LoRASide(mod, a, b, cfg.scale))
    for parts in fused.values():
        target = parts[0][0].fused
        a_all = torch.cat([a.float() for _, a, _ in parts])  # [parts * r, in]
        b_all = torch.zeros(target.out_features, a_all.shape[0])  # block-diagonal: each slice sees its own A
        for i, (sl, _, b) in enumerate(parts):
            b_all[sl.start:sl.stop, i * cfg.rank:(i + 1) * cfg.rank] = b.float() * cfg.scale
        target.set_side_path(a_all, b_all)
    return len(checked)


__all__ = ["LoRALinear", "LoRASide", "attach_lora", "apply_lora", "merge_lora", "lora_disabled", "lora_state_dict", "merge_lora_weights",
           "LORA_SUFFIXES"]
