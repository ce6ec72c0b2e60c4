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


_TOWER_PY = '''"""The exported vision tower run by ONNX Runtime inside Triton's Python backend (edgevlm.serving.tower_model)."""
from edgevlm.serving.tower_model import TritonPythonModel  # noqa: F401
'''
_PIPELINE_PY = '''"""image + prompt -> tower -> decoder, by business-logic scripting (edgevlm.serving.pipeline_model)."""
from edgevlm.serving.pipeline_model import TritonPythonModel  # noqa: F401
'''
TOWER_BACKENDS = ("onnxruntime", "tensorrt", "python")


def _spec_line(name: str, dims: list[int]) -> str:
    return f'  {{ name: "{name}" data_type: TYPE_FP32 dims: {dims} }}'


def tower_config(manifest, tower_backend: str, *, batch_delay_us: int = 2000, instances: int = 1) -> str:
    """``config.pbtxt`` of the ``tower`` model for an ONNX export's manifest. Views batch dynamically
    when each image is one view (up to the contract's ``max_views``); multi-view towers fuse an image's
    views inside the graph, so a request keeps its views together (``max_batch_size: 0``)."""
    c = manifest.contract
    if c.instruction is not None or len(c.inputs) != len(c.pixel_inputs):
        raise ConfigError("this tower's graph takes more than pixels (anyres masks or an instruction); "
                          "serve it with `edgevlm serve`, whose models run the tower in the Pipeline")
    one_view = tuple(c.view_counts) == (1,)
    batch = c.profile.max_views if one_view else 0

    def dims(shape) -> list[int]:
        rest = shape[1:] if one_view else shape
        return [-1 if isinstance(d, str) else int(d) for d in rest]

    if tower_backend == "tensorrt":  # an engine built for one GPU and TensorRT version (the manifest records them)
        lines = ['name: "tower"', 'platform: "tensorrt_plan"', f"max_batch_size: {batch}",
                 f'default_model_filename: "{manifest.files["engine"]["path"]}"']
    else:
        lines = ['name: "tower"', f'backend: "{tower_backend}"', f"max_batch_size: {batch}"]
    if tower_backend == "onnxruntime":
        lines.append(f'default_model_filename: "{manifest.files["graph"]["path"]}"')
    lines += ["input ["] + [",\n".join(_spec_line(t.name, dims(t.shape)) for t in c.pixel_inputs)] + ["]"]
    lines += ["output ["] + [",\n".join(_spec_line(t.name, dims(t.shape)) for t in c.outputs)] + ["]"]
    if batch:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {batch_delay_us} }}")
    kind = "KIND_GPU" if tower_backend == "tensorrt" else "KIND_CPU"
    lines.append(f"instance_group [ {{ kind: {kind} count: {instances} }} ]" +
                 ("  # KIND_GPU on a GPU server" if kind == "KIND_CPU" else ""))
    return "\n".join(lines) + "\n"


def write_pipeline_repository(source: str | os.PathLike, out: str | os.PathLike, *,
                              options: dict[str, Any] | None = None, precision: str = "fp32",
                              tower_backend: str = "onnxruntime", max_batch_size: int = 8, batch_delay_us: int = 2000,
                              instances: int = 1, progress: bool = True) -> Path:
    """``edgevlm export SRC --to triton-repo``: the repository of :func:`write_repository` plus

    - ``tower``: the vision tower and connector exported to ONNX (``precision`` fp32 / fp16 / int8,
      validated against eager PyTorch on real images as ``edgevlm export`` does), served by Triton's
      ``onnxruntime`` backend; with ``tower_backend="tensorrt"`` a TensorRT engine built here (a GPU
      and TensorRT needed) as a ``tensorrt_plan`` model; with ``"python"`` the ONNX graph run by ONNX
      Runtime inside the Python backend (servers without the onnxruntime backend, such as nvidia-pytriton's);
      dynamic batching over views when each image is one view (the export contract's ``max_views`` is
      the largest batch), else one request's views at a time;
    - ``pipeline``: image + prompt -> ``tower`` -> ``edgevlm`` (the decoder loop, fed ``image_embeds``),
      wired by business-logic scripting (:mod:`.pipeline_model`).

    Towers whose graph takes more than pixels (anyres padding masks, InstructBLIP's instruction) are
    refused for now."""
    from edgevlm.export.api import export_tower

    if tower_backend not in TOWER_BACKENDS:
        raise ConfigError(f"tower_backend must be one of {list(TOWER_BACKENDS)}, got {tower_backend!r}")
    out = Path(out)
    write_repository(source, out, options=options, max_batch_size=max_batch_size, batch_delay_us=batch_delay_us,
                     instances=instances, stream=True)
    tower = out / "tower"
    version = tower / "1"
    manifest = export_tower(str(source), out=version, to="tensorrt" if tower_backend == "tensorrt" else "onnx",
                            precision=precision, overwrite=True, progress=progress)
    (tower / "config.pbtxt").write_text(tower_config(manifest, tower_backend, batch_delay_us=batch_delay_us,
                                                     instances=instances))
    if tower_backend == "python":
        (version / "model.py").write_text(_TOWER_PY)

    pipe = out / "pipeline"
    (pipe / "1").mkdir(parents=True, exist_ok=True)
    (pipe / "1" / "model.py").write_text(_PIPELINE_PY)
    cfg = model_config("pipeline", str(source), {}, max_batch_size=max_batch_size, batch_delay_us=batch_delay_us,
                       instances=instances, decoupled=False)
    cfg = cfg.replace('  { key: "edgevlm_model"', '  { key: "tower_model" value: { string_value: "tower" } },\n'
                      '  { key: "decoder_model" value: { string_value: "edgevlm" } },\n  { key: "edgevlm_model"')
    (pipe / "config.pbtxt").write_text(cfg)
    return out


__all__ = ["write_repository", "write_pipeline_repository", "model_config", "tower_config", "TOWER_BACKENDS"]
