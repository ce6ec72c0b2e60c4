"""A plain transformers vision-encoder folder as one encoder of an edgevlm tower (weights format
``"transformers"``).

An edgevlm checkpoint config (``edgevlm.json``) may point an encoder at the ``save_pretrained`` folder of a
``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model`` (or ``Blip2VisionModel``; whole CLIP / SigLIP /
BLIP-2 folders through their ``vision_config``) or ``ConvNextModel``::

    {"kind": "vit", "name": "clip", "image_size": 224, "patch_size": 14, "width": 1024, ...,
     "weights": {"format": "transformers", "path": "/models/clip-vit-large-patch14"}}

The folder's ``config.json`` ``model_type`` picks the reader (:mod:`.hf_vision` or :mod:`.hf_convnext`);
it is never guessed from the folder's name. The folder's architecture must be the one the
:class:`~edgevlm.config.EncoderConfig` describes: every architectural field (width, depth, heads,
patch size, MLP size and activation, norm epsilon, biases, class token, layer scale, position grid
for the config's ``image_size``; ConvNeXt depths and dims) is compared, and the first that differs is a
:class:`~edgevlm.errors.CheckpointError` naming it, with both values. Fields that are the config's
choice rather than the folder's (which layer's features, the final norm, the class token kept,
mean/std) are taken from the config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from edgevlm.config import ConvNeXtConfig, EncoderConfig, ViTConfig
from edgevlm.errors import CheckpointError, ConfigError

from .safetensors_io import find_prefix, load_safetensors_dir, read_json

# ViTConfig fields that say how the config uses the encoder, not what the folder holds.
_VIT_CHOICES = ("feature_layer", "feature_layers", "final_norm", "keep_class_token")
# Fields never compared: the encoder's name in the tower, where its weights are, its input normalisation.
_NOT_ARCHITECTURE = ("name", "weights", "mean", "std")


def _vision_config(path: Path) -> dict:
    from .hf_vision import WHOLE_MODELS

    hf = read_json(path / "config.json")
    mt = hf.get("model_type")
    if mt in WHOLE_MODELS:  # a whole CLIP / SigLIP / BLIP-2 folder: its vision tower
        vision = hf.get("vision_config") or {}
        hf = {**vision, "model_type": vision.get("model_type") or WHOLE_MODELS[mt]}
    return hf


def first_mismatch(want: EncoderConfig, found: EncoderConfig, skip: tuple[str, ...] = ()) -> str | None:
    """The first architectural field (in declaration order) on which ``want`` and ``found`` differ, as
    ``"field: config says X, folder has Y"``; ``None`` when they agree."""
    for f in dataclasses.fields(want):
        if f.name in _NOT_ARCHITECTURE or f.name in skip:
            continue
        a, b = getattr(want, f.name), getattr(found, f.name)
        if a != b:
            return f"{f.name}: the config says {a!r}, the folder has {b!r}"
    return None


def _mismatch(path: Path, config: EncoderConfig, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: encoder {config.name!r} does not match this transformers folder: {why}")


def _read_vit(path: Path, hf: dict, config: EncoderConfig) -> dict[str, torch.Tensor]:
    from .hf_vision import _PREFIXES, FAMILIES, vit_config_from_hf, vit_from_hf

    if not isinstance(config, ViTConfig):
        raise _mismatch(path, config, f"the folder holds a ViT ({hf.get('model_type')}), the config a {config.kind!r} "
                                      "encoder")
    folder_cfg = vit_config_from_hf(hf, name=config.name, image_size=config.image_size, where=str(path))
    why = first_mismatch(config, folder_cfg, skip=_VIT_CHOICES)
    if why:
        raise _mismatch(path, config, why)
    state = load_safetensors_dir(path)
    fam = FAMILIES[hf["model_type"]]
    try:
        prefix = find_prefix(state, _PREFIXES, fam.patch + ".weight")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    choices = {k: getattr(config, k) for k in _VIT_CHOICES}
    try:
        cfg, sd = vit_from_hf(hf, state, prefix, name=config.name, image_size=config.image_size, **choices)
    except ConfigError as e:  # a feature layer the folder's depth cannot give (depth matched, so rare)
        raise _mismatch(path, config, str(e)) from None
    why = first_mismatch(config, cfg)
    if why:  # pragma: no cover - the choices came from the config itself
        raise _mismatch(path, config, why)
    return sd


def _read_convnext(path: Path, hf: dict, config: EncoderConfig) -> dict[str, torch.Tensor]:
    from .hf_convnext import _PROBE, PREFIXES, convnext_from_hf

    if not isinstance(config, ConvNeXtConfig):
        raise _mismatch(path, config, f"the folder holds a ConvNeXt, the config a {config.kind!r} encoder")
    state = load_safetensors_dir(path)
    try:
        prefix = find_prefix(state, PREFIXES, _PROBE)
        cfg, sd = convnext_from_hf(hf, state, prefix, name=config.name, image_size=config.image_size,
                                   final_norm=config.final_norm, mean=config.mean, std=config.std)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    why = first_mismatch(config, cfg)
    if why:
        raise _mismatch(path, config, why)
    return sd


def read_transformers_encoder(path: str | Path, config: EncoderConfig) -> dict[str, torch.Tensor]:
    """A transformers vision-encoder folder -> the state dict of the encoder ``config`` builds (edgevlm
    names), after checking that the folder's architecture is ``config``'s (module docstring)."""
    from .hf_vision import FAMILIES, WHOLE_MODELS

    path = Path(path)
    hf = _vision_config(path)
    mt = hf.get("model_type")
    if mt in FAMILIES:
        return _read_vit(path, hf, config)
    if mt == "convnext":
        return _read_convnext(path, hf, config)
    raise CheckpointError(f"{path}: config.json model_type {mt!r} is not a vision encoder this format reads; "
                          f"supported: {', '.join([*FAMILIES, 'convnext'])} (and whole {', '.join(WHOLE_MODELS)} "
                          "folders)")


__all__ = ["read_transformers_encoder", "first_mismatch"]
