"""detect / ground / keypoints: the model's padded-square boxes back in the frame's pixels."""

from __future__ import annotations

import numpy as np
import pytest

import edgevlm
from edgevlm.errors import PromptError
from edgevlm.runtime.boxes import Box, box_from_pixels
from edgevlm.runtime.pipeline import GenerateOutput


@pytest.fixture(scope="module")
def tiny():
    return edgevlm.load("tiny", quant="none")


def _answering(monkeypatch, pipe, text: str, seen: list):
    """The pipeline answers ``text`` (the model's wording is what is under test elsewhere)."""

    def generate(image, prompt, **kw):
        seen.append((image.shape, prompt, kw))
        return GenerateOutput(text=text, token_ids=[], timings={})

    monkeypatch.setattr(pipe, "generate", generate)


def test_detect_undoes_the_pad_to_square(tiny, monkeypatch):
    frame = np.zeros((300, 451, 3), np.uint8)  # landscape: padded 75 px above and 76 below
    true = (100.0, 40.0, 220.0, 180.0)
    b = box_from_pixels(*true, 300, 451)
    seen = []
    _answering(monkeypatch, tiny, f"[{b.x1:.6f},{b.y1:.6f},{b.x2:.6f},{b.y2:.6f};0.0,0.0,0.5,0.1] junk [2,3,4,5]",
               seen)
    found = tiny.detect(frame, " red cup ", max_new_tokens=20)
    assert seen[0][1] == "Where is the red cup? Answer with a bounding box." and seen[0][2]["max_new_tokens"] == 20
    assert len(found) == 2 and found[0].label == "red cup"  # [2,3,4,5] is not this convention: skipped
    assert found[0].box == pytest.approx(true, abs=1e-3)
    assert found[0].center == pytest.approx((160.0, 110.0), abs=1e-3)
    # the second box reaches into the top padding: clipped to the frame
    assert found[1].box == pytest.approx((0.0, 0.0, 225.5, 0.0), abs=1e-3)
    assert found[1].box_norm == Box(0.0, 0.0, 0.5, 0.1)


def test_ground_labels_boxes_and_keypoints_map_to_pixels(tiny, monkeypatch):
    frame = np.zeros((200, 100, 3), np.uint8)  # portrait: padded 50 px left and right
    _answering(monkeypatch, tiny, "A <p>cup</p> [0.25,0.5,0.75,1.0] and a <p>pen</p>[0.5,0.0,0.6,0.1;0.3,0.3,0.4,0.4]"
                                  " at [0.5,0.5] and [0.75,0.25]", [])
    g = tiny.ground(frame)
    assert [d.label for d in g] == ["cup", "pen", "pen"]
    assert g[0].box == pytest.approx((0.0, 100.0, 100.0, 200.0))
    pts, out = tiny.keypoints(frame, "Where are the handles?")
    assert [p.xy for p in pts] == [pytest.approx((50.0, 100.0)), pytest.approx((100.0, 50.0))]
    assert out.text.startswith("A <p>cup</p>")


def test_structured_calls_refuse_what_they_cannot_answer(tiny):
    frame = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(PromptError, match="non-empty phrase"):
        tiny.detect(frame, "  ")
    with pytest.raises(PromptError, match="exactly one image"):
        tiny.detect([frame, frame], "cup")
    with pytest.raises(PromptError, match="exactly one image"):
        tiny.ground(None)


@pytest.mark.slow
def test_demo_detect_returns_boxes_inside_the_frame():
    from edgevlm.cli import _asset

    pipe = edgevlm.load("demo")
    found = pipe.detect(_asset("chelsea.jpg"), "cat")  # 451 x 300, not square
    assert found.output.stop_reason in ("stop_token", "max_new_tokens", "stop_string")
    for d in found:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 <= x2 <= 451 and 0 <= y1 <= y2 <= 300 and d.label == "cat"
