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
