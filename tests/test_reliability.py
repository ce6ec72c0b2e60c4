"""A Pipeline under robot-style load: many threads on one Pipeline, latency budgets, cancellation,
and a long soak of generate calls (tiny model)."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import edgevlm
from edgevlm.errors import PromptError


@pytest.fixture(scope="module")
def pipe():
    return edgevlm.load("tiny", quant="none")


def _frames(k: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(30 + 7 * i, 50 + 3 * i, 3), dtype=np.uint8) for i in range(k)]


def _jobs(frames):
    # images and text-only prompts, different lengths: consecutive calls share prefixes and images
    return [(frames[i % len(frames)] if i % 3 else None, f"Frame {i % 5}: what changed?", 4 + i % 6)
            for i in range(24)]


def test_eight_threads_give_the_serial_outputs(pipe):
    jobs = _jobs(_frames(4))

    def run(job):
        image, prompt, n = job
        return pipe.generate(image, prompt, max_new_tokens=n).token_ids

    serial = [run(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=8) as ex:
        for _ in range(2):  # twice: the second round meets caches the first round left behind
            assert list(ex.map(run, jobs)) == serial


def test_deadline_stops_decoding_at_a_token_boundary(pipe):
    full = pipe.generate(None, "Tell me a long story.", max_new_tokens=40)
    assert full.stop_reason == "max_new_tokens" and len(full.token_ids) == 40
    out = pipe.generate(None, "Tell me a long story.", max_new_tokens=40, deadline_s=1e-9)
    assert out.stop_reason == "deadline" and out.token_ids == full.token_ids[:1]
    with pytest.raises(PromptError, match="deadline_s"):
        pipe.generate(None, "x", deadline_s=0)
    with pytest.raises(PromptError, match="deadline_s"):
        pipe.stream(None, "x", deadline_s=-1.0)


def test_cancel_from_another_thread_and_follow_up_stays_exact(pipe):
    frame = _frames(1, seed=3)[0]
    full = pipe.generate(frame, "Describe.", max_new_tokens=30)
    cancel = threading.Event()
    pieces = []
    for piece in pipe.stream(frame, "Describe.", max_new_tokens=30, cancel=cancel):
        pieces.append(piece)
        if len(pieces) == 1:
            threading.Thread(target=cancel.set).start()  # as a robot's supervisor thread would
            time.sleep(0.05)
    out = pipe.last_output
    assert out.stop_reason == "cancelled" and 1 <= len(out.token_ids) < 30
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
    # the interrupted call left a consistent KV cache: the same question again gives the full answer
    assert pipe.generate(frame, "Describe.", max_new_tokens=30).token_ids == full.token_ids


def _in_thread(fn, timeout: float):
    """fn() in a thread -> its result; fails (instead of hanging the suite) if it does not finish."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still blocked after {timeout} s"
    return box[0]


def test_an_abandoned_stream_does_not_block_other_callers(pipe, monkeypatch):
    """Serving exposes this: a client goes away mid-stream and its generator is neither closed nor
    collected. The next caller takes the decoder over once the stream has sat idle for stream_idle_s."""
    monkeypatch.setattr(pipe, "stream_idle_s", 0.3)
    frame = _frames(1, seed=9)[0]
    want = pipe.generate(None, "Hi there.", max_new_tokens=6).token_ids
    full = pipe.generate(frame, "Describe.", max_new_tokens=30)
    left = pipe.stream(frame, "Describe.", max_new_tokens=30)
    first = next(left)  # the consumer reads one piece, then walks away holding the stream
    t0 = time.perf_counter()
    got = _in_thread(lambda: pipe.generate(None, "Hi there.", max_new_tokens=6), timeout=60)
    assert got.token_ids == want  # the taker recomputed from a clean cache, not the stream's leftovers
    assert time.perf_counter() - t0 >= 0.3  # it waited for the idle limit, not less
    assert list(left) == [] and left.output.stop_reason == "preempted"  # ends at its next step
    assert left.output.text == first and left.output.token_ids == full.token_ids[:len(left.output.token_ids)]
    assert pipe.last_output is got  # the preempted stream does not overwrite the later answer
    assert pipe.generate(frame, "Describe.", max_new_tokens=30).token_ids == full.token_ids


def test_streams_read_at_once_from_two_threads_both_finish(pipe):
    """Consumers that keep reading are never preempted: the second stream waits for the first."""
    frames = _frames(2, seed=13)
    want = [pipe.generate(f, "Describe.", max_new_tokens=12) for f in frames]

    def read(f):
        s = pipe.stream(f, "Describe.", max_new_tokens=12)
        text = "".join(s)
        return text, s.output

    with ThreadPoolExecutor(max_workers=2) as ex:
        got = list(ex.map(read, frames))
    for (text, out), w in zip(got, want):
        assert out.stop_reason == w.stop_reason != "preempted" and out.token_ids == w.token_ids and text == w.text


def test_reset_waits_for_a_running_stream(pipe):
    frame = _frames(1, seed=17)[0]
    full = pipe.generate(frame, "Describe.", max_new_tokens=20)
    s = pipe.stream(frame, "Describe.", max_new_tokens=20)
    first = next(s)
    done = threading.Event()
    t = threading.Thread(target=lambda: (pipe.reset(), done.set()), daemon=True)
    t.start()
    assert not done.wait(0.2)  # the stream is within its idle allowance: reset waits for it
    rest = "".join(s)  # the consumer comes back and finishes undisturbed
    t.join(30)
    assert done.is_set() and s.output.token_ids == full.token_ids and first + rest == full.text


def test_an_image_embedding_answers_like_its_image(pipe):
    """The embedding hand-off: an image encoded elsewhere (here by the same tower) and passed as an
    ImageEmbedding gives the image's own answer, alone or beside images; bad ones are refused."""
    import torch

    from edgevlm.errors import ShapeError
    from edgevlm.runtime.image_embedding import ImageEmbedding

    a, b = _frames(2, seed=21)
    emb = ImageEmbedding.of(pipe.tower, a)
    answers = []
    for image in (a, emb, [b, a], [b, emb]):
        pipe.reset()  # the same (empty) cache before each, so only the image's form differs
        answers.append(pipe.generate(image, "Describe.", max_new_tokens=8))
    assert answers[1].token_ids == answers[0].token_ids and answers[1].visual_tokens == answers[0].visual_tokens
    assert answers[3].token_ids == answers[2].token_ids
    assert answers[1].timings["vision"] == 0.0 and answers[0].timings["vision"] > 0.0
    with pytest.raises(ShapeError, match="decoder takes"):
        pipe.generate(ImageEmbedding(emb.tokens[:, :-1]), "Describe.")
    with pytest.raises(ShapeError, match="do not match its digest"):
        ImageEmbedding(emb.tokens, digest="0" * 40)
    with pytest.raises(ShapeError, match="visual_tokens, width"):
        ImageEmbedding(torch.zeros(8))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc (Linux only)")
def test_soak_2000_calls_memory_stays_flat(pipe, capsys):
    frames = _frames(12, seed=7)  # repeated frames: embedding-cache hits and misses, prefix reuse and not
    calls, warm = 2000, 200
    start = None
    for i in range(calls):
        image = frames[(i * 7) % len(frames)] if i % 4 else None
        out = pipe.generate(image, f"Step {i % 13}: report.", max_new_tokens=1 + i % 6,
                            deadline_s=5.0 if i % 10 == 0 else None)
        assert out.token_ids
        if i == warm - 1:
            start = _rss_mb()
    growth = _rss_mb() - start
    with capsys.disabled():
        print(f"\nsoak: {calls} generate calls on 'tiny', RSS {start:.0f} MB after {warm}, "
              f"{start + growth:.0f} MB after {calls} ({growth:+.1f} MB)")
    assert growth < 32, f"RSS grew {growth:.1f} MB over {calls - warm} calls"


def test_generate_many_equals_one_by_one(pipe):
    frames = _frames(3, seed=11)
    one_by_one = [pipe.generate(f, "What is shown?", max_new_tokens=5).token_ids for f in frames]
    pipe.reset()
    batched = pipe.generate_many(frames, "What is shown?", max_new_tokens=5)
    assert [o.token_ids for o in batched] == one_by_one
    assert all(o.timings["vision"] < 1.0 for o in batched)  # the batched tower call filled the cache


def test_asyncio_generate_and_stream(pipe):
    import asyncio

    frame = _frames(1, seed=5)[0]
    want = pipe.generate(frame, "Describe.", max_new_tokens=12)

    async def main():
        a, b = await asyncio.gather(pipe.agenerate(frame, "Describe.", max_new_tokens=12),
                                    pipe.agenerate(None, "Hi.", max_new_tokens=3))
        pieces = [p async for p in pipe.astream(frame, "Describe.", max_new_tokens=12)]
        early = []
        async for p in pipe.astream(frame, "Describe.", max_new_tokens=12):
            early.append(p)
            break  # leaving the loop cancels the worker at the next token and frees the Pipeline
        after = await pipe.agenerate(frame, "Describe.", max_new_tokens=12)
        return a, b, pieces, early, after

    a, b, pieces, early, after = asyncio.run(main())
    assert a.token_ids == want.token_ids and len(b.token_ids) <= 3
    assert "".join(pieces) == want.text and early == pieces[:1]
    assert after.token_ids == want.token_ids


def test_session_keeps_the_image_prefix_and_matches_from_scratch(pipe):
    frame = _frames(1, seed=21)[0]
    chat = pipe.session(frame, system="Be brief.")
    first = chat.ask("What is on the table?", max_new_tokens=6)
    second = chat.ask("Which one is closest?", max_new_tokens=6)
    assert second.cached_tokens > first.visual_tokens  # the image and the first turn were reused
    assert second.timings["vision"] < 1.0 and len(chat.messages) == 4
    assert chat.messages[0]["content"][0] == {"type": "image"}
    fresh = edgevlm.load("tiny", quant="none")  # the same history computed from scratch
    again = fresh.generate(frame, chat.messages[:3], system="Be brief.", max_new_tokens=6)
    assert again.token_ids == second.token_ids and again.cached_tokens == 0
    with pytest.raises(PromptError, match="non-empty"):
        chat.ask("  ")
