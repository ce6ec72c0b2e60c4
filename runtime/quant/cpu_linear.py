"""The CPU's quantised linears: :class:`QuantLinear` (and its fused q/k/v, gate/up form) over
:mod:`edgevlm._C`'s matmul (``cpp_ext/qgemm.cpp``: AVX-512 VNNI where the CPU has it, a portable path
elsewhere), which also quantises the activations to int8 per 32 values. :func:`qgemm_reference` is the
same arithmetic in float64 torch, the oracle the C++ kernel is tested against. Off the CPU the modules
dequantise and use ``F.linear`` (correct, not fast; the CUDA path is :mod:`.triton_linear`).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.errors import ShapeError

from .formats import ACT_BLOCK, LANES, Packed, dequantize, unlanes, unpack_codes

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
    s = unlanes(p.scales, p.n).double()
    xg = xd.view(x.shape[0], p.k // p.group, p.group)
    out = torch.einsum("mgk,ngk,ng->mn", xg, codes, s)
    if p.zeros is not None:  # zero points multiply the exact (unquantised) sums of x
        xsum = x.double().view(x.shape[0], p.k // p.group, p.group).sum(-1)  # [M, K/G]
        out = out + xsum @ unlanes(p.zeros, p.n).double().T
    if bias is not None:
        out = out + bias.double()
    return out


def cpu_kernels() -> str:
    """Which quantised-matmul kernel set runs on this CPU: ``avx512-vnni``, ``avx-vnni``, ``neon-i8mm``,
    ``neon-dotprod`` or ``portable`` (``EDGEVLM_QGEMM=<name>`` picks another this CPU can run)."""
    from edgevlm import _C

    return _C.qgemm_kernels()


def cpu_kernel_info() -> dict:
    """What this CPU runs: the quantised-matmul kernel set in use (``qgemm``), every set it could run,
    best first (``qgemm_sets``), whether bf16 matmuls are native here (``native_bf16``: where they are,
    ``dtype="auto"`` puts the vision tower in bf16) and the instruction-set flags behind both."""
    from edgevlm import _C
    from edgevlm.cpu_features import cpu_flags, native_bf16

    return {"qgemm": _C.qgemm_kernels(), "qgemm_sets": list(_C.qgemm_kernel_sets()), "native_bf16": native_bf16("cpu"),
            "flags": cpu_flags()}


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
    # by tensor identity. (Compiling did not pay off: docs/quantization.md; and wrapping these
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
_QUANTIZED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # decoders with CPU-quantised layers


def mark_quantized(decoder: nn.Module) -> None:
    """Record that ``decoder`` holds CPU-quantised layers, so :func:`kernel_threads` manages its threads."""
    _QUANTIZED.add(decoder)


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


__all__ = ["QuantLinear", "FusedQuantLinear", "QuantSlice", "quantize_activations", "qgemm_reference", "cpu_kernels",
           "cpu_kernel_info",
           "kernel_threads", "mark_quantized"]
