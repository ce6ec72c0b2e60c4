"""``manifest.json``: what an export folder holds and what it was made from.

A manifest records the contract (inputs, outputs, dynamic axes, profile, tower config), the
precision, every file with its SHA-256, a digest of the tower weights it was exported from, the
tool versions, the validation result and, for TensorRT engines, the GPU it was built for. Readers
check all of it before running anything: an unreadable manifest or a file whose hash changed is
:class:`CorruptExportError`; an export of other weights, or an engine from another GPU / TensorRT
version, is :class:`StaleExportError`. Both messages say how to rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgevlm.errors import CorruptExportError, StaleExportError

from .contract import ExportContract

FORMAT = "edgevlm-export/1"
MANIFEST = "manifest.json"


@dataclass
class Manifest:
    target: str  # "onnx" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "int8"
    contract: ExportContract
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> {path, sha256, bytes}
    source: dict[str, Any] = field(default_factory=dict)  # {name, tower_sha256, weights}
    tools: dict[str, str] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] | None = None  # TensorRT: {gpu, compute_capability, tensorrt}
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "target": self.target, "precision": self.precision,
                "contract": self.contract.to_dict(), "files": self.files, "source": self.source,
                "tools": self.tools, "validation": self.validation, "device": self.device,
                "created": self.created}

    def path(self, folder: Path, role: str) -> Path:
        if role not in self.files:
            raise CorruptExportError(f"{folder / MANIFEST}: no {role!r} file listed (has {sorted(self.files)})")
        return folder / self.files[role]["path"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(folder: Path, name: str) -> dict[str, Any]:
    p = folder / name
    return {"path": name, "sha256": sha256_file(p), "bytes": p.stat().st_size}


def tower_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the tower's tensors (name, shape, values) in name order.

    Independent of where the weights came from (checkpoint, preset WeightsRef, transformers folder),
    so an export can be matched to whatever the runtime loaded. Float tensors are hashed as fp16, so
    a pipeline loaded with ``dtype="float16"`` (a robot's GPU) still matches the export made from the
    fp32 checkpoint; weights that differ only below fp16's precision count as the same.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float16)
        t = t.contiguous()
        h.update(f"{name}|{list(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    import edgevlm

    out = {"edgevlm": edgevlm.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("onnx", "onnxruntime", "tensorrt"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed (or, for tensorrt, no usable CUDA): simply not recorded
            pass
    return out


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_manifest(folder: Path, m: Manifest) -> Path:
    """Atomic: the manifest appears complete or not at all."""
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(m.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: str | os.PathLike, *, verify: bool = True) -> Manifest:
    """Read and check a manifest; ``verify`` also re-hashes every listed file."""
    folder = Path(folder)
    path = folder / MANIFEST
    rebuild = f"re-export with `edgevlm export ... --out {folder}`"
    if not path.is_file():
        raise CorruptExportError(f"{folder}: no {MANIFEST}; not an edgevlm export folder ({rebuild})")
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise CorruptExportError(f"{path}: format {d.get('format')!r}, this edgevlm reads {FORMAT!r}; {rebuild}")
        m = Manifest(target=d["target"], precision=d["precision"], contract=ExportContract.from_dict(d["contract"]),
                     files=dict(d["files"]), source=dict(d["source"]), tools=dict(d["tools"]),
                     validation=dict(d.get("validation") or {}), device=d.get("device"), created=d.get("created", ""))
    except CorruptExportError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON or a missing/mistyped field
        raise CorruptExportError(f"{path}: unreadable manifest ({type(e).__name__}: {e}); {rebuild}") from None
    if verify:
        for role, entry in m.files.items():
            p = folder / entry["path"]
            if not p.is_file():
                raise CorruptExportError(f"{folder}: {role} file {entry['path']!r} is missing; {rebuild}")
            if p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
                raise CorruptExportError(f"{p}: contents do not match the manifest's SHA-256 (truncated or "
                                         f"modified after export); {rebuild}")
    return m


def check_source(m: Manifest, digest: str, folder: Path) -> None:
    """Refuse an export made from other tower weights than the ones loaded."""
    have = m.source.get("tower_sha256")
    if have != digest:
        raise StaleExportError(f"{folder}: exported from tower weights {str(have)[:12]}…, but the loaded tower is "
                               f"{digest[:12]}…; the checkpoint changed since export. Re-export with "
                               f"`edgevlm export {m.source.get('name', 'CHECKPOINT')} --to {m.target} "
                               f"--precision {m.precision} --out {folder}`")


__all__ = ["Manifest", "read_manifest", "write_manifest", "check_source", "tower_digest", "tool_versions",
           "file_entry", "sha256_file", "FORMAT", "MANIFEST"]
