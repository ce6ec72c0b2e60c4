"""Structured answers for robot code: boxes and keypoints in the original image's pixels.

::

    found = pipe.detect(frame, "red cup")              # Grounding: a list of Detection
    for d in found:
        d.box                  # (x1, y1, x2, y2) pixel edges in `frame` (pad-to-square undone, clipped)
        d.box_norm             # the model's own box, relative to the padded square
    found.output.timings       # the GenerateOutput it came from (text, stop reason, timings)
    pipe.ground(frame)         # a grounded caption: <p>phrase</p>[box] pairs, labelled
    pipe.keypoints(frame, "Where are the cup's handles? Answer with points.")

The model prints SPHINX's convention (:mod:`edgevlm.runtime.boxes`): floats in 0..1 relative to the
image padded to a square. These helpers decode the frame once, ask, parse tolerantly (a malformed or
out-of-range box is skipped, never guessed) and convert to pixels of the frame as given. Prompts are
arguments with defaults in the demo model's wording; pass your model's own phrasing. An
:class:`~.image_embedding.ImageEmbedding` (a frame already through a tower) is taken with the frame's
``size=(h, w)``, which the boxes are converted to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgevlm.errors import PromptError

from .boxes import Box, box_to_pixels, parse_boxes, parse_grounded, parse_keypoints
from .views import pad_to_square

DETECT_PROMPT = "Where is the {phrase}? Answer with a bounding box."
GROUND_PROMPT = "Describe the image briefly, with a bounding box for each object you mention."


@dataclass(frozen=True)
class Detection:
    """One box: ``box`` in pixel edges of the original frame, ``box_norm`` as the model printed it."""

    label: str | None
    box: tuple[float, float, float, float]
    box_norm: Box

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return ((x1 + x2) / 2, (y1 + y2) / 2)


@dataclass(frozen=True)
class Keypoint:
    """One point: ``xy`` in pixels of the original frame, ``xy_norm`` as printed (padded square)."""

    xy: tuple[float, float]
    xy_norm: tuple[float, float]


@dataclass
class Grounding:
    """What :meth:`Pipeline.detect` / :meth:`Pipeline.ground` return: the detections (iterable, indexable)
    and the :class:`~edgevlm.runtime.pipeline.GenerateOutput` they were parsed from."""

    detections: list[Detection] = field(default_factory=list)
    output: object = None

    def __iter__(self):
        return iter(self.detections)

    def __len__(self) -> int:
        return len(self.detections)

    def __getitem__(self, i: int) -> Detection:
        return self.detections[i]


def _frame(pipe, image, size: tuple[int, int] | None) -> tuple[object, int, int]:
    """-> (what to send the Pipeline: the decoded frame or the embedding, the frame's h, w)."""
    from .image_embedding import ImageEmbedding
    from .image_io import load_images

    if pipe.tower is None:
        raise PromptError(f"model {pipe.name or '(text-only)'} has no vision tower; structured outputs need an image")
    if image is None or isinstance(image, (list, tuple)):
        raise PromptError("detect / ground / keypoints take exactly one image (a frame)")
    if isinstance(image, ImageEmbedding):
        if size is None or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            raise PromptError(f"an ImageEmbedding carries no frame size: pass size=(h, w) of the frame it was made "
                              f"from, to put the boxes in its pixels (got size={size!r})")
        return image, size[0], size[1]
    frame = load_images([image], max_pixels=pipe.tower.max_image_pixels)[0]  # HWC uint8, decoded once
    return frame, frame.shape[0], frame.shape[1]


def detect(pipe, image, phrase: str, *, prompt: str = DETECT_PROMPT, max_new_tokens: int = 80,
           size: tuple[int, int] | None = None, **gen) -> Grounding:
    """Boxes of ``phrase`` in ``image``, labelled ``phrase``."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise PromptError("detect needs a non-empty phrase, e.g. 'red cup'")
    frame, h, w = _frame(pipe, image, size)
    out = pipe.generate(frame, prompt.format(phrase=phrase.strip()), max_new_tokens=max_new_tokens, **gen)
    return Grounding([_detection(phrase.strip(), b, h, w) for b in parse_boxes(out.text)], out)


def ground(pipe, image, *, prompt: str = GROUND_PROMPT, max_new_tokens: int = 160,
           size: tuple[int, int] | None = None, **gen) -> Grounding:
    """A grounded caption parsed into labelled boxes (``<p>phrase</p>[box;box]``; unlabelled boxes get
    ``label=None``)."""
    frame, h, w = _frame(pipe, image, size)
    out = pipe.generate(frame, prompt, max_new_tokens=max_new_tokens, **gen)
    return Grounding([_detection(label, b, h, w) for label, boxes in parse_grounded(out.text) for b in boxes], out)


def keypoints(pipe, image, prompt: str, *, max_new_tokens: int = 80, size: tuple[int, int] | None = None,
              **gen) -> tuple[list[Keypoint], object]:
    """Points ``[x,y]`` the model prints in answer to ``prompt`` -> (keypoints in pixels, GenerateOutput)."""
    frame, h, w = _frame(pipe, image, size)
    out = pipe.generate(frame, prompt, max_new_tokens=max_new_tokens, **gen)
    g = pad_to_square(h, w)
    pts = [Keypoint((min(max(x * g.side - g.left, 0.0), float(w)), min(max(y * g.side - g.top, 0.0), float(h))),
                    (x, y)) for x, y in parse_keypoints(out.text)]
    return pts, out


def _detection(label: str | None, box: Box, h: int, w: int) -> Detection:
    return Detection(label, box_to_pixels(box, h, w), box)


__all__ = ["Detection", "Keypoint", "Grounding", "detect", "ground", "keypoints", "DETECT_PROMPT", "GROUND_PROMPT"]
