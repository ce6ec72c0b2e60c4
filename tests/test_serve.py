"""`edgevlm serve`: the Triton model repository, the server's environment, and (where Triton's server is
installed: `make test` runs this file again in .venv-serve) the served demo model against the in-process
Pipeline, over HTTP and gRPC, with concurrent frames, streaming and bad requests.

Everything runs on loopback; the server is the tritonserver bundled in nvidia-pytriton, on CPU."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import sysconfig
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import edgevlm
from edgevlm.errors import ConfigError, ImageDecodeError, ImageSizeError, PromptError, ServingError
from edgevlm.serving.protocol import parse_request
from edgevlm.serving.repository import write_repository
from edgevlm.serving.server import check_numpy, free_ports, server_env

from edgevlm_testkit import png_claiming

ASSETS = Path(edgevlm.__file__).resolve().parent / "assets"
OPTIONS = {"reuse_prefix": False}  # the served models' load options, and the in-process reference's


# ---- without a server ----------------------------------------------------------------------------

def test_server_env_puts_this_interpreters_libpython_first():
    """Triton's Python stub finds libpython through the loader: left alone it took the system's
    libpython3.11 and failed on a stdlib mismatch ('_thread.RLock' object has no attribute
    '_recursion_count'). The server's environment names this interpreter's own library first."""
    env = server_env(Path("/opt/triton-libs"), base={"LD_LIBRARY_PATH": "/usr/lib/x86_64-linux-gnu", "PATH": "/bin"})
    parts = env["LD_LIBRARY_PATH"].split(":")
    libdir = sysconfig.get_config_var("LIBDIR")
    assert parts[0] == libdir and parts.index("/opt/triton-libs") < parts.index("/usr/lib/x86_64-linux-gnu")
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)  # the stub runs this environment


def test_numpy_2_is_refused_before_it_corrupts_inputs():
    with pytest.raises(ConfigError, match="NumPy 2.4.6 .* needs NumPy < 2"):
        check_numpy("2.4.6")
    check_numpy("1.26.4")


def test_repository_holds_both_models_and_the_load_options(tmp_path):
    repo = write_repository("demo", tmp_path / "repo", options={"quant": "int8", "dtype": "float32"},
                            max_batch_size=4, batch_delay_us=500)
    batched = (repo / "edgevlm" / "config.pbtxt").read_text()
    stream = (repo / "edgevlm_stream" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in batched and "max_queue_delay_microseconds: 500" in batched
    assert "decoupled: true" in stream and "decoupled" not in batched
    assert '\\"quant\\": \\"int8\\"' in batched and 'string_value: "demo"' in batched
    assert "TritonPythonModel" in (repo / "edgevlm" / "1" / "model.py").read_text()
    assert not (write_repository("demo", tmp_path / "one", stream=False) / "edgevlm_stream").exists()
    with pytest.raises(ConfigError, match="JSON"):
        write_repository("demo", tmp_path / "bad", options={"dtype": object()})
    with pytest.raises(ConfigError, match="max_batch_size"):
        write_repository("demo", tmp_path / "bad", max_batch_size=0)


def _arr(v, dtype=np.object_):
    return np.array([[v]], dtype=dtype)


def test_requests_are_checked_field_by_field():
    r = parse_request({"prompt": _arr(b"Hi"), "max_tokens": _arr(5, np.int32), "deadline_ms": _arr(250.0, np.float32)})
    assert (r.prompt, r.max_tokens, r.deadline_s, r.task, r.image) == ("Hi", 5, 0.25, "generate", None)
    px = np.zeros((1, 5, 7, 3), np.uint8)
    assert parse_request({"prompt": _arr(b"x"), "image_array": px}).image.shape == (5, 7, 3)
    with pytest.raises(PromptError, match="uint8 \\[1, H, W, 3\\]"):
        parse_request({"prompt": _arr(b"x"), "image_array": px.astype(np.float32)})
    with pytest.raises(PromptError, match="send one of 'image', 'image_array'"):
        parse_request({"prompt": _arr(b"x"), "image": _arr(b"abc"), "image_array": px})
    chat = parse_request({"messages": _arr(b'[{"role": "user", "content": "Hi"}]')})
    assert chat.prompt == [{"role": "user", "content": "Hi"}]
    bad = [({}, "send one of 'prompt'"),
           ({"prompt": _arr(b"x"), "messages": _arr(b"[]")}, "send one of 'prompt'"),
           ({"messages": _arr(b"not json")}, "not JSON"),
           ({"messages": _arr(b'[{"role": "robot", "content": "x"}]')}, "message 0 must be"),
           ({"messages": _arr(b'[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]')},
            "last message must be the user's"),
           ({"prompt": _arr(b"x"), "max_tokens": _arr(0, np.int32)}, "max_tokens must be in 1..4096"),
           ({"prompt": _arr(b"x"), "temperature": _arr(np.nan, np.float32)}, "temperature"),
           ({"prompt": _arr(b"x"), "task": _arr(b"segment")}, "task must be one of"),
           ({"prompt": _arr(b"cup"), "task": _arr(b"detect")}, "needs an image"),
           ({"prompt": _arr(b"\xff\xfe")}, "not UTF-8"),
           ({"prompt": _arr(b"x"), "images": _arr(b"")}, "unknown inputs"),
           ({"prompt": np.array([[b"a", b"b"]], dtype=np.object_)}, "one value per request")]
    for arrays, msg in bad:
        with pytest.raises(PromptError, match=msg):
            parse_request(arrays)


def test_camera_requests_are_checked():
    px = np.zeros((1, 5, 7, 3), np.uint8)
    assert parse_request({"prompt": _arr(b"x"), "image_array": px, "camera": _arr(b"front")}).camera == "front"
    assert parse_request({"prompt": _arr(b"x"), "image_array": px}).camera is None
    for arrays, msg in [({"prompt": _arr(b"x"), "camera": _arr(b"front")}, "goes with the camera's frame"),
                        ({"prompt": _arr(b"x"), "image_array": px, "camera": _arr(b"f" * 200)}, "at most 128"),
                        ({"prompt": _arr(b"x"), "image_embeds": np.zeros((1, 3, 4), np.float32),
                          "camera": _arr(b"front")}, "not with an embedding")]:
        with pytest.raises(PromptError, match=msg):
            parse_request(arrays)


def test_client_raises_the_servers_typed_error():
    from edgevlm.client import _typed_error

    e = _typed_error("[StatusCode.INVALID_ARGUMENT] ImageDecodeError: 12 bytes: not a supported image: ...")
    assert type(e) is ImageDecodeError and str(e).startswith("12 bytes: not a supported image")
    assert type(_typed_error("in ensemble: KeyError: 'x'")) is ServingError
    assert type(_typed_error("connection refused")) is ServingError


# ---- a served demo model ---------------------------------------------------------------------------

def _serving_missing() -> str | None:
    if importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None:
        return "needs Triton's server and client (nvidia-pytriton, tritonclient): `make test` runs this file in .venv-serve"
    if int(np.__version__.split(".")[0]) >= 2:
        return "Triton's bundled Python backend needs NumPy < 2; `make test` runs this file in .venv-serve"
    return None


needs_server = pytest.mark.skipif(_serving_missing() is not None, reason=str(_serving_missing()))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from edgevlm.serving.server import TritonServer

    # No KV prefix reuse here or in `pipe`: a reused prefix is prefilled in other chunks than a whole prompt,
    # which can tip a greedy near-tie, so answers would depend on each Pipeline's history of calls.
    repo = write_repository("demo", tmp_path_factory.mktemp("repo"), options=OPTIONS, max_batch_size=8,
                            batch_delay_us=20000)
    http, grpc, metrics = free_ports(3)
    with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics) as s:
        yield s


@pytest.fixture(scope="module")
def pipe():
    return edgevlm.load("demo", **OPTIONS)


@pytest.fixture(scope="module")
def frames():
    from edgevlm.runtime.image_io import load_image

    return {n: load_image(ASSETS / n) for n in ("scene_a.png", "scene_b.png", "chelsea.jpg", "digit.png")}


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_answers_equal_the_in_process_pipeline(server, pipe, frames, protocol):
    from edgevlm.client import Client

    url = server.http_url if protocol == "http" else server.grpc_url
    with Client(url, protocol=protocol) as c:
        assert c.ready()
        frame = frames["scene_a.png"]
        for q in ("What color is the circle?", "How many triangles are there?"):
            want, got = pipe.generate(frame, q, max_new_tokens=16), c.generate(frame, q, max_new_tokens=16)
            assert got.token_ids == want.token_ids and got.text == want.text and got.stop_reason == want.stop_reason
            assert got.timings["batch"] >= 1 and "ttft" in got.timings
        # a path and raw file bytes are sent as they are; the text-only prompt has no image
        assert c.generate(ASSETS / "scene_b.png", "What color is the circle?", max_new_tokens=8).token_ids == \
            pipe.generate(frames["scene_b.png"], "What color is the circle?", max_new_tokens=8).token_ids
        assert c.generate(None, "Hello.", max_new_tokens=6).token_ids == pipe.generate(None, "Hello.", max_new_tokens=6).token_ids


@needs_server
def test_served_detect_gives_the_pipelines_boxes_in_pixels(server, pipe, frames):
    from edgevlm.client import Client

    frame = frames["scene_a.png"]
    want = pipe.detect(frame, "yellow triangle")
    with Client(server.http_url) as c:
        got = c.detect(frame, "yellow triangle")
    assert len(want) >= 1 and len(got) == len(want)  # the demo finds it (edgevlm demo checks the box)
    for g, w in zip(got, want):
        assert g.label == w.label and np.allclose(g.box, w.box, atol=1e-3) and np.allclose(g.box_norm.as_tuple(), w.box_norm.as_tuple(), atol=1e-6)
    assert got.output.text == want.output.text


@needs_server
def test_streamed_pieces_join_into_the_answer(server, pipe, frames):
    from edgevlm.client import Client

    frame, q = frames["scene_b.png"], "Describe the image briefly."
    want = pipe.generate(frame, q, max_new_tokens=24)
    with Client(server.grpc_url, protocol="grpc") as c:
        s = c.stream(frame, q, max_new_tokens=24)
        pieces = list(s)
        assert len(pieces) > 1 and "".join(pieces) == want.text == s.output.text
        assert s.output.token_ids == want.token_ids and s.output.stop_reason == want.stop_reason
        # a client that leaves mid-stream: the stream stops, and the next request is answered in full
        early = c.stream(frame, q, max_new_tokens=24)
        next(iter(early))
        early.close()
        s2 = c.stream(frame, q, max_new_tokens=24)
        assert "".join(s2) == want.text
    with Client(server.http_url) as c, pytest.raises(ConfigError, match="streaming needs gRPC"):
        c.stream(frame, "Hi.")


@needs_server
def test_bad_requests_get_typed_errors_and_the_server_keeps_serving(server, pipe, frames):
    from edgevlm.client import Client

    with Client(server.http_url) as c:
        with pytest.raises(ImageDecodeError, match="not a supported image"):
            c.generate(b"this is not an image" * 4, "What is it?")
        with pytest.raises(ImageSizeError, match="pixels"):
            c.generate(png_claiming(20000, 20000), "What is it?")  # refused from its header, never decoded
        with pytest.raises(PromptError, match="detect needs a non-empty phrase"):
            c.detect(frames["scene_a.png"], " ")
        with pytest.raises(PromptError, match="max_tokens"):
            c.generate(None, "Hi.", max_new_tokens=100000)
        ok = c.generate(frames["scene_a.png"], "What color is the circle?", max_new_tokens=8)
    assert ok.token_ids == pipe.generate(frames["scene_a.png"], "What color is the circle?", max_new_tokens=8).token_ids


@needs_server
def test_concurrent_frames_share_a_batch_and_each_gets_its_own_answer(server, pipe, frames):
    """Camera-like: frames of one size (Triton batches requests whose tensors have equal shapes; the
    client sends arrays as pixels), several cameras at once, one bad frame among them."""
    from edgevlm.client import Client

    frames = {n: np.ascontiguousarray(f[:200, :200]) for n, f in frames.items() if min(f.shape[:2]) >= 200}
    assert len(frames) >= 3
    names = list(frames) * 2
    want = {n: pipe.generate(frames[n], "What color is the circle?", max_new_tokens=6).token_ids for n in frames}
    results: dict[int, object] = {}
    bad = b"not an image at all"
    barrier = threading.Barrier(len(names) + 1)

    shared = Client(server.http_url)  # one Client used from every thread, as a robot's threads would

    def ask(i, name):
        barrier.wait()
        try:
            results[i] = shared.generate(frames[name], "What color is the circle?", max_new_tokens=6)
        except Exception as e:  # noqa: BLE001 - checked below
            results[i] = e

    def ask_bad():
        with Client(server.http_url) as c:
            barrier.wait()
            try:
                c.generate(bad, "What color is the circle?")
            except ImageDecodeError as e:
                results[-1] = e

    threads = [threading.Thread(target=ask, args=(i, n)) for i, n in enumerate(names)] + [threading.Thread(target=ask_bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    shared.close()
    assert isinstance(results.get(-1), ImageDecodeError)  # the bad frame failed alone
    for i, n in enumerate(names):
        assert not isinstance(results[i], Exception), results[i]
        assert results[i].token_ids == want[n], n
    assert max(results[i].timings["batch"] for i in range(len(names))) >= 2  # the batcher formed a batch


@needs_server
def test_an_embedding_made_on_the_robot_is_decoded_on_the_server(server, pipe, frames):
    """The hand-off: the robot runs the tower, sends [visual_tokens, width] and its digest; the server
    decodes it to the answer the image itself gets. A digest that does not match is refused."""
    from edgevlm.client import Client
    from edgevlm.errors import ShapeError
    from edgevlm.runtime.image_embedding import ImageEmbedding

    frame, q = frames["scene_a.png"], "What color is the circle?"
    emb = ImageEmbedding.of(pipe.tower, frame)
    want = pipe.generate(frame, q, max_new_tokens=8)
    with Client(server.http_url) as c:
        got = c.generate(emb, q, max_new_tokens=8)
        assert got.token_ids == want.token_ids and got.timings["vision"] == 0.0
        inputs = c._inputs(emb, q, max_new_tokens=8, temperature=0.0, deadline_s=None, task="generate")
        inputs[-1].set_data_from_numpy(np.array([[b"0" * 40]], dtype=np.object_))  # the digest, replaced
        with pytest.raises(ShapeError, match="do not match its digest"):
            c._infer(inputs)
        with pytest.raises(ShapeError, match="decoder takes 576"):
            c.generate(ImageEmbedding(emb.tokens[:, :100]), q)
        with pytest.raises(PromptError, match="boxes are given in its pixels"):
            c.detect(emb, "yellow triangle")


@needs_server
def test_camera_streams_behind_the_server(server, pipe):
    """Streams over a Client: a round's frames go to the server together with their cameras' names; the
    server encodes them with temporal reuse per camera (reported back) and answers like the Pipeline."""
    from edgevlm.client import Client
    from edgevlm.scene_video import scene_video
    from edgevlm.streams import Streams

    videos = {"front": scene_video("moving", 3, index=3, speed=8.0), "wrist": scene_video("static", 3, index=11)}
    with Client(server.http_url) as c:
        streams = Streams(c)
        cams = {n: streams.camera(n, v[0].mover or v[0].objects[0][0], task="detect", budget_s=120)
                for n, v in videos.items()}
        got = {n: [] for n in videos}
        for k in range(3):
            for n, cam in cams.items():
                cam.push(videos[n][k].image)
            for r in streams.run_once():
                got[r.camera].append(r)
        streams.stop()
    for n, rs in got.items():
        assert [r.error for r in rs] == [None] * 3, rs
        assert rs[0].reuse.mode == "full" and all(r.reuse.mode in ("partial", "reused") for r in rs[1:]), n
        want = pipe.detect(videos[n][0].image, cams[n].prompt)
        # a first frame is encoded whole: the Pipeline's boxes (sent as float32)
        assert np.allclose([d.box for d in rs[0].output], [d.box for d in want], atol=1e-3), n
    assert got["wrist"][2].reuse.mode == "reused"  # a still scene: nothing over the threshold
    with Client(server.http_url) as c:  # a camera's frame is pixels, not an embedding
        from edgevlm.runtime.image_embedding import ImageEmbedding

        with pytest.raises(PromptError, match="not with an embedding"):
            c.generate(ImageEmbedding.of(pipe.tower, videos["front"][0].image), "Hi", camera="front")


@pytest.fixture(scope="module")
def openai(server):
    from edgevlm.serving.openai import OpenAIServer

    o = OpenAIServer(server.http_url, server.grpc_url, port=free_ports(1)[0], model_name="demo").start()
    yield o
    o.stop()


def _post(url: str, body) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@needs_server
def test_openai_chat_completions_with_an_image_and_streaming(openai, pipe, frames):
    import base64

    png = (ASSETS / "scene_a.png").read_bytes()
    q = "Describe the image briefly."
    want = pipe.generate(frames["scene_a.png"], [{"role": "user", "content": q}], max_new_tokens=16)
    msg = [{"role": "user", "content": [{"type": "text", "text": q}, {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(png).decode()}}]}]
    code, body = _post(f"{openai.url}/v1/chat/completions", {"model": "demo", "messages": msg, "max_tokens": 16})
    out = json.loads(body)
    assert code == 200 and out["object"] == "chat.completion", body[:300]
    assert out["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert out["usage"]["completion_tokens"] == len(want.token_ids)
    code, body = _post(f"{openai.url}/v1/chat/completions", {"messages": msg, "max_tokens": 16, "stream": True})
    events = [ln[6:] for ln in body.decode().split("\n") if ln.startswith("data: ")]
    assert code == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks) and len(chunks) > 2
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    with urllib.request.urlopen(f"{openai.url}/v1/models", timeout=10) as r:
        assert json.load(r)["data"][0]["id"] == "demo"


@needs_server
def test_openai_endpoint_refuses_bad_requests_with_typed_errors(openai):
    url = f"{openai.url}/v1/chat/completions"
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    for body, code, kind, msg in ((b"{not json", 400, "PromptError", "not JSON"),
                                  ({"messages": remote}, 400, "PromptError", "does not fetch images"),
                                  ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
                                      "url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]}, 400, "ImageDecodeError",
                                   "not a supported image"),
                                  ({"messages": []}, 400, "PromptError", "non-empty")):
        got, raw = _post(url, body)
        err = json.loads(raw)["error"]
        assert got == code and err["type"] == kind and msg in err["message"], (got, raw[:300])


@needs_server
def test_exported_triton_repo_serves_image_tower_decoder(tmp_path, frames):
    """`edgevlm export demo --to triton-repo`: the tower exported to ONNX as its own model, the decoder
    loop fed its embeddings, a `pipeline` model wiring them. The bundled server has no onnxruntime
    backend, so here the tower runs the same graph with ONNX Runtime inside the Python backend; the
    onnxruntime-backend configuration is checked as text."""
    from edgevlm.client import Client
    from edgevlm.export import read_manifest
    from edgevlm.serving.repository import tower_config, write_pipeline_repository
    from edgevlm.serving.server import TritonServer

    repo = write_pipeline_repository("demo", tmp_path / "repo", options=OPTIONS, tower_backend="python",
                                     progress=False)
    assert sorted(p.name for p in repo.iterdir()) == ["edgevlm", "edgevlm_stream", "pipeline", "tower"]
    ort = tower_config(read_manifest(repo / "tower" / "1"), "onnxruntime")
    assert 'backend: "onnxruntime"' in ort and 'default_model_filename: "tower.fp32.onnx"' in ort
    assert "max_batch_size: 4" in ort and 'name: "pixels.dinov2" data_type: TYPE_FP32 dims: [3, 224, 224]' in ort
    assert "dynamic_batching" in ort and 'dims: [67, 576]' in ort
    import dataclasses

    m = read_manifest(repo / "tower" / "1")  # as a TensorRT export's manifest would read (no GPU here to build one)
    trt = tower_config(dataclasses.replace(m, target="tensorrt", files={"engine": {"path": "tower.fp16.engine"}}),
                       "tensorrt")
    assert 'platform: "tensorrt_plan"' in trt and 'default_model_filename: "tower.fp16.engine"' in trt
    assert "KIND_GPU" in trt and "max_batch_size: 4" in trt
    # the reference: an in-process Pipeline running the same exported graph
    ref = edgevlm.load("demo", vision_backend="onnxruntime", vision_export=repo / "tower" / "1", **OPTIONS)
    http, grpc, metrics = free_ports(3)
    with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics) as s, \
            Client(s.http_url, model="pipeline") as c:
        for name, q in (("scene_a.png", "What color is the circle?"), ("scene_b.png", "Describe the image briefly.")):
            want = ref.generate(frames[name], q, max_new_tokens=16)
            got = c.generate(frames[name], q, max_new_tokens=16)
            assert got.token_ids == want.token_ids and got.text == want.text, name
        with pytest.raises(PromptError, match="pipeline model answers task 'generate'"):
            c.detect(frames["scene_a.png"], "yellow triangle")
        with pytest.raises(ImageDecodeError, match="not a supported image"):
            c.generate(b"no image here", "Hi.")


@needs_server
def test_health_and_prometheus_metrics(server):
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/edgevlm/config", timeout=5) as r:
        assert json.load(r)["max_batch_size"] == 8
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'nv_inference_request_success{model="edgevlm"' in text
