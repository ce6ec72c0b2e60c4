"""What this CPU (or GPU) can execute natively, read from the machine: the instruction-set flags that
decide which kernel or precision is fastest here. Core: the loader's ``dtype="auto"``, the quantised
kernels' report and the bench rows all read it (bench rows through :mod:`edgevlm.perf.limits`)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction sets that change which kernel or precision is fastest here (bf16 wins only with AMX or
# AVX512-BF16; the int8 kernels need VNNI): bench rows record them, since "AMD EPYC" alone can mean AVX2 only.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile",
               "amx_bf16", "amx_int8")


def cpu_flags() -> str:
    """The :data:`SPEED_FLAGS` this CPU has, space-separated (Linux /proc/cpuinfo; ``""`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in SPEED_FLAGS if f in have)
    except OSError:
        pass
    return ""


def native_bf16(device: str | torch.device) -> bool:
    """Whether bf16 matmuls run in hardware here: a CUDA device that supports bf16, or a CPU with AMX-BF16
    or AVX512-BF16. Elsewhere oneDNN emulates them, and a bf16-autocast training step on an AVX2-only
    AMD EPYC took 157 s against 20 s in fp32 (docs/training.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool({"amx_bf16", "avx512_bf16"} & set(cpu_flags().split()))


__all__ = ["cpu_model", "cpu_flags", "native_bf16", "SPEED_FLAGS"]
