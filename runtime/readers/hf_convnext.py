"""transformers ``ConvNextModel`` checkpoints -> (:class:`ConvNeXtConfig`, state dict for
:class:`edgevlm.runtime.vision.convnext.ConvNeXt`).

Key renaming (transformers -> edgevlm, which uses timm's names)::

    embeddings.patch_embeddings.*                     stem.0.*
    embeddings.layernorm.*                            stem.1.*
    encoder.stages.i.downsampling_layer.{0,1}.*       stages.i.downsample.{0,1}.*
    encoder.stages.i.layers.j.dwconv.*                stages.i.blocks.j.conv_dw.*
    encoder.stages.i.layers.j.layernorm.*             stages.i.blocks.j.norm.*
    encoder.stages.i.layers.j.pwconv{1,2}.*           stages.i.blocks.j.mlp.fc{1,2}.*
    encoder.stages.i.layers.j.layer_scale_parameter   stages.i.blocks.j.gamma
    layernorm.*                                       head.norm.*            (final_norm only)

Epsilons: transformers hard-codes 1e-6 for every norm inside the trunk (= ``norm_eps``), but the
final ``layernorm`` uses ``layer_norm_eps`` from config.json (1e-12 in the facebook checkpoints).
ConvNeXtConfig has one ``norm_eps`` for all norms, so the final norm runs with 1e-6; the difference
is eps / var(pooled features), far below fp32 noise for any trained model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from edgevlm.config import IMAGENET_MEAN, IMAGENET_STD, RGB, ConvNeXtConfig
from edgevlm.errors import CheckpointError, ConfigError

from edgevlm.runtime.vision.convnext import ConvNeXt
from .safetensors_io import find_prefix, load_safetensors_dir, read_json, take

# edgevlm key (regex) -> transformers key (template); applied to the keys of ConvNeXt(cfg).
_RENAMES: list[tuple[re.Pattern, str]] = [(re.compile(a), b) for a, b in [
    (r"^stem\.0\.", "embeddings.patch_embeddings."),
    (r"^stem\.1\.", "embeddings.layernorm."),
    (r"^stages\.(\d+)\.downsample\.(\d)\.", r"encoder.stages.\1.downsampling_layer.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"encoder.stages.\1.layers.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"encoder.stages.\1.layers.\2.layernorm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc(\d)\.", r"encoder.stages.\1.layers.\2.pwconv\3."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", r"encoder.stages.\1.layers.\2.layer_scale_parameter"),
    (r"^head\.norm\.", "layernorm."),
]]

# Prefixes under which a ConvNextModel's weights appear: a bare ConvNextModel, the backbone of
# ConvNextForImageClassification, and the usual wrappers of a vision tower inside a VLM.
PREFIXES = ["", "convnext.", "model.", "vision_model.", "vision_tower."]
_PROBE = "embeddings.patch_embeddings.weight"


def hf_key(key: str) -> str:
    """transformers' name for an edgevlm ConvNeXt state-dict key."""
    for pat, repl in _RENAMES:
        new, n = pat.subn(repl, key)
        if n:
            return new
    raise KeyError(f"no transformers name for ConvNeXt key {key!r}")


def _hf_int_list(hf_config: dict, field: str) -> tuple[int, ...]:
    v = hf_config.get(field)
    if not isinstance(v, list) or not v or not all(isinstance(i, int) and i > 0 for i in v):
        raise CheckpointError(f"config.json: {field} must be a non-empty list of positive ints, got {v!r}")
    return tuple(v)


def config_from_hf(hf_config: dict, *, name: str, layer_scale: bool, image_size: int | None = None,
                   final_norm: bool = False, mean: RGB = IMAGENET_MEAN, std: RGB = IMAGENET_STD) -> ConvNeXtConfig:
    """Translate a transformers ConvNextConfig dict, refusing what this module cannot run."""
    model_type = hf_config.get("model_type", "convnext")
    if model_type != "convnext":
        # ConvNeXt V2 adds GRN layers to every block; running it as V1 would be silently wrong.
        raise CheckpointError(f"config.json: model_type {model_type!r} is not 'convnext'")
    for field, want in (("hidden_act", "gelu"), ("patch_size", 4), ("num_channels", 3)):
        got = hf_config.get(field, want)
        if got != want:
            raise CheckpointError(f"config.json: {field}={got!r} is not supported (edgevlm's ConvNeXt has {want!r})")
    depths, dims = _hf_int_list(hf_config, "depths"), _hf_int_list(hf_config, "hidden_sizes")
    if len(depths) != len(dims) or hf_config.get("num_stages", len(dims)) != len(dims):
        raise CheckpointError(f"config.json: depths {list(depths)}, hidden_sizes {list(dims)} and "
                              f"num_stages {hf_config.get('num_stages')} disagree")
    try:
        return ConvNeXtConfig(name=name, image_size=image_size or int(hf_config.get("image_size", 224)),
                              depths=depths, dims=dims, norm_eps=1e-6, layer_scale=layer_scale,
                              final_norm=final_norm, mean=mean, std=std)
    except ConfigError as e:
        raise CheckpointError(f"config.json describes an invalid ConvNeXt: {e}") from None


def convnext_from_hf(hf_config: dict, state: dict[str, torch.Tensor], prefix: str = "", *, name: str,
                     image_size: int | None = None, final_norm: bool = False, mean: RGB = IMAGENET_MEAN,
                     std: RGB = IMAGENET_STD) -> tuple[ConvNeXtConfig, dict[str, torch.Tensor]]:
    """Convert transformers ConvNextModel weights found under ``prefix`` in ``state``.

    The returned state dict loads with ``strict=True`` into ``ConvNeXt(cfg)``. Missing tensors,
    wrong shapes and stages deeper than config.json says raise :class:`CheckpointError`.
    """
    # Layer scale is decided by the weights themselves (layer_scale_init_value=0 drops the
    # parameter); config.json only says how it was initialised.
    layer_scale = f"{prefix}encoder.stages.0.layers.0.layer_scale_parameter" in state
    cfg = config_from_hf(hf_config, name=name, layer_scale=layer_scale, image_size=image_size,
                         final_norm=final_norm, mean=mean, std=std)
    with torch.device("meta"):  # shapes only; allocates nothing
        expected = {k: v.shape for k, v in ConvNeXt(cfg).state_dict().items()}

    out: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        src = prefix + hf_key(key)
        t = take(state, src)
        if t.shape != shape:
            raise CheckpointError(f"tensor {src!r} (edgevlm {key!r}): expected shape {tuple(shape)} from config.json, "
                                  f"found {tuple(t.shape)}")
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {src!r}: expected a floating-point tensor, found {t.dtype}")
        out[key] = t

    # Trunk tensors nobody consumed mean config.json and the weights disagree (e.g. a deeper stage);
    # other leftovers (a classifier, the pooled norm when final_norm=False) are legitimately unused.
    used = {prefix + hf_key(k) for k in expected}
    extra = sorted(k for k in state if k.startswith(prefix + "encoder.") and k not in used)
    if extra:
        raise CheckpointError(f"{len(extra)} encoder tensors are not described by config.json "
                              f"(depths {list(cfg.depths)}), e.g. {extra[:3]}")
    return cfg, out


def read_hf_convnext_dir(path: str | os.PathLike, *, name: str = "convnext",
                         **kw) -> tuple[ConvNeXtConfig, dict[str, torch.Tensor]]:
    """Read a ``save_pretrained`` folder (config.json + model.safetensors or shards).

    ``kw`` is passed to :func:`convnext_from_hf` (image_size, final_norm, mean, std).
    """
    path = Path(path)
    hf_config = read_json(path / "config.json")
    state = load_safetensors_dir(path)
    try:
        prefix = find_prefix(state, PREFIXES, _PROBE)
        return convnext_from_hf(hf_config, state, prefix, name=name, **kw)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


__all__ = ["convnext_from_hf", "read_hf_convnext_dir", "config_from_hf", "hf_key", "PREFIXES"]
