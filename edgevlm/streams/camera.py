"""One camera of :class:`~edgevlm.streams.Streams`: its question, its latency budget, the latest frame waiting,
and what happened to its frames.

A camera callback calls :meth:`Camera.push` with each frame; only the newest waits. A frame that a newer
one replaces before the scheduler took it is *dropped* (counted, not reported one by one: at 30 FPS that
is most frames); a frame the scheduler takes but will not answer within the budget is *skipped* (reported
to ``on_skip`` with the reason, and counted).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgevlm.errors import ConfigError

TASKS = ("generate", "detect", "ground")


@dataclass(frozen=True)
class Frame:
    """A frame taken from a camera: ``image`` as pushed, ``id`` (per camera, from 0), ``t`` (``time.monotonic()``
    when pushed) and its deadline (``t`` + the camera's budget)."""

    camera: str
    id: int
    image: Any
    t: float
    deadline: float


@dataclass(frozen=True)
class StreamResult:
    """One answered frame. ``output``: the :class:`~edgevlm.runtime.pipeline.GenerateOutput` (task
    "generate") or :class:`~edgevlm.runtime.structured.Grounding` (detect / ground), None on error;
    ``latency_s``: push to answer; ``late``: past the camera's budget; ``reuse``: what the tower did for
    this frame (a :class:`~edgevlm.runtime.temporal.ReuseReport`, None without temporal reuse);
    ``timings`` (ms): ``wait`` (push to the start of its round), ``tower`` (the round's batched tower
    call, shared by its frames), ``answer`` (this frame's prompt and decoding); ``error``: the typed
    error this frame met (the other cameras are answered regardless)."""

    camera: str
    frame_id: int
    output: Any
    latency_s: float
    late: bool
    reuse: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    error: Exception | None = None

    @property
    def text(self) -> str:
        out = self.output
        if out is None:
            return ""
        return out.text if hasattr(out, "text") else out.output.text  # a Grounding keeps its GenerateOutput


@dataclass(frozen=True)
class Skip:
    """A frame the scheduler took but did not answer: ``reason`` "deadline" (it could not be answered
    within the camera's budget), with ``detail`` saying by how much."""

    camera: str
    frame_id: int
    reason: str
    detail: str


@dataclass
class CameraStats:
    """Counts since the camera was added, and the answered frames' latencies (seconds, last 10000)."""

    pushed: int = 0
    dropped: int = 0  # replaced by a newer frame before they were taken
    skipped: int = 0  # taken, not answered: the budget could not be met
    answered: int = 0
    late: int = 0  # answered past the budget
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    reencoded_cells: int = 0  # temporal reuse: cells the tower encoded for this camera, of
    cells: int = 0  # all cells of the answered frames

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100) of the answered frames' latency in seconds (nan if none)."""
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def copy(self) -> "CameraStats":
        return CameraStats(**{**self.__dict__, "latencies": list(self.latencies)})


class Camera:
    """Made by :meth:`Streams.camera`. ``push(frame)`` from the camera's callback (any thread)."""

    def __init__(self, streams, name: str, prompt: str, *, task: str, budget_s: float, max_new_tokens: int | None,
                 on_result: Callable[[StreamResult], None] | None, hard_deadline: bool) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a camera needs a non-empty name, got {name!r}")
        if task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if task != "ground" and (not isinstance(prompt, str) or not prompt.strip()):
            raise ConfigError(f"camera {name!r}: task {task!r} needs a prompt (detect: the phrase to find)")
        if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
            raise ConfigError(f"camera {name!r}: budget_s must be a positive number of seconds, got {budget_s!r}")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 1):
            raise ConfigError(f"camera {name!r}: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        self.name, self.prompt, self.task = name, prompt, task
        self.budget_s, self.max_new_tokens = float(budget_s), max_new_tokens
        self.on_result = on_result
        self.hard_deadline = hard_deadline
        self._streams = streams
        self._pending: Frame | None = None
        self._next_id = 0
        self._stats = CameraStats()
        self.answer_s: float | None = None  # running estimate of this camera's answer time (scheduler)
        self.last_answer_t: float | None = None  # monotonic time of its last answer (the scheduler's fairness)
        self.skips_in_row = 0  # frames skipped since its last answer (past a few, the next one is answered)
        self.state = None  # the tower's temporal-reuse memory for this camera (a CameraState), set by Streams

    def push(self, image, t: float | None = None) -> int:
        """Hand the camera's newest frame (a path, PIL image, HWC uint8 array); a frame still waiting is
        dropped for it. ``t``: when it was captured (``time.monotonic()`` clock; default now): the budget
        runs from there. -> the frame's id."""
        t = time.monotonic() if t is None else float(t)
        with self._streams._cond:
            fid = self._next_id
            self._next_id += 1
            self._stats.pushed += 1
            if self._pending is not None:
                self._stats.dropped += 1
            self._pending = Frame(self.name, fid, image, t, t + self.budget_s)
            self._streams._cond.notify_all()
        return fid

    @property
    def stats(self) -> CameraStats:
        """A snapshot of the counters."""
        with self._streams._cond:
            return self._stats.copy()

    def _take(self) -> Frame | None:  # called holding the streams' lock
        f, self._pending = self._pending, None
        return f

    def __repr__(self) -> str:
        return f"Camera({self.name!r}, task={self.task!r}, budget_s={self.budget_s})"


__all__ = ["Camera", "CameraStats", "Frame", "Skip", "StreamResult", "TASKS"]
