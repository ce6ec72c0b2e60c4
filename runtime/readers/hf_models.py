"""Whole-model transformers folders -> edgevlm vision towers (LLaVA, BLIP-2).

Each reader returns ``(TowerConfig, state)`` where ``state`` uses the tower's own key names
(``encoders.<name>.*``, ``connector.*``). The per-component converters live beside this file; this
module only decides which component sits where and how the model family wires them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgevlm.config import TowerConfig, ViewConfig
from edgevlm.errors import CheckpointError

from .hf_connectors import blip2_connector_from_hf, llava_projector_from_hf
from .hf_vision import vit_from_hf
from .safetensors_io import find_prefix, load_safetensors_dir, read_json


def _not_language_model(key: str) -> bool:
    return "language_model" not in key and not key.startswith("lm_head")


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def read_llava_tower(path: str | Path) -> tuple[TowerConfig, dict[str, torch.Tensor]]:
    """LlavaForConditionalGeneration: CLIP tower at ``vision_feature_layer`` -> mlp2x_gelu projector."""
    path = Path(path)
    hf = read_json(path / "config.json")
    state = load_safetensors_dir(path, keep=_not_language_model)
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"{path}: vision_feature_layer {layer!r} (several layers) is not supported; "
                              "edgevlm reads a single feature layer")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"{path}: vision_feature_select_strategy {strategy!r} not supported ('default', 'full')")
    vision_cfg = hf.get("vision_config") or {}
    if vision_cfg.get("model_type") not in ("clip_vision_model", "siglip_vision_model"):
        raise CheckpointError(f"{path}: LLaVA vision tower {vision_cfg.get('model_type')!r} not supported "
                              "(supported: clip_vision_model, siglip_vision_model)")
    # transformers 4.x saved `vision_tower.vision_model.*`; 5.x saves `vision_tower.*` (and names it
    # `model.vision_tower.*` in memory).
    prefix = find_prefix(state, ["vision_tower.", "vision_tower.vision_model.", "model.vision_tower.",
                                 "model.vision_tower.vision_model."], "embeddings.patch_embedding.weight")
    vit_cfg, vit_state = vit_from_hf(vision_cfg, state, prefix, name="clip", feature_layer=layer,
                                     final_norm=False, keep_class_token=(strategy == "full"))
    conn_cfg, conn_state = llava_projector_from_hf(hf, state)
    # LLaVA-1.5 pads to a square with the CLIP mean colour before resizing (image_aspect_ratio=pad).
    tower = TowerConfig(encoders=(vit_cfg,), connector=conn_cfg, views=ViewConfig(kind="pad_square"))
    return tower, {**_prefixed("encoders.clip.", vit_state), **_prefixed("connector.", conn_state)}


def read_blip2_tower(path: str | Path) -> tuple[TowerConfig, dict[str, torch.Tensor]]:
    """Blip2ForConditionalGeneration / Blip2Model: EVA ViT -> Q-Former -> language_projection."""
    path = Path(path)
    hf = read_json(path / "config.json")
    state = load_safetensors_dir(path, keep=_not_language_model)
    vision_cfg = hf.get("vision_config") or {}
    vision_cfg = {"model_type": "blip_2_vision_model", **vision_cfg}
    prefix = find_prefix(state, ["model.vision_model.", "vision_model."], "embeddings.patch_embedding.weight")
    vit_cfg, vit_state = vit_from_hf(vision_cfg, state, prefix, name="eva")
    conn_cfg, conn_state = blip2_connector_from_hf(hf, state)
    # BLIP-2's processor resizes to a square without keeping the aspect ratio.
    tower = TowerConfig(encoders=(vit_cfg,), connector=conn_cfg, views=ViewConfig(kind="stretch"))
    return tower, {**_prefixed("encoders.eva.", vit_state), **_prefixed("connector.", conn_state)}


__all__ = ["read_llava_tower", "read_blip2_tower"]
