"""Quantising a finished decoder from outside: :func:`quantize_decoder` swaps its ``nn.Linear``
projections for :mod:`.cpu_linear` modules (nothing in :mod:`edgevlm.runtime.decoder` knows), and
:func:`summary` / :func:`describe` say what a decoder holds, CPU or Triton layers alike.
"""

from __future__ import annotations

import torch
from torch import nn

from edgevlm.config import QuantConfig
from edgevlm.errors import ConfigError

from .cpu_linear import FusedQuantLinear, QuantLinear, QuantSlice, cpu_kernels, mark_quantized
from .formats import LANES, Packed, check_shape, from_gguf, quantize_int4, quantize_int8
from .triton_linear import TritonInt4Linear

FUSED = (("attn", "qkv", ("q_proj", "k_proj", "v_proj")), ("mlp", "gate_up", ("gate_proj", "up_proj")))
SINGLE = (("attn", "o_proj"), ("mlp", "down_proj"))


def _validate(decoder: nn.Module, config: QuantConfig) -> None:
    """Every shape checked before anything is swapped: all or nothing."""
    for i, layer in enumerate(decoder.layers):
        for parent_name in ("attn", "mlp"):
            for name, mod in getattr(layer, parent_name).named_children():
                if isinstance(mod, nn.Linear):
                    check_shape(mod.weight, config.group, f"layers.{i}.{parent_name}.{name}")
    if config.lm_head and isinstance(decoder.lm_head, nn.Linear):
        check_shape(decoder.lm_head.weight, config.group, "lm_head")


def _pack(lin: nn.Module, name: str, config: QuantConfig | None, gguf_raw: dict | None) -> Packed | None:
    if not isinstance(lin, nn.Linear):
        return None
    if config is not None:
        if config.scheme == "int8":
            return quantize_int8(lin.weight, config.group, name)
        return quantize_int4(lin.weight, config.group, name)
    raw = gguf_raw.get(name + ".weight")
    if raw is None and name == "lm_head":  # tied: the output projection is the embedding table
        raw = gguf_raw.get("embed_tokens.weight")
    return None if raw is None else from_gguf(raw.ggml_type, raw.data, raw.shape, name)


def _concat(packs: list[Packed]) -> Packed | None:
    """Row-stack packed matrices of one kind (None if they differ or a part is not whole row blocks)."""
    first = packs[0]
    if any(p.bits != first.bits or p.group != first.group or p.k != first.k or p.n % LANES
           or (p.zeros is None) != (first.zeros is None) for p in packs):
        return None
    cat = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    sources = dict.fromkeys(p.source for p in packs)
    return Packed(first.bits, sum(p.n for p in packs), first.k, first.group, cat([p.qweight for p in packs]),
                  cat([p.scales for p in packs]), cat([p.zeros for p in packs]), "+".join(sources))


def _bias(lins: list[nn.Linear]) -> torch.Tensor | None:
    if all(lin.bias is None for lin in lins):
        return None
    return torch.cat([lin.bias.detach().float() if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                      for lin in lins])


def quantize_decoder(decoder: nn.Module, config: QuantConfig | None = None, *, gguf_raw: dict | None = None,
                     fuse: bool = True) -> nn.Module:
    """Swap the decoder's projections for quantised modules, in place; returns the decoder.

    ``config`` quantises float weights (int8 / int4). ``gguf_raw`` (a GGUF file's raw blocks by
    decoder name) repacks the Q8_0/Q4_0/Q4_1 tensors losslessly instead; other GGUF types stay float.
    One of the two, not both. ``fuse`` packs q/k/v and gate/up as one matrix each (same numbers,
    fewer calls per decode step). Raises ConfigError before changing anything if a layer cannot be
    quantised with the asked group size.
    """
    if (config is None) == (gguf_raw is None):
        raise ConfigError("quantize_decoder needs exactly one of config and gguf_raw")
    if config is not None:
        _validate(decoder, config)
    for i, layer in enumerate(decoder.layers):
        for parent_name, fused_name, names in FUSED:
            parent = getattr(layer, parent_name)
            lins = [getattr(parent, n) for n in names]
            packs = [_pack(lin, f"layers.{i}.{parent_name}.{n}", config, gguf_raw) for lin, n in zip(lins, names)]
            whole = _concat(packs) if fuse and all(p is not None for p in packs) else None
            if whole is not None:
                fused = FusedQuantLinear(whole, _bias(lins), packs)
                setattr(parent, fused_name, fused)
                start = 0
                for n, p in zip(names, packs):
                    setattr(parent, n, QuantSlice(fused, start, start + p.n))
                    start += p.n
                continue
            for lin, n, p in zip(lins, names, packs):
                if p is not None:
                    setattr(parent, n, QuantLinear(p, lin.bias))
        for parent_name, n in SINGLE:
            parent = getattr(layer, parent_name)
            p = _pack(getattr(parent, n), f"layers.{i}.{parent_name}.{n}", config, gguf_raw)
            if p is not None:
                setattr(parent, n, QuantLinear(p, getattr(parent, n).bias))
    if config is None or config.lm_head:
        p = _pack(decoder.lm_head, "lm_head", config, gguf_raw)
        if p is not None:
            decoder.lm_head = QuantLinear(p, decoder.lm_head.bias)
    mark_quantized(decoder)
    return decoder


def summary(decoder: nn.Module) -> dict:
    """What is quantised: ``{"schemes": {source: projections}, "float_linears": n, "quantized_bytes": b}``."""
    schemes: dict[str, int] = {}
    floats, nbytes = 0, 0
    for mod in decoder.modules():
        if isinstance(mod, QuantLinear):
            for src in mod.part_sources if isinstance(mod, FusedQuantLinear) else [mod.source]:
                schemes[src] = schemes.get(src, 0) + 1
            nbytes += mod.packed.nbytes
        elif isinstance(mod, TritonInt4Linear):  # the GPU's int4 layout
            key = f"int4-g{mod.group} (triton)"
            schemes[key] = schemes.get(key, 0) + 1
            nbytes += mod.weight4.nbytes
        elif isinstance(mod, nn.Linear):
            floats += 1
    return {"schemes": schemes, "float_linears": floats, "quantized_bytes": nbytes}


def describe(decoder: nn.Module) -> str:
    """One line for ``edgevlm info``: ``int4-g32 x211 (84.0 MB packed, kernels: avx512-vnni)`` or ``none (float32)``."""
    s = summary(decoder)
    if not s["schemes"]:
        return f"none ({str(decoder.dtype).replace('torch.', '')})"
    parts = ", ".join(f"{k} x{v}" for k, v in s["schemes"].items())
    extra = f", {s['float_linears']} float" if s["float_linears"] else ""
    kernels = "triton" if any(k.endswith("(triton)") for k in s["schemes"]) else cpu_kernels()
    return f"{parts}{extra} ({s['quantized_bytes'] / 1e6:.1f} MB packed, kernels: {kernels})"


__all__ = ["quantize_decoder", "summary", "describe"]
