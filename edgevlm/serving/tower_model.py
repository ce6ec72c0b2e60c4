"""The exported vision tower as a Triton Python-backend model, running its ONNX graph with ONNX Runtime
inside the model's process: for a ``tritonserver`` without the ``onnxruntime`` backend (the one bundled in
nvidia-pytriton has only the Python backend). ``write_pipeline_repository(..., tower_backend="python")``
writes it; with ``"onnxruntime"`` Triton's own backend runs the same graph and this file is unused.

Inputs are the export contract's pixel inputs, outputs its ``visual_embeds``; the model folder's
version directory holds the export (graph and manifest), checked when it loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .triton_model import error_response


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb

        from edgevlm.export.api import open_export

        self.pb = pb
        folder = Path(args["model_repository"]) / args["model_version"]
        self.run, manifest = open_export(folder, backend="onnxruntime")
        self.contract = manifest.contract
        self.output = json.loads(args["model_config"])["output"][0]["name"]

    def execute(self, requests: list) -> list:
        pb, out = self.pb, []
        for request in requests:
            try:
                views = {}
                for name, spec in zip(self.contract.encoder_names, self.contract.pixel_inputs):
                    t = pb.get_input_tensor_by_name(request, spec.name)
                    if t is None:
                        raise ValueError(f"input {spec.name!r} is required")
                    views[name] = torch.from_numpy(t.as_numpy())
                emb = self.run(views).numpy()
                out.append(pb.InferenceResponse(output_tensors=[pb.Tensor(self.output, emb)]))
            except Exception as e:  # noqa: BLE001 - this request's error
                out.append(error_response(pb, e))
        return out


__all__ = ["TritonPythonModel"]
