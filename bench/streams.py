"""Camera streams under load: 1, 2, 4 and 8 cameras pushing frames in real time at a set rate into one
Pipeline through :class:`edgevlm.streams.Streams`, with temporal reuse on and off, side by side in one run.

    .venv/bin/python -P bench/streams.py                          # demo, 1/2/4/8 cameras, 5 FPS, 500 ms, 20 s
    .venv/bin/python -P bench/streams.py --cameras 2 --fps 10 --budget-ms 250 --seconds 10 --out /tmp/s.csv

Each camera plays its own rendered video (:mod:`edgevlm.scene_video`: moving object, still scene, camera
pan, light flicker, in turn; sensor noise on every frame) from a feeder thread at ``--fps``, and asks
``detect`` of one object of its scene within ``--budget-ms``. The tower's cache of exact pixels is off:
without reuse every frame is encoded. Per row (cameras, reuse on/off):

* ``answers_per_cam_s``: answered frames per second per camera (the achieved rate; the cap is ``--fps``),
  with the least and most served camera's (``min_cam_answers_s`` / ``max_cam_answers_s``: fairness);
* ``p50_ms`` / ``p99_ms``: push-to-answer latency of the answered frames;
* ``pushed`` / ``dropped`` (a newer frame replaced it while it waited) / ``skipped`` (taken, but the
  scheduler saw the budget could not be met) / ``late`` (answered past the budget);
* ``frames_per_round``: how many cameras' frames the batched tower call took at once;
* ``tower_ms_per_frame``: the rounds' tower time over the frames sent to it (a frame reuse found
  unchanged costs ~0), ``tower_ms_per_answer``: over the answers, and ``reencoded``: the fraction of
  cells the tower encoded (1 without reuse).

The limit beside each figure is one Pipeline's serial rate: 1 / (tower + answer time of one frame, one
camera, measured first in the same run), shared by all cameras. Rows go to ``--out``
(``bench/results/streams.csv``) and a plot to ``--plot``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import threading
import time

import numpy as np
import torch

import edgevlm
from edgevlm.perf.limits import cpu_model, git_commit
from edgevlm.perf.plot import draw_grouped_bars
from edgevlm.perf.results import append_rows
from edgevlm.runtime.embed_cache import EmbeddingCache
from edgevlm.scene_video import scene_video
from edgevlm.streams import Streams

KINDS = ("moving", "static", "pan", "flicker")
SCENES = (6, 7, 2, 5, 0, 10, 14, 9)  # held-out scenes with at most 5 objects, one per camera


def feeder(cam, frames: list[np.ndarray], fps: float, t_end: float, stop: threading.Event) -> None:
    """Pushes ``frames`` (looped) at ``fps`` in real time until ``t_end``."""
    t0, k = time.monotonic(), 0
    while not stop.is_set():
        due = t0 + k / fps
        now = time.monotonic()
        if due >= t_end:
            return
        if due > now:
            time.sleep(due - now)
        cam.push(frames[k % len(frames)], t=due)
        k += 1


def run(pipe, n: int, reuse: bool, videos, fps: float, budget_s: float, seconds: float) -> dict:
    streams = Streams(pipe, reuse="auto" if reuse else None)
    rounds: list[dict] = []  # Streams.last_round of each round
    cams = []
    for i in range(n):
        frames, target = videos[i]
        cams.append(streams.camera(f"cam{i}", target, task="detect", budget_s=budget_s))
    t_start = time.monotonic()
    t_end = t_start + seconds
    stop = threading.Event()
    feeders = [threading.Thread(target=feeder, args=(c, videos[i][0], fps, t_end, stop), daemon=True)
               for i, c in enumerate(cams)]
    results = []
    for f in feeders:
        f.start()
    while time.monotonic() < t_end:  # rounds in this thread (what the worker does), so each round is seen
        got = streams.run_once()
        if not got:
            time.sleep(0.002)
            continue
        results += got
        rounds.append(dict(streams.last_round))
    stop.set()
    for f in feeders:
        f.join()
    elapsed = time.monotonic() - t_start
    stats = [c.stats for c in cams]
    lat = [x for s in stats for x in s.latencies]
    ok = [r for r in results if r.error is None]
    cells = sum(s.cells for s in stats)
    return {"cameras": n, "reuse": "on" if reuse else "off", "seconds": round(elapsed, 1),
            "answers_per_cam_s": round(sum(s.answered for s in stats) / elapsed / n, 3),
            "min_cam_answers_s": round(min(s.answered for s in stats) / elapsed, 3),
            "max_cam_answers_s": round(max(s.answered for s in stats) / elapsed, 3),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 1) if lat else "",
            "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 1) if lat else "",
            "pushed": sum(s.pushed for s in stats), "answered": sum(s.answered for s in stats),
            "dropped": sum(s.dropped for s in stats), "skipped": sum(s.skipped for s in stats),
            "late": sum(s.late for s in stats), "errors": sum(s.errors for s in stats),
            "rounds": len(rounds),
            "frames_per_round": round(statistics.mean(r["batch"] for r in rounds), 2) if rounds else "",
            "tower_ms_per_frame": round(sum(r["tower_ms"] for r in rounds) / max(1, sum(r["batch"] for r in rounds)), 1),
            "tower_ms_per_answer": round(sum(r["tower_ms"] for r in rounds) / max(1, len(ok)), 1),
            "reencoded": round(sum(s.reencoded_cells for s in stats) / cells, 3) if cells else 1.0,
            "with_boxes": round(sum(1 for r in ok if len(r.output)) / max(1, len(ok)), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--cameras", default="1,2,4,8")
    ap.add_argument("--fps", type=float, default=5.0)
    ap.add_argument("--budget-ms", type=float, default=500.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", default="bench/results/streams.csv")
    ap.add_argument("--plot", default="bench/results/streams.png")
    args = ap.parse_args()
    levels = [int(v) for v in args.cameras.split(",")]
    pipe = edgevlm.load(args.model)
    # Reuse off must mean every frame encoded: no answer from the tower's cache of exact pixels (the
    # videos are long enough not to loop either, and sensor noise makes every frame new anyway).
    pipe.tower.embedding_cache = EmbeddingCache(0)
    n_frames = int(args.seconds * args.fps) + 2
    videos = []
    for i in range(max(levels)):
        vid = scene_video(KINDS[i % len(KINDS)], n_frames, index=SCENES[i % len(SCENES)], speed=4.0)
        videos.append(([v.image for v in vid], vid[0].mover or vid[0].objects[0][0]))
    # one frame, one camera, serially: the limit beside the rows
    warm = Streams(pipe, reuse=None)
    cam = warm.camera("warm", videos[0][1], task="detect", budget_s=60)
    serial = []
    for k in range(4):
        cam.push(videos[0][0][k])
        t0 = time.monotonic()
        warm.run_once()
        serial.append(time.monotonic() - t0)
    serial_s = statistics.median(serial[1:])
    common = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
              "cpu_model": cpu_model() or platform.processor(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "model": args.model, "fps": args.fps, "budget_ms": args.budget_ms,
              "serial_ms_per_frame": round(serial_s * 1e3, 1), "serial_limit_per_s": round(1 / serial_s, 2)}
    print(f"one camera, one frame at a time: {serial_s * 1e3:.0f} ms -> at most {1 / serial_s:.2f} answers/s in all")
    rows = []
    for n in levels:
        for reuse in (False, True):
            r = {**common, **run(pipe, n, reuse, videos, args.fps, args.budget_ms / 1e3, args.seconds)}
            rows.append(r)
            print(f"{n} cameras, reuse {r['reuse']:3s}: {r['answers_per_cam_s']:.2f} answers/s per camera "
                  f"({r['min_cam_answers_s']:.2f}..{r['max_cam_answers_s']:.2f}) "
                  f"(p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms), pushed {r['pushed']}, dropped {r['dropped']}, "
                  f"skipped {r['skipped']}, late {r['late']}, {r['frames_per_round']} frames per round, tower "
                  f"{r['tower_ms_per_frame']} ms per frame encoded, re-encoded {r['reencoded']}")
    append_rows(args.out, rows)
    print(f"{len(rows)} rows -> {args.out}")
    plot(rows, args.plot)
    return 0


def plot(rows: list[dict], path: str) -> None:
    """Per camera count, the answer rate per camera with reuse off and on (bars), p50 / p99 latency and
    the drops (text), and the cameras' frame rate (dashed): what each camera could at most be answered."""
    levels = sorted({int(r["cameras"]) for r in rows})
    colours = {"off": (230, 159, 0), "on": (0, 114, 178)}
    by = {(int(r["cameras"]), r["reuse"]): r for r in rows}
    fps = float(rows[0]["fps"])
    groups = []
    for n in levels:
        bars = [(float(r["answers_per_cam_s"]), colours[mode],
                 f"{float(r['answers_per_cam_s']):.2f}/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  dropped "
                 f"{r['dropped']}  skipped {r['skipped']}  tower {r['tower_ms_per_frame']} ms/frame")
                for mode in ("off", "on") if (r := by.get((n, mode)))]
        groups.append((f"{n} camera{'s' if n > 1 else ''}", bars))
    out = draw_grouped_bars(
        path, f"edgevlm streams: {rows[0]['model']}, {rows[0]['cpu_model']}, {rows[0]['threads']} threads, {fps:g} FPS "
              f"per camera, {float(rows[0]['budget_ms']):.0f} ms budget, detect",
        "answers / s per camera (bar); p50 / p99 push-to-answer latency, frames dropped and skipped (text); "
        "orange: every frame whole, blue: temporal reuse", groups, top=fps * 1.15, limit=fps, limit_label=f"{fps:g} FPS")
    print(f"plot -> {out}")


if __name__ == "__main__":
    sys.exit(main())
