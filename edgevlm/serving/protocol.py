"""The tensors a served edgevlm model takes and returns, shared by the Triton model
(:mod:`.triton_model`) and the client (:mod:`edgevlm.client`). Pure NumPy: no Triton import.

Every tensor has Triton's batch dimension first (the models are batched, ``max_batch_size`` > 0), and a
request carries one frame: shape ``[1, ...]``.

Inputs (``BYTES`` are UTF-8 text or raw bytes):

==============  ======  =======  =================================================================
name            type    shape    meaning
==============  ======  =======  =================================================================
``prompt``      BYTES   [1, 1]   the question (``detect``: the phrase to find)
``messages``    BYTES   [1, 1]   instead of ``prompt``: a conversation, JSON ``[{"role", "content"}, ...]``
``image``       BYTES   [1, 1]   optional: an encoded image file (JPEG, PNG, ...)
``image_array`` UINT8   [1, H, W, 3] optional, instead of ``image``: RGB pixels (a camera frame as it is)
``image_embeds`` FP32   [1, T, D] optional, instead of ``image``: the image already through the tower
``image_digest`` BYTES  [1, 1]   optional with ``image_embeds``: its digest, checked against the values
``max_tokens``  INT32   [1, 1]   optional, default 64
``temperature`` FP32    [1, 1]   optional, default 0 (greedy)
``deadline_ms`` FP32    [1, 1]   optional latency budget (``stop_reason`` "deadline" when reached)
``task``        BYTES   [1, 1]   optional: ``generate`` (default), ``detect`` or ``ground``
``camera``      BYTES   [1, 1]   optional with ``image`` / ``image_array``: the camera's name. Its frames
                                 are encoded with temporal reuse against its previous frame, and its
                                 answers keep their own KV prefix (:mod:`edgevlm.streams`)
==============  ======  =======  =================================================================

Outputs: ``text`` BYTES [1, 1]; ``token_ids`` INT64 [1, n]; ``stop_reason`` BYTES [1, 1]; ``timings``
BYTES [1, 1] (JSON: the Pipeline's timings in ms plus ``batch``, the number of requests the server
handled in the same call, and for a camera's frame ``reuse``: what the tower did, the fields of
:class:`~edgevlm.runtime.temporal.ReuseReport`); ``boxes`` FP32 [1, k, 4] (pixel edges in the frame as sent),
``boxes_norm`` FP32 [1, k, 4] (as the model printed them: 0..1 of the padded square) and ``labels``
BYTES [1, k] for ``detect`` / ``ground`` (k = 0 otherwise).

The streaming model (decoupled, gRPC only) sends one response per text piece (``text`` only) and a
last one with every output but ``text`` (``text`` empty), flagged final.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgevlm.errors import PromptError

MODEL = "edgevlm"  # batched, one response per request
STREAM_MODEL = "edgevlm_stream"  # decoupled: text pieces as they are decoded
TASKS = ("generate", "detect", "ground")
DEFAULT_MAX_TOKENS = 64

# name -> (Triton datatype, dims after the batch dimension, optional)
INPUTS: dict[str, tuple[str, tuple[int, ...], bool]] = {
    "prompt": ("BYTES", (1,), True),
    "messages": ("BYTES", (1,), True),
    "image": ("BYTES", (1,), True),
    "image_array": ("UINT8", (-1, -1, 3), True),
    "image_embeds": ("FP32", (-1, -1), True),
    "image_digest": ("BYTES", (1,), True),
    "max_tokens": ("INT32", (1,), True),
    "temperature": ("FP32", (1,), True),
    "deadline_ms": ("FP32", (1,), True),
    "task": ("BYTES", (1,), True),
    "camera": ("BYTES", (1,), True),
}
OUTPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "text": ("BYTES", (1,)),
    "token_ids": ("INT64", (-1,)),
    "stop_reason": ("BYTES", (1,)),
    "timings": ("BYTES", (1,)),
    "boxes": ("FP32", (-1, 4)),
    "boxes_norm": ("FP32", (-1, 4)),
    "labels": ("BYTES", (-1,)),
}
NUMPY = {"BYTES": np.object_, "UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}


@dataclass
class Request:
    """One request's inputs, checked."""

    prompt: str | list[dict]  # a question, or chat messages
    image: bytes | np.ndarray | None = None  # an encoded file, or HWC uint8 pixels
    embeds: np.ndarray | None = None  # [T, D]
    digest: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    deadline_s: float | None = None
    task: str = "generate"
    camera: str | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_new_tokens": self.max_tokens, "temperature": self.temperature}
        if self.deadline_s is not None:
            kw["deadline_s"] = self.deadline_s
        return kw


def _scalar(arrays: dict[str, np.ndarray], name: str):
    a = arrays.get(name)
    if a is None:
        return None
    if a.size != 1:
        raise PromptError(f"input '{name}' must hold one value per request, got shape {tuple(a.shape)}")
    return a.reshape(-1)[0]


def _text(v, name: str) -> str:
    if isinstance(v, (bytes, np.bytes_)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError as e:
            raise PromptError(f"input '{name}' is not UTF-8 text") from e
    return str(v)


def parse_request(arrays: dict[str, np.ndarray]) -> Request:
    """The inputs of one request (name -> array, batch dimension included) -> :class:`Request`;
    PromptError naming what is wrong."""
    unknown = sorted(set(arrays) - set(INPUTS))
    if unknown:
        raise PromptError(f"unknown inputs {unknown}; expected some of {sorted(INPUTS)}")
    prompt, messages = _scalar(arrays, "prompt"), _scalar(arrays, "messages")
    if (prompt is None) == (messages is None):
        raise PromptError("send one of 'prompt' (a question) and 'messages' (a JSON list of chat messages)")
    r = Request(prompt=_text(prompt, "prompt") if prompt is not None else parse_messages(_text(messages, "messages")))
    image = _scalar(arrays, "image")
    if image is not None:
        r.image = bytes(image) if isinstance(image, (bytes, np.bytes_)) else _text(image, "image").encode()
        if not r.image:
            r.image = None
    if (a := arrays.get("image_array")) is not None:
        if r.image is not None:
            raise PromptError("send one of 'image', 'image_array' and 'image_embeds'")
        if a.ndim != 4 or a.shape[0] != 1 or a.shape[3] != 3 or a.dtype != np.uint8:
            raise PromptError(f"input 'image_array' must be uint8 [1, H, W, 3], got {a.dtype} {tuple(a.shape)}")
        r.image = np.ascontiguousarray(a[0])
    if (e := arrays.get("image_embeds")) is not None:
        if r.image is not None:
            raise PromptError("send one of 'image', 'image_array' and 'image_embeds'")
        if e.ndim != 3 or e.shape[0] != 1:
            raise PromptError(f"input 'image_embeds' must be [1, visual_tokens, width], got {tuple(e.shape)}")
        r.embeds = np.ascontiguousarray(e[0], dtype=np.float32)
        if (d := _scalar(arrays, "image_digest")) is not None:
            r.digest = _text(d, "image_digest") or None
    elif "image_digest" in arrays:
        raise PromptError("'image_digest' goes with 'image_embeds'")
    if (v := _scalar(arrays, "max_tokens")) is not None:
        if not 1 <= int(v) <= 4096:
            raise PromptError(f"max_tokens must be in 1..4096, got {int(v)}")
        r.max_tokens = int(v)
    if (v := _scalar(arrays, "temperature")) is not None:
        if not (np.isfinite(v) and 0.0 <= float(v) <= 10.0):
            raise PromptError(f"temperature must be in 0..10, got {float(v)}")
        r.temperature = float(v)
    if (v := _scalar(arrays, "deadline_ms")) is not None:
        if not (np.isfinite(v) and float(v) > 0):
            raise PromptError(f"deadline_ms must be a positive number, got {float(v)}")
        r.deadline_s = float(v) / 1e3
    if (v := _scalar(arrays, "task")) is not None:
        r.task = _text(v, "task") or "generate"
        if r.task not in TASKS:
            raise PromptError(f"task must be one of {list(TASKS)}, got {r.task!r}")
    if (v := _scalar(arrays, "camera")) is not None:
        r.camera = _text(v, "camera") or None
        if r.camera is not None and (len(r.camera) > 128 or not r.camera.isprintable()):
            raise PromptError(f"camera must be a printable name of at most 128 characters, got {r.camera!r:.40}")
        if r.camera is not None and r.image is None:
            raise PromptError("'camera' goes with the camera's frame ('image' or 'image_array'), not with an "
                              "embedding: the server compares the frame's pixels with the camera's previous one")
    if r.task != "generate" and r.image is None:
        raise PromptError(f"task '{r.task}' needs an image" + (" file: boxes are given in its pixels, which an "
                                                             "embedding does not carry" if r.embeds is not None else ""))
    return r


ROLES = ("system", "user", "assistant")


def parse_messages(text: str) -> list[dict]:
    """JSON chat messages -> ``[{"role", "content"}]`` with text contents (PromptError otherwise)."""
    try:
        msgs = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptError(f"input 'messages' is not JSON: {e}") from None
    if not isinstance(msgs, list) or not msgs:
        raise PromptError("input 'messages' must be a non-empty JSON list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PromptError(f"message {i} must be {{\"role\": one of {list(ROLES)}, \"content\": text}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise PromptError("the last message must be the user's")
    return out


def response_arrays(text: str, token_ids, stop_reason: str, timings: dict, boxes=(), boxes_norm=(),
                    labels=()) -> dict[str, np.ndarray]:
    """One request's outputs as arrays with the batch dimension."""
    return {
        "text": np.array([[text.encode("utf-8")]], dtype=np.object_),
        "token_ids": np.asarray(token_ids, dtype=np.int64).reshape(1, -1),
        "stop_reason": np.array([[stop_reason.encode()]], dtype=np.object_),
        "timings": np.array([[json.dumps(timings).encode()]], dtype=np.object_),
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(1, -1, 4),
        "boxes_norm": np.asarray(boxes_norm, dtype=np.float32).reshape(1, -1, 4),
        "labels": np.array([[(lab or "").encode("utf-8") for lab in labels]], dtype=np.object_).reshape(1, -1),
    }


__all__ = ["MODEL", "STREAM_MODEL", "TASKS", "INPUTS", "OUTPUTS", "NUMPY", "Request", "parse_request", "parse_messages",
           "response_arrays", "DEFAULT_MAX_TOKENS"]
