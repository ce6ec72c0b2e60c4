"""What the caller asked to load, decided once: :func:`resolve_source` turns a preset name, a
:class:`~edgevlm.config.ModelConfig`, an edgevlm checkpoint folder, a transformers folder or a
``.gguf`` file into a :class:`ModelSource`. The full loader (:mod:`.loader`) and the tower-only
loader (:func:`.tower.load_vision_tower`) both start here, so a source means the same to both and
a bad one gets the same typed error. Nothing but small JSON files is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevlm.config import ModelConfig
from edgevlm.errors import CheckpointError, UnknownPresetError, WeightsNotFoundError
from edgevlm.presets import PRESETS, get_preset

from .checkpoint import is_checkpoint_dir
from .readers.minigpt4 import is_minigpt4_config, is_minigpt4_dir
from .readers.safetensors_io import read_json
from .readers.sphinx_pth import is_sphinx_dir, llama_type

KINDS = ("config", "checkpoint", "transformers", "gguf", "sphinx", "minigpt4")


@dataclass(frozen=True)
class ModelSource:
    """``kind``: ``config`` (a preset or a ModelConfig: random weights allowed where the config names
    none), ``checkpoint`` (an edgevlm folder), ``transformers`` (a ``config.json`` folder, with its
    ``model_type``), ``gguf`` (a file) or ``sphinx`` (a LLaMA2-Accessory folder of
    ``consolidated.NN-of-MM.model.pth`` shards; ``model_type`` is its meta.json llama_type) or
    ``minigpt4`` (a MiniGPT-4 eval config ``.yaml``, or a folder holding one: :mod:`.readers.minigpt4`). ``name``
    is the source as the caller named it (a preset name, a config's name, a path); exports made on
    first use are cached under it."""

    kind: str
    name: str
    config: ModelConfig | None = None
    path: Path | None = None
    model_type: str | None = None

    @property
    def allows_random(self) -> bool:
        return self.kind == "config"


def resolve_source(source: Any) -> ModelSource:
    if isinstance(source, ModelSource):
        return source
    if isinstance(source, ModelConfig):
        return ModelSource("config", source.name, config=source)
    if isinstance(source, str) and source in PRESETS:
        return ModelSource("config", source, config=get_preset(source))
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is not None and path.is_file():
        if is_minigpt4_config(path):  # a MiniGPT-4 eval config (.yaml) names its weights itself
            return ModelSource("minigpt4", str(path), path=path)
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: only .gguf files load directly; other checkpoints are folders")
        return ModelSource("gguf", str(path), path=path)
    if path is not None and path.is_dir():
        if is_checkpoint_dir(path):
            return ModelSource("checkpoint", str(path), path=path)
        if is_sphinx_dir(path):  # before config.json: a SPHINX folder's config.json holds LLaMA ModelArgs
            return ModelSource("sphinx", str(path), path=path, model_type=llama_type(path))
        if is_minigpt4_dir(path):  # before config.json, like SPHINX: its .yaml names the weights elsewhere
            return ModelSource("minigpt4", str(path), path=path)
        if (path / "config.json").is_file():
            return ModelSource("transformers", str(path), path=path,
                               model_type=read_json(path / "config.json").get("model_type"))
        raise WeightsNotFoundError(f"{path}: neither an edgevlm checkpoint (edgevlm.json) nor a transformers "
                                   "folder (config.json)")
    raise UnknownPresetError(f"{source!r} is neither a preset ({', '.join(PRESETS)}), a folder, nor a .gguf file")


__all__ = ["ModelSource", "resolve_source", "KINDS"]
