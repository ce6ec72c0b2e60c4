"""A Triton model repository serving an edgevlm model through the Python backend.

::

    write_repository("demo", "served/", max_batch_size=8, options={"quant": "auto"})
    tritonserver --model-repository=served/     # a stock server: the Python backend imports edgevlm

Two models (:mod:`.protocol`): ``edgevlm``, batched by Triton's dynamic batcher, and
``edgevlm_stream``, decoupled (streams over gRPC). Their ``model.py`` only imports
:class:`~edgevlm.serving.triton_model.TritonPythonModel`, so the environment Triton's Python backend
runs in must have edgevlm installed (and, for the bundled 24.x-era backend, NumPy < 2: see
:func:`edgevlm.serving.server.check_numpy`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgevlm.errors import ConfigError

from .protocol import INPUTS, MODEL, OUTPUTS, STREAM_MODEL

_MODEL_PY = '''"""edgevlm served by Triton's Python backend (written by edgevlm.serving.repository)."""
from edgevlm.serving.triton_model import TritonPythonModel  # noqa: F401
'''


def _tensor(name: str, dtype: str, dims: tuple[int, ...], optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: TYPE_{"STRING" if dtype == "BYTES" else dtype} dims: {list(dims)}{opt} }}'


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def model_config(name: str, source: str, options: dict[str, Any], *, max_batch_size: int, batch_delay_us: int,
                 instances: int, decoupled: bool) -> str:
    """The ``config.pbtxt`` text of one of the two models."""
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch_size}", "input ["]
    lines.append(",\n".join(_tensor(n, t, d, o) for n, (t, d, o) in INPUTS.items()))
    lines += ["]", "output ["]
    lines.append(",\n".join(_tensor(n, t, d) for n, (t, d) in OUTPUTS.items()))
    lines.append("]")
    if decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    else:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {batch_delay_us} }}")
    lines.append(f"instance_group [ {{ kind: KIND_CPU count: {instances} }} ]")
    params = {"edgevlm_model": source, "edgevlm_options": json.dumps(options, sort_keys=True)}
    lines.append("parameters [")
    lines.append(",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{_escape(v)}" }} }}' for k, v in params.items()))
    lines.append("]")
    return "\n".join(lines) + "\n"


def write_repository(source: str | os.PathLike, out: str | os.PathLike, *, options: dict[str, Any] | None = None,
                     max_batch_size: int = 8, batch_delay_us: int = 2000, instances: int = 1,
                     stream: bool = True) -> Path:
    """Writes the model repository for ``source`` (a preset name or a checkpoint folder, as for
    ``edgevlm.load``) into ``out`` and returns it. ``options``: ``edgevlm.load`` keyword arguments
    (JSON-serialisable: ``quant``, ``dtype``, ``vision_backend``, ...). ``max_batch_size``: the most
    requests the dynamic batcher hands over at once (their frames share one tower call);
    ``batch_delay_us``: how long it may hold a request for others to join; ``instances``: Pipelines per
    model (each its own process and memory); ``stream``: also the decoupled streaming model."""
    options = dict(options or {})
    try:
        json.dumps(options)
    except TypeError as e:
        raise ConfigError(f"serving options must be JSON values (strings, numbers, booleans): {e}") from None
    if not 1 <= max_batch_size <= 256:
        raise ConfigError(f"max_batch_size must be in 1..256, got {max_batch_size}")
    if batch_delay_us < 0 or instances < 1:
        raise ConfigError("batch_delay_us must be >= 0 and instances >= 1")
    src = str(source)
    if Path(src).exists():  # a folder: the server may start elsewhere, so the path is made absolute
        src = str(Path(src).resolve())
    out = Path(out)
    models = [(MODEL, False)] + ([(STREAM_MODEL, True)] if stream else [])
    for name, decoupled in models:
        d = out / name
        (d / "1").mkdir(parents=True, exist_ok=True)
        (d / "1" / "model.py").write_text(_MODEL_PY)
        (d / "config.pbtxt").write_text(model_config(name, src, options, max_batch_size=max_batch_size,
                                                     batch_delay_us=batch_delay_us, instances=instances,
                                                     decoupled=decoupled))
    return out


__all__ = ["write_repository", "model_config"]
