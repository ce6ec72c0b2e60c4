"""Camera streams (edgevlm.streams): the scheduler's plan alone, then Streams over the tiny model (random
weights: what is checked is who gets answered, when and from what, not what the answer says) and over the
demo, whose answers must equal the Pipeline's on the same frames."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import edgevlm
from edgevlm.errors import ConfigError, ImageDecodeError
from edgevlm.scene_video import scene_video
from edgevlm.streams import Skip, Streams, TemporalReuse, plan_round
from edgevlm.streams.camera import Frame


def _f(cam: str, t: float, budget: float, fid: int = 0) -> Frame:
    return Frame(cam, fid, None, t, t + budget)


# ---- the plan --------------------------------------------------------------------------------------

def test_plan_orders_by_deadline_and_keeps_all_without_estimates():
    frames = [_f("a", 0.0, 0.5), _f("b", 0.1, 0.2), _f("c", 0.0, 0.9)]
    kept, skipped = plan_round(frames, 0.2, 0.0, {})
    assert [f.camera for f in kept] == ["b", "a", "c"] and skipped == []


def test_plan_skips_what_would_finish_late_and_says_by_how_much():
    # tower 50 ms per frame; answers 100 ms. b (deadline 0.25) fits: 0.1 of tower (b, a) + 0.1; a (0.28)
    # would end at 0.1 + 0.1 + 0.1 = 0.3, so it goes; c then fits after b
    frames = [_f("a", 0.0, 0.28), _f("b", 0.0, 0.25), _f("c", 0.0, 2.0)]
    kept, skipped = plan_round(frames, 0.0, 0.05, {"a": 0.1, "b": 0.1, "c": 0.1})
    assert [f.camera for f in kept] == ["b", "c"]
    assert [(f.camera, why.split(" ")[0]) for f, why in skipped] == [("a", "expected")]
    assert "ms after its deadline" in skipped[0][1]
    # a frame whose tower share would make an earlier deadline late is skipped, naming that camera
    frames = [_f("a", 0.0, 0.16), _f("z", 0.0, 5.0)]
    kept, skipped = plan_round(frames, 0.0, 0.05, {"a": 0.1, "z": 0.0})
    assert [f.camera for f in kept] == ["a"] and "'a'" in skipped[0][1]
    kept, skipped = plan_round(frames, 0.0, 0.05, {"a": 0.1}, skip_late=False)
    assert len(kept) == 2 and skipped == []


def test_plan_never_skips_a_camera_it_must_answer():
    frames = [_f("a", 0.0, 0.1), _f("b", 0.0, 0.1)]
    kept, skipped = plan_round(frames, 0.0, 0.05, {"a": 0.2, "b": 0.2}, must={"b"})
    assert [f.camera for f in kept] == ["b"] and [f.camera for f, _ in skipped] == ["a"]
    kept, skipped = plan_round(frames, 0.0, 0.05, {"a": 0.2, "b": 0.2}, must={"a", "b"})
    assert len(kept) == 2 and skipped == []


def test_plan_under_overload_takes_turns_instead_of_starving_a_camera():
    # Two cameras, same phase, same costs: only one frame fits each round. Whoever was answered less
    # recently goes first, so over rounds they alternate (deadline order alone would always pick "a").
    last: dict[str, float] = {}
    picks = []
    for k in range(6):
        now = float(k)
        kept, skipped = plan_round([_f("a", now, 0.3), _f("b", now, 0.3)], now, 0.05, {"a": 0.2, "b": 0.2},
                                   last_answer=last)
        assert len(kept) == 1 and len(skipped) == 1 and skipped[0][1]  # a reason, whichever it was
        picks.append(kept[0].camera)
        last[kept[0].camera] = now + 0.25
    assert picks == ["a", "b", "a", "b", "a", "b"], picks


# ---- Streams on the tiny model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return edgevlm.load("tiny", quant="none")


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    return [v.image for v in scene_video("moving", n, seed=seed, speed=6.0)]


def test_newest_frame_wins_and_the_rest_are_counted(tiny):
    streams = Streams(tiny)
    cam = streams.camera("front", "What is here?", max_new_tokens=2, budget_s=60)
    frames = _frames(3)
    ids = [cam.push(f) for f in frames]
    (res,) = streams.run_once()
    assert res.frame_id == ids[-1] and res.error is None and not res.late
    s = cam.stats
    assert (s.pushed, s.dropped, s.answered, s.skipped) == (3, 2, 1, 0)
    assert streams.run_once() == []  # nothing waits


def test_cameras_are_answered_from_one_tower_call_with_reuse_and_their_own_kv(tiny):
    streams = Streams(tiny, reuse=TemporalReuse(threshold=8.0))
    a = streams.camera("a", "What is here?", max_new_tokens=2, budget_s=60)
    b = streams.camera("b", "What moved?", max_new_tokens=2, budget_s=60)
    still = _frames(1, seed=4)[0]
    moving = _frames(2, seed=5)
    a.push(still), b.push(moving[0])
    first = {r.camera: r for r in streams.run_once()}
    assert streams.temporal.last_timings["encoded_frames"] == 2  # both frames, one call
    assert {r.reuse.mode for r in first.values()} == {"full"}
    a.push(still.copy()), b.push(moving[1])
    second = {r.camera: r for r in streams.run_once()}
    assert second["a"].reuse.mode == "reused" and second["b"].reuse.mode in ("partial", "full")
    # camera a's image and prompt were still in its own KV slot, though camera b answered in between
    out_a = second["a"].output
    assert out_a.cached_tokens == out_a.prompt_tokens - 1
    assert second["a"].output.token_ids == first["a"].output.token_ids
    assert a.stats.cells == 2 * streams.temporal.cells_per_view * tiny.tower.config.views_per_image


def test_a_bad_frame_fails_alone_and_late_frames_are_skipped_and_reported(tiny):
    skips: list[Skip] = []
    streams = Streams(tiny, on_skip=skips.append)
    good = streams.camera("good", "What is here?", max_new_tokens=2, budget_s=60)
    bad = streams.camera("bad", "What is here?", max_new_tokens=2, budget_s=60)
    good.push(_frames(1)[0]), bad.push(b"not an image")
    res = {r.camera: r for r in streams.run_once()}
    assert res["good"].error is None and isinstance(res["bad"].error, ImageDecodeError)
    assert bad.stats.errors == 1 and good.stats.answered == 1
    hurried = streams.camera("hurried", "What is here?", max_new_tokens=2, budget_s=1e-6)
    hurried.push(_frames(1)[0])
    assert streams.run_once() == []
    assert hurried.stats.skipped == 1 and skips[-1].camera == "hurried" and skips[-1].reason == "deadline"
    # a camera skipped 10 times in a row has its next frame answered, late: its estimates are measured again
    for _ in range(9):
        hurried.push(_frames(1)[0])
        assert streams.run_once() == []
    hurried.push(_frames(1)[0])
    (probe,) = streams.run_once()
    assert probe.camera == "hurried" and probe.late and probe.error is None
    assert (hurried.stats.skipped, hurried.stats.answered, hurried.stats.late) == (10, 1, 1)
    relaxed = Streams(tiny, skip_late=False)
    late = relaxed.camera("late", "What is here?", max_new_tokens=2, budget_s=1e-6)
    late.push(_frames(1)[0])
    (r,) = relaxed.run_once()
    assert r.late and late.stats.late == 1


def test_the_worker_thread_answers_pushed_frames(tiny):
    got, done = [], threading.Event()

    def on_result(r):
        got.append(r)
        if len(got) == 2:
            done.set()

    streams = Streams(tiny)
    cam = streams.camera("front", "What is here?", max_new_tokens=2, budget_s=60, on_result=on_result)
    with streams:
        cam.push(_frames(1)[0])
        assert done.wait(0) is False
        while not done.is_set():
            cam.push(_frames(1, seed=len(got) + 1)[0])
            done.wait(0.5)
    assert len(got) >= 2 and all(r.error is None for r in got) and streams.last_error is None


def test_settings_are_checked(tiny):
    streams = Streams(tiny)
    streams.camera("x", "q")
    for kw in (dict(name="x", prompt="q"), dict(name="", prompt="q"), dict(name="y", prompt=""),
               dict(name="y", prompt="q", task="segment"), dict(name="y", prompt="q", budget_s=0),
               dict(name="y", prompt="q", max_new_tokens=0)):
        name, prompt = kw.pop("name"), kw.pop("prompt")
        with pytest.raises(ConfigError):
            streams.camera(name, prompt, **kw)
    with pytest.raises(ConfigError, match="reuse"):
        Streams(tiny, reuse="always")
    tiny.tower.set_token_keep(0.5)
    try:
        assert Streams(tiny).info()["reuse"] == {"on": False, "why": "temporal reuse cannot run this tower: "
                                                               "token dropping is on (set_token_keep(1.0) first)"}
        with pytest.raises(ConfigError, match="token dropping"):
            Streams(tiny, reuse=TemporalReuse())
    finally:
        tiny.tower.set_token_keep(1.0)


# ---- the demo: the same answers as the Pipeline ------------------------------------------------------

def test_demo_detect_through_streams_equals_the_pipeline():
    from edgevlm.presets import SMOLLM2_GGUF
    from edgevlm.runtime.readers import resolve_weights_path

    try:
        resolve_weights_path(SMOLLM2_GGUF)
    except edgevlm.WeightsNotFoundError as e:
        pytest.skip(f"real weights not installed: {e}")
    pipe = edgevlm.load("demo")
    video = scene_video("moving", 2, index=3, speed=8.0)
    streams = Streams(pipe)
    cam = streams.camera("front", video[0].mover, task="detect", budget_s=60)
    for v in video:
        cam.push(v.image)
        (r,) = streams.run_once()
        want = pipe.detect(v.image, video[0].mover)
        assert r.error is None and [d.box for d in r.output] == [d.box for d in want], (r.reuse, r.text, want.output.text)
    assert r.reuse.mode == "partial" and r.reuse.fraction < 0.5
