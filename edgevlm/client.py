"""A client of ``edgevlm serve`` (or of any Triton server loading an edgevlm model repository) with
the Pipeline's calling convention, so robot code switches from embedded to served in one line::

    pipe = edgevlm.load("demo")                                  # embedded
    pipe = Client("gpu-server:8001", protocol="grpc")            # served (from edgevlm.client): same calls
    out = pipe.generate(frame, "What color is the cube?")        # GenerateOutput
    for d in pipe.detect(frame, "red cube"): print(d.box)        # Grounding, boxes in frame pixels
    for piece in pipe.stream(frame, "Describe the scene."): ...  # gRPC only (Triton streams over gRPC)

Errors: a typed error the server raised comes back as the same class (``ImageDecodeError``,
``PromptError``, ...); an unreachable server or an unknown failure is a
:class:`~edgevlm.errors.ServingError`. Needs ``tritonclient[http,grpc]`` (``pip install edgevlm[client]``).
Images go as encoded files (a path or bytes as they are, PIL images and other arrays as PNG), an HWC
uint8 RGB array as its pixels (``image_array``). An
:class:`~edgevlm.runtime.image_embedding.ImageEmbedding` (the image through a tower run on the robot)
goes as its tensor and digest, and the server only decodes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import queue
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgevlm.runtime.boxes import Box
from edgevlm.runtime.image_embedding import ImageEmbedding
from edgevlm.runtime.pipeline import GenerateOutput
from edgevlm.runtime.structured import Detection, Grounding
from edgevlm.runtime.temporal import ReuseReport

from . import errors as _errors
from .errors import BackendUnavailableError, ConfigError, ServingError
from .serving.protocol import INPUTS, MODEL, NUMPY, STREAM_MODEL

_TYPED = re.compile(r"\b([A-Z][A-Za-z]*Error): (.*)", re.S)


def _typed_error(message: str) -> Exception:
    """The server's ``"ImageDecodeError: ..."`` -> that edgevlm error class; anything else ServingError."""
    m = _TYPED.search(message)
    if m:
        cls = getattr(_errors, m.group(1), None)
        if isinstance(cls, type) and issubclass(cls, _errors.EdgeVLMError):
            return cls(m.group(2).strip())
    return ServingError(message)


def encode_image(image) -> bytes | None:
    """A path, encoded bytes, a PIL image or an HWC uint8 array -> the bytes sent (None -> None)."""
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise _errors.ImageError(f"cannot send {type(image).__name__} as an image: pass a path, bytes, a PIL image "
                             "or an HWC uint8 array")


class Client:
    """``url``: ``host:port`` of the server's HTTP (default 8000) or gRPC (8001) endpoint, as
    ``protocol`` says. ``timeout_s``: per request (HTTP: network timeout; gRPC: the call's deadline)."""

    def __init__(self, url: str = "127.0.0.1:8000", *, protocol: str = "http", timeout_s: float = 120.0,
                 model: str = MODEL, stream_model: str = STREAM_MODEL) -> None:
        if protocol not in ("http", "grpc"):
            raise ConfigError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        try:
            if protocol == "http":
                import tritonclient.http as tc
            else:
                import tritonclient.grpc as tc
        except ImportError as e:
            raise BackendUnavailableError("the edgevlm client needs tritonclient: pip install 'edgevlm[client]'") from e
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        self.model, self.stream_model = model, stream_model
        self._tc = tc
        self._kw = {"connection_timeout": timeout_s, "network_timeout": timeout_s} if protocol == "http" else {}
        # One transport client per thread: tritonclient's HTTP client runs on gevent and fails when used
        # from another thread than its own ("Cannot switch to a different thread"), and a gRPC client
        # holds one stream at a time. So a Client may be shared by a robot's threads.
        self._local = threading.local()
        self._made: list = []
        self._made_lock = threading.Lock()

    @property
    def _client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = self._tc.InferenceServerClient(self.url, **self._kw)
            with self._made_lock:
                self._made.append(c)
        return c

    # ---- plumbing ------------------------------------------------------------------------------
    def _inputs(self, image, prompt: "str | list[dict]", *, max_new_tokens: int, temperature: float,
                deadline_s: float | None, task: str, camera: str | None = None) -> list:
        if isinstance(prompt, str):
            values: dict[str, Any] = {"prompt": prompt.encode("utf-8")}
        elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
            values = {"messages": json.dumps(list(prompt)).encode("utf-8")}
        else:
            raise _errors.PromptError("prompt must be a string or a list of chat messages ({'role': ..., "
                                      f"'content': ...}}), got {type(prompt).__name__}")
        values.update({"max_tokens": int(max_new_tokens), "temperature": float(temperature), "task": task.encode()})
        if isinstance(image, ImageEmbedding):  # encoded here: the server only decodes
            values["image_embeds"] = image.tokens.detach().to("cpu", torch.float32).numpy()[None]
            values["image_digest"] = image.digest.encode()
        elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
            values["image_array"] = np.ascontiguousarray(image)[None]  # a camera frame: pixels as they are
        elif (data := encode_image(image)) is not None:
            values["image"] = data
        if deadline_s is not None:
            values["deadline_ms"] = float(deadline_s) * 1e3
        if camera is not None:
            values["camera"] = str(camera).encode("utf-8")
        inputs = []
        for name, v in values.items():
            dtype = INPUTS[name][0]
            arr = v if isinstance(v, np.ndarray) else np.array([[v]], dtype=NUMPY[dtype])
            t = self._tc.InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(arr)
            inputs.append(t)
        return inputs

    def _infer(self, inputs: list, request_id: str = ""):
        try:
            if self.protocol == "http":
                return self._client.infer(self.model, inputs, request_id=request_id)
            return self._client.infer(self.model, inputs, request_id=request_id, client_timeout=self.timeout_s)
        except self._tc.InferenceServerException as e:
            raise _typed_error(e.message() or str(e)) from None
        except Exception as e:  # noqa: BLE001 - connection refused, reset, timeout: the transport's own types
            raise ServingError(f"request to {self.url} ({self.protocol}) failed: {type(e).__name__}: {e}") from e

    @staticmethod
    def _text(a) -> str:
        return bytes(np.asarray(a).reshape(-1)[0]).decode("utf-8")

    def _output(self, res) -> GenerateOutput:
        timings = json.loads(self._text(res.as_numpy("timings")))
        ids, text = res.as_numpy("token_ids"), res.as_numpy("text")  # no text in a stream's final response
        reuse = timings.pop("reuse", None)  # a camera's frame: what the server's tower did
        return GenerateOutput(text=self._text(text) if text is not None else "",
                              token_ids=[int(i) for i in np.asarray(ids).reshape(-1)], timings=timings,
                              stop_reason=self._text(res.as_numpy("stop_reason")),
                              info={"served_by": self.url, "batch": timings.get("batch", 1),
                                    **({"reuse": ReuseReport(**reuse)} if reuse else {})})

    # ---- the Pipeline's calls ------------------------------------------------------------------
    def generate(self, image, prompt: "str | list[dict]", *, max_new_tokens: int = 64, temperature: float = 0.0,
                 deadline_s: float | None = None, camera: str | None = None) -> GenerateOutput:
        """:meth:`edgevlm.runtime.pipeline.Pipeline.generate` on the server (one image or None).
        ``camera``: the name of the camera ``image`` is a frame of: the server encodes it with temporal
        reuse against that camera's previous frame and answers in the camera's KV slot
        (``output.info["reuse"]``: what its tower did)."""
        res = self._infer(self._inputs(image, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                       deadline_s=deadline_s, task="generate", camera=camera))
        return self._output(res)

    def _grounding(self, image, prompt: str, task: str, max_new_tokens: int, **kw) -> Grounding:
        res = self._infer(self._inputs(image, prompt, max_new_tokens=max_new_tokens, task=task, **kw))
        boxes = np.asarray(res.as_numpy("boxes")).reshape(-1, 4)
        norm = np.asarray(res.as_numpy("boxes_norm")).reshape(-1, 4)
        labels = [bytes(v).decode("utf-8") or None for v in np.asarray(res.as_numpy("labels")).reshape(-1)]
        dets = [Detection(lab, tuple(float(v) for v in b), Box(*(float(v) for v in n)))
                for lab, b, n in zip(labels, boxes, norm)]
        return Grounding(dets, self._output(res))

    def detect(self, image, phrase: str, *, max_new_tokens: int = 80, temperature: float = 0.0,
               deadline_s: float | None = None, camera: str | None = None) -> Grounding:
        """:meth:`~edgevlm.runtime.pipeline.Pipeline.detect` on the server: boxes in ``image``'s pixels
        (``camera``: as for :meth:`generate`)."""
        return self._grounding(image, phrase, "detect", max_new_tokens, temperature=temperature, deadline_s=deadline_s,
                               camera=camera)

    def ground(self, image, *, max_new_tokens: int = 160, temperature: float = 0.0,
               deadline_s: float | None = None, camera: str | None = None) -> Grounding:
        """:meth:`~edgevlm.runtime.pipeline.Pipeline.ground` on the server (the model's default prompt;
        ``camera``: as for :meth:`generate`)."""
        return self._grounding(image, "", "ground", max_new_tokens, temperature=temperature, deadline_s=deadline_s,
                               camera=camera)

    def stream(self, image, prompt: "str | list[dict]", *, max_new_tokens: int = 64, temperature: float = 0.0,
               deadline_s: float | None = None) -> "ServedStream":
        """Text pieces as the server decodes them (gRPC: Triton streams decoupled models over gRPC only).
        ``output`` of the returned stream is the GenerateOutput once it has ended."""
        if self.protocol != "grpc":
            raise ConfigError("streaming needs gRPC: Client('host:8001', protocol='grpc') (Triton's decoupled "
                              "models stream over gRPC, not HTTP)")
        inputs = self._inputs(image, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                              deadline_s=deadline_s, task="generate")
        return ServedStream(self, inputs)

    def ready(self) -> bool:
        """Whether the server answers and the model is loaded."""
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - not reachable is "not ready"
            return False

    def close(self) -> None:
        with self._made_lock:
            made, self._made = self._made, []
        for c in made:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - a gevent client closed from another thread; nothing to keep
                pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ServedStream:
    """Iterates the text pieces of one streamed answer; ``close()`` (or leaving the loop) cancels it on
    the server, which stops decoding at its next piece."""

    def __init__(self, client: Client, inputs: list) -> None:
        self._client = client
        self._q: queue.Queue = queue.Queue()
        self.output: GenerateOutput | None = None
        self._done = False
        self._pieces: list[str] = []
        grpc = client._client
        grpc.start_stream(callback=lambda result, error: self._q.put((result, error)))
        grpc.async_stream_infer(client.stream_model, inputs)

    def __iter__(self) -> Iterator[str]:
        try:
            while not self._done:
                try:
                    result, error = self._q.get(timeout=self._client.timeout_s)
                except queue.Empty:
                    raise ServingError(f"no streamed piece within {self._client.timeout_s} s") from None
                if error is not None:
                    msg = error.message() if hasattr(error, "message") else str(error)
                    raise _typed_error(msg)
                if result.as_numpy("stop_reason") is not None:  # the final response
                    self.output = dataclasses.replace(self._client._output(result), text="".join(self._pieces))
                    self._done = True
                    break
                piece = Client._text(result.as_numpy("text"))
                self._pieces.append(piece)
                yield piece
        finally:
            self.close()

    def close(self) -> None:
        if not getattr(self, "_closed", False):
            self._closed = True
            self._done = True
            self._client._client.stop_stream(cancel_requests=True)


__all__ = ["Client", "ServedStream", "encode_image"]
