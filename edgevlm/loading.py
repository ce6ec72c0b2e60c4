"""``edgevlm.load(source, **options)``: a preset name, a ModelConfig, an edgevlm checkpoint folder, a
transformers folder (LlamaForCausalLM, LlavaForConditionalGeneration) or a ``.gguf`` file -> a
:class:`~edgevlm.runtime.pipeline.Pipeline`.

This is where the runtime and export meet, so it sits above both: the runtime reads and quantises
the model (:mod:`edgevlm.runtime.loader`), export opens a vision tower exported to ONNX Runtime or
TensorRT (:mod:`edgevlm.export.api`), and the Pipeline is constructed once, with everything it needs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from .errors import ConfigError
from .options import LoadOptions


def load(source: Any, options: LoadOptions | None = None, **overrides) -> "Pipeline":  # noqa: F821
    """Load a Pipeline from ``source``. ``options`` (a :class:`~edgevlm.options.LoadOptions`) and/or
    keyword arguments naming its fields say how; keywords override ``options``. All are checked
    before any weights are read.

    - ``device``, ``dtype``: where the model runs and the float dtype of its weights. ``dtype="auto"``:
      the vision tower in bf16 where bf16 matmuls run in hardware (AVX512-BF16 or AMX-BF16 CPUs, bf16
      GPUs), float32 elsewhere, and the decoder in float32 (:func:`edgevlm.options.auto_dtypes`).
    - ``tower_dtype``: the vision tower's dtype when it should differ from ``dtype``.
    - ``quant``: the decoder's weight format. ``"auto"`` keeps a GGUF file's own Q8_0/Q4_0/Q4_1 blocks
      (repacked bit-exactly; nothing else is quantised), ``"none"``/None runs float weights, ``"int8"``
      (per channel), ``"int4"`` (group 32), ``"int4-g64"``, ``"int4-g128"``, ``"int8-g32"`` or a
      :class:`~edgevlm.config.QuantConfig` quantise the float weights (a GGUF model is then dequantised
      first). See :mod:`edgevlm.runtime.quant`.
    - ``kv_cache``: ``"float"`` or ``"int8"`` (:class:`~edgevlm.runtime.kv_cache.Int8KVCache`: a scale
      per vector, a quarter of the memory, a dequantising pass per step).
    - ``max_context``: positions of the static KV cache (prompt + answer), capped at the decoder's limit.
    - ``decode_graphs``: ``"on"`` (CUDA, float KV cache) captures the one-token decode step as CUDA graphs
      at load, one per context bucket (128, 256, ... ``max_context``), each sampling on the device;
      ``"eager"`` runs the same static-shape steps without capture; ``"off"`` (default) the ordinary step.
      See :mod:`edgevlm.runtime.cuda_graph`.
    - ``reuse_prefix``: keep the last conversation's KV cache, so a follow-up prefills only its new
      tokens. ``embedding_cache_bytes``: bound on the image embeddings kept by content (0 turns that
      cache and its per-image hashing off).
    - ``preprocess_backend``: ``"auto"`` (C++ when built), ``"cpp"`` or ``"reference"``.
      ``max_image_pixels``: larger images are refused before decoding (default 64 MP, see
      :mod:`edgevlm.runtime.image_io`).
    - ``vision_backend``: ``"torch"`` (eager), ``"onnxruntime"`` or ``"tensorrt"``. ``vision_export`` is a
      folder written by ``edgevlm export``; it must come from the same tower weights (and, for TensorRT,
      this GPU and TensorRT version), else :class:`~edgevlm.errors.StaleExportError`. Without it the
      tower is exported at ``vision_precision`` into ``$EDGEVLM_CACHE`` (default ``~/.cache/edgevlm``) on
      first use and reused after. With ``device="cuda"`` the onnxruntime backend uses onnxruntime-gpu's
      CUDA execution provider.
    - ``keep_ratio`` < 1: token dropping: the ViTs see only the patches under that share of the keep
      grid's cells (``keep_mode`` ``"uniform"`` or ``"random"``): a SPHINX tower's fused grid, or a
      single-ViT tower's own patch grid (LLaVA, BLIP-2 / InstructBLIP, a resampler). SPHINX and LLaVA
      decoders then get that many fewer visual positions; a Q-Former or resampler gives its usual count
      from fewer image keys. Towers it cannot apply to (any-resolution packing, a projector over a CNN)
      raise ConfigError (:meth:`~edgevlm.runtime.tower.VisionTower.set_token_keep`).
    - ``grounding_head``: False leaves a model's grounding head out, so the decoder alone writes boxes and
      short answers (what the head adds can be measured: ``edgevlm eval --no-head``).
    - ``seed``: random weights for presets that have none. ``progress``: True draws a bar over the
      loading stages on stderr (the CLI's default), False draws nothing, None (default) draws one only
      for an export made on first use (that takes minutes).
    """
    opts = _options(options, overrides)
    from .progress import Stages
    from edgevlm.runtime.loader import assemble, quantize_parts, read_parts, release_freed_memory
    from edgevlm.runtime.source import resolve_source

    src = resolve_source(source)
    names = ["read weights", "quantize decoder"] + (["vision export"] if opts.vision_backend != "torch" else [])
    stages = Stages(names, "load", bool(opts.progress))
    try:
        with stages("read weights"):
            parts = read_parts(src, opts)
        with stages("quantize decoder"):
            parts = quantize_parts(parts, opts)
        runner, described = None, {}
        if opts.vision_backend != "torch":
            with stages("vision export"):
                runner, described = _exported_tower(parts, opts, src.name)
    finally:
        stages.close()
    pipe = assemble(parts, opts, runner=runner, backend=opts.vision_backend, extra_sources=described)
    release_freed_memory()
    return pipe


def _options(options: LoadOptions | None, overrides: dict[str, Any]) -> LoadOptions:
    unknown = sorted(set(overrides) - set(LoadOptions.names()))
    if unknown:
        raise TypeError(f"load() got unknown options {unknown}; the options are {', '.join(LoadOptions.names())}")
    if options is None:
        return LoadOptions(**overrides)
    if not isinstance(options, LoadOptions):
        raise TypeError(f"load()'s second argument is a LoadOptions, got {type(options).__name__}; "
                        "pass other settings by name (device=..., dtype=...)")
    return dataclasses.replace(options, **overrides) if overrides else options


def _exported_tower(parts, opts: LoadOptions, name: str) -> tuple[Any, dict[str, str]]:
    """-> (runner of the exported tower, what to record in the pipeline's sources)."""
    from edgevlm.export.api import cached_export, open_export
    from edgevlm.export.manifest import tower_digest

    if parts.tower is None:
        raise ConfigError(f"vision_backend={opts.vision_backend!r}, but model {parts.name!r} has no vision tower")
    digest = tower_digest(parts.tower)  # once: the cache key and the staleness check both need it
    folder = opts.vision_export
    if folder is None:
        folder = cached_export(parts.tower, backend=opts.vision_backend, precision=opts.vision_precision,
                               name=name, digest=digest, progress=opts.progress is not False)
    # On a CUDA device the ONNX Runtime tower runs on onnxruntime-gpu's CUDA provider, else on the CPU.
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if opts.device.type == "cuda" else None
    runner, manifest = open_export(folder, backend=opts.vision_backend, model=parts.tower, digest=digest,
                                   providers=providers if opts.vision_backend == "onnxruntime" else None)
    return runner, {"vision_backend": f"{opts.vision_backend} {manifest.precision} ({os.fspath(folder)})"}


__all__ = ["load", "LoadOptions"]
