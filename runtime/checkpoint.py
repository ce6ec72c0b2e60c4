"""edgevlm's own checkpoint directory: ``edgevlm.json`` (a ModelConfig) next to ``model.safetensors``.

Training writes it, export and the runtime read it. Keys are the module paths of the runtime model
(``tower.encoders.<name>.*``, ``tower.connector.*``, ``decoder.*``). A checkpoint may omit the
weights of components whose config names a :class:`~edgevlm.config.WeightsRef` (frozen real
encoders), so a trained connector ships in a few MB.

Writes are atomic: files go to a temporary sibling folder that is renamed into place, so an
interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from edgevlm.config import ModelConfig
from edgevlm.errors import CheckpointError, ConfigError, WeightsNotFoundError

from .readers.safetensors_io import load_safetensors, read_json

CONFIG_NAME = "edgevlm.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def save_checkpoint(path: str | os.PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                    *, metadata: dict[str, str] | None = None, overwrite: bool = False,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``config`` and ``state_dict`` to the folder ``path`` atomically. ``write_extra(folder)``
    adds files that belong beside the weights (a tokenizer) before the folder is put in place."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        doc = {"edgevlm_format": FORMAT_VERSION, "config": config.to_dict()}
        (tmp / CONFIG_NAME).write_text(json.dumps(doc, indent=2))
        # safetensors refuses shared or non-contiguous storage; a checkpoint is a plain snapshot.
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", **(metadata or {})})
        if write_extra is not None:
            write_extra(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_checkpoint_config(path: str | os.PathLike, config: ModelConfig) -> Path:
    """Replace the config of the checkpoint folder ``path``, weights untouched (e.g. a fitted
    ``answer_weight``). The file is swapped in whole, so a reader sees the old config or the new one."""
    path = Path(path)
    if not is_checkpoint_dir(path):
        raise CheckpointError(f"{path} is not an edgevlm checkpoint folder (no {CONFIG_NAME})")
    fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_NAME}.", dir=path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"edgevlm_format": FORMAT_VERSION, "config": config.to_dict()}, f, indent=2)
        os.replace(tmp, path / CONFIG_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path / CONFIG_NAME


def load_checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    doc = read_json(path / CONFIG_NAME)
    version = doc.get("edgevlm_format")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path / CONFIG_NAME}: edgevlm_format {version!r}, this edgevlm reads {FORMAT_VERSION}")
    try:
        return ModelConfig.from_dict(doc["config"])
    except KeyError:
        raise CheckpointError(f"{path / CONFIG_NAME}: no 'config' object") from None
    except ConfigError as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: invalid config: {e}") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an edgevlm checkpoint folder -> (config, state dict on CPU)."""
    path = Path(path)
    if not path.is_dir():
        raise WeightsNotFoundError(f"checkpoint folder {path} does not exist")
    config = load_checkpoint_config(path)
    weights = path / WEIGHTS_NAME
    state = load_safetensors(weights) if weights.is_file() else {}
    return config, state


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "is_checkpoint_dir", "save_checkpoint", "save_checkpoint_config",
           "load_checkpoint", "load_checkpoint_config"]
