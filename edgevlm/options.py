"""How to load a model: :class:`LoadOptions`, one frozen object that ``edgevlm.load`` builds from its
keyword arguments (or takes as it is) and hands, whole, to every stage of loading.

Every field is checked and normalised when the object is made, so a bad option fails before any
weights are read, and later stages never re-derive a setting from a string: ``quant`` is ``"auto"``,
None or a :class:`~edgevlm.config.QuantConfig`; ``device`` a ``torch.device``; ``dtype`` and
``tower_dtype`` ``torch.dtype``s (``dtype="auto"`` is resolved here, for this machine: see
:func:`auto_dtypes`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from .config import QuantConfig
from .errors import ConfigError

VISION_BACKENDS = ("torch", "onnxruntime", "tensorrt")
VISION_PRECISIONS = ("fp32", "fp16", "int8")
KV_CACHES = ("float", "int8")
# How a Pipeline decodes one token at a time: the ordinary eager step, captured CUDA graphs (one per
# context bucket, runtime/cuda_graph.py), or the same static-shape steps run without capture.
DECODE_GRAPHS = ("off", "on", "eager")
# load() picks token dropping by ratio and mode; the "score" mode needs a scorer callable, which only
# VisionTower.set_token_keep takes.
KEEP_MODES = ("uniform", "random")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def torch_dtype(d: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"fp16"`` / ``torch.bfloat16`` ... -> a torch dtype (ConfigError for others)."""
    if isinstance(d, torch.dtype):
        if d not in DTYPES.values():
            raise ConfigError(f"dtype {d} not supported; use one of {sorted(DTYPES)}")
        return d
    if d not in DTYPES:
        raise ConfigError(f"dtype {d!r} not supported; use one of {sorted(DTYPES)} (or 'auto' for load's dtype)")
    return DTYPES[d]


def auto_dtypes(device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """What ``dtype="auto"`` means on ``device``: (decoder dtype, vision tower dtype).

    The tower is bf16 where bf16 matmuls run in hardware (a CPU with AVX512-BF16 or AMX-BF16, a CUDA
    GPU with bf16) and float32 elsewhere, where bf16 would be emulated and slower. The decoder stays
    float32: the quantised CPU kernels take fp32 activations (their prefill runs int8 dot products,
    faster than bf16 on CPUs without AMX), and a float decoder keeps its reference numbers."""
    from .cpu_features import native_bf16

    return torch.float32, (torch.bfloat16 if native_bf16(device) else torch.float32)


def quant_setting(quant: str | QuantConfig | None) -> str | QuantConfig | None:
    """``quant`` as one of three things: ``"auto"`` (keep a GGUF file's own blocks), None (float
    weights; ``"none"`` means the same) or a :class:`QuantConfig` (``"int8"``, ``"int4-g64"``, ...)."""
    if isinstance(quant, QuantConfig) or quant is None or quant == "auto":
        return quant
    if quant == "none":
        return None
    if not isinstance(quant, str):
        raise ConfigError(f"quant must be 'auto', 'none', a scheme name or a QuantConfig, got {type(quant).__name__}")
    return QuantConfig.named(quant)


@dataclass(frozen=True)
class LoadOptions:
    """Everything ``edgevlm.load`` can be told besides what to load. See :func:`edgevlm.load` for
    what each option does; the defaults are the CLI's."""

    device: str | torch.device = "cpu"
    dtype: str | torch.dtype = "float32"
    tower_dtype: str | torch.dtype | None = None
    quant: str | QuantConfig | None = "auto"
    kv_cache: str = "float"
    max_context: int = 2048
    reuse_prefix: bool = True
    embedding_cache_bytes: int = 64 << 20
    preprocess_backend: str = "auto"
    max_image_pixels: int | None = None
    vision_backend: str = "torch"
    vision_export: str | os.PathLike | None = None
    vision_precision: str = "fp32"
    keep_ratio: float = 1.0
    keep_mode: str = "uniform"
    seed: int = 0
    progress: bool | None = None
    grounding_head: bool = True
    decode_graphs: str = "off"

    def __post_init__(self) -> None:
        device = torch.device(self.device)
        if isinstance(self.dtype, str) and self.dtype == "auto":
            dtype, tower_dtype = auto_dtypes(device)
        else:
            dtype = torch_dtype(self.dtype)
            tower_dtype = dtype
        if self.tower_dtype is not None:
            tower_dtype = torch_dtype(self.tower_dtype)
        normalise = {"device": device, "dtype": dtype, "tower_dtype": tower_dtype,
                     "quant": quant_setting(self.quant), "reuse_prefix": bool(self.reuse_prefix),
                     "grounding_head": bool(self.grounding_head)}
        for name, value in normalise.items():
            object.__setattr__(self, name, value)
        if self.vision_backend not in VISION_BACKENDS:
            raise ConfigError(f"vision_backend must be one of {', '.join(VISION_BACKENDS)}, "
                              f"got {self.vision_backend!r}")
        if self.vision_backend == "torch" and self.vision_export is not None:
            raise ConfigError("vision_export is read by the onnxruntime / tensorrt vision backends; "
                              "pass vision_backend too")
        if self.vision_precision not in VISION_PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(VISION_PRECISIONS)}, got {self.vision_precision!r}")
        if self.kv_cache not in KV_CACHES:
            raise ConfigError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
        if self.decode_graphs not in DECODE_GRAPHS:
            raise ConfigError(f"decode_graphs must be one of {', '.join(DECODE_GRAPHS)}, got {self.decode_graphs!r}")
        if self.decode_graphs == "on" and self.device.type != "cuda":
            raise ConfigError(f"decode_graphs='on' captures CUDA graphs; device is {self.device} "
                              "(decode_graphs='eager' runs the same static-shape steps without capturing them)")
        if self.decode_graphs != "off" and self.kv_cache != "float":
            raise ConfigError("decode_graphs needs kv_cache='float': the captured step writes K/V in the weights' "
                              "dtype")
        if isinstance(self.embedding_cache_bytes, bool) or not isinstance(self.embedding_cache_bytes, int) \
                or self.embedding_cache_bytes < 0:
            raise ConfigError(f"embedding_cache_bytes must be >= 0, got {self.embedding_cache_bytes}")
        if isinstance(self.max_context, bool) or not isinstance(self.max_context, int) or self.max_context < 1:
            raise ConfigError(f"max_context must be a positive number of positions, got {self.max_context!r}")
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) \
                or not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.keep_mode not in KEEP_MODES:
            raise ConfigError(f"keep mode must be one of {', '.join(KEEP_MODES)}, got {self.keep_mode!r}")
        if self.keep_ratio < 1.0 and self.vision_backend != "torch":
            raise ConfigError(f"token dropping runs on the torch backend only; vision_backend={self.vision_backend!r} "
                              "runs an exported graph that takes every token")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @property
    def keeps_gguf_blocks(self) -> bool:
        """A GGUF decoder keeps the file's own Q8_0/Q4_0/Q4_1 blocks (``quant="auto"``)."""
        return self.quant == "auto"

    @property
    def token_dropping(self) -> bool:
        return self.keep_ratio != 1.0 or self.keep_mode != "uniform"


__all__ = ["LoadOptions", "torch_dtype", "auto_dtypes", "quant_setting", "VISION_BACKENDS", "VISION_PRECISIONS", "KV_CACHES",
           "KEEP_MODES", "DTYPES", "DECODE_GRAPHS"]
