"""Building a model in the runtime layer: a resolved source (:mod:`.source`) and
:class:`~edgevlm.options.LoadOptions` -> the model's parts -> its quantised decoder -> one
:class:`~.pipeline.Pipeline`, constructed once with everything it needs.

``edgevlm.load`` (:mod:`edgevlm.loading`) runs these steps in order, and between the last two opens an
exported vision backend when one is asked for (export sits above the runtime, so this module never
imports it):

    parts = read_parts(resolve_source(source), opts)   # decoder, tokenizer, chat format, tower module
    parts = quantize_parts(parts, opts)                  # opts.quant, applied from outside the decoder
    pipe = assemble(parts, opts, runner=..., backend=...)

Presets with real weights (``demo``) take them from the packages their config names; the other
presets get seeded random weights (for shapes and benchmarks) and a byte-level tokenizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgevlm.config import ModelConfig, QuantConfig, WeightsRef
from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.options import LoadOptions

from .chat import ChatFormat
from .checkpoint import load_checkpoint
from .decoder import Decoder
from .grounding_head import PREFIX as GROUNDING_PREFIX
from .grounding_head import GroundingHead, build_grounding_head
from .lora import LORA_SUFFIXES, attach_lora, merge_lora_weights
from .pipeline import Pipeline
from .quant import quantize_decoder, swap_linears_for_triton
from .readers import resolve_weights_path
from .readers.safetensors_io import load_safetensors
from .source import ModelSource
from .tokenizer import BYTE_TO_CHAR, Tokenizer
from .tower import (TOWER_PREFIX, VisionTower, VisionTowerModel, WeightsReport, build_tower_model,
                    instruction_tokenizer_for, resolve_tower_source)

DECODER_PREFIX = "decoder."


@dataclass(frozen=True)
class ModelParts:
    """A model's pieces before they become a Pipeline. ``gguf_raw``: the GGUF file's raw blocks, while
    they still describe the decoder's weights (``quant="auto"`` repacks them). ``lora``: LoRA
    (factors, config) kept apart from the weights so that quantisation can put them beside the
    quantised layers. ``tower``: the vision tower module on the load's device, in ``opts.tower_dtype``, or None.
    ``grounding_head``: the box head of a config with one (float32, on the load's device), or None."""

    name: str
    decoder: Decoder
    tokenizer: Tokenizer
    chat: ChatFormat
    sources: dict[str, str]
    tower: VisionTowerModel | None = None
    tower_weights: WeightsReport | None = None
    gguf_raw: dict | None = None
    lora: tuple | None = None
    instruction_tokenizer: Any = None  # InstructBLIP: tokenises the prompt for its Q-Former
    grounding_head: GroundingHead | None = None


def read_parts(source: ModelSource, opts: LoadOptions) -> ModelParts:
    """Read every part of ``source`` (a :class:`~.source.ModelSource`) on ``opts.device`` in ``opts.dtype``.

    With ``quant`` other than None the LoRA factors stay unmerged (:func:`quantize_parts` decides),
    and ``quant="auto"`` keeps a GGUF decoder's blocks from the start (:func:`gguf_decoder`)."""
    if source.kind == "config":
        return _from_model_config(source.config, {}, opts, allow_random=True, tokenizer_dir=None)
    if source.kind == "checkpoint":
        cfg, state = load_checkpoint(source.path)
        return _from_model_config(cfg, state, opts, allow_random=False, tokenizer_dir=source.path)
    if source.kind == "gguf":
        return _gguf_parts(source.path, opts)
    if source.kind == "sphinx":
        return _sphinx_parts(source, opts)
    if source.kind == "minigpt4":
        return _minigpt4_parts(source, opts)
    return _transformers_parts(source, opts)


# ---- decoders and tokenizers --------------------------------------------------------------------

def _decoder_from_ref(ref: WeightsRef, opts: LoadOptions) -> tuple[Decoder, Any]:
    """-> (decoder, GGUF model or None). GGUF files also carry the tokenizer, so keep the reader."""
    if ref.format == "gguf":
        return gguf_decoder(resolve_weights_path(ref), opts.dtype, opts.device, keep_blocks=opts.keeps_gguf_blocks)
    if ref.format == "transformers":
        from .readers.hf_decoders import read_decoder_dir

        cfg, state = read_decoder_dir(resolve_weights_path(ref, folder=True))
        return Decoder.from_state(cfg, state, dtype=opts.dtype, device=opts.device), None
    raise CheckpointError(f"decoder weights format {ref.format!r} not supported; use 'gguf' or 'transformers'")


def gguf_decoder(path: Path, dtype, device, *, keep_blocks: bool) -> tuple[Decoder, Any]:
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
        return Decoder.from_state(g.config, g.state, dtype=dtype, device=device), g
    g = read_gguf(path, dequantize_weights=False)
    state = {}
    for key, r in g.raw.items():
        projection = key == "lm_head.weight" or key.endswith("_proj.weight")
        if projection and gguf_packable(r.ggml_type, r.shape):  # replaced by quantize_decoder below
            state[key] = torch.empty(r.shape, device="meta")
        else:
            state[key] = torch.from_numpy(dequantize(r.data, r.ggml_type, r.shape)).to(dtype)
    decoder = Decoder.from_state(g.config, state)
    quantize_decoder(decoder, gguf_raw=g.raw)
    left = [n for n, t in [*decoder.named_parameters(), *decoder.named_buffers()] if t.is_meta]
    if left:  # a projection the packer refused after all: an edgevlm bug, not a bad file
        raise CheckpointError(f"{path}: GGUF layers {left[:3]} were neither packed nor dequantised")
    return decoder.to(device=device), g


def _tokenizer_from_ref(ref: WeightsRef, gguf_model=None) -> Tokenizer:
    if ref.format == "gguf":
        if gguf_model is not None:
            return Tokenizer.from_gguf_metadata(gguf_model.metadata)
        from .readers.gguf_reader import read_gguf_metadata

        return Tokenizer.from_gguf_metadata(read_gguf_metadata(resolve_weights_path(ref)))
    if ref.format == "tokenizer-json":
        return Tokenizer.from_tokenizer_json(resolve_weights_path(ref, folder=True))
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


def _random_decoder(cfg, dtype, device, seed: int) -> Decoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        dec = Decoder(cfg)
    return dec.to(device=device, dtype=dtype)


# ---- the parts of each kind of source ------------------------------------------------------------

def _from_model_config(cfg: ModelConfig, state: dict[str, torch.Tensor], opts: LoadOptions, *,
                       allow_random: bool, tokenizer_dir: Path | None,
                       tower: tuple[VisionTowerModel, WeightsReport] | None = None) -> ModelParts:
    """The parts a ModelConfig describes, from ``state`` (``decoder.*`` / ``tower.*`` keys), the
    weights the config points at, or (``allow_random``) seeded random init. ``tower``: a tower already
    built from another source (a transformers LLaVA folder)."""
    sources: dict[str, str] = {}
    if cfg.weights is not None:  # trained tensors shipped beside the config (the checkpoint's own win)
        state = {**load_safetensors(resolve_weights_path(cfg.weights)), **state}
        sources["trained"] = f"{cfg.weights.format}:{cfg.weights.path}"
    dec_all = {k[len(DECODER_PREFIX):]: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}
    lora_state = {k: v for k, v in dec_all.items() if k.endswith(LORA_SUFFIXES)}
    dec_state = {k: v for k, v in dec_all.items() if not k.endswith(LORA_SUFFIXES)}
    gguf_model = None
    if dec_state:
        decoder = Decoder.from_state(cfg.decoder, dec_state, dtype=opts.dtype, device=opts.device)
        sources["decoder"] = "checkpoint"
    elif cfg.decoder_weights is not None:
        decoder, gguf_model = _decoder_from_ref(cfg.decoder_weights, opts)
        if decoder.cfg != cfg.decoder:
            raise CheckpointError(f"decoder weights {cfg.decoder_weights.path} describe {decoder.cfg}, "
                                  f"but the model config says {cfg.decoder}")
        sources["decoder"] = f"{cfg.decoder_weights.format}:{cfg.decoder_weights.path}"
    elif allow_random:
        decoder = _random_decoder(cfg.decoder, opts.dtype, opts.device, opts.seed)
        sources["decoder"] = "random"
    else:
        raise CheckpointError("checkpoint has no decoder.* tensors and its config names no decoder_weights")
    native = gguf_model.raw if gguf_model is not None else None
    lora = None
    if lora_state:
        if cfg.lora is None:
            raise CheckpointError("checkpoint holds LoRA factors but its config has no `lora` section")
        if opts.quant is None:  # float weights: fold the factors in now
            native = None  # merged LoRA changes the weights: the file's blocks no longer describe them
            n = merge_lora_weights(decoder, lora_state, cfg.lora)
            sources["decoder"] += f" + LoRA r={cfg.lora.rank} merged into {n} layers"
        else:
            lora = (lora_state, cfg.lora)
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

    tower_state = {k[len(TOWER_PREFIX):]: v for k, v in state.items() if k.startswith(TOWER_PREFIX)}
    if cfg.tower is None and tower is None:  # a text-only model (edgevlm convert of a causal LM or GGUF)
        if tower_state:
            raise CheckpointError(f"checkpoint holds {len(tower_state)} tower.* tensors but its config has no tower")
        return ModelParts(cfg.name, decoder, tokenizer, ChatFormat.from_config(cfg, tokenizer), sources,
                          gguf_raw=native, lora=lora)
    if tower is None:
        tower = build_tower_model(cfg.tower, tower_state, allow_random=allow_random, seed=opts.seed)
    model, report = tower
    head = None
    if cfg.grounding_head is not None:  # small and run once per box answer: float32 on the load's device
        head = build_grounding_head(cfg.grounding_head, state).to(opts.device)
        sources["grounding_head"] = sources.get("trained", "checkpoint")
    elif any(k.startswith(GROUNDING_PREFIX) for k in state):
        raise CheckpointError(f"checkpoint holds {GROUNDING_PREFIX}* tensors but its config has no grounding_head")
    return ModelParts(cfg.name, decoder, tokenizer, ChatFormat.from_config(cfg, tokenizer), sources,
                      tower=model.to(opts.device, opts.tower_dtype), tower_weights=report, gguf_raw=native, lora=lora,
                      instruction_tokenizer=_checkpoint_instruction_tokenizer(tokenizer_dir, model.config),
                      grounding_head=head)


def _checkpoint_instruction_tokenizer(folder: Path | None, tower_cfg):
    """An InstructBLIP Q-Former tokenizer kept in a checkpoint folder's ``qformer_tokenizer/`` (as
    ``edgevlm convert`` writes it), for a tower whose Q-Former reads the prompt; else None."""
    from .qformer_tokenizer import QFORMER_TOKENIZER_DIR, QFormerTokenizer
    from .tower import takes_instruction

    if folder is None or not takes_instruction(tower_cfg) or not (folder / QFORMER_TOKENIZER_DIR).is_dir():
        return None
    text = tower_cfg.connector.qformer.text
    return QFormerTokenizer.from_folder(folder / QFORMER_TOKENIZER_DIR, max_length=text.max_positions)


def _template_chat(tokenizer: Tokenizer) -> ChatFormat:
    return ChatFormat(kind="template", template=tokenizer.chat_template, bos_token=tokenizer.bos_token,
                      eos_token=tokenizer.eos_token)


def _gguf_parts(path: Path, opts: LoadOptions) -> ModelParts:
    """A ``.gguf`` file: a text-only model (decoder, tokenizer, the file's chat template)."""
    decoder, g = gguf_decoder(path, opts.dtype, opts.device, keep_blocks=opts.keeps_gguf_blocks)
    tokenizer = Tokenizer.from_gguf_metadata(g.metadata)
    return ModelParts(path.stem, decoder, tokenizer, _template_chat(tokenizer),
                      {"decoder": str(path), "tokenizer": str(path)}, gguf_raw=g.raw)


# How each multimodal transformers folder lays out a prompt: (image placement, chat format). The tower
# comes from its reader in tower.TRANSFORMERS_TOWERS, the language model from hf_decoders.
MULTIMODAL_LAYOUTS: dict[str, tuple[str, str]] = {
    "llava": ("placeholder", "template"),
    "llava_next": ("placeholder", "template"),
    "blip-2": ("before_bos", "qa"),  # the 32 query embeddings, then BOS and "Question: ... Answer:"
    "instructblip": ("before_bos", "template"),
    "xgenmm": ("placeholder", "template"),  # BLIP-3: each <image> token, in order (interleaved)
}

# The prompt template of folders whose processor feeds the user's words as they are, for when the folder's
# tokenizer ships no chat template (the generic "User: ... Assistant:" one would give the language model
# text it never saw): InstructBLIP's processor lays out the query tokens, then tokenizer(prompt) -- BOS and
# the prompt, no roles. Turns of a longer conversation are joined by newlines.
PLAIN_PROMPT_TEMPLATE = "{% for m in messages %}{% if not loop.first %}\n{% endif %}{{ m['content'] }}{% endfor %}"
PROMPT_AS_TEXT = ("instructblip",)


def _transformers_parts(source: ModelSource, opts: LoadOptions) -> ModelParts:
    """A transformers folder: a causal LM of a supported family, or a multimodal model (tower + decoder)."""
    from .readers.hf_decoders import SUPPORTED_MODEL_TYPES, read_decoder_dir

    path, model_type = source.path, source.model_type
    if model_type in SUPPORTED_MODEL_TYPES:
        tokenizer = Tokenizer.from_tokenizer_json(path)
        cfg, state = read_decoder_dir(path)
        decoder = Decoder.from_state(cfg, state, dtype=opts.dtype, device=opts.device)
        return ModelParts(path.name, decoder, tokenizer, _template_chat(tokenizer),
                          {"decoder": str(path), "tokenizer": str(path)})
    if model_type in MULTIMODAL_LAYOUTS:
        from .readers.safetensors_io import read_json

        tokenizer = Tokenizer.from_tokenizer_json(path)
        tower_cfg, tower_state, _ = resolve_tower_source(source)
        tower = build_tower_model(tower_cfg, tower_state, allow_random=False, seed=opts.seed)
        dec_cfg, dec_state = read_decoder_dir(path)  # the language model inside the folder
        hf = read_json(path / "config.json")
        image_id = hf.get("image_token_id", hf.get("image_token_index", -1))
        image_token = tokenizer.id_to_token(image_id) if isinstance(image_id, int) and image_id >= 0 else None
        placement, chat = MULTIMODAL_LAYOUTS[model_type]
        cfg = ModelConfig(name=path.name, tower=tower_cfg, decoder=dec_cfg, image_placement=placement,
                          chat_format=chat, image_token=image_token or "<image>")
        parts = _from_model_config(cfg, {f"{DECODER_PREFIX}{k}": v for k, v in dec_state.items()}, opts,
                                   allow_random=False, tokenizer_dir=path, tower=tower)
        chat = parts.chat
        if chat.template is None and model_type in PROMPT_AS_TEXT:
            chat = dataclasses.replace(chat, template=PLAIN_PROMPT_TEMPLATE)
        return dataclasses.replace(parts, chat=chat, instruction_tokenizer=instruction_tokenizer_for(source, tower_cfg))
    raise CheckpointError(f"{path}: transformers model_type {model_type!r} is not supported; supported: "
                          f"{sorted((*SUPPORTED_MODEL_TYPES, *MULTIMODAL_LAYOUTS))}")


def _sphinx_parts(source: ModelSource, opts: LoadOptions) -> ModelParts:
    """A LLaMA2-Accessory SPHINX folder (``consolidated.*.model.pth``): the SPHINX-fusion tower, the LLaMA
    decoder and the folder's tokenizer (:mod:`.readers.sphinx_pth`); images go after BOS, SPHINX's template."""
    from .readers.sphinx_pth import read_sphinx, sphinx_tokenizer

    path = source.path
    tokenizer, tokenizer_src = sphinx_tokenizer(path)
    ck = read_sphinx(path)
    cfg = ck.model_config(path.name)
    if tokenizer.vocab_size > cfg.decoder.vocab_size:
        raise CheckpointError(f"{tokenizer_src}: {tokenizer.vocab_size} tokens, but the LLM embeds only "
                              f"{cfg.decoder.vocab_size}")
    parts = _from_model_config(cfg, ck.state, opts, allow_random=False, tokenizer_dir=None)
    sources = {**parts.sources, "decoder": f"{ck.llama_type}: {path} ({ck.shards} shard(s))",
               "tokenizer": tokenizer_src}
    return dataclasses.replace(parts, tokenizer=tokenizer, chat=ChatFormat.from_config(cfg, tokenizer),
                               sources=sources)


def _minigpt4_parts(source: ModelSource, opts: LoadOptions) -> ModelParts:
    """A MiniGPT-4 eval config (:mod:`.readers.minigpt4`): BLIP-2's tower with MiniGPT-4's llama_proj, the
    Vicuna decoder and tokenizer; the 32 image embeddings replace ``<ImageHere>`` in its ###Human prompt."""
    from .readers.minigpt4 import read_minigpt4

    ck = read_minigpt4(source.path)
    parts = _from_model_config(ck.config, ck.state, opts, allow_random=False, tokenizer_dir=None)
    return dataclasses.replace(parts, tokenizer=ck.tokenizer, chat=ChatFormat.from_config(ck.config, ck.tokenizer),
                               sources={**parts.sources, **ck.sources})


# ---- quantising and assembling -------------------------------------------------------------------

def quantize_parts(parts: ModelParts, opts: LoadOptions) -> ModelParts:
    """Quantise the decoder as ``opts.quant`` asks (in place: the layers are swapped from outside), then
    put the LoRA factors back beside or into it; returns the parts with their sources updated.

    On a CUDA device with Triton, int4 goes to the Triton GEMV kernel's layout
    (:mod:`edgevlm.runtime.quant.triton_linear`); elsewhere off the CPU, QuantLinear dequantises per
    call (correct, not fast). ``quant="auto"`` repacks a GGUF file's own blocks and leaves float
    weights float."""
    from edgevlm.kernels.triton_support import kernel_backend

    decoder, quant, lora = parts.decoder, opts.quant, parts.lora
    note = ""
    if isinstance(quant, QuantConfig) and quant.scheme == "int4" and decoder.device.type == "cuda" \
            and kernel_backend() == "triton":
        if lora is not None:  # the kernel has no LoRA side path: fold the factors in before quantising
            note = f" + LoRA r={lora[1].rank} merged into {merge_lora_weights(decoder, *lora)} layers"
        swap_linears_for_triton(decoder, quant.group)
    else:
        if isinstance(quant, QuantConfig):
            quantize_decoder(decoder, quant)
        elif quant == "auto" and parts.gguf_raw is not None:
            quantize_decoder(decoder, gguf_raw=parts.gguf_raw)
        quantized = isinstance(quant, QuantConfig) or (quant == "auto" and parts.gguf_raw is not None)
        if lora is not None and quantized:
            note = f" + LoRA r={lora[1].rank} beside {attach_lora(decoder, *lora)} quantised layers"
        elif lora is not None:  # nothing was quantised after all (auto on float weights): merge
            note = f" + LoRA r={lora[1].rank} merged into {merge_lora_weights(decoder, *lora)} layers"
    sources = {**parts.sources, "decoder": parts.sources["decoder"] + note}
    return dataclasses.replace(parts, sources=sources, gguf_raw=None, lora=None)


def assemble(parts: ModelParts, opts: LoadOptions, *, runner=None, backend: str = "torch",
             extra_sources: dict[str, str] | None = None) -> Pipeline:
    """The Pipeline (and its VisionTower), each constructed once with everything it needs.
    ``runner``: what runs the tower's encoders + connector instead of the torch module (an exported
    graph's runner, :func:`edgevlm.export.open_export`), named by ``backend``."""
    tower = None
    if parts.tower is not None:
        tower = VisionTower(parts.tower, device=opts.device, dtype=opts.tower_dtype,
                            preprocess_backend=opts.preprocess_backend, max_image_pixels=opts.max_image_pixels,
                            weights=parts.tower_weights, embedding_cache_bytes=opts.embedding_cache_bytes,
                            runner=runner, backend=backend, keep_ratio=opts.keep_ratio, keep_mode=opts.keep_mode,
                            instruction_tokenizer=parts.instruction_tokenizer)
    elif opts.token_dropping:
        raise ConfigError(f"keep_ratio={opts.keep_ratio}, but model {parts.name!r} has no vision tower")
    return Pipeline(parts.decoder, parts.tokenizer, parts.chat, tower=tower, name=parts.name,
                    max_context=opts.max_context, sources={**parts.sources, **(extra_sources or {})},
                    reuse_prefix=opts.reuse_prefix, kv_cache=opts.kv_cache,
                    grounding_head=parts.grounding_head if opts.grounding_head else None,
                    decode_graphs=opts.decode_graphs)


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


__all__ = ["ModelParts", "read_parts", "quantize_parts", "assemble", "gguf_decoder", "byte_tokenizer",
           "release_freed_memory"]
