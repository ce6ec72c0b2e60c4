"""transformers vision checkpoints -> (ViTConfig, state dict in :class:`~edgevlm.runtime.vision.vit.ViT` names).

Supported vision ``model_type`` values: ``clip_vision_model``, ``dinov2``, ``siglip_vision_model``,
``blip_2_vision_model``; :func:`read_hf_vision_dir` also opens whole ``clip``, ``siglip`` and ``blip-2``
folders through their ``vision_config``.

Key layouts differ between transformers versions, and both are read:

- DINOv2: ``save_pretrained`` in transformers 5 still writes the hub names (``attention.attention.query``,
  ``mlp.weights_in``), while the in-memory modules say ``attention.q_proj`` / ``mlp.gate_proj``.
- BLIP-2: hub checkpoints store ``self_attn.q_bias`` and ``self_attn.v_bias`` (EVA has no k bias);
  transformers 5 writes one fused ``self_attn.qkv.bias``. Both become the fused ``attn.qkv.bias``
  (with zeros for k in the first case).
- Prefixes: a standalone ``CLIPVisionModel`` is saved without ``vision_model.`` by transformers 5 and
  with it by 4.x; callers of :func:`vit_from_hf` pass the prefix, the folder reader probes for it.

Every tensor is checked against the shape the config implies; a mismatch or a missing tensor is a
:class:`~edgevlm.errors.CheckpointError` naming the checkpoint key. Tensors the ViT does not use (text
towers, pooling heads, blocks past ``feature_layer``, an unapplied post-norm) are ignored.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgevlm.config import CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD, ViTConfig
from edgevlm.errors import CheckpointError, ConfigError

from .safetensors_io import find_prefix, load_safetensors_dir, read_json

Keys = tuple[str, ...]  # alternative names of one tensor, tried in order

# transformers activation name -> ViTConfig.mlp_act. gelu_new is the tanh formula written out.
_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


@dataclass(frozen=True)
class _Family:
    """Where one transformers family keeps each tensor (names relative to the vision prefix)."""

    model_type: str
    defaults: dict[str, Any]  # the transformers config class defaults, for keys a config.json omits
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_token: bool
    pre_norm: bool
    patch_bias: bool
    layer_scale: bool
    final_norm: bool  # our default: does transformers' last_hidden_state include the final norm?
    patch: str
    pos: str
    pos_batched: bool  # [1, T, W] Parameter (True) or [T, W] nn.Embedding weight (False)
    final: str
    layer: str  # block prefix, with {i}
    norm1: str
    norm2: str
    out: Keys
    cls: str = ""
    cls_batched: bool = True  # [1, 1, W] (True) or [W] (False)
    pre: str = ""
    q: Keys = ()
    k: Keys = ()
    v: Keys = ()
    qkv: str = ""  # fused projection (BLIP-2)
    fc1: Keys = ("mlp.fc1",)
    fc2: Keys = ("mlp.fc2",)
    ls1: str = ""
    ls2: str = ""


_CLIP = _Family(
    model_type="clip_vision_model", mean=CLIP_MEAN, std=CLIP_STD,
    defaults=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    class_token=True, pre_norm=True, patch_bias=False, layer_scale=False, final_norm=False,
    patch="embeddings.patch_embedding", cls="embeddings.class_embedding", cls_batched=False,
    pos="embeddings.position_embedding.weight", pos_batched=False, pre="pre_layrnorm", final="post_layernorm",
    layer="encoder.layers.{i}.", norm1="layer_norm1", norm2="layer_norm2",
    q=("self_attn.q_proj",), k=("self_attn.k_proj",), v=("self_attn.v_proj",), out=("self_attn.out_proj",),
)

_SIGLIP = dataclasses.replace(
    _CLIP, model_type="siglip_vision_model", mean=HALF_MEAN, std=HALF_STD,
    defaults=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    class_token=False, pre_norm=False, patch_bias=True, final_norm=True, cls="", pre="",
)

_BLIP2 = _Family(
    model_type="blip_2_vision_model", mean=CLIP_MEAN, std=CLIP_STD,
    defaults=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                  image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True),
    class_token=True, pre_norm=False, patch_bias=True, layer_scale=False, final_norm=True,
    patch="embeddings.patch_embedding", cls="embeddings.class_embedding",
    pos="embeddings.position_embedding", pos_batched=True, final="post_layernorm",
    layer="encoder.layers.{i}.", norm1="layer_norm1", norm2="layer_norm2",
    qkv="self_attn.qkv", out=("self_attn.projection",),
)

_DINOV2 = _Family(
    model_type="dinov2", mean=IMAGENET_MEAN, std=IMAGENET_STD,
    defaults=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, image_size=224,
                  patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False),
    class_token=True, pre_norm=False, patch_bias=True, layer_scale=True, final_norm=True,
    patch="embeddings.patch_embeddings.projection", cls="embeddings.cls_token",
    pos="embeddings.position_embeddings", pos_batched=True, final="layernorm",
    layer="encoder.layer.{i}.", norm1="norm1", norm2="norm2",
    q=("attention.attention.query", "attention.q_proj"), k=("attention.attention.key", "attention.k_proj"),
    v=("attention.attention.value", "attention.v_proj"), out=("attention.output.dense", "attention.o_proj"),
    fc1=("mlp.fc1",), fc2=("mlp.fc2", "mlp.weights_out", "mlp.down_proj"),
    ls1="layer_scale1.lambda1", ls2="layer_scale2.lambda1",
)

FAMILIES: dict[str, _Family] = {f.model_type: f for f in (_CLIP, _DINOV2, _SIGLIP, _BLIP2)}
# Whole (vision + text) models whose folders read_hf_vision_dir opens: model_type -> vision model_type.
WHOLE_MODELS: dict[str, str] = {"clip": "clip_vision_model", "siglip": "siglip_vision_model",
                                "blip-2": "blip_2_vision_model"}
# Where the vision weights sit in the checkpoints of the folders above, across transformers versions.
_PREFIXES = ["", "vision_model.", "model.vision_model.", "dinov2.", "backbone."]


def _supported() -> str:
    return (f"supported vision model_types: {', '.join(FAMILIES)}; whole-model folders: "
            f"{', '.join(WHOLE_MODELS)}")


def _family(hf: dict, where: str) -> _Family:
    mt = hf.get("model_type")
    if mt in WHOLE_MODELS:
        raise CheckpointError(f"{where}: model_type {mt!r} is a whole model; pass its 'vision_config' "
                              f"(model_type {WHOLE_MODELS[mt]!r})")
    if mt not in FAMILIES:
        raise CheckpointError(f"{where}: unsupported vision model_type {mt!r}; {_supported()}")
    return FAMILIES[mt]


def _square(value: Any, what: str, where: str) -> int:
    # transformers accepts (h, w) pairs; ViTConfig's trained grid is square.
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{where}: non-square {what} {value} is not supported")
        value = value[0]
    if not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{where}: {what} must be a positive int, got {value!r}")
    return value


def _config(fam: _Family, hf: dict, name: str, image_size: int | None, overrides: dict, where: str) -> ViTConfig:
    h = {**fam.defaults, **{k: v for k, v in hf.items() if v is not None}}
    if h.get("num_channels", 3) != 3:
        raise CheckpointError(f"{where}: num_channels={h['num_channels']}; only RGB encoders are supported")
    width = h["hidden_size"]
    if fam is _DINOV2:
        mlp = int(width * h["mlp_ratio"])
        if h["use_swiglu_ffn"]:
            # transformers' Dinov2SwiGLUFFN: two thirds of the MLP size, rounded up to a multiple of 8.
            mlp, act = (int(mlp * 2 / 3) + 7) // 8 * 8, "swiglu"
        else:
            act = h["hidden_act"]
    else:
        mlp, act = h["intermediate_size"], h["hidden_act"]
    if act != "swiglu":
        if act not in _ACTS:
            raise CheckpointError(f"{where}: hidden_act {act!r} not supported; known: {sorted(_ACTS)}")
        act = _ACTS[act]
    patch = _square(h["patch_size"], "patch_size", where)
    trained = _square(h["image_size"], "image_size", where) // patch
    size = image_size if image_size is not None else trained * patch
    fields = dict(
        name=name, image_size=size, mean=fam.mean, std=fam.std, patch_size=patch, width=width,
        depth=h["num_hidden_layers"], heads=h["num_attention_heads"], mlp_dim=mlp, mlp_act=act,
        norm_eps=float(h["layer_norm_eps"]), qkv_bias=bool(h.get("qkv_bias", True)), patch_bias=fam.patch_bias,
        class_token=fam.class_token, keep_class_token=fam.class_token, pre_norm=fam.pre_norm,
        layer_scale=fam.layer_scale, final_norm=fam.final_norm,
        pos_grid=0 if trained == size // patch else trained,
    )
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown ViTConfig overrides {unknown}; fields are {sorted(known)}")
    return ViTConfig(**{**fields, **overrides})


class _Source:
    """Shape-checked access to the tensors under one prefix of a checkpoint."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str, where: str):
        self.state, self.prefix, self.where = state, prefix, where

    def has(self, key: str) -> bool:
        return self.prefix + key in self.state

    def get(self, keys: str | Keys, shape: tuple[int, ...]) -> torch.Tensor:
        keys = (keys,) if isinstance(keys, str) else keys
        for k in keys:
            t = self.state.get(self.prefix + k)
            if t is None:
                continue
            if tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"{self.where}: tensor {self.prefix + k!r} has shape {tuple(t.shape)}, "
                                      f"expected {tuple(shape)} for this config")
            return t
        alts = " or ".join(repr(self.prefix + k) for k in keys)
        raise CheckpointError(f"{self.where}: checkpoint lacks tensor {alts} (expected shape {tuple(shape)})")

    def linear(self, keys: Keys, out_f: int, in_f: int, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.get(tuple(k + ".weight" for k in keys), (out_f, in_f))
        # The bias goes with the weight's name, so it is never taken from another layout.
        base = next(k for k in keys if self.has(k + ".weight"))
        return w, (self.get(base + ".bias", (out_f,)) if bias else None)


def _convert(fam: _Family, src: _Source, cfg: ViTConfig) -> dict[str, torch.Tensor]:
    W, P, G = cfg.width, cfg.patch_size, cfg.trained_grid
    n_pos = int(cfg.class_token) + G * G
    sd: dict[str, torch.Tensor] = {"patch_embed.weight": src.get(fam.patch + ".weight", (W, 3, P, P))}
    if cfg.patch_bias:
        sd["patch_embed.bias"] = src.get(fam.patch + ".bias", (W,))
    if cfg.class_token:
        sd["cls_token"] = src.get(fam.cls, (1, 1, W) if fam.cls_batched else (W,)).reshape(1, 1, W)
    sd["pos_embed"] = src.get(fam.pos, (1, n_pos, W) if fam.pos_batched else (n_pos, W)).reshape(1, n_pos, W)
    if cfg.pre_norm:
        sd["norm_pre.weight"] = src.get(fam.pre + ".weight", (W,))
        sd["norm_pre.bias"] = src.get(fam.pre + ".bias", (W,))

    # A checkpoint deeper than the config means the config is wrong, not that blocks may be dropped.
    if src.has(fam.layer.format(i=cfg.depth) + fam.norm1 + ".weight"):
        raise CheckpointError(f"{src.where}: checkpoint has more than depth={cfg.depth} blocks "
                              f"(found {src.prefix + fam.layer.format(i=cfg.depth)}*)")
    for i in range(cfg.blocks_run):
        s, d = _Source(src.state, src.prefix + fam.layer.format(i=i), src.where), f"blocks.{i}."
        for norm, ours in ((fam.norm1, "norm1"), (fam.norm2, "norm2")):
            sd[d + ours + ".weight"] = s.get(norm + ".weight", (W,))
            sd[d + ours + ".bias"] = s.get(norm + ".bias", (W,))
        sd.update({d + "attn.qkv." + k: t for k, t in _qkv(fam, s, cfg).items()})
        sd[d + "attn.proj.weight"], sd[d + "attn.proj.bias"] = s.linear(fam.out, W, W)
        sd.update({d + "mlp." + k: t for k, t in _mlp(fam, s, cfg).items()})
        if cfg.layer_scale:
            sd[d + "ls1"] = s.get(fam.ls1, (W,))
            sd[d + "ls2"] = s.get(fam.ls2, (W,))
    if cfg.final_norm:
        sd["norm.weight"] = src.get(fam.final + ".weight", (W,))
        sd["norm.bias"] = src.get(fam.final + ".bias", (W,))
    return sd


def _qkv(fam: _Family, s: _Source, cfg: ViTConfig) -> dict[str, torch.Tensor]:
    W = cfg.width
    if fam.qkv:  # BLIP-2 / EVA: already fused
        out = {"weight": s.get(fam.qkv + ".weight", (3 * W, W))}
        if cfg.qkv_bias:
            if s.has(fam.qkv + ".bias"):
                out["bias"] = s.get(fam.qkv + ".bias", (3 * W,))
            else:  # hub layout: EVA trains q and v biases only, k's is identically zero
                q = s.get("self_attn.q_bias", (W,))
                v = s.get("self_attn.v_bias", (W,))
                out["bias"] = torch.cat([q, torch.zeros_like(q), v])
        return out
    parts = [s.linear(keys, W, W, cfg.qkv_bias) for keys in (fam.q, fam.k, fam.v)]
    out = {"weight": torch.cat([w for w, _ in parts])}  # rows: q, k, v
    if cfg.qkv_bias:
        out["bias"] = torch.cat([b for _, b in parts])
    return out


def _mlp(fam: _Family, s: _Source, cfg: ViTConfig) -> dict[str, torch.Tensor]:
    W, M = cfg.width, cfg.mlp_dim
    if cfg.mlp_act == "swiglu":
        if s.has("mlp.weights_in.weight"):  # hub layout: fused [gate | up]
            w1, b1 = s.linear(("mlp.weights_in",), 2 * M, W)
        else:  # transformers 5 in-memory layout: separate gate and up projections
            gw, gb = s.linear(("mlp.gate_proj",), M, W)
            uw, ub = s.linear(("mlp.up_proj",), M, W)
            w1, b1 = torch.cat([gw, uw]), torch.cat([gb, ub])
    else:
        w1, b1 = s.linear(fam.fc1, M, W)
    w2, b2 = s.linear(fam.fc2, W, M)
    return {"fc1.weight": w1, "fc1.bias": b1, "fc2.weight": w2, "fc2.bias": b2}


def vit_from_hf(hf_config: dict, state: dict[str, torch.Tensor], prefix: str, *, name: str,
                image_size: int | None = None, **overrides) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """Convert one transformers vision tower to ``(ViTConfig, state dict)`` for :class:`ViT`.

    ``hf_config`` is the *vision* config dict (a whole model's ``vision_config``), ``prefix`` the key
    prefix of the tower in ``state`` (``""``, ``"vision_model."``, ``"model.vision_tower.vision_model."``).
    ``image_size`` defaults to the trained size; ``overrides`` replace ViTConfig fields
    (``feature_layer``, ``final_norm``, ``keep_class_token``, ...). Family defaults: CLIP
    ``final_norm=False`` (transformers' ``last_hidden_state`` is not post-normed), the others True.
    The state dict holds only what ``ViT(cfg)`` has, so it loads with ``strict=True``.
    """
    return _vit_from_hf(hf_config, state, prefix, name, image_size, overrides, where="checkpoint")


def _vit_from_hf(hf: dict, state: dict, prefix: str, name: str, image_size: int | None, overrides: dict,
                 where: str) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    fam = _family(hf, where)
    cfg = _config(fam, hf, name, image_size, overrides, where)
    return cfg, _convert(fam, _Source(state, prefix, where), cfg)


def vit_config_from_hf(hf_config: dict, *, name: str, image_size: int | None = None, where: str = "config.json",
                       **overrides) -> ViTConfig:
    """The :class:`ViTConfig` a transformers *vision* config dict describes, without reading weights
    (``image_size`` and ``overrides`` as in :func:`vit_from_hf`)."""
    return _config(_family(hf_config, where), hf_config, name, image_size, overrides, where)


def read_hf_vision_dir(path: str | os.PathLike, *, name: str = "vision",
                       **overrides) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """Read a ``save_pretrained`` folder (``config.json`` + safetensors) of a supported vision model.

    Opens CLIPVisionModel, Dinov2Model, SiglipVisionModel and Blip2VisionModel folders, and whole
    CLIPModel / SiglipModel / Blip2 folders through their ``vision_config``. ``overrides`` as in
    :func:`vit_from_hf` (``image_size`` included).
    """
    path = Path(path)
    hf = read_json(path / "config.json")
    mt = hf.get("model_type")
    if mt in WHOLE_MODELS:
        vision = hf.get("vision_config") or {}  # absent when every field is the default
        hf = {**vision, "model_type": vision.get("model_type") or WHOLE_MODELS[mt]}
    fam = _family(hf, str(path))  # before reading any weights: an unsupported folder fails fast
    state = load_safetensors_dir(path)
    try:
        prefix = find_prefix(state, _PREFIXES, fam.patch + ".weight")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    image_size = overrides.pop("image_size", None)
    return _vit_from_hf(hf, state, prefix, name, image_size, overrides, where=str(path))


__all__ = ["FAMILIES", "WHOLE_MODELS", "vit_from_hf", "vit_config_from_hf", "read_hf_vision_dir"]
