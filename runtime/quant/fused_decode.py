"""Batch-1 steps of a CPU-quantised decoder with no Python per layer: :class:`FusedDecodeStep` runs every
layer of one token (a decode step) or of a whole prompt (a prefill) in one call into
``edgevlm._C.DecodePlan`` (``cpp_ext/decode_step.cpp``).

The ordinary step (:meth:`~edgevlm.runtime.decoder.Decoder.forward`) makes about fifteen torch and
kernel calls per layer; on a small model (the demo's 30 layers of 576) that interpreter time is a third
of a token. The C++ step runs the same arithmetic: the quantised matmuls are the very kernels
:class:`~.cpu_linear.QuantLinear` calls (same activation quantisation, same weights, same shared
worker pool and thread count), LoRA side paths and biases are added in the same order; RMSNorm, RoPE,
attention and SiLU are plain fp32 loops whose only difference from torch's is the order of fp32
summation (and a polynomial ``exp`` within a couple of ulp of torch's). The final norm and ``lm_head``
stay the decoder's own modules::

    step = FusedDecodeStep(decoder, cache)        # refuses (ConfigError) what supports() refuses
    logits = step.logits(decoder.embed(prompt_ids), cache)                      # prefill: [1, T] ids -> [1, V]
    for _ in range(n):
        token = logits.argmax(-1)                                               # [1]
        logits = step.logits(decoder.embed(token[:, None]), cache)              # [1, V]; commits 1 position

What it handles (:meth:`FusedDecodeStep.supports` names the first thing it does not): a fp32 CPU
:class:`~edgevlm.runtime.decoder.Decoder` with RMSNorm, rotate-half RoPE whose frequencies do not depend
on the sequence length (scaling ``none``, ``linear``, ``llama3``; partial rotary included), a gated
SiLU MLP, and every projection of every layer a CPU :class:`~.cpu_linear.QuantLinear`: q/k/v and
gate/up either as :class:`~.cpu_linear.QuantSlice` views of one :class:`~.cpu_linear.FusedQuantLinear`
(with its optional side path) or as separate linears, each optionally inside a
:class:`~edgevlm.runtime.lora.LoRASide`; and a float :class:`~edgevlm.runtime.kv_cache.KVCache` of batch 1.

The C++ side trusts its pointers, so every tensor is checked here once (dtype, device, contiguity,
size) and kept referenced. An identity and address check over everything the plan points at notices
a replaced module, buffer or parameter (``load_state_dict(assign=True)``, ``attach_lora``, ``.to()``)
and gathers the plan again; it runs before every step, or once per generation where the caller says
so (``checked=True``: :func:`~edgevlm.runtime.generate.generate_tokens`), since for a 30-layer model it
costs ~50 us, 1 % of a token.
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from edgevlm.errors import ConfigError, ShapeError
from edgevlm.runtime.decoder import Decoder, RMSNorm
from edgevlm.runtime.kv_cache import ContextLengthError, KVCache
from edgevlm.runtime.lora import LoRASide

from .cpu_linear import FusedQuantLinear, QuantLinear, QuantSlice, _default_threads, cpu_kernels, kernel_threads

# RoPE scalings whose frequencies are fixed, so one cos/sin table serves every position; dynamic NTK
# and LongRoPE pick theirs from the sequence length (runtime/decoder.py: rope_inv_freq).
STATIC_ROPE = ("none", "linear", "llama3")


class _Unsupported(Exception):
    """Internal: what supports() reports (raised deep in the gathering, caught at the top)."""


def _need(ok: bool, reason: str) -> None:
    if not ok:
        raise _Unsupported(reason)


class _Watch:
    """What the plan points at: ``owner[key] is obj`` for every module, parameter and buffer slot it
    read, and the address of every parameter (``.to()`` gives a Parameter new storage in place, while
    it replaces buffers in their slots). Both checks are C-level maps, ~0.05 us an entry: ~50 us for
    the demo's 30 layers, which is why a generation checks once, not every token (see ``checked``)."""

    def __init__(self) -> None:
        self.slots: list[dict] = []
        self.keys: list[str] = []
        self.objs: list = []
        self.tensors: list[torch.Tensor] = []
        self.ptrs: list[int] = []

    def slot(self, owner: nn.Module, kind: str, key: str):
        """``owner``'s child / parameter / buffer ``key`` (kind: _modules, _parameters, _buffers), watched."""
        d = getattr(owner, kind)
        obj = d.get(key)
        self.slots.append(d), self.keys.append(key), self.objs.append(obj)
        return obj

    def tensor(self, t: torch.Tensor, what: str, shape: tuple[int, ...]) -> int:
        """Checks a fp32 CPU contiguous tensor of ``shape``; returns its address."""
        _need(isinstance(t, torch.Tensor), f"{what}: missing")
        _need(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and tuple(t.shape) == shape,
              f"{what}: expected a contiguous float32 CPU tensor of shape {shape}, got {t.dtype} "
              f"{tuple(t.shape)} on {t.device}{'' if t.is_contiguous() else ' (strided)'}")
        return self.pointer(t)

    def pointer(self, t: torch.Tensor) -> int:
        if isinstance(t, nn.Parameter):
            self.tensors.append(t), self.ptrs.append(t.data_ptr())
        return t.data_ptr()

    def unchanged(self) -> bool:
        return (all(map(operator.is_, map(dict.get, self.slots, self.keys), self.objs))
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs)


def _quant_args(lin: QuantLinear, watch: _Watch, what: str, n: int, k: int) -> tuple:
    """(bits, N, K, group, qweight, scales, zeros, bias) of a CPU QuantLinear of shape [n, k], checked."""
    _need(type(lin) in (QuantLinear, FusedQuantLinear),
          f"{what} is {type(lin).__name__}, expected a CPU QuantLinear (quantize_decoder)")
    _need((lin.out_features, lin.in_features) == (n, k),
          f"{what}: expected [{n}, {k}], got [{lin.out_features}, {lin.in_features}]")
    for name in ("qweight", "scales", "zeros", "bias"):
        t = watch.slot(lin, "_buffers", name)
        _need(t is None or t.device.type == "cpu", f"{what}.{name} is on {getattr(t, 'device', '?')}, not the CPU")
    try:
        qw, _, sc, zr, g, b = lin._kernel_args()  # dtype / size / contiguity, as the Python path checks them
    except ShapeError as e:
        raise _Unsupported(f"{what}: {e}") from None
    return (lin.bits, n, k, g, qw, sc, zr, b)


def _side(watch: _Watch, owner: nn.Module, a_name: str, b_name: str, what: str, n: int, k: int) -> tuple:
    """(side_A, side_B, rank) pointers of a low-rank path y += B (A x), or zeros when there is none."""
    a, b = watch.slot(owner, "_buffers", a_name), watch.slot(owner, "_buffers", b_name)
    if a is None and b is None:
        return (0, 0, 0)
    _need(a is not None and b is not None and a.dim() == 2, f"{what}: side path needs both A [r, {k}] and B [{n}, r]")
    r = a.shape[0]
    return (watch.tensor(a, f"{what} side A", (r, k)), watch.tensor(b, f"{what} side B", (n, r)), r)


def _single(mod: nn.Module, watch: _Watch, what: str, n: int, k: int, offset: int) -> tuple:
    """One projection (QuantLinear, optionally inside a LoRASide) -> the plan's tuple."""
    if isinstance(mod, LoRASide):
        base = watch.slot(mod, "_modules", "base")
        # LoRASide.forward: base(x) + (x A^T) (scale B)^T, with the scale folded into _scaled_B
        side = _side(watch, mod, "lora_A", "_scaled_B", what, n, k)
        return (*_quant_args(base, watch, f"{what}.base", n, k), offset, *side)
    _need(type(mod) is QuantLinear, f"{what} is {type(mod).__name__}, expected a CPU QuantLinear (quantize_decoder)")
    return (*_quant_args(mod, watch, what, n, k), offset, 0, 0, 0)


def _group(parent: nn.Module, names: tuple[str, ...], sizes: tuple[int, ...], k: int, watch: _Watch,
           what: str) -> list[tuple]:
    """Projections of one input whose outputs are concatenated (q|k|v, gate|up): either slices of one
    fused matrix in that order (one plan entry) or separate linears (one entry each)."""
    mods = [watch.slot(parent, "_modules", n) for n in names]
    total = sum(sizes)
    if all(isinstance(m, QuantSlice) for m in mods):
        fused = mods[0].fused
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
        layout = [(m.fused is fused, m.start, m.stop) for m in mods]
        want = [(True, a, b) for a, b in zip(starts, starts[1:])]
        _need(layout == want and fused.out_features == total,
              f"{what}: slices {[(m.start, m.stop) for m in mods]} are not {'|'.join(names)} of one fused "
              f"matrix with {total} rows")
        # the fused module is not a registered child of the slices: watch it through the slices' __dict__
        for m in mods:
            watch.slots.append(m.__dict__), watch.keys.append("fused"), watch.objs.append(fused)
        return [(*_quant_args(fused, watch, f"{what} (fused)", total, k), 0,
                 *_side(watch, fused, "side_A", "side_B", f"{what} (fused)", total, k))]
    _need(not any(isinstance(m, QuantSlice) for m in mods), f"{what}: some of {', '.join(names)} are fused, some not")
    out, off = [], 0
    for m, name, n in zip(mods, names, sizes):
        out.append(_single(m, watch, f"{what.rsplit(' ', 1)[0]} {name}", n, k, off))
        off += n
    return out


def _norm(parent: nn.Module, name: str, watch: _Watch, what: str, d: int) -> tuple[int, float]:
    norm = watch.slot(parent, "_modules", name)
    _need(type(norm) is RMSNorm, f"{what} is {type(norm).__name__}, the fused step runs RMSNorm only")
    return watch.tensor(watch.slot(norm, "_parameters", "weight"), f"{what}.weight", (d,)), float(norm.eps)


def _extension():
    """edgevlm._C, if it is built and has DecodePlan (an extension built before this file would not)."""
    try:
        from edgevlm import _C
    except ImportError as e:
        raise _Unsupported(f"the C++ extension edgevlm._C is not built ({e})") from None
    _need(hasattr(_C, "DecodePlan"), "edgevlm._C was built without DecodePlan; rebuild it (pip install -e .)")
    return _C


def _gather(decoder: Decoder) -> tuple[list[tuple], _Watch]:
    """Every layer's pointers for DecodePlan.set_layer, checked; raises _Unsupported with the reason."""
    _need(isinstance(decoder, Decoder), f"expected an edgevlm Decoder, got {type(decoder).__name__}")
    _extension()
    cfg = decoder.cfg
    _need(decoder.device.type == "cpu", f"the decoder is on {decoder.device}; the fused step runs on the CPU")
    _need(decoder.dtype == torch.float32, f"the decoder's dtype is {decoder.dtype}; the fused step needs float32")
    _need(cfg.positions == "rope" and decoder.rotary is not None,
          f"positions are {cfg.positions!r}; the fused step needs RoPE")
    _need(cfg.rope_scaling in STATIC_ROPE and not decoder.rotary.length_dependent,
          f"rope_scaling {cfg.rope_scaling!r} depends on the sequence length; the fused step needs one of "
          f"{', '.join(STATIC_ROPE)}")
    _need(decoder.rotary.attention_factor == 1.0, "RoPE attention factor != 1")
    _need(cfg.norm == "rms", f"norm is {cfg.norm!r}; the fused step needs RMSNorm")
    _need(cfg.mlp_gated, "the MLP is not gated; the fused step needs gate/up/down")
    _need(cfg.mlp_act == "silu", f"the MLP activation is {cfg.mlp_act!r}; the fused step needs silu")
    _need(len(decoder.layers) == cfg.layers, f"{len(decoder.layers)} layers, the config says {cfg.layers}")
    d, h, hkv, dh, inter = cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.intermediate
    watch = _Watch()
    layers = []
    for i, layer in enumerate(decoder.layers):
        at = f"layers.{i}"
        attn = watch.slot(layer, "_modules", "attn")
        mlp = watch.slot(layer, "_modules", "mlp")
        _need(isinstance(watch.slot(mlp, "_modules", "act"), nn.SiLU), f"{at}.mlp.act is not SiLU")
        attn_norm, attn_eps = _norm(layer, "attn_norm", watch, f"{at}.attn_norm", d)
        mlp_norm, mlp_eps = _norm(layer, "mlp_norm", watch, f"{at}.mlp_norm", d)
        qkv = _group(attn, ("q_proj", "k_proj", "v_proj"), (h * dh, hkv * dh, hkv * dh), d, watch, f"{at}.attn q/k/v")
        o = [_single(watch.slot(attn, "_modules", "o_proj"), watch, f"{at}.attn.o_proj", d, h * dh, 0)]
        gate_up = _group(mlp, ("gate_proj", "up_proj"), (inter, inter), d, watch, f"{at}.mlp gate/up")
        down = [_single(watch.slot(mlp, "_modules", "down_proj"), watch, f"{at}.mlp.down_proj", d, inter, 0)]
        layers.append((i, attn_norm, attn_eps, mlp_norm, mlp_eps, qkv, o, gate_up, down))
    return layers, watch


def _cache_reason(decoder: Decoder, cache: KVCache) -> str | None:
    cfg = decoder.cfg
    if type(cache) is not KVCache:
        return f"the KV cache is of type {type(cache).__name__}; the fused step writes a float KVCache"
    if cache.batch != 1:
        return f"the KV cache holds batch {cache.batch}; the fused step runs batch 1"
    want = (cfg.layers, 1, cfg.kv_heads, cache.max_len, cfg.head_dim)
    for name, t in (("k", cache.k), ("v", cache.v)):
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != want:
            return (f"KV cache {name}: expected a contiguous float32 CPU tensor {list(want)}, got "
                    f"{t.dtype} {list(t.shape)} on {t.device}")
    return None


class FusedDecodeStep:
    """One-token decode steps of ``decoder`` in C++ (see the module docstring). ``cache``, if given, is
    checked now; any other float KVCache of batch 1 fitting the decoder is checked when first passed.

    ``threads``: 0 (default) uses the quantised linears' own count (the torch thread count, or the one
    :func:`~.cpu_linear.kernel_threads` holds while a generation runs)."""

    def __init__(self, decoder: Decoder, cache: KVCache | None = None, *, threads: int = 0) -> None:
        reason = self.supports(decoder, cache)
        if reason is not None:
            raise ConfigError(f"the fused CPU decode step cannot run this model: {reason}")
        self.decoder = decoder
        self.threads = threads
        self._C = _extension()
        self._plan = None
        self._watch: _Watch | None = None
        self._bound: tuple | None = None  # (cache, k, v, max_len): the cache the tables and pointers are for
        self._cos = self._sin = None  # [max_len, Dr] fp32 rotary tables
        self.regathered = 0  # how many times a changed decoder made the plan be built again
        self._build()
        if cache is not None:
            self._bind(cache)

    @staticmethod
    def supports(decoder: Decoder, cache: KVCache | None = None) -> str | None:
        """None when the fused step can run ``decoder`` (and ``cache``, if given), else the reason."""
        try:
            _gather(decoder)
        except _Unsupported as e:
            return str(e)
        return None if cache is None else _cache_reason(decoder, cache)

    # ---- plan and cache ----------------------------------------------------------------------
    def _build(self) -> None:
        try:
            layers, watch = _gather(self.decoder)
        except _Unsupported as e:
            raise ConfigError(f"the fused CPU decode step cannot run this model any more: {e}") from None
        cfg = self.decoder.cfg
        plan = self._C.DecodePlan(cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.rope_dim, cfg.intermediate,
                                  cfg.layers)
        for args in layers:
            plan.set_layer(*args)
        self._plan, self._watch = plan, watch

    def _bind(self, cache: KVCache) -> None:
        reason = _cache_reason(self.decoder, cache)
        if reason is not None:
            raise ConfigError(f"the fused CPU decode step cannot use this cache: {reason}")
        if self._cos is None or self._cos.shape[0] < cache.max_len:
            # From the decoder's own Rotary, so every row is what the ordinary step computes for its position.
            cos, sin = self.decoder.rotary(torch.arange(cache.max_len), torch.float32)  # [1, 1, S, Dr] each
            self._cos, self._sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()  # [S, Dr]
        self._bound = (cache, cache.k, cache.v, cache.max_len)

    def check(self, cache: KVCache) -> None:
        """Gathers the plan again if the decoder changed since, and binds ``cache`` (ConfigError if
        either can no longer be run). What every step does unless called with ``checked=True``."""
        b = self._bound
        if b is None or b[0] is not cache or b[1] is not cache.k or b[2] is not cache.v:
            self._bind(cache)
        if not self._watch.unchanged():
            self._build()
            self.regathered += 1

    # ---- the step ------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, cache: KVCache, *, checked: bool = False) -> torch.Tensor:
        """Embeddings ``x [1, T, D]`` of T tokens at positions ``cache.length ..`` -> the final-normed
        hidden states ``[1, T, D]`` (what :meth:`Decoder.hidden_states` returns); their K/V are written
        and the cache advances by T, exactly as an ordinary forward does. T = 1 is a decode step; a
        prompt (T > 1) runs the prefill kernels, with token i attending to every position up to its own.

        ``checked=True`` skips looking for changes in the decoder (:meth:`check`), for a caller that
        ran ``check(cache)`` and does not change the decoder in between (generate_tokens, once per
        generation); the cache is still verified to be the bound one."""
        d = self.decoder.cfg.hidden
        if x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != d or x.shape[1] < 1:
            raise ShapeError(f"the fused step takes token embeddings [1, T, {d}] (T >= 1), got {tuple(x.shape)}")
        if cache.batch != 1:
            raise ShapeError(f"KV cache was built for batch {cache.batch}, the fused step runs batch 1")
        b = self._bound
        if not checked or b is None or b[0] is not cache or b[1] is not cache.k or b[2] is not cache.v:
            self.check(cache)
        t = x.shape[1]
        start = cache.reserve(t)  # ContextLengthError on overflow, before anything is written
        max_seq = self.decoder.cfg.max_seq_len
        if start + t > max_seq:
            raise ContextLengthError(f"{start} cached + {t} new = {start + t} positions exceed the decoder's "
                                     f"max_seq_len {max_seq}")
        with torch.no_grad(), kernel_threads(self.decoder):
            h = x.detach().reshape(t, d).to("cpu", torch.float32, copy=True)  # [T, D], a private buffer updated in place
            row = self._cos.shape[1] * 4 * start  # byte offset of row `start` in the [S, Dr] tables
            self._plan.step(h.data_ptr(), start, self._cos.data_ptr() + row, self._sin.data_ptr() + row,
                            cache.k.data_ptr(), cache.v.data_ptr(), cache.max_len, self.threads or _default_threads(), t)
            cache.commit(start + t)
            return self.decoder.norm(h.view(1, t, d))

    def logits(self, x: torch.Tensor, cache: KVCache, *, checked: bool = False) -> torch.Tensor:
        """As ``__call__``, then the decoder's ``lm_head`` on the last position: logits ``[1, V]``."""
        h = self(x, cache, checked=checked)
        with torch.no_grad(), kernel_threads(self.decoder):
            return self.decoder.lm_head(h[:, -1:])[:, -1]

    def info(self) -> dict:
        return {"threads": self.threads or _default_threads(), "qgemm_kernels": cpu_kernels(),
                "math_kernels": self._plan.math_kernels, "regathered": self.regathered}


__all__ = ["FusedDecodeStep", "STATIC_ROPE"]
