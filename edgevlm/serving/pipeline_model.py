"""The ``pipeline`` model of a repository from :func:`~.repository.write_pipeline_repository`: Triton's
business-logic scripting (BLS) wiring an image and a prompt through the other models of the repository.

    image bytes --(decode, preprocess: here)--> views --(model "tower": ONNX Runtime / TensorRT)-->
    visual embeddings --(model "edgevlm": the decoder loop, image_embeds input)--> text, ids, timings

Preprocessing follows the tower export's own configuration (its manifest), so the views are the ones
the graph was validated on. ``generate`` only: ``detect`` / ``ground`` give boxes in the frame's pixels
and go to the ``edgevlm`` model with the image. Each request gets its own response or error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgevlm.errors import PromptError

from .protocol import OUTPUTS, parse_request
from .triton_model import DownstreamError, error_response, input_arrays


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb

        from edgevlm.export.manifest import read_manifest
        from edgevlm.runtime.preprocess import Preprocessor

        self.pb = pb
        params = {k: v.get("string_value", "") for k, v in
                  json.loads(args["model_config"]).get("parameters", {}).items()}
        self.tower_model, self.decoder_model = params["tower_model"], params["decoder_model"]
        tower_dir = Path(args["model_repository"]).parent / self.tower_model / "1"
        self.contract = read_manifest(tower_dir).contract
        self.pre = Preprocessor(self.contract.tower_config())

    def _call(self, model: str, tensors: list, outputs: list[str]):
        pb = self.pb
        res = pb.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=tensors).exec()
        if res.has_error():
            raise DownstreamError(res.error().message())
        return res

    def _answer(self, request):
        pb = self.pb
        arrays = input_arrays(pb, request)
        r = parse_request(arrays)
        if r.camera is not None:
            raise PromptError("send a camera's frames to the 'edgevlm' model: it keeps each camera's tower state for "
                              "temporal reuse, which the exported tower here does not")
        if r.task != "generate" or r.image is None or r.embeds is not None:
            raise PromptError("the pipeline model answers task 'generate' about one image file; send detect / ground, "
                              "text-only prompts and embeddings to the 'edgevlm' model")
        from edgevlm.runtime.image_io import load_image

        pre = self.pre([load_image(r.image)])  # an encoded file or HWC uint8 pixels, checked alike
        views = [pb.Tensor(spec.name, np.ascontiguousarray(pre.views[name].numpy()))
                 for name, spec in zip(self.contract.encoder_names, self.contract.pixel_inputs)]
        out_name = self.contract.output_names[0]
        emb = pb.get_output_tensor_by_name(self._call(self.tower_model, views, [out_name]), out_name).as_numpy()
        passed = [pb.Tensor(n, a) for n, a in arrays.items() if n not in ("image", "image_array", "image_digest")]
        passed.append(pb.Tensor("image_embeds", np.ascontiguousarray(emb.reshape(1, -1, emb.shape[-1]))))
        res = self._call(self.decoder_model, passed, list(OUTPUTS))
        return pb.InferenceResponse(output_tensors=[pb.get_output_tensor_by_name(res, n) for n in OUTPUTS])

    def execute(self, requests: list) -> list:
        out = []
        for request in requests:
            try:
                out.append(self._answer(request))
            except Exception as e:  # noqa: BLE001 - this request's error
                out.append(error_response(self.pb, e))
        return out


__all__ = ["TritonPythonModel"]
