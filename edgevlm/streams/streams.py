"""N cameras -> one Pipeline: the newest frame of each camera wins, every round's frames go through the
vision tower in one batched call, and the answers go out earliest deadline first.

::

    streams = Streams(edgevlm.load("demo"))
    front = streams.camera("front", "red cube", task="detect", budget_s=0.25, on_result=handle)
    wrist = streams.camera("wrist", "green circle", task="detect", budget_s=0.25, on_result=handle)
    with streams:                      # a worker thread runs the rounds
        ...                            # camera callbacks: front.push(frame), wrist.push(frame)
    front.stats.percentile(99)         # frame-to-answer latency; .dropped, .skipped, .late

A round takes each camera's waiting frame, plans (:func:`~.scheduler.plan_round`: skip what cannot meet
its budget, order by deadline), encodes the kept frames together (with temporal reuse where the tower
allows it: :mod:`edgevlm.runtime.temporal`), then answers them one by one, each camera in its own KV
slot so the prompt around its image stays cached between its frames (an unchanged frame keeps the
image's positions too). ``run_once()`` runs one round in the caller's thread instead of the worker.

Served: ``Streams(Client(...))`` keeps the newest-frame and deadline logic here and sends a round's
frames to ``edgevlm serve`` together, each with its camera's name; the server's dynamic batcher puts them
through the tower in one call, with temporal reuse and a KV slot per camera (:mod:`edgevlm.serving`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edgevlm.errors import ConfigError, EdgeVLMError
from edgevlm.runtime.image_embedding import ImageEmbedding
from edgevlm.runtime.image_io import load_images
from edgevlm.runtime.temporal import CameraState, TemporalReuse, TemporalTower

from .camera import Camera, Frame, Skip, StreamResult
from .scheduler import plan_round

log = logging.getLogger("edgevlm.streams")

_EMA = 0.3  # weight of the newest measurement in the running time estimates
_PROBE_AFTER = 10  # a camera skipped this many times in a row has its next frame answered, late or not


class Streams:
    """Cameras sharing one :class:`~edgevlm.runtime.pipeline.Pipeline`.

    ``reuse``: "auto" (default) reuses tokens between a camera's frames where the tower allows it
    (:class:`~edgevlm.runtime.temporal.TemporalTower`; ``info()["reuse"]`` says whether, and if not why),
    a :class:`~edgevlm.runtime.temporal.TemporalReuse` to require it with those settings (ConfigError where
    the tower cannot), None to encode every frame whole. ``on_skip(Skip)``: called for each frame taken
    but not answered. ``skip_late``: False answers every taken frame, late or not; with True (default) a
    camera skipped 10 times in a row still has its next frame answered, so that its time estimates are
    measured again."""

    def __init__(self, pipe, *, reuse: TemporalReuse | str | None = "auto",
                 on_skip: Callable[[Skip], None] | None = None, skip_late: bool = True) -> None:
        from edgevlm.client import Client

        self.remote = isinstance(pipe, Client)
        if not self.remote and getattr(pipe, "tower", None) is None:
            raise ConfigError("camera streams need a model with a vision tower")
        self.pipe = pipe
        self.on_skip = on_skip
        self.skip_late = skip_late
        self._reuse_why = ""
        self.temporal: TemporalTower | None = None
        self._pool: ThreadPoolExecutor | None = None
        if self.remote:
            if isinstance(reuse, TemporalReuse):
                raise ConfigError("a served model's reuse settings are the server's; pass reuse='auto' (frames sent "
                                  "with their camera's name) or None")
            if reuse not in ("auto", None):
                raise ConfigError(f"reuse must be 'auto', a TemporalReuse or None, got {reuse!r}")
            self._reuse_why = ("the server's (frames sent with their camera's name)" if reuse == "auto"
                               else "turned off (reuse=None): frames sent without a camera name")
            self._send_camera = reuse == "auto"
        elif reuse == "auto":
            try:
                self.temporal = TemporalTower(pipe.tower)
            except ConfigError as e:
                self._reuse_why = str(e)
        elif isinstance(reuse, TemporalReuse):
            self.temporal = TemporalTower(pipe.tower, reuse)
        elif reuse is None:
            self._reuse_why = "turned off (reuse=None)"
        else:
            raise ConfigError(f"reuse must be 'auto', a TemporalReuse or None, got {reuse!r}")
        self._cameras: dict[str, Camera] = {}
        self._cond = threading.Condition()
        self._round_lock = threading.Lock()  # one round at a time (worker or run_once)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.tower_s: float | None = None  # running estimate: tower time per frame encoded
        self.rounds = 0
        #: the latest round: frames ``taken``, ``skipped``, sent to the tower (``batch``), ``encoded`` by it
        #: (temporal reuse leaves unchanged frames out), ``tower_ms``
        self.last_round: dict[str, float] = {}
        self.last_error: BaseException | None = None

    # ---- cameras -------------------------------------------------------------------------------
    def camera(self, name: str, prompt: str = "", *, task: str = "generate", budget_s: float = 0.5,
               max_new_tokens: int | None = None, on_result: Callable[[StreamResult], None] | None = None,
               hard_deadline: bool = False) -> Camera:
        """Add a camera. ``task``: "generate" (``prompt`` is the question), "detect" (``prompt`` is the
        phrase to find; results carry boxes in the frame's pixels) or "ground". ``budget_s``: the latency
        budget from ``push`` to answer, which the scheduler orders and skips by. ``max_new_tokens``: None
        keeps the task's default (``Pipeline.generate``'s, ``detect``'s, ``ground``'s). ``hard_deadline``: stop
        decoding at the budget (a shorter answer, ``stop_reason="deadline"``) instead of finishing late.
        ``on_result(StreamResult)`` runs in the worker thread: keep it short."""
        with self._cond:
            if name in self._cameras:
                raise ConfigError(f"a camera named {name!r} exists already")
            cam = Camera(self, name, prompt, task=task, budget_s=budget_s, max_new_tokens=max_new_tokens,
                         on_result=on_result, hard_deadline=hard_deadline)
            cam.state = CameraState() if self.temporal is not None else None
            self._cameras[name] = cam
            if self.remote:  # one sender per camera: a round's frames are in flight together
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(max_workers=len(self._cameras), thread_name_prefix="edgevlm-send")
        return cam

    @property
    def cameras(self) -> dict[str, Camera]:
        return dict(self._cameras)

    # ---- the worker ----------------------------------------------------------------------------
    def start(self) -> "Streams":
        """Run rounds in a worker thread until :meth:`stop`."""
        if self._thread is not None:
            raise ConfigError("these streams are running already")
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="edgevlm-streams", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop after the round in progress (frames still waiting stay waiting)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "Streams":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not any(c._pending for c in self._cameras.values()):
                    self._cond.wait()
                if self._stop:
                    return
            try:
                self.run_once()
            except BaseException as e:  # noqa: BLE001 - a bug must not silently end every camera's answers
                self.last_error = e
                log.exception("streams round failed")

    # ---- one round -----------------------------------------------------------------------------
    def run_once(self) -> list[StreamResult]:
        """One round in the caller's thread: the frames waiting now, planned, encoded together and
        answered. -> the round's results (also handed to each camera's ``on_result``)."""
        with self._round_lock:
            with self._cond:
                frames = [f for c in self._cameras.values() if (f := c._take()) is not None]
            if not frames:
                return []
            self.rounds += 1
            t_round = time.monotonic()
            must = {n for n, c in self._cameras.items() if c.skips_in_row >= _PROBE_AFTER}
            keep, skips = plan_round(frames, t_round, self.tower_s or 0.0,
                                     {n: c.answer_s or 0.0 for n, c in self._cameras.items()}, self.skip_late,
                                     {n: c.last_answer_t for n, c in self._cameras.items() if c.last_answer_t}, must)
            for f, why in skips:
                self._skip(f, why)
            self.last_round = {"taken": len(frames), "skipped": len(skips), "batch": 0, "encoded": 0, "tower_ms": 0.0}
            results: list[StreamResult] = []
            if self.remote:
                return self._send(keep, t_round)
            decoded: list[tuple[Frame, Any]] = []
            for f in keep:  # each frame decoded alone: a bad one fails alone
                try:
                    decoded.append((f, load_images([f.image], max_pixels=self.pipe.tower.max_image_pixels)[0]))
                except EdgeVLMError as e:
                    results.append(self._finish(f, None, None, {}, e))
            if decoded:
                results += self._encode_and_answer(decoded, t_round)
            return results

    def _encode_and_answer(self, decoded: list[tuple[Frame, Any]], t_round: float) -> list[StreamResult]:
        cams = [self._cameras[f.camera] for f, _ in decoded]
        arrays = [a for _, a in decoded]
        t0 = time.monotonic()
        reports: list = [None] * len(arrays)
        try:
            if self.temporal is not None:
                encoded = self.temporal.encode(arrays, [c.state for c in cams])
                images = [ImageEmbedding(e) for e, _ in encoded]
                reports = [r for _, r in encoded]
                n_encoded = self.temporal.last_timings["encoded_frames"]
            elif self.pipe.tower.takes_instruction:  # its Q-Former reads each camera's prompt: encoded per answer
                images, n_encoded = arrays, 0
            else:
                images, n_encoded = [ImageEmbedding(e) for e in self.pipe.tower.embed_each(arrays)], len(arrays)
        except EdgeVLMError as e:
            return [self._finish(f, None, None, {}, e) for f, _ in decoded]
        tower_s = time.monotonic() - t0
        self.last_round.update(batch=len(arrays), encoded=n_encoded, tower_ms=tower_s * 1e3)
        if n_encoded:
            per = tower_s / n_encoded
            self.tower_s = per if self.tower_s is None else (1 - _EMA) * self.tower_s + _EMA * per
        results = []
        for (f, frame), cam, image, rep in zip(decoded, cams, images, reports):
            t1 = time.monotonic()
            if self.skip_late and t1 + (cam.answer_s or 0.0) > f.deadline and cam.skips_in_row < _PROBE_AFTER:
                self._skip(f, f"its deadline passed while the round answered earlier deadlines "
                              f"({(t1 + (cam.answer_s or 0.0) - f.deadline) * 1e3:.0f} ms short)")
                self.last_round["skipped"] += 1
                continue
            timings = {"wait": (t_round - f.t) * 1e3, "tower": tower_s * 1e3}
            try:
                out = self._answer(cam, image, frame.shape[:2], f.deadline - t1)
            except EdgeVLMError as e:
                results.append(self._finish(f, None, rep, timings, e))
                continue
            answer = time.monotonic() - t1
            cam.answer_s = answer if cam.answer_s is None else (1 - _EMA) * cam.answer_s + _EMA * answer
            results.append(self._finish(f, out, rep, {**timings, "answer": answer * 1e3}, None))
        return results

    def _send(self, keep: list[Frame], t_round: float) -> list[StreamResult]:
        """Served: the round's frames to the server at once (its batcher encodes them together)."""
        def one(f: Frame):
            cam = self._cameras[f.camera]
            t1 = time.monotonic()
            try:
                out = self._answer(cam, f.image, None, f.deadline - t1)
            except EdgeVLMError as e:
                return f, None, e, t1
            return f, out, None, t1

        results = []
        for f, out, err, t1 in self._pool.map(one, keep):  # results in deadline order
            timings = {"wait": (t_round - f.t) * 1e3}
            rep = None
            if out is not None:
                gen = out if hasattr(out, "timings") else out.output
                timings.update(answer=(time.monotonic() - t1) * 1e3, server=gen.timings.get("total", 0.0))
                rep = gen.info.get("reuse")
                cam = self._cameras[f.camera]
                a = timings["answer"] / 1e3
                cam.answer_s = a if cam.answer_s is None else (1 - _EMA) * cam.answer_s + _EMA * a
            results.append(self._finish(f, out, rep, timings, err))
        self.last_round.update(batch=len(keep), encoded=len(keep))
        return results

    def _answer(self, cam: Camera, image, size: tuple[int, int] | None, left_s: float):
        """One frame's answer: from the Pipeline in the camera's KV slot (``image`` an ImageEmbedding of a
        frame of ``size``, or the frame itself), or from the server, the frame sent with the camera's name."""
        kw: dict[str, Any] = {}
        if self.remote:
            if self._send_camera:
                kw["camera"] = cam.name
        else:
            kw["kv_slot"] = ("camera", cam.name)
            if cam.task != "generate" and isinstance(image, ImageEmbedding):
                kw["size"] = (int(size[0]), int(size[1]))
        if cam.max_new_tokens is not None:
            kw["max_new_tokens"] = cam.max_new_tokens
        if cam.hard_deadline:
            kw["deadline_s"] = max(left_s, 1e-3)
        if cam.task == "generate":
            return self.pipe.generate(image, cam.prompt, **kw)
        if cam.task == "detect":
            return self.pipe.detect(image, cam.prompt, **kw)
        return self.pipe.ground(image, **kw)

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _finish(self, f: Frame, out, rep, timings: dict, error: Exception | None) -> StreamResult:
        cam = self._cameras[f.camera]
        latency = time.monotonic() - f.t
        late = latency > cam.budget_s
        res = StreamResult(f.camera, f.id, out, latency, late, rep, timings, error)
        with self._cond:
            s = cam._stats
            if error is not None:
                s.errors += 1
            else:
                cam.last_answer_t = time.monotonic()
                cam.skips_in_row = 0
                s.answered += 1
                s.late += late
                s.latencies.append(latency)
                del s.latencies[:-10000]
                if rep is not None:
                    s.cells += rep.cells
                    s.reencoded_cells += rep.encoded
        if cam.on_result is not None:
            try:
                cam.on_result(res)
            except Exception:  # noqa: BLE001 - the user's callback must not stop the other cameras
                log.exception("on_result of camera %r raised", f.camera)
        return res

    def _skip(self, f: Frame, why: str) -> None:
        with self._cond:
            self._cameras[f.camera]._stats.skipped += 1
            self._cameras[f.camera].skips_in_row += 1
        log.debug("camera %r frame %d skipped: %s", f.camera, f.id, why)
        if self.on_skip is not None:
            try:
                self.on_skip(Skip(f.camera, f.id, "deadline", why))
            except Exception:  # noqa: BLE001
                log.exception("on_skip raised")

    def info(self) -> dict[str, Any]:
        r = self.temporal.reuse if self.temporal is not None else None
        return {"cameras": {n: {"task": c.task, "budget_s": c.budget_s, "answer_ms": (c.answer_s or 0) * 1e3}
                            for n, c in self._cameras.items()},
                "reuse": ({"on": True, **dataclasses.asdict(r)} if r is not None else {"on": False, "why": self._reuse_why}),
                "tower_ms_per_frame": (self.tower_s or 0) * 1e3, "rounds": self.rounds}


__all__ = ["Streams"]
