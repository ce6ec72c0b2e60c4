"""Served against embedded, under load and under faults: `edgevlm serve`'s Triton server on loopback
and an in-process Pipeline, the same workload side by side in one run.

    .venv-serve/bin/python -P bench/serve.py                       # demo, 1/4/16/64 clients, 15 s each
    .venv-serve/bin/python -P bench/serve.py --clients 1,8 --seconds 10 --out /tmp/serve.csv

(Run it from the serving environment, ``scripts/setup.sh .venv-serve --serve``: Triton's bundled Python
backend needs NumPy < 2.)

Workload: every request is a new camera frame (a bundled scene, shifted by a random crop so the tower's
embedding cache never answers), one question, ``--max-tokens`` greedy tokens. N clients each send
requests back to back for ``--seconds``:

* ``served``: each client its own ``edgevlm.client.Client`` over HTTP, with a request id that the
  response must echo (so a lost or doubled answer is counted, not assumed away);
* ``embedded``: N threads calling one ``Pipeline.generate`` (what a robot process does without a server).

Per row: requests answered per second, p50 / p99 latency, the batch sizes Triton's dynamic batcher formed
(``timings["batch"]``), errors, lost and doubled answers. The limit beside each figure is one Pipeline's
serial rate (1 / its mean latency at one client, embedded): one server model instance computes on the
same cores, so only batched tower calls can take it past that.

Faults (``--faults``, during the largest client count): a gRPC stream closed after its first piece, a
request whose image is not an image, one whose header claims 20000 x 20000 pixels; they must get their
typed errors while the load's clients see none. Then the server is stopped (clients must get a clear
ServingError, not hang) and started again on the same ports (the same Client objects must recover).
Rows go to ``--out`` (``bench/results/serve.csv``) and a plot to ``--plot``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import torch

import edgevlm
from edgevlm.errors import EdgeVLMError, ImageDecodeError, ImageSizeError, ServingError
from edgevlm.perf.limits import cpu_model, git_commit
from edgevlm.perf.plot import draw_grouped_bars
from edgevlm.perf.results import append_rows

QUESTION = "What color is the circle?"
FIELDS = ["timestamp", "commit", "cpu_model", "threads", "torch", "tritonserver", "model", "mode", "clients",
          "seconds", "max_tokens", "requests", "req_per_s", "serial_limit_req_per_s", "of_limit", "p50_ms", "p99_ms",
          "mean_batch", "max_batch", "errors", "lost", "doubled", "note"]


class Frames:
    """A new camera frame per call: a random 200 x 200 crop of a bundled scene, so the tower's embedding
    cache (which keys on the pixels) practically never answers, as with a real camera."""

    def __init__(self) -> None:
        from edgevlm.runtime.image_io import load_image

        assets = Path(edgevlm.__file__).resolve().parent / "assets"
        self.scenes = [load_image(assets / n) for n in ("scene_a.png", "scene_b.png")]

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        s = self.scenes[int(rng.integers(2))]
        y, x = rng.integers(0, s.shape[0] - 200), rng.integers(0, s.shape[1] - 200)
        return np.ascontiguousarray(s[y:y + 200, x:x + 200])


def png_claiming(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"\x00x" * 4) + chunk(b"IEND", b""))


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.batches: list[int] = []
        self.errors: list[str] = []
        self.lost = self.doubled = 0


def run_load(n_clients: int, seconds: float, call, frames: Frames, seed: int) -> tuple[Tally, float]:
    """n_clients threads, each calling ``call(client_index, frame, request_id)`` back to back."""
    tally, stop = Tally(), threading.Event()
    barrier = threading.Barrier(n_clients + 1)

    def worker(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        barrier.wait()
        k = 0
        while not stop.is_set():
            rid = f"c{i}-r{k}"
            k += 1
            t0 = time.perf_counter()
            try:
                batch, echoed = call(i, frames(rng), rid)
            except Exception as e:  # noqa: BLE001 - counted
                with tally.lock:
                    tally.errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            dt_ms = (time.perf_counter() - t0) * 1e3
            with tally.lock:
                tally.latencies.append(dt_ms)
                tally.batches.append(batch)
                if echoed is not None and echoed != rid:
                    tally.lost += 1  # an answer that is not this request's: its own is lost, another doubled
                    tally.doubled += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(600)
    return tally, time.perf_counter() - t0


def row(common: dict, mode: str, n: int, tally: Tally, elapsed: float, limit: float, note: str = "") -> dict:
    lat = sorted(tally.latencies)
    rate = len(lat) / elapsed
    q = (lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]) if lat else (lambda p: float("nan"))
    return {**common, "mode": mode, "clients": n, "requests": len(lat), "req_per_s": f"{rate:.2f}",
            "serial_limit_req_per_s": f"{limit:.2f}", "of_limit": f"{rate / limit:.2f}" if limit else "",
            "p50_ms": f"{q(0.5):.0f}", "p99_ms": f"{q(0.99):.0f}",
            "mean_batch": f"{statistics.mean(tally.batches):.2f}" if tally.batches else "",
            "max_batch": max(tally.batches) if tally.batches else "", "errors": len(tally.errors),
            "lost": tally.lost, "doubled": tally.doubled, "note": note or "; ".join(sorted(set(tally.errors))[:2])}


def inject_faults(server, frame: np.ndarray) -> list[str]:
    """During load: a stream closed early, a non-image, an oversized header. -> what each got."""
    from edgevlm.client import Client

    seen = []
    with Client(server.grpc_url, protocol="grpc") as g:
        s = g.stream(frame, "Describe the image briefly.", max_new_tokens=24)
        next(iter(s))
        s.close()
        seen.append("stream closed after its first piece")
    with Client(server.http_url) as c:
        for what, data, expected in (("not an image", b"definitely not an image", ImageDecodeError),
                                     ("20000 x 20000 header", png_claiming(20000, 20000), ImageSizeError)):
            try:
                c.generate(data, QUESTION, max_new_tokens=4)
                seen.append(f"{what}: ANSWERED (expected {expected.__name__})")
            except expected as e:
                seen.append(f"{what}: {type(e).__name__}")
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--batch-delay-ms", type=float, default=5.0)
    ap.add_argument("--no-faults", dest="faults", action="store_false")
    ap.add_argument("--out", default="bench/results/serve.csv")
    ap.add_argument("--plot", default="bench/results/serve.png")
    args = ap.parse_args()
    levels = [int(v) for v in args.clients.split(",")]

    from edgevlm.client import Client
    from edgevlm.serving.repository import write_repository
    from edgevlm.serving.server import TritonServer, free_ports

    frames = Frames()
    rng = np.random.default_rng(0)
    common = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
              "cpu_model": cpu_model() or platform.processor(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "model": args.model, "seconds": args.seconds,
              "max_tokens": args.max_tokens}
    rows = []

    # ---- embedded ----------------------------------------------------------------------------
    pipe = edgevlm.load(args.model)
    pipe.generate(frames(rng), QUESTION, max_new_tokens=args.max_tokens)  # warm-up

    def embedded(i, frame, rid):
        out = pipe.generate(frame, QUESTION, max_new_tokens=args.max_tokens)
        return 1, None

    limit = 0.0
    for n in levels:
        tally, elapsed = run_load(n, args.seconds, embedded, frames, seed=n)
        if not limit:  # one Pipeline's serial rate: the first level's answers per second
            limit = len(tally.latencies) / elapsed
        rows.append(row({**common, "tritonserver": ""}, "embedded", n, tally, elapsed, limit))
        print(f"embedded {n:3d} clients: {rows[-1]['req_per_s']} req/s  p50 {rows[-1]['p50_ms']} ms  "
              f"p99 {rows[-1]['p99_ms']} ms", flush=True)
    del pipe

    # ---- served ------------------------------------------------------------------------------
    repo = write_repository(args.model, tempfile.mkdtemp(prefix="edgevlm-bench-repo-"), max_batch_size=args.max_batch,
                            batch_delay_us=int(args.batch_delay_ms * 1000))
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics).start()
    version = next((ln.split("|")[2].strip() for ln in (server.log_tail(400).splitlines())
                    if "server_version" in ln), "")
    common["tritonserver"] = version
    clients = [Client(server.http_url, timeout_s=600) for _ in range(max(levels))]
    clients[0].generate(frames(rng), QUESTION, max_new_tokens=args.max_tokens)  # warm-up

    def served(i, frame, rid):
        c = clients[i]
        res = c._infer(c._inputs(frame, QUESTION, max_new_tokens=args.max_tokens, temperature=0.0, deadline_s=None,
                                 task="generate"), request_id=rid)
        timings = json.loads(bytes(res.as_numpy("timings").reshape(-1)[0]))
        return timings["batch"], res.get_response().get("id")

    fault_note = ""
    try:
        for n in levels:
            faults: list[str] = []
            timer = None
            if args.faults and n == max(levels):
                timer = threading.Timer(args.seconds / 2, lambda: faults.extend(inject_faults(server, frames(rng))))
                timer.start()
            tally, elapsed = run_load(n, args.seconds, served, frames, seed=100 + n)
            if timer is not None:
                timer.join()
            note = "; ".join(faults) if faults else ""
            rows.append(row(common, "served", n, tally, elapsed, limit, note=note))
            r = rows[-1]
            print(f"served   {n:3d} clients: {r['req_per_s']} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                  f"batch mean {r['mean_batch']} max {r['max_batch']}  errors {r['errors']} lost {r['lost']} "
                  f"doubled {r['doubled']}" + (f"  faults: {note}" if note else ""), flush=True)
        if args.faults:  # restart: a clear error while down, then the same Client recovers
            server.stop()
            t0 = time.perf_counter()
            try:
                clients[0].generate(frames(rng), QUESTION, max_new_tokens=2)
                down = "answered while stopped?!"
            except ServingError as e:
                down = f"ServingError after {(time.perf_counter() - t0) * 1e3:.0f} ms ({str(e)[:80]})"
            server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics).start()
            back = clients[0].generate(frames(rng), QUESTION, max_new_tokens=2)
            fault_note = f"restart: while down {down}; after restart the same Client answered ({back.stop_reason})"
            print(fault_note, flush=True)
            rows.append({**common, "mode": "restart", "clients": 1, "errors": 0, "note": fault_note})
    finally:
        server.stop()

    append_rows(args.out, rows, FIELDS)
    print(f"{len(rows)} rows -> {args.out}")
    if args.plot:
        plot([r for r in rows if r["mode"] != "restart"], args.plot)
    return 0


def plot(rows: list[dict], path: str) -> None:
    """Grouped bars: per client count, requests per second embedded and served, with p50 / p99, and a
    line at one Pipeline's serial rate."""
    levels = sorted({int(r["clients"]) for r in rows})
    colours = {"embedded": (86, 180, 233), "served": (0, 114, 178)}
    rate = {(r["mode"], int(r["clients"])): r for r in rows}
    groups = []
    for n in levels:
        bars = []
        for mode in ("embedded", "served"):
            if (r := rate.get((mode, n))) is None:
                continue
            extra = f"  batch mean {r['mean_batch']}" if mode == "served" else ""
            bars.append((float(r["req_per_s"]), colours[mode],
                         f"{mode} {float(r['req_per_s']):.2f}/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  errors "
                         f"{r['errors']}{extra}"))
        groups.append((f"{n} clients", bars))
    limit = float(rows[0].get("serial_limit_req_per_s") or 0)
    out = draw_grouped_bars(
        path, f"edgevlm serve vs embedded Pipeline: {rows[0]['model']}, {rows[0]['cpu_model']}, "
              f"{rows[0]['max_tokens']} tokens per answer",
        "requests / s (bar), p50 / p99 latency (text)", groups, top=max(float(r["req_per_s"]) for r in rows) * 1.25,
        limit=limit, limit_label=f"one Pipeline, serial: {limit:.2f}/s", width=980)
    print(f"plot -> {out}")


if __name__ == "__main__":
    sys.exit(main())
