"""An OpenAI-compatible chat endpoint in front of the Triton server: ``POST /v1/chat/completions``
(``image_url`` parts, ``stream: true`` as server-sent events) and ``GET /v1/models``, for the tools that
speak that API (vLLM's clients, Ray Serve, KServe's Hugging Face runtime, llama-server users).

It is a thin translator: each request becomes one call of :class:`edgevlm.client.Client` to the
``edgevlm`` model (or, streamed, to ``edgevlm_stream`` over gRPC), so batching, typed errors and metrics
are Triton's. Images must be ``data:`` URLs (base64): edgevlm fetches nothing from the network. One
image per request (the first ``image_url`` part); message contents become text.

Errors: a typed edgevlm error is HTTP 400 with ``{"error": {"message", "type"}}``; Triton unreachable is
502. Streams end with ``data: [DONE]``.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from edgevlm.errors import EdgeVLMError, PromptError, ServingError

MAX_BODY = 64 << 20  # a request body above this (a huge data URL) is refused before it is read


def _messages_and_image(body: dict) -> tuple[list[dict], bytes | None]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise PromptError("'messages' must be a non-empty list")
    out, image = [], None
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise PromptError(f"message {i} must be an object")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(str(part.get("text", "")))
                elif kind == "image_url":
                    url = (part.get("image_url") or {}).get("url", "") if isinstance(part.get("image_url"), dict) \
                        else str(part.get("image_url", ""))
                    if image is None:
                        image = _data_url(url)
                else:
                    raise PromptError(f"message {i}: content parts must be 'text' or 'image_url', got {kind!r}")
            content = "\n".join(t for t in texts if t)
        if not isinstance(content, str):
            raise PromptError(f"message {i}: 'content' must be text or a list of parts")
        out.append({"role": m.get("role"), "content": content})
    return out, image


def _data_url(url: str) -> bytes:
    if not url.startswith("data:"):
        raise PromptError("image_url must be a data: URL (base64); edgevlm does not fetch images over the network")
    head, _, data = url.partition(",")
    if not head.endswith(";base64"):
        raise PromptError("image_url data: URLs must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError as e:
        raise PromptError(f"image_url is not valid base64: {e}") from None


class _Handler(BaseHTTPRequestHandler):
    server: "OpenAIServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args) -> None:  # quiet: Triton logs the requests
        pass

    def _json(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, e: BaseException) -> None:
        self._json(code, {"error": {"message": str(e), "type": type(e).__name__}})

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "owned_by": "edgevlm"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "NotFound"}})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._json(404, {"error": {"message": f"no route {self.path}", "type": "NotFound"}})
        try:
            n = int(self.headers.get("Content-Length", "0"))
            if n > MAX_BODY:
                raise PromptError(f"request body of {n} bytes is above the {MAX_BODY >> 20} MB limit")
            try:
                body = json.loads(self.rfile.read(n) or b"{}")
            except json.JSONDecodeError as e:
                raise PromptError(f"the request body is not JSON: {e}") from None
            if not isinstance(body, dict):
                raise PromptError("the request body must be a JSON object")
            messages, image = _messages_and_image(body)
            kw = {"max_new_tokens": int(body.get("max_tokens") or body.get("max_completion_tokens") or 64),
                  "temperature": float(body.get("temperature") or 0.0)}
        except (EdgeVLMError, ValueError, TypeError) as e:
            return self._error(400, e if isinstance(e, EdgeVLMError) else PromptError(str(e)))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": created, "model": self.server.model_name}
        try:
            if body.get("stream"):
                return self._stream(base, image, messages, kw)
            out = self.server.client("http").generate(image, messages, **kw)
        except ServingError as e:
            return self._error(502, e)
        except EdgeVLMError as e:
            return self._error(400, e)
        self._json(200, {**base, "object": "chat.completion",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                                      "finish_reason": _finish(out.stop_reason)}],
                         "usage": {"completion_tokens": len(out.token_ids)}})

    def _stream(self, base: dict, image, messages, kw) -> None:
        stream = self.server.client("grpc").stream(image, messages, **kw)
        it = iter(stream)
        try:
            first = next(it, None)  # errors before the first piece are still an HTTP error status
        except EdgeVLMError as e:
            return self._error(502 if isinstance(e, ServingError) else 400, e)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = {**base, "object": "chat.completion.chunk"}

        def send(delta: dict, finish=None) -> None:
            ev = {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
            self.wfile.flush()

        try:
            send({"role": "assistant", "content": first or ""})
            for piece in it:
                send({"content": piece})
            send({}, _finish(stream.output.stop_reason if stream.output else "stop"))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client left: stop the served stream
            stream.close()
        except EdgeVLMError as e:  # after the headers: the error goes in the stream
            self.wfile.write(b"data: " + json.dumps({"error": {"message": str(e), "type": type(e).__name__}}).encode()
                             + b"\n\n")
        self.close_connection = True


def _finish(stop_reason: str) -> str:
    return "length" if stop_reason in ("max_new_tokens", "deadline") else "stop"


class OpenAIServer(ThreadingHTTPServer):
    """``/v1/chat/completions`` on ``host:port``, answered by the Triton server at ``http_url`` /
    ``grpc_url``. :meth:`start` serves from a daemon thread; :meth:`stop` ends it."""

    daemon_threads = True

    def __init__(self, http_url: str, grpc_url: str, *, host: str = "127.0.0.1", port: int = 8080,
                 model_name: str = "edgevlm") -> None:
        super().__init__((host, port), _Handler)
        self.http_url, self.grpc_url, self.model_name = http_url, grpc_url, model_name
        self._clients: dict[str, object] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def client(self, protocol: str):
        """One edgevlm Client per protocol, shared by the handler threads (it keeps one transport per thread)."""
        from edgevlm.client import Client

        with self._lock:
            if protocol not in self._clients:
                self._clients[protocol] = Client(self.http_url if protocol == "http" else self.grpc_url,
                                                 protocol=protocol)
            return self._clients[protocol]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "OpenAIServer":
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        for c in self._clients.values():
            c.close()


__all__ = ["OpenAIServer"]
