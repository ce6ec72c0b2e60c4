"""edgevlm as a model of Triton Inference Server's Python backend.

A model repository written by :func:`edgevlm.serving.repository.write_repository` holds two models whose
``model.py`` is one line importing :class:`TritonPythonModel` from here; their ``config.pbtxt``
names the edgevlm model to load and its load options (parameters ``edgevlm_model`` and
``edgevlm_options``). Triton runs each in its own stub process, in the Python environment edgevlm is
installed in; tensors are described in :mod:`.protocol`.

- ``edgevlm`` (batched): Triton's dynamic batcher hands :meth:`execute` the requests that arrived
  together; their frames go through the vision tower in one batched call, then each is answered from
  the tower's embedding cache. Each request gets its own response: a bad one gets an error naming the
  typed error (``ImageDecodeError: ...``) and the others are answered. Frames sent with a ``camera``
  name go through a :class:`~edgevlm.runtime.temporal.TemporalTower` instead (one batched call for the
  cameras of the batch, each against its own previous frame) and are answered in that camera's KV slot.
- ``edgevlm_stream`` (decoupled): one response per text piece, then a final one with the ids, stop
  reason and timings. A client that goes away closes the stream at the next piece.

Nothing here raises out of :meth:`execute`: a failure is a response, and the server keeps serving.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np

from edgevlm.errors import PromptError

from .protocol import INPUTS, Request, parse_request, response_arrays


class DownstreamError(Exception):
    """Another model of the repository answered with this error text (already ``"TypeName: message"``)."""


def error_response(pb, e: BaseException):
    """A response carrying ``e`` the way the client reads typed errors back (``"ImageDecodeError: ..."``);
    a :class:`DownstreamError` passes through as it is."""
    text = str(e) if isinstance(e, DownstreamError) else f"{type(e).__name__}: {e}"
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(text))


def input_arrays(pb, request) -> dict[str, np.ndarray]:
    """The protocol inputs (:data:`~.protocol.INPUTS`) a request carries, by name."""
    return {n: t.as_numpy() for n in INPUTS if (t := pb.get_input_tensor_by_name(request, n)) is not None}


class TritonPythonModel:
    """The Python backend's model interface: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb  # provided by Triton's stub process only

        import edgevlm

        self.pb = pb
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.decoupled = bool(pb.using_decoupled_model_transaction_policy(config))
        options = json.loads(params.get("edgevlm_options") or "{}")
        self.pipe = edgevlm.load(params["edgevlm_model"], progress=False, **options)
        self.cameras: OrderedDict = OrderedDict()  # camera name -> CameraState, least recently seen first
        self._temporal = None  # made on the first camera frame

    #: camera states kept (the least recently seen is dropped past this; its next frame is encoded whole)
    max_cameras = 64

    # ---- helpers ---------------------------------------------------------------------------------
    def _frame(self, r: Request):
        if r.embeds is not None:
            import torch

            from edgevlm.runtime.image_embedding import ImageEmbedding

            return ImageEmbedding(torch.from_numpy(r.embeds), r.digest)  # ShapeError if the digest disagrees
        if r.image is None:
            return None
        from edgevlm.runtime.image_io import DEFAULT_MAX_PIXELS, load_image

        tower = self.pipe.tower
        if tower is None:
            raise PromptError(f"model {self.pipe.name!r} has no vision tower; send no image")
        return load_image(r.image, max_pixels=tower.max_image_pixels or DEFAULT_MAX_PIXELS)

    def _tensors(self, arrays: dict[str, np.ndarray]) -> list:
        return [self.pb.Tensor(name, a) for name, a in arrays.items()]

    def _answer(self, r: Request, frame, batch: int, camera: tuple | None = None):
        """``camera``: (the frame's ImageEmbedding, its ReuseReport or None, the frame's (h, w)) for a
        camera's frame, answered from that embedding in the camera's KV slot."""
        kw = r.generate_kwargs()
        boxes, norm, labels = [], [], []
        extra: dict = {}
        if camera is not None:
            frame, report, size = camera
            kw["kv_slot"] = ("camera", r.camera)
            if report is not None:
                extra["reuse"] = {"mode": report.mode, "reason": report.reason, "cells": report.cells,
                                  "encoded": report.encoded, "max_change": report.max_change}
        if r.task == "generate":
            out = self.pipe.generate(frame, r.prompt, **kw)
        else:
            if camera is not None:
                kw["size"] = size
            found = (self.pipe.detect(frame, r.prompt, **kw) if r.task == "detect"
                     else self.pipe.ground(frame, **kw))
            out = found.output
            boxes, norm, labels = [d.box for d in found], [d.box_norm.as_tuple() for d in found], [d.label for d in found]
        timings = {**out.timings, "batch": batch, **extra}
        arrays = response_arrays(out.text, out.token_ids, out.stop_reason, timings, boxes, norm, labels)
        return self.pb.InferenceResponse(output_tensors=self._tensors(arrays))

    # ---- the backend's entry points ------------------------------------------------------------
    def execute(self, requests: list):
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        parsed: list = []
        frames: dict[int, object] = {}  # request -> HWC pixels, or the ImageEmbedding it sent
        for i, request in enumerate(requests):
            try:
                r = parse_request(input_arrays(self.pb, request))
                f = self._frame(r)
            except Exception as e:  # noqa: BLE001 - this request's error response
                parsed.append(e)
                continue
            parsed.append(r)
            if f is not None:
                frames[i] = f
        tower = self.pipe.tower
        cams = {i: r for i, r in enumerate(parsed) if i in frames and not isinstance(r, Exception) and r.camera}
        encoded = self._encode_cameras(cams, frames) if cams else {}
        pixels = [f for i, f in frames.items() if isinstance(f, np.ndarray) and i not in cams]  # not embeddings sent
        # (an InstructBLIP tower encodes each image with its prompt, so it cannot be batched ahead)
        if len(pixels) > 1 and tower is not None and tower.embedding_cache.enabled and not tower.takes_instruction:
            try:  # the frames of this batch through the tower at once; each answer then hits its cache
                tower.embed_each(pixels)
            except Exception:  # noqa: BLE001 - each request meets (and reports) its own failure below
                pass
        responses = []
        for i, r in enumerate(parsed):
            if isinstance(r, Exception):
                responses.append(error_response(self.pb, r))
                continue
            try:
                got = encoded.get(i)
                if isinstance(got, Exception):
                    raise got
                responses.append(self._answer(r, frames.get(i), len(requests), got))
            except Exception as e:  # noqa: BLE001 - typed errors and anything else become this response's error
                responses.append(error_response(self.pb, e))
        return responses

    def _encode_cameras(self, cams: dict[int, Request], frames: dict[int, object]) -> dict[int, object]:
        """Camera frames of one batch -> request index -> (ImageEmbedding, ReuseReport or None, (h, w)), or
        the exception its encoding met. Through the TemporalTower in as few calls as the batch allows
        (one per repeat of a camera: each frame against the one before it); a tower it cannot run (an
        exported graph, any-resolution views) encodes the frames whole, still batched."""
        from edgevlm.errors import ConfigError
        from edgevlm.runtime.image_embedding import ImageEmbedding
        from edgevlm.runtime.temporal import CameraState, TemporalTower

        tower = self.pipe.tower
        if tower is None:
            return {i: PromptError(f"model {self.pipe.name!r} has no vision tower; send no camera frames") for i in cams}
        if self._temporal is None:
            try:
                self._temporal = TemporalTower(tower)
            except ConfigError as e:
                self._temporal = e  # reuse cannot run here: frames are encoded whole
        out: dict[int, object] = {}
        todo = list(cams)
        while todo:
            now, seen = [], set()
            for i in todo:  # a camera's second frame in the same batch waits for the next call
                if cams[i].camera not in seen:
                    seen.add(cams[i].camera)
                    now.append(i)
            todo = [i for i in todo if i not in now]
            imgs = [frames[i] for i in now]
            try:
                if isinstance(self._temporal, TemporalTower):
                    states = [self._camera_state(cams[i].camera, CameraState) for i in now]
                    res = [(ImageEmbedding(e), rep) for e, rep in self._temporal.encode(imgs, states)]
                else:
                    res = [(ImageEmbedding(e), None) for e in tower.embed_each(imgs)]
                for i, (emb, rep) in zip(now, res):
                    out[i] = (emb, rep, tuple(int(v) for v in frames[i].shape[:2]))
            except Exception as e:  # noqa: BLE001 - these requests' error; the rest of the batch goes on
                for i in now:
                    out[i] = e
        return out

    def _camera_state(self, name: str, make):
        st = self.cameras.pop(name, None) or make()
        self.cameras[name] = st
        while len(self.cameras) > self.max_cameras:
            self.cameras.popitem(last=False)
        return st

    def _stream(self, request) -> None:
        pb = self.pb
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        sender = request.get_response_sender()
        stream = None
        try:
            r = parse_request(input_arrays(self.pb, request))
            if r.task != "generate":
                raise PromptError(f"the streaming model answers task 'generate' only, got {r.task!r}; "
                                  "send detect / ground to the batched model")
            if r.camera is not None:
                raise PromptError("send a camera's frames to the batched model 'edgevlm': it batches the cameras' "
                                  "frames through the tower and keeps each camera's state")
            stream = self.pipe.stream(self._frame(r), r.prompt, **r.generate_kwargs())
            for piece in stream:
                if request.is_cancelled():  # the client went away or cancelled: stop decoding now
                    break
                sender.send(pb.InferenceResponse(output_tensors=[
                    pb.Tensor("text", np.array([[piece.encode("utf-8")]], dtype=np.object_))]))
            stream.close()
            out = stream.output
            arrays = response_arrays("", out.token_ids, out.stop_reason, {**out.timings, "batch": 1})
            del arrays["text"]
            sender.send(pb.InferenceResponse(output_tensors=self._tensors(arrays)), flags=final)
        except Exception as e:  # noqa: BLE001 - reported to this client; the server keeps serving
            if stream is not None:
                stream.close()
            try:
                sender.send(error_response(self.pb, e), flags=final)
            except Exception:  # noqa: BLE001 - the client is gone; nothing left to tell
                pass

    def finalize(self) -> None:
        self.pipe = None


__all__ = ["TritonPythonModel", "DownstreamError", "error_response", "input_arrays"]
