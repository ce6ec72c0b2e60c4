"""The Jetson modules this runtime is meant for, as NVIDIA publishes them: memory, bandwidth and the
GPU's tensor-core rate. :mod:`edgevlm.perf.plan` sets a model's work against them (``edgevlm plan``).

NVIDIA quotes one "AI performance" figure per module: sparse INT8 TOPS of the GPU plus, on the NX and
AGX modules, the two DLAs. This runtime runs on the GPU, so the rates here are the GPU's own, derived
from its clock and SM count the way Ampere's tensor cores work (GA10B has A100-class tensor cores:
1,024 dense FP16 multiply-adds per clock per SM, twice that in INT8, twice again with 2:4 sparsity).
``published_ai_tops`` is kept beside them so a test can check the derivation against NVIDIA's figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgevlm.errors import ConfigError

FP16_FLOP_PER_CLOCK_PER_SM = 2048  # 1,024 dense FP16 FMAs on GA10B's four third-generation tensor cores


@dataclass(frozen=True)
class DeviceSpec:
    """One module at one power mode. ``memory_gb`` is shared by the CPU, the GPU and the OS."""

    name: str
    title: str
    memory_gb: float
    bandwidth_gbs: float  # LPDDR5 peak, read and write together
    sms: int
    gpu_ghz: float  # GPU clock at this power mode
    published_ai_tops: float  # NVIDIA's headline: sparse INT8, GPU + DLAs
    dla_sparse_tops: float  # the DLAs' share of that headline (0 where fused off)
    workspace_mb: int  # TensorRT builder workspace: docs/export.md advises 1 GiB at 8 GB, 2 at 16; 4 assumed at 64
    source: str

    @property
    def fp16_tflops(self) -> float:
        """Dense FP16 tensor-core peak of the GPU."""
        return self.sms * FP16_FLOP_PER_CLOCK_PER_SM * self.gpu_ghz / 1e3

    @property
    def int8_tops(self) -> float:
        """Dense INT8 tensor-core peak of the GPU."""
        return 2 * self.fp16_tflops

    @property
    def gpu_sparse_int8_tops(self) -> float:
        """What the GPU contributes to NVIDIA's headline figure."""
        return 2 * self.int8_tops


DEVICES: dict[str, DeviceSpec] = {d.name: d for d in (
    DeviceSpec("orin-nano", "Jetson Orin Nano 8 GB, MAXN SUPER (JetPack 6.1+, 25 W)", 8, 102.0, 8, 1.02, 67, 0,
               1024, "NVIDIA Jetson Orin Nano Super datasheet (Dec 2024): 67 TOPS, 102 GB/s, GPU 1,020 MHz"),
    DeviceSpec("orin-nano-15w", "Jetson Orin Nano 8 GB, 15 W (before JetPack 6.1's Super mode)", 8, 68.0, 8, 0.625,
               40, 0, 1024, "NVIDIA Jetson Orin Nano series datasheet: 40 TOPS, 68 GB/s, GPU 625 MHz"),
    DeviceSpec("orin-nx", "Jetson Orin NX 16 GB, MAXN (25 W)", 16, 102.4, 8, 0.918, 100, 40, 2048,
               "NVIDIA Jetson Orin NX series datasheet: 100 TOPS (GPU + 2 DLAs), 102.4 GB/s, GPU 918 MHz"),
    DeviceSpec("agx-orin", "Jetson AGX Orin 64 GB, MAXN (60 W)", 64, 204.8, 16, 1.3, 275, 105, 4096,
               "NVIDIA Jetson AGX Orin series technical brief: 275 TOPS (GPU 170 + DLAs 105), 204.8 GB/s, "
               "GPU 1.3 GHz"),
)}


def get_device(name: str) -> DeviceSpec:
    try:
        return DEVICES[name]
    except KeyError:
        raise ConfigError(f"unknown device {name!r}; known: {', '.join(DEVICES)}") from None


__all__ = ["DeviceSpec", "DEVICES", "get_device"]
