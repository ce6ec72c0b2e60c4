"""Reading safetensors files and transformers-style checkpoint folders, with typed errors.

Corrupt, truncated or missing files become :class:`~edgevlm.errors.CheckpointError` naming the file;
nothing here can execute code from a checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable

import torch

from edgevlm.errors import CheckpointError, WeightsNotFoundError

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format itself caps the JSON header at 100 MB


def _check_header(path: Path) -> None:
    """Validate the 8-byte length + JSON header before handing the file to safetensors, so that a
    truncated or garbage file gets a message that says so rather than a low-level parse error."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file (truncated?)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size} (corrupt or truncated)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has no valid data_offsets") from None
        if not (0 <= start <= stop):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid offsets {start}..{stop}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: tensors need {8 + n + end} bytes but the file has {size} (truncated)")


KeyFilter = Callable[[str], bool]


def load_safetensors(path: str | os.PathLike, keep: KeyFilter | None = None) -> dict[str, torch.Tensor]:
    """Load the tensors of one ``.safetensors`` file onto the CPU (only those ``keep`` accepts)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"no such safetensors file: {path}")
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: could not read safetensors ({e})") from None


def load_safetensors_dir(folder: str | os.PathLike, keep: KeyFilter | None = None) -> dict[str, torch.Tensor]:
    """Load a transformers-style folder: ``model.safetensors`` or shards listed in its index.

    ``keep`` selects keys, so reading a vision tower out of a whole VLM does not load its LLM."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return load_safetensors(single, keep)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        wanted = {k: v for k, v in weight_map.items() if keep is None or keep(k)}
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(wanted.values())):
            out.update(load_safetensors(folder / shard, keep))
        missing = set(wanted) - set(out)
        if missing:
            raise CheckpointError(f"{index}: shards lack {len(missing)} listed tensors, e.g. {sorted(missing)[:3]}")
        return out
    raise WeightsNotFoundError(
        f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are read; "
        "convert pickled .bin checkpoints with transformers' save_pretrained(safe_serialization=True))")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"missing {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def find_prefix(state: dict[str, torch.Tensor], candidates: list[str], probe: str) -> str:
    """Return the first prefix p in ``candidates`` such that ``p + probe`` is a key of ``state``.

    Checkpoints of one architecture differ in key layout between transformers versions
    (``vision_tower.`` vs ``model.vision_tower.``); readers probe instead of assuming one.
    """
    for p in candidates:
        if p + probe in state:
            return p
    raise CheckpointError(f"none of the expected key prefixes {candidates} holds {probe!r}; "
                          f"first keys are {sorted(state)[:5]}")


def take(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """``state[key]`` with a typed error naming the missing key."""
    try:
        return state[key]
    except KeyError:
        raise CheckpointError(f"checkpoint lacks tensor {key!r}") from None
