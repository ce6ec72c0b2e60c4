"""Weight-only quantisation of the decoder, applied to a finished model from outside.

:func:`quantize_decoder` swaps the decoder's ``nn.Linear`` projections for :class:`QuantLinear`
modules; nothing in :mod:`edgevlm.runtime.decoder` knows. Three sources of quantised weights, one
packed format:

- ``int8``: symmetric int8, one fp32 scale per output channel (or per group of inputs);
- ``int4``: asymmetric 4-bit codes with an fp16 scale and zero point per group of 32/64/128 inputs
  (``w = scale * q + zero``, q in 0..15);
- GGUF ``Q8_0`` / ``Q4_0`` / ``Q4_1`` blocks, repacked as they are: Q8_0 is int8 with group 32,
  Q4_0 is int4 with ``zero = -8 * scale``, Q4_1 is int4 with its own ``m`` as zero. Every value is
  reproduced bit for bit, so a GGUF model is never quantised twice.

On CPU the matmul is :mod:`edgevlm._C`'s VNNI kernel (``cpp_ext/qgemm.cpp``), which also quantises the
activations to int8 per 32 values; :func:`qgemm_reference` is the same arithmetic in float64 torch,
the oracle the kernel is tested against. Other devices dequantise and use ``F.linear`` (correct,
not fast; the CUDA path is ``kernels/int4_gemv.py``).

Packed layouts (rows padded to a multiple of 16; each row block keeps 16 rows side by side so one
512-bit register holds 16 rows' partial sums):

    int8  qweight uint8 [N16, K/4, 16, 4]   byte = int8 + 128
          scales  fp32  [N16, K/G, 16]
    int4  qweight uint8 [N16, K/8, 16, 4]   byte j of a lane holds k = 8c+j (low nibble), 8c+4+j (high)
          scales, zeros fp16 [N16, K/G, 16]
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.config import QuantConfig
from edgevlm.errors import CheckpointError, ConfigError, ShapeError

LANES = 16  # rows per row block
ACT_BLOCK = 32  # activation quantisation block (inputs), also the smallest weight group


def _pad_rows(t: torch.Tensor, n16: int) -> torch.Tensor:
    return t if t.shape[0] == n16 else torch.cat([t, t.new_zeros(n16 - t.shape[0], *t.shape[1:])])


def _lanes(t: torch.Tensor, n16: int) -> torch.Tensor:
    """Per-row values ``[N, C]`` -> ``[N16/16, C, 16]`` (padded rows are 0)."""
    t = _pad_rows(t, n16)
    return t.view(n16 // LANES, LANES, t.shape[1]).transpose(1, 2).contiguous()


def _unlanes(t: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_lanes`: ``[N16/16, C, 16]`` -> ``[N, C]``."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n]


@dataclass(frozen=True)
class Packed:
    """One quantised weight matrix in the kernel's layout (see the module docstring)."""

    bits: int
    n: int
    k: int
    group: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    source: str  # "int8", "int4", "gguf Q4_1", ... (shown by `edgevlm info`)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)


def pack_int8_codes(codes: torch.Tensor, scales: torch.Tensor, group: int, source: str) -> Packed:
    """int8 codes ``[N, K]`` and fp32 scales ``[N, K/group]`` -> :class:`Packed`."""
    n, k = codes.shape
    n16 = -(-n // LANES) * LANES
    u8 = (codes.to(torch.int16) + 128).to(torch.uint8)
    u8 = _pad_rows(u8, n16).masked_fill(torch.arange(n16)[:, None] >= n, 128)  # padded rows decode to 0
    qw = u8.view(n16 // LANES, LANES, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    return Packed(8, n, k, group, qw, _lanes(scales.float(), n16), None, source)


def pack_int4_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                    source: str) -> Packed:
    """4-bit codes ``[N, K]`` (0..15) with fp16 scales and zeros ``[N, K/group]`` -> :class:`Packed`."""
    n, k = codes.shape
    n16 = -(-n // LANES) * LANES
    c = _pad_rows(codes.to(torch.uint8), n16).view(n16, k // 8, 2, 4)  # k = 8c + 4h + j
    byte = c[:, :, 0] | (c[:, :, 1] << 4)  # [N16, K/8, 4]
    qw = byte.view(n16 // LANES, LANES, k // 8, 4).permute(0, 2, 1, 3).contiguous()
    return Packed(4, n, k, group, qw, _lanes(scales.half(), n16), _lanes(zeros.half(), n16), source)


def unpack_codes(p: Packed) -> torch.Tensor:
    """The integer codes ``[N, K]``: int8 (-127..127 for ours, -128.. for GGUF) or 0..15."""
    n16 = p.qweight.shape[0] * LANES
    if p.bits == 8:
        return (p.qweight.permute(0, 2, 1, 3).reshape(n16, p.k).to(torch.int16) - 128)[:p.n]
    b = p.qweight.permute(0, 2, 1, 3).reshape(n16, p.k // 8, 4)
    return torch.stack([b & 0x0F, b >> 4], dim=2).reshape(n16, p.k)[:p.n].to(torch.int16)


def dequantize(p: Packed) -> torch.Tensor:
    """float32 ``[N, K]`` weights the packed matrix stands for."""
    q = unpack_codes(p).float().view(p.n, p.k // p.group, p.group)
    s = _unlanes(p.scales, p.n).float()[..., None]
    w = q * s
    if p.zeros is not None:
        w = w + _unlanes(p.zeros, p.n).float()[..., None]
    return w.view(p.n, p.k)


# ---- quantisers ---------------------------------------------------------------------------------

def _check_shape(w: torch.Tensor, group: int, what: str) -> None:
    n, k = w.shape
    if k % ACT_BLOCK:
        raise ConfigError(f"{what}: {k} inputs is not a multiple of {ACT_BLOCK}; it cannot be quantised")
    if group and k % group:
        raise ConfigError(f"{what}: {k} inputs is not a multiple of group {group}; pick a group that divides it "
                          f"({', '.join(str(g) for g in (32, 64, 128) if k % g == 0)})")


def quantize_int8(w: torch.Tensor, group: int = 0, what: str = "weight") -> Packed:
    """Symmetric int8: ``scale = max|w| / 127`` per output channel (``group=0``) or per group."""
    _check_shape(w, group, what)
    n, k = w.shape
    g = group or k
    wg = w.detach().float().view(n, k // g, g)
    scales = wg.abs().amax(-1) / 127.0  # [N, K/g]
    inv = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    codes = torch.round(wg * inv[..., None]).clamp_(-127, 127).to(torch.int8).view(n, k)
    return pack_int8_codes(codes, scales, g, "int8" + (f"-g{group}" if group else ""))


def quantize_int4(w: torch.Tensor, group: int = 64, what: str = "weight") -> Packed:
    """Asymmetric 4-bit per group: ``zero = min``, ``scale = (max - min) / 15``, both rounded to fp16
    first so the codes are chosen against the values the kernel will use."""
    _check_shape(w, group, what)
    n, k = w.shape
    wg = w.detach().float().view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15.0).half()
    zeros = lo.half()
    s, z = scales.float(), zeros.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = torch.round((wg - z[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8).view(n, k)
    return pack_int4_codes(codes, scales, zeros, group, f"int4-g{group}")


def gguf_packable(ggml_type, shape: tuple[int, ...]) -> bool:
    """Whether :func:`from_gguf` packs a GGUF tensor of this type and shape (Q8_0 / Q4_0 / Q4_1 matrices
    whose rows are whole activation blocks); others stay float."""
    from gguf import GGMLQuantizationType as T

    return len(shape) == 2 and ggml_type in (T.Q8_0, T.Q4_0, T.Q4_1) and shape[1] % ACT_BLOCK == 0


def from_gguf(ggml_type, data: np.ndarray, shape: tuple[int, int], what: str = "weight") -> Packed | None:
    """GGUF Q8_0 / Q4_0 / Q4_1 rows (``data`` uint8 ``[N, row_bytes]``) -> :class:`Packed`, bit-exact.
    None for other types (the caller keeps those in float)."""
    from gguf import GGMLQuantizationType as T

    n, k = shape
    if not gguf_packable(ggml_type, shape):
        return None
    name = T(ggml_type).name
    size = {T.Q8_0: 34, T.Q4_0: 18, T.Q4_1: 20}[ggml_type]
    blk = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True).reshape(n, k // 32, size))
    d = blk[..., :2].contiguous().view(torch.float16)[..., 0]  # [N, K/32]
    if ggml_type == T.Q8_0:
        codes = blk[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        return pack_int8_codes(codes, d.float(), 32, f"gguf {name}")
    qs = blk[..., 4:] if ggml_type == T.Q4_1 else blk[..., 2:]  # [N, K/32, 16]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, k)  # low nibbles are elements 0..15
    if ggml_type == T.Q4_1:
        zeros = blk[..., 2:4].contiguous().view(torch.float16)[..., 0]
    else:
        zeros = d * -8.0  # exact in fp16: a power-of-two multiple
        if not torch.isfinite(zeros).all():
            raise CheckpointError(f"{what}: a Q4_0 scale overflows fp16 when multiplied by -8")
    return pack_int4_codes(codes, d, zeros, 32, f"gguf {name}")


# ---- the kernel and its reference ---------------------------------------------------------------

def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, K]`` -> (int8 values as float64 ``[M, K]``, scales ``[M, K/32]``), as the kernel does it:
    ``scale = max|x| / 127`` per block of 32, round half to even."""
    m, k = x.shape
    xb = x.float().view(m, k // ACT_BLOCK, ACT_BLOCK)
    d = xb.abs().amax(-1) / 127.0  # fp32, like the kernel
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None]).clamp_(-127, 127)
    return q.double().view(m, k), d.double()


def qgemm_reference(x: torch.Tensor, p: Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's arithmetic in float64: ``[M, K]`` -> ``[M, N]``."""
    q, d = quantize_activations(x)
    xd = (q.view(x.shape[0], -1, ACT_BLOCK) * d[..., None]).view_as(q)  # dequantised activations
    codes = unpack_codes(p).double().view(p.n, p.k // p.group, p.group)
    s = _unlanes(p.scales, p.n).double()
    xg = xd.view(x.shape[0], p.k // p.group, p.group)
    out = torch.einsum("mgk,ngk,ng->mn", xg, codes, s)
    if p.zeros is not None:  # zero points multiply the exact (unquantised) sums of x
        xsum = x.double().view(x.shape[0], p.k // p.group, p.group).sum(-1)  # [M, K/G]
        out = out + xsum @ _unlanes(p.zeros, p.n).double().T
    if bias is not None:
        out = out + bias.double()
    return out


def cpu_kernels() -> str:
    """Which quantised-matmul kernels run on this CPU: ``avx512-vnni`` or ``portable``."""
    from edgevlm import _C

    return _C.qgemm_kernels()


class QuantLinear(nn.Module):
    """A drop-in for ``nn.Linear`` holding a :class:`Packed` weight. Input ``[..., K]`` -> ``[..., N]``
    in the input's dtype; the matmul itself runs in fp32 (CPU kernel) on int8 activations."""

    def __init__(self, packed: Packed, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = packed.k, packed.n
        self.bits, self.group, self.source = packed.bits, packed.group, packed.source
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self.threads = 0  # 0: the thread count torch has (see kernel_threads)
        self._args: tuple | None = None  # kernel pointers, checked (see _kernel_args)

    @property
    def packed(self) -> Packed:
        return Packed(self.bits, self.out_features, self.in_features, self.group, self.qweight, self.scales,
                      self.zeros, self.source)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.source}, group={self.group}"

    def _apply(self, fn, recurse=True):  # .to()/.cuda() move the buffers: re-read their pointers
        self._args = None
        return super()._apply(fn, recurse)

    def __setattr__(self, name, value):  # a buffer replaced (load_state_dict(assign=True)): re-check it
        if name in ("qweight", "scales", "zeros", "bias"):
            self.__dict__["_args"] = None
        super().__setattr__(name, value)

    def _kernel_args(self) -> tuple:
        """Raw pointers for the kernel, checked again whenever a buffer is replaced or moved: the C++
        side trusts dtype, layout and size."""
        if self._args is None:
            n16, k, g = -(-self.out_features // LANES) * LANES, self.in_features, self.group
            want = [("qweight", self.qweight, torch.uint8, n16 * k // (1 if self.bits == 8 else 2)),
                    ("scales", self.scales, torch.float32 if self.bits == 8 else torch.float16, n16 * k // g)]
            if self.bits == 4:
                want.append(("zeros", self.zeros, torch.float16, n16 * k // g))
            if self.bias is not None:
                want.append(("bias", self.bias, torch.float32, self.out_features))
            for name, t, dtype, numel in want:
                if t is None or t.dtype != dtype or t.numel() != numel or not t.is_contiguous():
                    got = "None" if t is None else f"{t.dtype} x {t.numel()}{'' if t.is_contiguous() else ', strided'}"
                    raise ShapeError(f"QuantLinear {name}: expected contiguous {dtype} x {numel}, got {got}")
            self._args = (self.qweight.data_ptr(), self.out_features, self.scales.data_ptr(),
                          0 if self.zeros is None else self.zeros.data_ptr(), g,
                          0 if self.bias is None else self.bias.data_ptr())
        return self._args

    # Not for torch.compile: the kernel is an opaque call on raw pointers and the fused modules cache
    # by tensor identity. (Compiling did not pay off: README, "Quantised decoding"; and wrapping these
    # in torch.compiler.disable costs more per call than the rest of this method.)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        if x.shape[-1] != k:
            raise ShapeError(f"QuantLinear expects [..., {k}] inputs, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        if x.device.type != "cpu":
            return F.linear(x.float(), dequantize(self.packed).to(x.device), self.bias).to(x.dtype)
        xf = x.reshape(-1, k)
        if xf.dtype != torch.float32 or not xf.is_contiguous():
            xf = xf.float().contiguous()
        m = xf.shape[0]
        out = torch.empty(m, self.out_features, dtype=torch.float32)
        if m:
            qw, n, sc, zr, g, b = self._kernel_args()
            _C().qgemm(self.bits, xf.data_ptr(), m, k, qw, n, sc, zr, g, b, out.data_ptr(),
                       self.threads or _default_threads())
        out = out.view(*lead, self.out_features)
        return out if x.dtype == torch.float32 else out.to(x.dtype)


class FusedQuantLinear(QuantLinear):
    """Several projections of the same input packed as one matrix (q/k/v; gate/up), so a decode
    step quantises the activations once and makes one kernel call instead of three. The model still
    calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)``: each is a :class:`QuantSlice` of this module,
    and the first call computes all outputs while the others take their slice of the result."""

    def __init__(self, packed: Packed, bias: torch.Tensor | None, parts: list[Packed]) -> None:
        super().__init__(packed, bias)
        self.splits = [p.n for p in parts]
        self.part_sources = [p.source for p in parts]
        self._last: tuple | None = None
        self._served = 0
        self.register_buffer("side_A", None)
        self.register_buffer("side_B", None)

    def set_side_path(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """A float low-rank term added to every output: ``y += (x @ a^T) @ b^T`` with ``a [r, K]``,
        ``b [N, r]`` (how LoRA adapters stay exact beside quantised weights; see lora.attach_lora)."""
        if a.shape[1] != self.in_features or b.shape != (self.out_features, a.shape[0]):
            raise ShapeError(f"side path a {tuple(a.shape)} / b {tuple(b.shape)} does not fit "
                             f"[{self.out_features}, {self.in_features}]")
        self.side_A, self.side_B = a.float().contiguous(), b.float().contiguous()
        self._last = None

    def output_for(self, x: torch.Tensor) -> torch.Tensor:
        # Same tensor object, not modified since (inference tensors keep no version counter; the
        # decoder never writes to a projection's input between the q/k/v calls).
        version = None if x.is_inference() else x._version
        last = self._last
        if last is not None and last[0] is x and last[1] == version:
            self._served += 1
            if self._served == len(self.splits):  # every slice has its part: do not hold a prompt's
                self._last = None                 # activations until the next call
            return last[2]
        y = super().forward(x)
        if self.side_A is not None:
            y = y + F.linear(F.linear(x.float(), self.side_A), self.side_B).to(y.dtype)
        self._last, self._served = (x, version, y), 1
        return y


class QuantSlice(nn.Module):
    """Output rows ``[start, stop)`` of a :class:`FusedQuantLinear` (not registered as a child: the
    fused module owns the weights and appears once in the state dict)."""

    def __init__(self, fused: FusedQuantLinear, start: int, stop: int) -> None:
        super().__init__()
        self.__dict__["fused"] = fused
        self.start, self.stop = start, stop
        self.in_features, self.out_features = fused.in_features, stop - start

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.stop} of a fused {self.fused.source} matrix"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output_for(x)[..., self.start:self.stop]


def _C():
    from edgevlm import _C as ext

    return ext


def _default_threads() -> int:
    return _KERNEL_THREADS or torch.get_num_threads()


_KERNEL_THREADS = 0  # set while kernel_threads() is active
_QUANTIZED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@contextlib.contextmanager
def kernel_threads(decoder: nn.Module):
    """Give the quantised CPU kernels the cores for the duration of a decoder call.

    The kernels run on their own worker pool (``cpp_ext/spin_pool.h``). torch's OpenMP workers keep
    spinning for a while after each parallel op, and on a machine with as many threads as cores the
    two pools then time-slice each other (a decode step measured 4x slower). So while the step runs,
    torch's intra-op threads are set to 1 and the kernels use the thread count torch had; outside
    this block nothing changes. A no-op for decoders without CPU-quantised layers.
    """
    global _KERNEL_THREADS
    if decoder not in _QUANTIZED or _KERNEL_THREADS or decoder.embed_tokens.weight.device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    _KERNEL_THREADS = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _KERNEL_THREADS = 0


# ---- applying it to a decoder -------------------------------------------------------------------

FUSED = (("attn", "qkv", ("q_proj", "k_proj", "v_proj")), ("mlp", "gate_up", ("gate_proj", "up_proj")))
SINGLE = (("attn", "o_proj"), ("mlp", "down_proj"))


def _validate(decoder: nn.Module, config: QuantConfig) -> None:
    """Every shape checked before anything is swapped: all or nothing."""
    for i, layer in enumerate(decoder.layers):
        for parent_name in ("attn", "mlp"):
            for name, mod in getattr(layer, parent_name).named_children():
                if isinstance(mod, nn.Linear):
                    _check_shape(mod.weight, config.group, f"layers.{i}.{parent_name}.{name}")
    if config.lm_head and isinstance(decoder.lm_head, nn.Linear):
        _check_shape(decoder.lm_head.weight, config.group, "lm_head")


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
    _QUANTIZED.add(decoder)
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
        elif hasattr(mod, "weight4"):  # kernels.int4_gemv.TritonInt4Linear, the GPU's int4 layout
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


__all__ = ["Packed", "QuantLinear", "FusedQuantLinear", "QuantSlice", "kernel_threads", "quantize_int8", "quantize_int4", "from_gguf", "gguf_packable", "pack_int8_codes",
           "pack_int4_codes", "unpack_codes", "dequantize", "quantize_activations", "qgemm_reference",
           "quantize_decoder", "summary", "describe", "cpu_kernels"]
