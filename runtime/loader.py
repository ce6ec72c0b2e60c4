"""``edgevlm.load(source)``: a preset name, an edgevlm checkpoint folder, a transformers folder
(LlamaForCausalLM or LlavaForConditionalGeneration) or a ``.gguf`` file -> a :class:`Pipeline`.

Presets with real weights (``demo``) take them from the packages their config names; the other
presets get seeded random weights (for shapes and benchmarks) and a byte-level tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from edgevlm.config import ModelConfig, QuantConfig, WeightsRef
from edgevlm.errors import CheckpointError, ConfigError, UnknownPresetError, WeightsNotFoundError
from edgevlm.presets import PRESETS, get_preset

from .chat import ChatFormat
from .checkpoint import is_checkpoint_dir, load_checkpoint
from .decoder import LlamaDecoder
from .embed_cache import EmbeddingCache
from .lora import LORA_SUFFIXES, attach_lora, merge_lora_weights
from .pipeline import Pipeline
from .quant import quantize_decoder
from .readers import resolve_weights_path
from .readers.safetensors_io import load_safetensors, read_json
from .tokenizer import BYTE_TO_CHAR, Tokenizer
from .tower import VisionTower, _dtype, build_tower_model

DECODER_PREFIX = "decoder."


def _decoder_from_ref(ref: WeightsRef, dtype, device, gguf_blocks: bool = False) -> tuple[LlamaDecoder, Any]:
    """-> (decoder, GGUF model or None). GGUF files also carry the tokenizer, so keep the reader."""
    path = resolve_weights_path(ref) if ref.format == "gguf" else _ref_dir(ref)
    if ref.format == "gguf":
        return gguf_decoder(path, dtype, device, keep_blocks=gguf_blocks)
    if ref.format == "transformers":
        from .readers.hf_llama import read_llama_dir

        cfg, state = read_llama_dir(path)
        return LlamaDecoder.from_state(cfg, state, dtype=dtype, device=device), None
    raise CheckpointError(f"decoder weights format {ref.format!r} not supported; use 'gguf' or 'transformers'")


def gguf_decoder(path: Path, dtype, device, *, keep_blocks: bool) -> tuple[LlamaDecoder, Any]:
    """A GGUF file -> (decoder, its reader).

    ``keep_blocks``: the projections stored as Q8_0 / Q4_0 / Q4_1 become quantised layers straight from
    the file's blocks (:func:`~edgevlm.runtime.quant.quantize_decoder` with ``gguf_raw``) and are never
    dequantised, so loading never holds their fp32 copy (SmolLM2-135M: 540 MB). Everything else (norms,
    embeddings, other block types) is dequantised as usual. Without it, every tensor is dequantised
    (for float decoding, or for requantising with another scheme)."""
    from .quant import gguf_packable
    from .readers.gguf_reader import dequantize, read_gguf

    if not keep_blocks:
        g = read_gguf(path)
        return LlamaDecoder.from_state(g.config, g.state, dtype=dtype, device=device), g
    g = read_gguf(path, dequantize_weights=False)
    state = {}
    for key, r in g.raw.items():
        projection = key == "lm_head.weight" or key.endswith("_proj.weight")
        if projection and gguf_packable(r.ggml_type, r.shape):  # replaced by quantize_decoder below
            state[key] = torch.empty(r.shape, device="meta")
        else:
            state[key] = torch.from_numpy(dequantize(r.data, r.ggml_type, r.shape)).to(dtype)
    decoder = LlamaDecoder.from_state(g.config, state)
    quantize_decoder(decoder, gguf_raw=g.raw)
    left = [n for n, t in [*decoder.named_parameters(), *decoder.named_buffers()] if t.is_meta]
    if left:  # a projection the packer refused after all: an edgevlm bug, not a bad file
        raise CheckpointError(f"{path}: GGUF layers {left[:3]} were neither packed nor dequantised")
    return decoder.to(device=device), g


def _ref_dir(ref: WeightsRef) -> Path:
    import importlib.util

    if ref.package:
        spec = importlib.util.find_spec(ref.package)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsNotFoundError(f"package {ref.package!r} holding {ref.path} is not installed")
        return Path(list(spec.submodule_search_locations)[0]) / ref.path
    return Path(ref.path)


def _tokenizer_from_ref(ref: WeightsRef, gguf_model=None) -> Tokenizer:
    if ref.format == "gguf":
        if gguf_model is not None:
            return Tokenizer.from_gguf_metadata(gguf_model.metadata)
        from .readers.gguf_reader import read_gguf_metadata

        return Tokenizer.from_gguf_metadata(read_gguf_metadata(resolve_weights_path(ref)))
    if ref.format == "tokenizer-json":
        return Tokenizer.from_tokenizer_json(_ref_dir(ref))
    raise CheckpointError(f"tokenizer format {ref.format!r} not supported; use 'gguf' or 'tokenizer-json'")


def byte_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level tokenizer (ids 3..258 are the 256 bytes; 0/1/2 are <unk>/<s>/</s>) for presets
    without a real vocabulary: random-weight models still need text in and out for benchmarks."""
    tokens = ["<unk>", "<s>", "</s>"] + [BYTE_TO_CHAR[b] for b in range(256)]
    tokens += [f"<extra_{i}>" for i in range(max(0, vocab_size - len(tokens)))]
    types = [3, 3, 3] + [1] * 256 + [5] * (len(tokens) - 259)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": [], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True}
    return Tokenizer.from_gguf_metadata(meta)


def _random_decoder(cfg, dtype, device, seed: int) -> LlamaDecoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        dec = LlamaDecoder(cfg)
    return dec.to(device=device, dtype=dtype)


def _from_model_config(cfg: ModelConfig, state: dict[str, torch.Tensor], *, allow_random: bool, dtype, device,
                       tokenizer_dir: Path | None, preprocess_backend: str, max_context: int, seed: int,
                       max_image_pixels: int | None = None,
                       tower_override: VisionTower | None = None,
                       merge_lora: bool = True,
                       gguf_blocks: bool = False) -> tuple[Pipeline, dict | None, tuple | None]:
    """-> (pipeline, the GGUF file's raw blocks when the decoder holds that file's weights, the LoRA
    (factors, config) left unmerged when ``merge_lora`` is False, else None). ``gguf_blocks``: a GGUF
    decoder keeps its blocks from the start (see :func:`gguf_decoder`)."""
    sources: dict[str, str] = {}
    if cfg.weights is not None:  # trained tensors shipped beside the config (the checkpoint's own win)
        state = {**load_safetensors(resolve_weights_path(cfg.weights)), **state}
        sources["trained"] = f"{cfg.weights.format}:{cfg.weights.path}"
    dec_all = {k[len(DECODER_PREFIX):]: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}
    lora_state = {k: v for k, v in dec_all.items() if k.endswith(LORA_SUFFIXES)}
    dec_state = {k: v for k, v in dec_all.items() if not k.endswith(LORA_SUFFIXES)}
    gguf_model = None
    if dec_state:
        decoder = LlamaDecoder.from_state(cfg.decoder, dec_state, dtype=dtype, device=device)
        sources["decoder"] = "checkpoint"
    elif cfg.decoder_weights is not None:
        decoder, gguf_model = _decoder_from_ref(cfg.decoder_weights, dtype, device, gguf_blocks)
        if decoder.cfg != cfg.decoder:
            raise CheckpointError(f"decoder weights {cfg.decoder_weights.path} describe {decoder.cfg}, "
                                  f"but the model config says {cfg.decoder}")
        sources["decoder"] = f"{cfg.decoder_weights.format}:{cfg.decoder_weights.path}"
    elif allow_random:
        decoder = _random_decoder(cfg.decoder, dtype, device, seed)
        sources["decoder"] = "random"
    else:
        raise CheckpointError("checkpoint has no decoder.* tensors and its config names no decoder_weights")
    native = gguf_model.raw if gguf_model is not None else None
    unmerged = None
    if lora_state and not merge_lora:
        if cfg.lora is None:
            raise CheckpointError("checkpoint holds LoRA factors but its config has no `lora` section")
        unmerged = (lora_state, cfg.lora)
    elif lora_state:
        native = None  # merged LoRA changes the weights: the file's blocks no longer describe them
        if cfg.lora is None:
            raise CheckpointError("checkpoint holds LoRA factors but its config has no `lora` section")
        n = merge_lora_weights(decoder, lora_state, cfg.lora)
        sources["decoder"] += f" + LoRA r={cfg.lora.rank} merged into {n} layers"
    elif cfg.lora is not None and not allow_random:
        raise CheckpointError(f"config asks for LoRA r={cfg.lora.rank} but the checkpoint has no lora_A/lora_B tensors")

    if cfg.tokenizer is not None:
        tokenizer = _tokenizer_from_ref(cfg.tokenizer, gguf_model)
        sources["tokenizer"] = f"{cfg.tokenizer.format}:{cfg.tokenizer.path}"
    elif tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_tokenizer_json(tokenizer_dir)
        sources["tokenizer"] = str(tokenizer_dir / "tokenizer.json")
    else:
        tokenizer = byte_tokenizer(cfg.decoder.vocab_size)
        sources["tokenizer"] = "byte-level (no vocabulary in this model)"

    if tower_override is not None:
        tower = tower_override
    else:
        tower_state = {k[len("tower."):]: v for k, v in state.items() if k.startswith("tower.")}
        model, report = build_tower_model(cfg.tower, tower_state, allow_random=allow_random, seed=seed)
        tower = VisionTower(model.to(device, dtype), device=torch.device(device), dtype=dtype,
                            preprocess_backend=preprocess_backend, max_image_pixels=max_image_pixels,
                            weights=report)
    return Pipeline(decoder, tokenizer, ChatFormat.from_config(cfg, tokenizer), tower=tower, name=cfg.name,
                    max_context=max_context, sources=sources), native, unmerged


def load(source: Any, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32", *,
         quant: str | QuantConfig | None = "auto", preprocess_backend: str = "auto", max_context: int = 2048,
         max_image_pixels: int | None = None, seed: int = 0, reuse_prefix: bool = True,
         embedding_cache_bytes: int = 64 << 20, kv_cache: str = "float", vision_backend: str = "torch",
         vision_export: str | os.PathLike | None = None, vision_precision: str = "fp32",
         keep_ratio: float = 1.0, keep_mode: str = "uniform", progress: bool | None = None) -> Pipeline:
    """Load a Pipeline from a preset name, an edgevlm checkpoint folder, a transformers folder
    (LlamaForCausalLM, LlavaForConditionalGeneration) or a ``.gguf`` file.

    ``max_context`` sizes the static KV cache (positions of prompt + answer); it is capped at the
    decoder's own limit. ``max_image_pixels`` refuses larger images before decoding them (default
    64 MP, see :mod:`edgevlm.runtime.image_io`). ``reuse_prefix`` keeps the last conversation's KV
    cache so a follow-up prefills only its new tokens; ``embedding_cache_bytes`` bounds the image
    embeddings kept by content (0 turns that cache and its per-image hashing off).

    ``quant`` picks the decoder's weight format: ``"auto"`` keeps a GGUF file's own Q8_0/Q4_0/Q4_1
    blocks (repacked bit-exactly; nothing else is quantised), ``"none"``/None runs float weights,
    ``"int8"`` (per channel), ``"int4"`` (group 32), ``"int4-g64"``, ``"int4-g128"``, ``"int8-g32"``
    or a :class:`~edgevlm.config.QuantConfig` quantise the float weights (a GGUF model is then
    dequantised first). See :mod:`edgevlm.runtime.quant`. ``kv_cache="int8"`` stores the KV cache as
    int8 with a scale per vector (:class:`~edgevlm.runtime.kv_cache.Int8KVCache`): a quarter of the
    memory, a dequantising pass per step.

    ``vision_backend`` runs the vision tower + connector eagerly (``"torch"``) or as an exported graph:
    ``"onnxruntime"`` or ``"tensorrt"``. ``vision_export`` is a folder written by ``edgevlm export``; it
    must come from the same tower weights (and, for TensorRT, this GPU and TensorRT version), else
    :class:`~edgevlm.errors.StaleExportError`. Without it the tower is exported at ``vision_precision``
    into ``$EDGEVLM_CACHE`` (default ``~/.cache/edgevlm``) on first use and reused after. With
    ``device="cuda"`` the onnxruntime backend uses onnxruntime-gpu's CUDA execution provider.

    ``keep_ratio`` < 1 turns on token dropping for SPHINX-fusion towers: the ViTs see only the patches
    under that share of the fused grid's cells (``keep_mode`` ``"uniform"`` or ``"random"``), and the
    decoder gets that many fewer visual positions (:meth:`VisionTower.set_token_keep`).

    ``progress``: True draws a bar over the loading stages on stderr (the CLI's default), False draws
    nothing, None (default) draws one only for an export made on first use (that takes minutes).
    """
    from edgevlm.progress import Stages

    _check_vision_backend(vision_backend, vision_export, vision_precision)
    if kv_cache not in ("float", "int8"):
        raise ConfigError(f"kv_cache must be 'float' or 'int8', got {kv_cache!r}")
    if embedding_cache_bytes < 0:
        raise ConfigError(f"embedding_cache_bytes must be >= 0, got {embedding_cache_bytes}")
    qcfg = _quant_config(quant)  # bad names fail before any weights are read
    names = ["read weights", "quantize decoder"] + (["vision export"] if vision_backend != "torch" else [])
    stages = Stages(names, "load", bool(progress))
    try:
        with stages("read weights"):
            # With quantisation ahead, LoRA stays unmerged (see lora.LoRASide) and is attached afterwards.
            pipe, native, lora = _load(source, device, dtype, preprocess_backend=preprocess_backend,
                                       max_context=max_context, max_image_pixels=max_image_pixels, seed=seed,
                                       merge_lora=qcfg is None and quant != "auto", gguf_blocks=quant == "auto")
        with stages("quantize decoder"):
            _quantize(pipe, qcfg, quant, native, lora)
        pipe.reuse_prefix = bool(reuse_prefix)
        pipe.kv_int8 = kv_cache == "int8"
        if pipe.tower is not None:
            pipe.tower.embedding_cache = EmbeddingCache(embedding_cache_bytes)
        if vision_backend != "torch":
            with stages("vision export"):
                _use_exported_tower(pipe, vision_backend, vision_export, vision_precision, source,
                                    progress is not False)
    finally:
        stages.close()
    if keep_ratio != 1.0 or keep_mode != "uniform":
        if pipe.tower is None:
            raise ConfigError(f"keep_ratio={keep_ratio}, but model {pipe.name!r} has no vision tower")
        pipe.tower.set_token_keep(keep_ratio, keep_mode)
    release_freed_memory()
    return pipe


def release_freed_memory() -> None:
    """Hand memory that loading freed back to the operating system (glibc only; a no-op elsewhere).

    Loading makes large short-lived buffers (a GGUF dequantised to fp32 before repacking, ONNX protobufs,
    float weights replaced by packed ones). glibc keeps what they freed in its heap, so the process's
    RSS stayed at the load peak: for the demo 1.23 GB after load, 0.70 GB after ``malloc_trim``."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        pass


def _quantize(pipe: Pipeline, qcfg: QuantConfig | None, quant, native, lora) -> None:
    """Quantise the decoder as ``quant`` asks, then put the LoRA factors back beside or into it. On a
    CUDA device with Triton, int4 goes to the Triton GEMV kernel's layout (:mod:`edgevlm.runtime.quant.triton_linear`);
    elsewhere off the CPU, QuantLinear dequantises per call (correct, not fast)."""
    from edgevlm.kernels.triton_support import kernel_backend

    if (qcfg is not None and qcfg.scheme == "int4" and pipe.decoder.device.type == "cuda"
            and kernel_backend() == "triton"):
        from .quant import swap_linears_for_triton

        if lora is not None:  # the kernel has no LoRA side path: fold the factors in before quantising
            n = merge_lora_weights(pipe.decoder, *lora)
            pipe.sources["decoder"] += f" + LoRA r={lora[1].rank} merged into {n} layers"
        swap_linears_for_triton(pipe.decoder, qcfg.group)
        return
    quantized = qcfg is not None or (quant == "auto" and native is not None)
    if qcfg is not None:
        quantize_decoder(pipe.decoder, qcfg)
    elif quantized:
        quantize_decoder(pipe.decoder, gguf_raw=native)
    if lora is not None:
        if quantized:
            n = attach_lora(pipe.decoder, *lora)
            pipe.sources["decoder"] += f" + LoRA r={lora[1].rank} beside {n} quantised layers"
        else:  # nothing was quantised after all (auto on float weights): merge, as without quant
            n = merge_lora_weights(pipe.decoder, *lora)
            pipe.sources["decoder"] += f" + LoRA r={lora[1].rank} merged into {n} layers"


VISION_BACKENDS = ("torch", "onnxruntime", "tensorrt")


def _check_vision_backend(backend, folder, precision) -> None:
    from edgevlm.export.contract import check_precision

    if backend not in VISION_BACKENDS:
        raise ConfigError(f"vision_backend must be one of {', '.join(VISION_BACKENDS)}, got {backend!r}")
    if backend == "torch" and folder is not None:
        raise ConfigError("vision_export is read by the onnxruntime / tensorrt vision backends; "
                          "pass vision_backend too")
    check_precision(precision)


def _use_exported_tower(pipe: Pipeline, backend: str, folder, precision: str, source, progress: bool) -> None:
    from edgevlm.export.api import cached_export, open_export
    from edgevlm.export.manifest import tower_digest

    if pipe.tower is None:
        raise ConfigError(f"vision_backend={backend!r}, but model {pipe.name!r} has no vision tower")
    model = pipe.tower.model
    digest = tower_digest(model)  # once: the cache key and the staleness check both need it
    if folder is None:
        name = str(source) if isinstance(source, (str, os.PathLike)) else pipe.name
        folder = cached_export(model, backend=backend, precision=precision, name=name, digest=digest,
                               progress=progress)
    # On a CUDA device the ONNX Runtime tower runs on onnxruntime-gpu's CUDA provider, else on the CPU.
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if pipe.tower.device.type == "cuda" else None
    runner, manifest = open_export(folder, backend=backend, model=model, digest=digest,
                                   providers=providers if backend == "onnxruntime" else None)
    pipe.tower.use_runner(runner, backend)
    pipe.sources["vision_backend"] = f"{backend} {manifest.precision} ({folder})"


def _quant_config(quant) -> QuantConfig | None:
    if isinstance(quant, QuantConfig):
        return quant
    if quant is None or quant in ("auto", "none"):
        return None
    if not isinstance(quant, str):
        raise ConfigError(f"quant must be 'auto', 'none', a scheme name or a QuantConfig, got {type(quant).__name__}")
    return QuantConfig.named(quant)


def _load(source, device, dtype, *, preprocess_backend, max_context, max_image_pixels, seed,
          merge_lora: bool = True, gguf_blocks: bool = False) -> tuple[Pipeline, dict | None, tuple | None]:
    dt, dev = _dtype(dtype), torch.device(device)
    common = dict(dtype=dt, device=dev, preprocess_backend=preprocess_backend, max_context=max_context, seed=seed,
                  max_image_pixels=max_image_pixels, merge_lora=merge_lora)
    if isinstance(source, ModelConfig):
        return _from_model_config(source, {}, allow_random=True, tokenizer_dir=None, gguf_blocks=gguf_blocks,
                                  **common)
    if isinstance(source, str) and source in PRESETS:
        return _from_model_config(get_preset(source), {}, allow_random=True, tokenizer_dir=None,
                                  gguf_blocks=gguf_blocks, **common)
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is not None and path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: only .gguf files load directly; other checkpoints are folders")
        return (*_load_gguf(path, dt, dev, max_context, gguf_blocks), None)  # text-only: no image limits apply
    if path is not None and path.is_dir():
        if is_checkpoint_dir(path):
            cfg, state = load_checkpoint(path)
            return _from_model_config(cfg, state, allow_random=False, tokenizer_dir=path, gguf_blocks=gguf_blocks,
                                      **common)
        if (path / "config.json").is_file():
            return _load_transformers(path, **common)
        raise WeightsNotFoundError(f"{path}: neither an edgevlm checkpoint (edgevlm.json) nor a transformers "
                                   "folder (config.json)")
    raise UnknownPresetError(f"{source!r} is neither a preset ({', '.join(PRESETS)}), a folder, nor a .gguf file")


def _load_gguf(path: Path, dtype, device, max_context: int, gguf_blocks: bool) -> tuple[Pipeline, dict]:
    decoder, g = gguf_decoder(path, dtype, device, keep_blocks=gguf_blocks)
    tokenizer = Tokenizer.from_gguf_metadata(g.metadata)
    chat = ChatFormat(kind="template", template=tokenizer.chat_template, bos_token=tokenizer.bos_token,
                      eos_token=tokenizer.eos_token)
    return Pipeline(decoder, tokenizer, chat, name=path.stem, max_context=max_context,
                    sources={"decoder": str(path), "tokenizer": str(path)}), g.raw


def _load_transformers(path: Path, *, dtype, device, preprocess_backend, max_context, seed,
                       max_image_pixels, merge_lora: bool = True) -> tuple[Pipeline, None, None]:
    from .readers.hf_llama import SUPPORTED_MODEL_TYPES, read_llama_dir

    hf = read_json(path / "config.json")
    model_type = hf.get("model_type")
    tokenizer = Tokenizer.from_tokenizer_json(path)
    if model_type in SUPPORTED_MODEL_TYPES:
        cfg, state = read_llama_dir(path)
        decoder = LlamaDecoder.from_state(cfg, state, dtype=dtype, device=device)
        chat = ChatFormat(kind="template", template=tokenizer.chat_template, bos_token=tokenizer.bos_token,
                          eos_token=tokenizer.eos_token)
        return Pipeline(decoder, tokenizer, chat, name=path.name, max_context=max_context,
                        sources={"decoder": str(path), "tokenizer": str(path)}), None, None
    if model_type == "llava":
        from .tower import load_vision_tower

        tower = load_vision_tower(path, device=device, dtype=dtype, preprocess_backend=preprocess_backend,
                                  max_image_pixels=max_image_pixels)
        dec_cfg, dec_state = read_llama_dir(path)  # the language model inside the LLaVA folder
        image_token = tokenizer.id_to_token(hf.get("image_token_id", hf.get("image_token_index", -1))) or "<image>"
        cfg = ModelConfig(name=path.name, tower=tower.config, decoder=dec_cfg, image_placement="placeholder",
                          image_token=image_token)
        return _from_model_config(cfg, {f"decoder.{k}": v for k, v in dec_state.items()}, allow_random=False,
                                  tokenizer_dir=path, dtype=dtype, device=device,
                                  preprocess_backend=preprocess_backend, max_context=max_context, seed=seed,
                                  max_image_pixels=max_image_pixels, tower_override=tower)
    raise CheckpointError(f"{path}: transformers model_type {model_type!r} is not supported; supported: "
                          f"{sorted((*SUPPORTED_MODEL_TYPES, 'llava'))}")


__all__ = ["load", "byte_tokenizer"]
