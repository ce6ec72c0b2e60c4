"""What every Triton kernel file here needs: a lazy ``import triton``, the interpreter switch, a jit
that binds ``tl`` into the kernel's module, and the one dispatch decision (:func:`kernel_backend`).

Kernel bodies are plain functions in their files (which import without triton) and name ``tl`` as a
module global; :func:`jit` sets that global and decorates them on first use. Under
``TRITON_INTERPRET=1`` (set before triton is first imported) the same kernels run on CPU tensors.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from edgevlm.errors import BackendUnavailableError


def triton_module(what: str):
    """``import triton`` (and ``triton.language``) or :class:`BackendUnavailableError` naming ``what`` needs it."""
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(
            f"{what} needs the `triton` package, which is not importable here ({e}); install it "
            "(`pip install triton`, bundled with CUDA builds of torch), or use the PyTorch reference") from e
    return triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_JITTED: dict[tuple[object, bool], object] = {}  # (kernel function, interpret mode) -> jitted kernel


def jit(fn, what: str):
    """``triton.jit(fn)``, once per interpreter mode (triton reads the flag when it decorates)."""
    interpret = interpreting()
    key = (fn, interpret)
    if key not in _JITTED:
        triton = triton_module(what)
        # triton.language's own helpers (tl.sum, ...) are jitted when triton is imported, for the
        # interpreter or for a GPU; a kernel interpreted on top of GPU-jitted helpers fails deep inside.
        if interpret and type(triton.language.sum).__name__ != "InterpretedFunction":
            raise BackendUnavailableError("TRITON_INTERPRET=1 was set after triton had been imported; set it "
                                          "before the first `import triton` of the process")
        fn.__globals__["tl"] = triton.language
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


def check_runnable(device, what: str, reference: str) -> None:
    """Triton kernels run on CUDA tensors, or anywhere under the interpreter."""
    if device.type != "cuda" and not interpreting():
        raise BackendUnavailableError(f"{what} runs on CUDA tensors (got {device}); set TRITON_INTERPRET=1 to "
                                      f"run it on CPU, or use {reference}")


@functools.lru_cache(maxsize=None)
def kernel_backend() -> str:
    """``"triton"`` when CUDA tensors take the vision kernels (attention, token gather): CUDA present,
    Triton importable, not disabled by ``EDGEVLM_KERNELS=torch``; else ``"torch"`` (the PyTorch
    references: CPU, and Jetson, where Triton has no wheel). Decided once per process."""
    import torch

    if os.environ.get("EDGEVLM_KERNELS", "").lower() == "torch":
        return "torch"
    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return "torch"
    return "triton"


__all__ = ["triton_module", "interpreting", "jit", "check_runnable", "kernel_backend"]
