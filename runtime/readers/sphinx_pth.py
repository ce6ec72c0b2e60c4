"""LLaMA2-Accessory SPHINX checkpoints -> an edgevlm :class:`~edgevlm.config.ModelConfig` and state dict.

A released SPHINX folder (``SPHINX/README.md`` L69-77 of Alpha-VLLM/LLaMA2-Accessory @ 3777c439, the
snapshot every ``L..`` below refers to unless another file is named)::

    consolidated.00-of-02.model.pth   model-parallel shards of MetaModel.state_dict(), keys "llma.*",
    consolidated.01-of-02.model.pth   saved as {"model": {key: tensor}} (accessory/util/misc.py L350-363)
    meta.json                         {"llama_type": ...}: the accessory/model/LLM/<llama_type>.py that
                                      built it (accessory/model/meta.py L156-165)
    config.json                       ModelArgs overrides (n_heads, norm_eps, ...; meta.py L168-178)
    tokenizer.model                   SentencePiece (or tokenizer.json + tokenizer_config.json,
                                      accessory/model/tokenizer.py L133-156)

Files are opened with ``torch.load(weights_only=True, mmap=True)``: a file that needs code to unpickle
is refused (:class:`~edgevlm.errors.CheckpointError`), and tensors are read from disk when used.
Shards are merged as ``accessory/util/tensor_parallel.py`` L34-38 and L106-123 do: column-parallel
weights (wq, wk, wv, w1, w3, output) along dim 0, row-parallel ones (wo, w2) and the parallel
embedding along dim 1, everything else replicated.

Variants (``meta.json``'s llama_type; reference/architecture.md §1.1) -> view recipe::

    llama_ens         SPHINX           CLIP + ConvNeXt@256 + DINOv2 + Q-Former   1 view of 224
    llama_ens5        SPHINX-(v2-)1k   the same                                  global + 2x2 crops of 448
    llama_ens10       (unreleased)     the same                                  global + 3x3 crops of 672
    llama_ens_light   SPHINX-Tiny      ConvNeXt@512 + DINOv2                     1 view
    llama_ens5_light  SPHINX-Tiny-1k   ConvNeXt@512 + DINOv2                     global + 2x2 crops

The architecture sizes come from the tensors (widths, depths, MLP sizes, vocabulary) and from
``config.json`` / ModelArgs defaults (the LLM's head count); everything else is the released
architecture as :mod:`edgevlm.presets` defines it. Head counts of the vision encoders follow their
public code's head widths: 64 for open_clip (``CLIPVisionCfg.head_width``) and DINOv2, 88 and 64 for
the BLIP-2 EVA and Q-Former (1408/16 and 768/12 in
``accessory/resources/hf/Salesforce/blip2-opt-2.7b/config.json``).

Conversions (each exact; :data:`KEY_TABLE` says where each applies):

- ``rope_q`` / ``rope_k``: LLaMA2-Accessory applies RoPE to adjacent pairs (``view_as_complex`` of
  ``reshape(..., -1, 2)``, accessory/model/LLM/llama.py L67-77), edgevlm's decoder rotates halves
  (transformers' convention). Per head, the rows of wq / wk are reordered evens-then-odds, which turns
  pair ``(2i, 2i+1)`` into ``(i, i + head_dim/2)`` with the same frequency; q.k is unchanged because
  q and k are permuted alike. wv and wo are untouched.
- ``dino_pos``: SPHINX's DINOv2 runs at 224 (a 16x16 grid), and torch.hub's DINOv2 resizes its 37x37
  position table with ``scale_factor=(16 + 0.1) / 37`` (facebookresearch/dinov2
  ``vision_transformer.py`` L180-212 @ b8931f7, ``interpolate_offset=0.1`` from ``hub/backbones.py``
  L28), which samples at other points than ``size=16``. The table is resampled once here exactly
  that way, so the ViT then runs at its own grid (``pos_grid=0``).
- ``cls`` / ``pos``: open_clip keeps ``class_embedding [W]`` and ``positional_embedding [T, W]``
  unbatched; edgevlm's ViT keeps ``[1, 1, W]`` and ``[1, T, W]``.

Two settings follow the public inference code rather than the pretrained encoders' own defaults:
the CLIP ViT's MLP uses exact GELU, because llama_ens.py L299 builds ``open_clip`` ``ViT-L-14`` with
``pretrained=None`` and open_clip then uses ``nn.GELU`` (open_clip v2.23.0 ``model.py`` L116; QuickGELU
only for ``pretrained='openai'``, ``factory.py`` L199-217); ConvNeXt-XXL's norms use eps 1e-5
(timm ``convnext_xxlarge``, ``convnext.py`` L1321-1324 @ aa4b585, default since timm 1c13ef7, 2023-02).

Known difference from the reference (documented, not emulated): SPHINX feeds ConvNeXt a
nearest-upsampled copy of the 224 view (llama_ens.py L399-401) and derives DINOv2's and sub-views'
pixels from the CLIP-normalised tensor in fp16; edgevlm's preprocessing samples each encoder's view
straight from the image at its resolution (see :mod:`edgevlm.presets`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edgevlm.config import DecoderConfig, ModelConfig, SphinxFusionConfig, TowerConfig, ViewConfig, ViTConfig
from edgevlm.errors import CheckpointError, ConfigError, WeightsNotFoundError
from edgevlm.presets import clip_vit_l14, convnext_xxl, dinov2

from .safetensors_io import read_json

SHARD_RE = re.compile(r"^consolidated\.(\d{2})-of-(\d{2})\.model\.pth$")  # tensor_parallel.py L40-45
PREFIX = "llma."  # MetaModel keeps the LLM (and its encoders) as self.llma (meta.py L58)


@dataclass(frozen=True)
class Recipe:
    """How one llama_type wires the encoders (the parts its file adds to llama_ens.py)."""

    qformer_and_clip: bool  # llama_ens*.py L283-301 build them; the *_light files do not
    convnext_size: int  # ConvNeXt input: 256 (L399-401) or 512 (llama_ens_light.py L372-375)
    crop_grid: int  # sub-views: 0, 2 (llama_ens5.py L381-385) or 3 (llama_ens10.py L381-390)


RECIPES: dict[str, Recipe] = {
    "llama_ens": Recipe(True, 256, 0),
    "llama_ens5": Recipe(True, 256, 2),
    "llama_ens10": Recipe(True, 256, 3),
    "llama_ens_light": Recipe(False, 512, 0),
    "llama_ens5_light": Recipe(False, 512, 2),
}
UNSUPPORTED = {
    "llama_ens5p2": "its sub-views are pooled to 8x8 (a different token count than the global view)",
    "llama_ens_peft": "it adds LoRA/bias adapters to the LLM",
    "mixtral_sparse_ens": "its LLM is Mixtral (a mixture of experts)",
    "mixtral_sparse_ens5": "its LLM is Mixtral (a mixture of experts)",
}

# ModelArgs fields and defaults (llama_ens.py L33-50; the *_light files add trainable_mode, L52).
MODEL_ARGS: dict[str, Any] = {
    "dim": 5120, "n_layers": 40, "n_heads": 40, "n_kv_heads": None, "vocab_size": -1, "multiple_of": 256,
    "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 10000.0, "max_batch_size": 32,
    "max_seq_len": 2048, "rope_scaling": None, "load_pretrained_visual_encoder": False,
    "trainable_mode": "mm_stage2",
}
MAX_SEQ_LEN = 4096  # MetaModel(max_seq_len=4096) overrides config.json's (meta.py L22, L39, L85)
VISION_HEAD_WIDTH = {"clip": 64, "dinov2": 64, "eva": 88, "qformer": 64}
VIEW_SIZE = 224  # every ViT sees 224 views (llama_ens.py L336, llama_ens_light.py L370)

# ---- the key table ----------------------------------------------------------------------------
#
# reference key (after "llma.")  ->  edgevlm key  (+ conversion). Placeholders: {i} a layer index,
# {p} weight|bias, {s} a Sequential index, {rest} any suffix. First match wins. edgevlm key None:
# the tensor is not used by SPHINX's forward; "hf:eva" / "hf:qformer": read by the transformers
# mappers of hf_vision / hf_connectors (SPHINX's `qformer` is a whole transformers Blip2Model,
# llama_ens.py L283-293, so its keys are Blip2Model's).

_D = "decoder."
_CLIP, _DINO, _CNX = "tower.encoders.clip.", "tower.encoders.dinov2.", "tower.encoders.convnext."
_CONN = "tower.connector."
_RB = "clip.visual.transformer.resblocks.{i}."

KEY_TABLE: tuple[tuple[str, str | None, str], ...] = (
    # LLaMA (llama_ens.py: Transformer L252-269, TransformerBlock L220-235, Attention L63-90,
    # FeedForward L202-217 = w2(silu(w1 x) * w3 x)); shards merged as the module docstring says.
    ("tok_embeddings.weight", _D + "embed_tokens.weight", ""),
    ("layers.{i}.attention.wq.weight", _D + "layers.{i}.attn.q_proj.weight", "rope_q"),
    ("layers.{i}.attention.wk.weight", _D + "layers.{i}.attn.k_proj.weight", "rope_k"),
    ("layers.{i}.attention.wv.weight", _D + "layers.{i}.attn.v_proj.weight", ""),
    ("layers.{i}.attention.wo.weight", _D + "layers.{i}.attn.o_proj.weight", ""),
    ("layers.{i}.feed_forward.w1.weight", _D + "layers.{i}.mlp.gate_proj.weight", ""),
    ("layers.{i}.feed_forward.w3.weight", _D + "layers.{i}.mlp.up_proj.weight", ""),
    ("layers.{i}.feed_forward.w2.weight", _D + "layers.{i}.mlp.down_proj.weight", ""),
    ("layers.{i}.attention_norm.weight", _D + "layers.{i}.attn_norm.weight", ""),
    ("layers.{i}.ffn_norm.weight", _D + "layers.{i}.mlp_norm.weight", ""),
    ("norm.weight", _D + "norm.weight", ""),
    ("output.weight", _D + "lm_head.weight", ""),
    # CLIP ViT-L/14, open_clip VisionTransformer (v2.23.0 transformer.py L328-400, blocks L188-242);
    # SPHINX's forward: conv1, class token, + positions, ln_pre, blocks, ln_post, no proj (L352-375).
    ("clip.visual.conv1.weight", _CLIP + "patch_embed.weight", ""),
    ("clip.visual.class_embedding", _CLIP + "cls_token", "cls"),
    ("clip.visual.positional_embedding", _CLIP + "pos_embed", "pos"),
    ("clip.visual.ln_pre.{p}", _CLIP + "norm_pre.{p}", ""),
    (_RB + "ln_1.{p}", _CLIP + "blocks.{i}.norm1.{p}", ""),
    (_RB + "attn.in_proj_weight", _CLIP + "blocks.{i}.attn.qkv.weight", ""),  # nn.MultiheadAttention: rows q, k, v
    (_RB + "attn.in_proj_bias", _CLIP + "blocks.{i}.attn.qkv.bias", ""),
    (_RB + "attn.out_proj.{p}", _CLIP + "blocks.{i}.attn.proj.{p}", ""),
    (_RB + "ln_2.{p}", _CLIP + "blocks.{i}.norm2.{p}", ""),
    (_RB + "mlp.c_fc.{p}", _CLIP + "blocks.{i}.mlp.fc1.{p}", ""),
    (_RB + "mlp.c_proj.{p}", _CLIP + "blocks.{i}.mlp.fc2.{p}", ""),
    ("clip.visual.ln_post.{p}", _CLIP + "norm.{p}", ""),
    ("clip.visual.proj", None, ""),  # its use is commented out (L372-373)
    # the text tower's leftovers (open_clip v2.23.0 model.py L243-250; L300 sets clip.transformer = None)
    ("clip.token_embedding.weight", None, ""),
    ("clip.positional_embedding", None, ""),
    ("clip.ln_final.{p}", None, ""),
    ("clip.text_projection", None, ""),
    ("clip.logit_scale", None, ""),
    ("clip.logit_bias", None, ""),
    # ConvNeXt-XXL: open_clip's timm trunk with Identity pool/flatten (L303-315); timm's names are edgevlm's
    # (runtime/vision/convnext.py): stem.{0,1}, stages.{i}.downsample.{0,1}, stages.{i}.blocks.{j}.*, head.norm.
    ("openclip_convnext_xxl.{rest}", _CNX + "{rest}", ""),
    # DINOv2 ViT-g/14 from torch.hub (L317-322): dinov2 vision_transformer.py, layers/block.py,
    # layers/swiglu_ffn.py L27-34 (w12 = [gate | up], w3 = down); forward_features L255-271.
    ("dinov2_vitg14.patch_embed.proj.{p}", _DINO + "patch_embed.{p}", ""),
    ("dinov2_vitg14.cls_token", _DINO + "cls_token", ""),
    ("dinov2_vitg14.pos_embed", _DINO + "pos_embed", "dino_pos"),
    ("dinov2_vitg14.mask_token", None, ""),  # masked training only
    ("dinov2_vitg14.blocks.{i}.norm1.{p}", _DINO + "blocks.{i}.norm1.{p}", ""),
    ("dinov2_vitg14.blocks.{i}.attn.qkv.{p}", _DINO + "blocks.{i}.attn.qkv.{p}", ""),
    ("dinov2_vitg14.blocks.{i}.attn.proj.{p}", _DINO + "blocks.{i}.attn.proj.{p}", ""),
    ("dinov2_vitg14.blocks.{i}.ls1.gamma", _DINO + "blocks.{i}.ls1", ""),
    ("dinov2_vitg14.blocks.{i}.norm2.{p}", _DINO + "blocks.{i}.norm2.{p}", ""),
    ("dinov2_vitg14.blocks.{i}.mlp.w12.{p}", _DINO + "blocks.{i}.mlp.fc1.{p}", ""),
    ("dinov2_vitg14.blocks.{i}.mlp.w3.{p}", _DINO + "blocks.{i}.mlp.fc2.{p}", ""),
    ("dinov2_vitg14.blocks.{i}.mlp.fc1.{p}", _DINO + "blocks.{i}.mlp.fc1.{p}", ""),  # S/B/L: plain MLP
    ("dinov2_vitg14.blocks.{i}.mlp.fc2.{p}", _DINO + "blocks.{i}.mlp.fc2.{p}", ""),
    ("dinov2_vitg14.blocks.{i}.ls2.gamma", _DINO + "blocks.{i}.ls2", ""),
    ("dinov2_vitg14.norm.{p}", _DINO + "norm.{p}", ""),
    # Projections and separators (L325-339): Sequential(Linear, LayerNorm); edgevlm's SphinxFusion names.
    ("qformer_proj.{s}.{p}", _CONN + "qformer_proj.{s}.{p}", ""),
    ("visual_proj.{s}.{p}", _CONN + "visual_proj.{s}.{p}", ""),
    ("start_img", _CONN + "start_img", ""),
    ("end_img", _CONN + "end_img", ""),
    # BLIP-2 (transformers Blip2Model, language parts set to None at L291-292). get_qformer_features
    # runs vision_model (EVA, post-LN) then the Q-Former's query path only (L393).
    ("qformer.qformer.encoder.layer.{i}.intermediate.{rest}", None, ""),  # text-path FFN
    ("qformer.qformer.encoder.layer.{i}.output.{rest}", None, ""),
    ("qformer.qformer.embeddings.{rest}", None, ""),  # text embeddings (newer transformers)
    ("qformer.vision_model.{rest}", "tower.encoders.eva.*", "hf:eva"),
    ("qformer.query_tokens", _CONN + "qformer.query_tokens", "hf:qformer"),
    ("qformer.qformer.{rest}", _CONN + "qformer.*", "hf:qformer"),
)

_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)", "s": r"(?P<s>\d)", "rest": r"(?P<rest>.+)"}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(_PLACEHOLDERS[p] if k % 2 else re.escape(p) for k, p in enumerate(parts)) + "$")


_RULES = [(_pattern(ref), ref, ours, how) for ref, ours, how in KEY_TABLE]
_OURS = [(_pattern(ours), ref) for ref, ours, how in KEY_TABLE if ours and not how.startswith("hf:")]


def reference_key(ours: str) -> str | None:
    """The checkpoint key that :data:`KEY_TABLE` maps to the edgevlm key ``ours`` (for error messages)."""
    for pat, ref in _OURS:
        m = pat.match(ours)
        if m:
            return PREFIX + ref.format(**m.groupdict())
    return None


# ---- the folder --------------------------------------------------------------------------------

def shard_files(folder: str | os.PathLike) -> list[Path]:
    """The ``consolidated.NN-of-MM.model.pth`` files of ``folder``, in rank order; [] if none.
    An incomplete or mixed set is a CheckpointError."""
    folder = Path(folder)
    found = sorted((int(m[2]), int(m[1]), p) for p in folder.iterdir() if (m := SHARD_RE.match(p.name)))
    if not found:
        return []
    sizes = {n for n, _, _ in found}
    n = found[0][0]
    if len(sizes) != 1 or [r for _, r, _ in found] != list(range(n)):
        names = [p.name for *_, p in found]
        raise CheckpointError(f"{folder}: model-parallel shards {names} are not one complete set "
                              f"consolidated.00-of-NN ... consolidated.(NN-1)-of-NN.model.pth")
    return [p for *_, p in found]


def is_sphinx_dir(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any(SHARD_RE.match(p.name) for p in folder.iterdir())


def _json(path: Path, required: bool) -> dict[str, Any]:
    """A JSON object file (:func:`read_json`'s typed errors); an optional one that is absent is ``{}``."""
    return read_json(path) if required or path.is_file() else {}


def llama_type(folder: str | os.PathLike) -> str:
    """``meta.json``'s llama_type, checked against the variants this reader knows."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise WeightsNotFoundError(f"{folder}: a SPHINX folder needs meta.json ({{\"llama_type\": ...}}) to say "
                                   f"which LLaMA2-Accessory model built it; known: {', '.join(RECIPES)}")
    lt = _json(path, required=True).get("llama_type")
    if lt in UNSUPPORTED:
        raise CheckpointError(f"{path}: llama_type {lt!r} is not supported: {UNSUPPORTED[lt]}; "
                              f"supported: {', '.join(RECIPES)}")
    if lt not in RECIPES:
        raise CheckpointError(f"{path}: llama_type {lt!r} is not a SPHINX model this reader knows; "
                              f"supported: {', '.join(RECIPES)}")
    return lt


def model_args(folder: str | os.PathLike) -> tuple[dict[str, Any], frozenset[str]]:
    """(ModelArgs as the reference builds them: defaults, then config.json; the fields config.json gave).
    Unknown keys are refused, as ``ModelArgs(**args)`` refuses them (meta.py L45)."""
    path = Path(folder) / "config.json"
    cfg = _json(path, required=False)
    unknown = sorted(set(cfg) - set(MODEL_ARGS))
    if unknown:
        raise CheckpointError(f"{path}: unknown ModelArgs fields {unknown}; known: {sorted(MODEL_ARGS)}")
    return {**MODEL_ARGS, **cfg}, frozenset(cfg)


# ---- reading the shards ------------------------------------------------------------------------

def _torch_load(path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) file
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: the file needs code to unpickle, and edgevlm loads .pth files "
                              f"with weights_only=True ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _shard_state(path: Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """One shard: ``{"model": {...}}`` or a bare dict (tensor_parallel.py L219-222), "llma." removed."""
    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (or {{'model': state dict}}), got {type(obj).__name__}")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if not k.startswith(PREFIX):
            raise CheckpointError(f"{path}: unexpected key {k!r}; a consolidated SPHINX checkpoint holds "
                                  f"MetaModel keys {PREFIX}*")
        if keep(k[len(PREFIX):]):
            out[k[len(PREFIX):]] = v
    return out


# tensor_parallel.py L34-38 with llama_ens.py L63-90, L202-210, L258-269: the split dim of each
# model-parallel weight; the rest is replicated on every rank.
_SPLIT_DIM = [(re.compile(r"^(layers\.\d+\.attention\.w[qkv]|layers\.\d+\.feed_forward\.w[13]|output)\.weight$"), 0),
              (re.compile(r"^(layers\.\d+\.attention\.wo|layers\.\d+\.feed_forward\.w2|tok_embeddings)\.weight$"), 1)]


def _split_dim(key: str) -> int | None:
    return next((d for pat, d in _SPLIT_DIM if pat.match(key)), None)


def load_consolidated(folder: str | os.PathLike, keep: Callable[[str], bool] = lambda k: True
                      ) -> dict[str, torch.Tensor]:
    """All shards of ``folder`` merged into one state dict (keys without "llma."), only keys ``keep`` accepts."""
    files = shard_files(folder)
    if not files:
        raise WeightsNotFoundError(f"{folder}: no consolidated.NN-of-MM.model.pth files")
    shards = [_shard_state(p, keep) for p in files]
    if len(shards) == 1:
        return shards[0]
    merged: dict[str, torch.Tensor] = {}
    for key in shards[0].keys() | set().union(*(s.keys() for s in shards[1:])):
        parts = [s.get(key) for s in shards]
        if any(p is None for p in parts):
            lacking = [files[r].name for r, p in enumerate(parts) if p is None]
            raise CheckpointError(f"{folder}: tensor {PREFIX + key!r} is missing from shards {lacking}")
        dim = _split_dim(key)
        if dim is None:
            if any(p.shape != parts[0].shape for p in parts):
                raise CheckpointError(f"{folder}: replicated tensor {PREFIX + key!r} has shapes "
                                      f"{[tuple(p.shape) for p in parts]} across shards")
            merged[key] = parts[0]
        else:
            try:
                merged[key] = torch.cat(parts, dim=dim)
            except RuntimeError:
                raise CheckpointError(f"{folder}: shards of {PREFIX + key!r} ({[tuple(p.shape) for p in parts]}) do "
                                      f"not concatenate along dim {dim}") from None
    return merged


# ---- configs from the tensors ------------------------------------------------------------------

def _need(state: dict[str, torch.Tensor], key: str, what: str, ndim: int | None = None) -> torch.Tensor:
    t = state.get(key)
    if t is None:
        raise CheckpointError(f"checkpoint lacks tensor {PREFIX + key!r} (needed to size {what})")
    if ndim is not None and t.ndim != ndim:
        raise CheckpointError(f"tensor {PREFIX + key!r} has shape {tuple(t.shape)}, expected {ndim} dims ({what})")
    return t


def _count(state: dict[str, torch.Tensor], pattern: str, what: str) -> int:
    """How many consecutive indices ``{i}`` (from 0) the keys matching ``pattern`` use."""
    pat = re.compile(pattern)
    idx = sorted({int(m[1]) for k in state if (m := pat.match(k))})
    if idx != list(range(len(idx))):
        raise CheckpointError(f"{what}: layer indices {idx[:8]}... are not 0..n-1")
    if not idx:
        raise CheckpointError(f"checkpoint has no {what} (keys matching {PREFIX}{pattern})")
    return len(idx)


def _heads(width: int, head_width: int, what: str) -> int:
    if width % head_width:
        raise CheckpointError(f"{what}: width {width} is not a multiple of the head width {head_width}")
    return width // head_width


def ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """FeedForward's hidden size for ``dim`` (llama_ens.py L196-200 with hidden_dim = 4 * dim, L229)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def decoder_config(state: dict[str, torch.Tensor], args: dict[str, Any],
                   given: frozenset[str] = frozenset()) -> DecoderConfig:
    """The LLaMA's DecoderConfig from the tensors and ModelArgs (``args``; ``given``: the fields
    config.json set, see :func:`model_args`). vocab_size and max_seq_len are MetaModel's (meta.py L39-43)."""
    vocab, dim = _need(state, "tok_embeddings.weight", "the LLM", 2).shape
    layers = _count(state, r"^layers\.(\d+)\.attention\.wq\.weight$", "LLM layers")
    for field, got in (("dim", dim), ("n_layers", layers)):
        if field in given and args[field] != got:
            raise CheckpointError(f"config.json says {field}={args[field]}, the tensors {got}")
    heads = int(args["n_heads"])
    if heads <= 0 or dim % heads:
        raise CheckpointError(f"n_heads={heads} does not divide dim {dim} (config.json / ModelArgs default)")
    head_dim = dim // heads
    kv_rows = _need(state, "layers.0.attention.wk.weight", "the LLM's key heads", 2).shape[0]
    kv = kv_rows // head_dim
    want_kv = args["n_kv_heads"] or heads  # None: as many as the query heads (llama_ens.py L56)
    if kv * head_dim != kv_rows or kv != want_kv:
        raise CheckpointError(f"layers.0.attention.wk.weight has {kv_rows} rows; with head_dim {head_dim} "
                              f"(dim {dim} / n_heads {heads}) that is not n_kv_heads={want_kv}")
    inter = _need(state, "layers.0.feed_forward.w1.weight", "the LLM's FFN", 2).shape[0]
    want = ffn_hidden(dim, int(args["multiple_of"]), args["ffn_dim_multiplier"])
    if inter != want:
        raise CheckpointError(f"layers.0.feed_forward.w1.weight has {inter} rows; ModelArgs (multiple_of="
                              f"{args['multiple_of']}, ffn_dim_multiplier={args['ffn_dim_multiplier']}) give {want}")
    rope: dict[str, Any] = {}
    if args["rope_scaling"] is not None:  # positions multiplied by it (llama.py L50-53) = frequencies / (1/s)
        rope = {"rope_scaling": "linear", "rope_scaling_factor": 1.0 / float(args["rope_scaling"])}
    try:
        return DecoderConfig(vocab_size=int(vocab), hidden=int(dim), layers=layers, heads=heads, kv_heads=kv,
                             intermediate=int(inter), norm_eps=float(args["norm_eps"]),
                             rope_theta=float(args["rope_theta"]), max_seq_len=MAX_SEQ_LEN, **rope)
    except ConfigError as e:
        raise CheckpointError(f"the LLM's settings are not a valid decoder: {e}") from None


def _vit_dims(state: dict[str, torch.Tensor], patch_key: str, block: str, fc1: str,
              what: str) -> tuple[int, int, int, int]:
    """(width, patch, depth, MLP rows) of a ViT: patch conv ``[W, 3, P, P]``, blocks ``block`` (with
    ``{i}``) counted, the first block's ``fc1`` rows."""
    w = _need(state, patch_key, what, 4)
    width, patch = int(w.shape[0]), int(w.shape[-1])
    depth = _count(state, "^" + re.escape(block.split("{i}")[0]) + r"(\d+)\.", what + " blocks")
    mlp = int(_need(state, block.format(i=0) + "." + fc1, what + " MLP", 2).shape[0])
    return width, patch, depth, mlp


def _clip_config(state: dict[str, torch.Tensor]) -> ViTConfig:
    width, patch, depth, mlp = _vit_dims(state, "clip.visual.conv1.weight", "clip.visual.transformer.resblocks.{i}",
                                         "mlp.c_fc.weight", "CLIP ViT")
    base = clip_vit_l14(final_norm=True, mlp_act="gelu")  # exact GELU: see the module docstring
    return dataclasses.replace(base, image_size=VIEW_SIZE, patch_size=patch, width=width, depth=depth,
                               heads=_heads(width, VISION_HEAD_WIDTH["clip"], "CLIP ViT"), mlp_dim=mlp)


def _dinov2_config(state: dict[str, torch.Tensor]) -> ViTConfig:
    swiglu = "dinov2_vitg14.blocks.0.mlp.w12.weight" in state
    fc1 = "mlp.w12.weight" if swiglu else "mlp.fc1.weight"
    width, patch, depth, mlp = _vit_dims(state, "dinov2_vitg14.patch_embed.proj.weight", "dinov2_vitg14.blocks.{i}",
                                         fc1, "DINOv2")
    base = dinov2("dinov2", "g")
    return dataclasses.replace(base, image_size=VIEW_SIZE, patch_size=patch, width=width, depth=depth,
                               heads=_heads(width, VISION_HEAD_WIDTH["dinov2"], "DINOv2"),
                               mlp_dim=mlp // 2 if swiglu else mlp, mlp_act="swiglu" if swiglu else "gelu",
                               pos_grid=0)  # the table is resampled to the 224 grid on read (dino_pos)


def _convnext_config(state: dict[str, torch.Tensor], image_size: int):
    p = re.escape("openclip_convnext_xxl.")
    n_stages = _count(state, rf"^{p}stages\.(\d+)\.", "ConvNeXt stages")
    dims = [int(_need(state, "openclip_convnext_xxl.stem.0.weight", "ConvNeXt's stem", 4).shape[0])]
    dims += [int(_need(state, f"openclip_convnext_xxl.stages.{i}.downsample.1.weight", f"ConvNeXt stage {i}",
                       4).shape[0]) for i in range(1, n_stages)]
    depths = [_count(state, rf"^{p}stages\.{i}\.blocks\.(\d+)\.", f"ConvNeXt stage {i} blocks")
              for i in range(n_stages)]
    return dataclasses.replace(convnext_xxl(image_size=image_size), depths=tuple(depths), dims=tuple(dims),
                               layer_scale="openclip_convnext_xxl.stages.0.blocks.0.gamma" in state)


def _hf_configs(state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers' vision and Q-Former config dicts for SPHINX's Blip2Model: the numbers of
    accessory/resources/hf/Salesforce/blip2-opt-2.7b/config.json, with the sizes taken from the tensors."""
    v = "qformer.vision_model."
    width, patch, depth, mlp = _vit_dims(state, v + "embeddings.patch_embedding.weight", v + "encoder.layers.{i}",
                                         "mlp.fc1.weight", "BLIP-2 EVA ViT")
    vision = {"model_type": "blip_2_vision_model", "hidden_size": width, "intermediate_size": mlp,
              "num_hidden_layers": depth, "num_attention_heads": _heads(width, VISION_HEAD_WIDTH["eva"], "EVA ViT"),
              "image_size": VIEW_SIZE, "patch_size": patch, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
              "qkv_bias": True}
    q = "qformer.qformer."
    hidden = int(_need(state, q + "layernorm.weight", "the Q-Former", 1).shape[0])
    layers = _count(state, rf"^{re.escape(q)}encoder\.layer\.(\d+)\.", "Q-Former layers")
    cross = [i for i in range(layers) if f"{q}encoder.layer.{i}.crossattention.attention.query.weight" in state]
    every = cross[1] - cross[0] if len(cross) > 1 else layers  # checked layer by layer by qformer_from_hf
    inter = int(_need(state, q + "encoder.layer.0.intermediate_query.dense.weight", "the Q-Former FFN", 2).shape[0])
    qformer = {"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": inter,
               "num_attention_heads": _heads(hidden, VISION_HEAD_WIDTH["qformer"], "Q-Former"),
               "cross_attention_frequency": every, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
               "encoder_hidden_size": width}
    return vision, qformer


# ---- conversions -------------------------------------------------------------------------------

def rope_rows_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from adjacent-pair RoPE (Meta, LLaMA2-Accessory) to rotate-half order:
    within each head, rows 0, 2, 4, ... then 1, 3, 5, ... ``[heads * head_dim, D]`` -> same shape."""
    rows, cols = w.shape
    hd = rows // heads
    return w.reshape(heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def dinov2_pos_for_grid(pos: torch.Tensor, grid: int, offset: float = 0.1) -> torch.Tensor:
    """DINOv2 hub's ``interpolate_pos_encoding`` for a square ``grid`` (see the module docstring):
    ``[1, 1 + M*M, W]`` -> ``[1, 1 + grid*grid, W]`` in fp32, class position unchanged."""
    n = pos.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise CheckpointError(f"DINOv2 pos_embed has {n} patch positions, not a square grid")
    if m == grid:
        return pos.float()
    w = pos.shape[-1]
    patch = pos[:, 1:].float().reshape(1, m, m, w).permute(0, 3, 1, 2)  # [1, W, M, M]
    s = (grid + offset) / m
    patch = F.interpolate(patch, scale_factor=(s, s), mode="bicubic", antialias=False)
    if tuple(patch.shape[-2:]) != (grid, grid):
        raise CheckpointError(f"DINOv2 position table {m}x{m} resamples to {tuple(patch.shape[-2:])}, "
                              f"not {grid}x{grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, w)
    return torch.cat([pos[:, :1].float(), patch], dim=1)


class _Reads(dict):
    """A dict that records which keys were read (``[]`` / ``get``), so the transformers mappers'
    consumption can be checked without changing them."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key, default=None):
        if key in self:
            return self[key]
        return default


# ---- the whole checkpoint ----------------------------------------------------------------------

@dataclass(frozen=True)
class SphinxCheckpoint:
    """What :func:`read_sphinx` found. ``state``: edgevlm keys (``tower.*``, and ``decoder.*`` unless
    tower-only). ``ignored``: checkpoint keys SPHINX's forward never uses (text-tower leftovers)."""

    llama_type: str
    tower: TowerConfig
    decoder: DecoderConfig | None
    state: dict[str, torch.Tensor]
    ignored: tuple[str, ...]
    shards: int

    def model_config(self, name: str) -> ModelConfig:
        if self.decoder is None:
            raise ConfigError("read tower-only; no decoder config")
        return ModelConfig(name=name, tower=self.tower, decoder=self.decoder, image_placement="after_bos",
                           chat_format="sphinx")



def _is_decoder_key(key: str) -> bool:
    return key.split(".", 1)[0] in ("tok_embeddings", "layers", "norm", "output")


def _convert(how: str, key: str, t: torch.Tensor, want: tuple[int, ...], decoder: DecoderConfig | None,
             grid: int) -> torch.Tensor:
    try:
        if how in ("rope_q", "rope_k"):
            if tuple(t.shape) != want:
                raise ValueError
            return rope_rows_to_half(t, decoder.heads if how == "rope_q" else decoder.kv_heads)
        if how == "cls":
            return t.reshape(1, 1, -1)
        if how == "pos":
            return t.unsqueeze(0)
        if how == "dino_pos":
            return dinov2_pos_for_grid(t, grid) if t.ndim == 3 and t.shape[0] == 1 else t
        return t
    except (ValueError, RuntimeError):
        raise CheckpointError(f"tensor {PREFIX + key!r} has shape {tuple(t.shape)}; expected {want} "
                              f"(after the {how!r} conversion)") from None


def _expected_shapes(tower: TowerConfig, decoder: DecoderConfig | None) -> dict[str, tuple[int, ...]]:
    from edgevlm.runtime.decoder import Decoder
    from edgevlm.runtime.tower import VisionTowerModel

    with torch.device("meta"):  # shapes only, nothing allocated
        shapes = {"tower." + k: tuple(v.shape) for k, v in VisionTowerModel(tower).state_dict().items()}
        if decoder is not None:
            shapes.update({"decoder." + k: tuple(v.shape) for k, v in Decoder(decoder).state_dict().items()})
    return shapes


def _map_keys(ref: _Reads, hf_read: set[str], hf_state: dict[str, torch.Tensor], tower: TowerConfig,
              decoder: DecoderConfig | None, what: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every checkpoint key through :data:`KEY_TABLE` -> (edgevlm state, ignored keys). A key that no
    rule takes, or that maps to nothing this model has, is unexpected; a model tensor no key fills is
    missing: both are CheckpointErrors naming the keys."""
    expected = _expected_shapes(tower, decoder)
    grid = tower.connector.grid
    plan: list[tuple[str, str, str]] = []  # (checkpoint key, edgevlm key, conversion)
    ignored, unexpected, taken = [], [], set(hf_state)
    for key in ref:
        m, rule = next(((m, r) for r in _RULES if (m := r[0].match(key))), (None, None))
        if rule is None:
            unexpected.append(key)
            continue
        _, _, ours, how = rule
        if how.startswith("hf:"):
            if key not in hf_read:  # read by hf_vision / hf_connectors, or nobody
                unexpected.append(key)
            continue
        if ours is None:
            ignored.append(key)
            continue
        name = ours.format(**m.groupdict())
        if name not in expected or name in taken:
            unexpected.append(key)
            continue
        taken.add(name)
        plan.append((key, name, how))
    if unexpected:  # before any shape check: a wrong llama_type shows up here, not as a shape mismatch
        raise CheckpointError(f"{len(unexpected)} checkpoint tensors are not part of a {what} model as this reader "
                              f"knows it, e.g. {[PREFIX + k for k in sorted(unexpected)[:4]]} (is meta.json's "
                              f"llama_type right?)")
    out = dict(hf_state)
    for key, name, how in plan:
        t = _convert(how, key, dict.__getitem__(ref, key), expected[name], decoder, grid)
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"tensor {PREFIX + key!r} has shape {tuple(t.shape)}, expected {expected[name]} "
                                  f"(edgevlm {name!r}) for this {what} checkpoint")
        out[name] = t
    missing = [k for k in expected if k not in out]
    if missing:
        names = [reference_key(k) or k for k in missing[:4]]
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors a {what} model needs, e.g. {names}")
    return out, sorted(ignored)


def read_sphinx(folder: str | os.PathLike, *, tower_only: bool = False) -> SphinxCheckpoint:
    """Read a SPHINX folder (see the module docstring). ``tower_only`` leaves the LLM's tensors unread."""
    folder = Path(folder)
    lt = llama_type(folder)
    args, given = model_args(folder)
    keep = (lambda k: not _is_decoder_key(k)) if tower_only else (lambda k: True)
    state = load_consolidated(folder, keep)
    try:
        ck = sphinx_from_state(state, lt, args, given, tower_only=tower_only, what=f"{lt} ({folder.name})")
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    return dataclasses.replace(ck, shards=len(shard_files(folder)))


def sphinx_from_state(state: dict[str, torch.Tensor], lt: str, args: dict[str, Any] | None = None,
                      given: frozenset[str] = frozenset(), *, tower_only: bool = False,
                      what: str = "") -> SphinxCheckpoint:
    """A merged state dict (keys without "llma.") of llama_type ``lt`` -> configs and edgevlm state.
    Only shapes are read to size the model, so meta tensors give the configs of a full-size release."""
    from .hf_connectors import qformer_from_hf
    from .hf_vision import vit_from_hf

    recipe, what = RECIPES[lt], what or lt
    args = {**MODEL_ARGS, **(args or {})}
    ref = _Reads(state)
    try:
        decoder = None if tower_only else decoder_config(ref, args, given)
        cnx, dino = _convnext_config(ref, recipe.convnext_size), _dinov2_config(ref)
        fused, extra, qcfg, hf_state = [cnx, dino], [], None, {}
        hf_read: set[str] = set()
        if recipe.qformer_and_clip:
            fused = [_clip_config(ref), cnx, dino]  # channel order of the concatenation, L429-433
            vision, qformer = _hf_configs(ref)
            ref.read.clear()  # from here on, a read means the mappers consumed the tensor
            eva, eva_state = vit_from_hf(vision, ref, "qformer.vision_model.", name="eva")
            qcfg, q_state = qformer_from_hf(qformer, ref, "qformer.qformer.", "qformer.query_tokens", encoder="eva")
            hf_read = set(ref.read)
            extra = [eva]
            hf_state = {**{"tower.encoders.eva." + k: v for k, v in eva_state.items()},
                        **{"tower.connector.qformer." + k: v for k, v in q_state.items()}}
        off_grid = [e.name for e in fused if e.kind == "vit" and e.grid != dino.grid]
        if off_grid:
            raise CheckpointError(f"encoders {off_grid} do not share DINOv2's {dino.grid} patch grid")
        out_width = int(_need(ref, "visual_proj.0.weight", "the visual projection", 2).shape[0])
        if decoder is not None and out_width != decoder.hidden:
            raise CheckpointError(f"visual_proj.0.weight projects to {out_width}, the LLM is {decoder.hidden} wide")
        fusion = SphinxFusionConfig(encoders=tuple(e.name for e in fused), in_widths=tuple(e.width for e in fused),
                                    grid=dino.grid[0], qformer=qcfg, out_width=out_width)
        tower = TowerConfig(encoders=tuple(fused + extra), connector=fusion,
                            views=ViewConfig(kind="pad_square", crop_grid=recipe.crop_grid))
    except ConfigError as e:
        raise CheckpointError(f"the tensors do not describe a valid {what} model: {e}") from None
    out, ignored = _map_keys(ref, hf_read, hf_state, tower, decoder, what)
    return SphinxCheckpoint(lt, tower, decoder, out, tuple(ignored), 1)


def read_sphinx_tower(folder: str | os.PathLike) -> tuple[TowerConfig, dict[str, torch.Tensor]]:
    """The vision tower only: (TowerConfig, tower-relative state), for
    :func:`~edgevlm.runtime.tower.load_vision_tower`; the LLM's tensors are never read."""
    ck = read_sphinx(folder, tower_only=True)
    return ck.tower, {k[len("tower."):]: v for k, v in ck.state.items()}


def sphinx_tokenizer(folder: str | os.PathLike):
    """-> (Tokenizer, where it came from): ``tokenizer.model`` first, else ``tokenizer.json`` (the order
    of accessory/model/tokenizer.py L133-156)."""
    from edgevlm.runtime.tokenizer import Tokenizer

    from .spm_model import read_spm_metadata

    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        spm = folder / "tokenizer.model"
        return Tokenizer.from_gguf_metadata(read_spm_metadata(spm)), str(spm)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_tokenizer_json(folder), str(folder / "tokenizer.json")
    raise WeightsNotFoundError(f"{folder}: no tokenizer.model (SentencePiece, as SPHINX releases ship) and no "
                               "tokenizer.json (+ tokenizer_config.json)")


__all__ = ["KEY_TABLE", "RECIPES", "SphinxCheckpoint", "read_sphinx", "sphinx_from_state", "read_sphinx_tower",
           "sphinx_tokenizer",
           "load_consolidated", "shard_files", "is_sphinx_dir", "llama_type", "model_args", "decoder_config",
           "rope_rows_to_half", "dinov2_pos_for_grid", "reference_key", "ffn_hidden"]
