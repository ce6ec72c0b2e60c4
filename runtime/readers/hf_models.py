"""Whole-model transformers folders -> edgevlm vision towers (LLaVA, LLaVA-NeXT, BLIP-2, InstructBLIP).

Each reader returns ``(TowerConfig, state)`` where ``state`` uses the tower's own key names
(``encoders.<name>.*``, ``connector.*``). The per-component converters live beside this file; this
module only decides which component sits where and how the model family wires them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgevlm.config import AnyresPackConfig, MLPConnectorConfig, TowerConfig, ViewConfig, ViTConfig
from edgevlm.errors import CheckpointError

from .hf_connectors import blip2_connector_from_hf, llava_projector_from_hf
from .hf_vision import vit_from_hf
from .safetensors_io import find_prefix, load_safetensors_dir, read_json, take


def _not_language_model(key: str) -> bool:
    return "language_model" not in key and not key.startswith("lm_head")


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


LLAVA_STRATEGIES = ("default", "full")
# LlavaNextConfig's default image_grid_pinpoints, (height, width) canvases in pixels.
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _feature_layers(path: Path, layer) -> dict:
    """``vision_feature_layer`` -> ViTConfig fields: one int, or a list of ints concatenated on channels."""
    if isinstance(layer, int) and not isinstance(layer, bool):
        return {"feature_layer": layer}
    if isinstance(layer, list) and layer and all(isinstance(i, int) and not isinstance(i, bool) for i in layer):
        return {"feature_layers": tuple(layer)}
    raise CheckpointError(f"{path}: vision_feature_layer {layer!r} must be an int or a non-empty list of ints")


def _llava_vision_and_projector(path: Path, hf: dict, state: dict[str, torch.Tensor]
                                ) -> tuple[ViTConfig, dict[str, torch.Tensor], MLPConnectorConfig, dict[str, torch.Tensor]]:
    """The LLaVA family's vision tower at ``vision_feature_layer`` (one layer, or several concatenated on
    channels as transformers does) with ``vision_feature_select_strategy`` applied, and its mlp2x_gelu
    projector."""
    layers = _feature_layers(path, hf.get("vision_feature_layer", -2))
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in LLAVA_STRATEGIES:
        raise CheckpointError(f"{path}: vision_feature_select_strategy {strategy!r} not supported; "
                              f"supported: {list(LLAVA_STRATEGIES)}")
    vision_cfg = hf.get("vision_config") or {}
    if vision_cfg.get("model_type") not in ("clip_vision_model", "siglip_vision_model"):
        raise CheckpointError(f"{path}: LLaVA vision tower {vision_cfg.get('model_type')!r} not supported "
                              "(supported: clip_vision_model, siglip_vision_model)")
    # transformers 4.x saved `vision_tower.vision_model.*`; 5.x saves `vision_tower.*` (and names it
    # `model.vision_tower.*` in memory).
    prefix = find_prefix(state, ["vision_tower.", "vision_tower.vision_model.", "model.vision_tower.",
                                 "model.vision_tower.vision_model."], "embeddings.patch_embedding.weight")
    vit_cfg, vit_state = vit_from_hf(vision_cfg, state, prefix, name="clip", final_norm=False,
                                     keep_class_token=(strategy == "full"), **layers)
    conn_cfg, conn_state = llava_projector_from_hf(hf, state)
    return vit_cfg, vit_state, conn_cfg, conn_state


def read_llava_tower(path: str | Path) -> tuple[TowerConfig, dict[str, torch.Tensor]]:
    """LlavaForConditionalGeneration: CLIP tower at ``vision_feature_layer`` -> mlp2x_gelu projector."""
    path = Path(path)
    hf = read_json(path / "config.json")
    state = load_safetensors_dir(path, keep=_not_language_model)
    vit_cfg, vit_state, conn_cfg, conn_state = _llava_vision_and_projector(path, hf, state)
    # LLaVA-1.5 pads to a square with the CLIP mean colour before resizing (image_aspect_ratio=pad).
    tower = TowerConfig(encoders=(vit_cfg,), connector=conn_cfg, views=ViewConfig(kind="pad_square"))
    return tower, {**_prefixed("encoders.clip.", vit_state), **_prefixed("connector.", conn_state)}


def _pinpoint_grids(path: Path, pinpoints, tile: int) -> tuple[tuple[int, int], ...]:
    """``image_grid_pinpoints`` ((height, width) canvases in pixels) -> (rows, cols) grids of ``tile`` tiles."""
    if not isinstance(pinpoints, list) or not pinpoints:
        raise CheckpointError(f"{path}: image_grid_pinpoints must be a non-empty list of [height, width], "
                              f"got {pinpoints!r}")
    grids = []
    for p in pinpoints:
        ok = isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p)
        if not ok or p[0] % tile or p[1] % tile:
            raise CheckpointError(f"{path}: image_grid_pinpoints entry {p!r} is not a [height, width] pair of "
                                  f"positive multiples of the vision tower's tile size {tile}")
        grids.append((p[0] // tile, p[1] // tile))
    return tuple(grids)


def read_llava_next_tower(path: str | Path) -> tuple[TowerConfig, dict[str, torch.Tensor]]:
    """LlavaNextForConditionalGeneration: any-resolution views -> vision tower -> mlp2x_gelu -> packing.

    Views (``LlavaNextImageProcessor``): the image stretched to the tile size, then the tiles of the
    canvas from ``image_grid_pinpoints`` that shows it best, the image resized keeping its aspect and
    centred on black. Every view's grid tokens are projected, then packed per image (base view first,
    tiles stitched, padding rows/cols dropped, ``image_newline`` ending each row; see
    :mod:`edgevlm.runtime.connectors.anyres`).
    """
    path = Path(path)
    hf = read_json(path / "config.json")
    state = load_safetensors_dir(path, keep=_not_language_model)
    vit_cfg, vit_state, conn_cfg, conn_state = _llava_vision_and_projector(path, hf, state)
    strategy = hf.get("vision_feature_select_strategy", "default")
    if vit_cfg.class_token != (strategy == "default"):
        # transformers drops token 0 for 'default' and keeps all for 'full'; LLaVA-NeXT's tiles must then be
        # the bare patch grid, or its packing fails (transformers raises on these pairings too).
        raise CheckpointError(f"{path}: vision_feature_select_strategy {strategy!r} with a vision tower "
                              f"{'with' if vit_cfg.class_token else 'without'} a class token leaves no patch grid "
                              "to pack; supported: 'default' with a class token (CLIP), 'full' without (SigLIP)")
    grids = _pinpoint_grids(path, hf.get("image_grid_pinpoints") or LLAVA_NEXT_PINPOINTS, vit_cfg.image_size)
    key = find_prefix(state, ["", "model."], "image_newline") + "image_newline"
    newline = take(state, key)
    if tuple(newline.shape) != (conn_cfg.out_width,):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(newline.shape)}, expected "
                              f"({conn_cfg.out_width},)")
    views = ViewConfig(kind="anyres", anyres_grids=grids, anyres_fill=(0, 0, 0))
    tower = TowerConfig(encoders=(vit_cfg,), connector=conn_cfg, views=views, pack=AnyresPackConfig())
    return tower, {**_prefixed("encoders.clip.", vit_state), **_prefixed("connector.", conn_state),
                   "pack.newline": newline}


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


def read_instructblip_tower(path: str | Path) -> tuple[TowerConfig, dict[str, torch.Tensor]]:
    """InstructBlipForConditionalGeneration: EVA ViT -> instruction-aware Q-Former -> language_projection.

    The vision model is BLIP-2's (same keys, saved as ``instructblip_vision_model``). The Q-Former also
    reads the instruction (``QFormerConfig.text``); its tokenizer is the folder's ``qformer_tokenizer/``
    (:mod:`edgevlm.runtime.qformer_tokenizer`), not the decoder's.
    """
    path = Path(path)
    hf = read_json(path / "config.json")
    state = load_safetensors_dir(path, keep=_not_language_model)
    vision_cfg = {**(hf.get("vision_config") or {}), "model_type": "blip_2_vision_model"}
    prefix = find_prefix(state, ["model.vision_model.", "vision_model."], "embeddings.patch_embedding.weight")
    vit_cfg, vit_state = vit_from_hf(vision_cfg, state, prefix, name="eva")
    conn_cfg, conn_state = blip2_connector_from_hf(hf, state, instruction=True)
    # InstructBLIP's processor is BLIP-2's: a square resize without keeping the aspect ratio.
    tower = TowerConfig(encoders=(vit_cfg,), connector=conn_cfg, views=ViewConfig(kind="stretch"))
    return tower, {**_prefixed("encoders.eva.", vit_state), **_prefixed("connector.", conn_state)}


__all__ = ["read_llava_tower", "read_llava_next_tower", "read_blip2_tower", "read_instructblip_tower"]
