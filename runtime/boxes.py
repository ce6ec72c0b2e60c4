"""SPHINX box / keypoint text: formatting, tolerant parsing, pixel conversion and IoU.

The convention (reference/architecture.md §1.6): a box is ``[x1,y1,x2,y2]`` with floats in 0..1,
relative to the **padded square** of the original image -- ``side = max(h, w)``, the image centred at
offset ``(side - short) // 2`` on its short axis (the geometry of :func:`views.pad_to_square`, reused
here so that preprocessing and boxes can never disagree). Several boxes for one phrase share one
bracket, separated by ``;``: ``[x1,y1,x2,y2;x1,y1,x2,y2]``. Keypoints are ``[x,y]`` in the same frame.

Pixel coordinates are continuous edges in the original image: a box tight around columns ``c0..c1``
and rows ``r0..r1`` (inclusive) is ``(c0, r0, c1 + 1, r1 + 1)``. That makes the box's width its pixel
count, and ``box_from_pixels`` / ``box_to_pixels`` exact inverses (up to float rounding).

Rounding: :func:`format_box` clamps every value to [0, 1] and prints it with ``decimals`` digits via
Python's ``format`` (round-half-even on the binary value), so a formatted coordinate is within
``0.5 * 10**-decimals`` of the clamped value -- at 2 decimals that is 0.005 of the side, 1.6 px on a
320 px image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from edgevlm.errors import BoxFormatError
from .views import pad_to_square


# A number as a model might print it: "0.12", ".5", "1", "1.", "-0.01", "1e-3".
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
# The innermost brackets only: "[[0.1,0.2,0.3,0.4]]" still yields the box.
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_PHRASE = re.compile(r"<p>(.*?)</p>", re.DOTALL)

# Parsed values may overshoot [0, 1] a little (a model printing "1.01" or "-0.00"); those are clamped.
# Anything further out is a different convention (pixels, percent) and the box is skipped, because
# clamping [12, 40, 330, 610] to [1, 1, 1, 1] would silently turn garbage into a plausible answer.
PARSE_TOLERANCE = 0.05


@dataclass(frozen=True)
class Box:
    """``x1, y1, x2, y2`` relative to the padded square (0..1, top-left origin)."""

    x1: float
    y1: float
    x2: float
    y2: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    @property
    def area(self) -> float:
        # Degenerate / inverted boxes (x2 < x1) have zero area rather than a negative one.
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)

    def clamped(self) -> Box:
        return Box(*(_clamp01(v) for v in self.as_tuple()))


def _clamp01(v: float) -> float:
    return 0.0 if v < 0.0 else 1.0 if v > 1.0 else float(v)


def _as_box(box: Box | Sequence[float]) -> Box:
    if isinstance(box, Box):
        vals = box.as_tuple()
    else:
        try:
            vals = tuple(float(v) for v in box)
        except (TypeError, ValueError) as e:
            raise BoxFormatError(f"a box must be a Box or four numbers, got {box!r}") from e
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise BoxFormatError(f"a box must be four finite numbers x1,y1,x2,y2, got {vals!r}")
    return Box(*vals)


def _check_decimals(decimals: int) -> None:
    # More than 6 digits is noise for a 0..1 coordinate and only costs the decoder tokens.
    if not isinstance(decimals, int) or isinstance(decimals, bool) or not 0 <= decimals <= 6:
        raise BoxFormatError(f"decimals must be an int in 0..6, got {decimals!r}")


def _fmt(v: float, decimals: int) -> str:
    s = f"{_clamp01(v):.{decimals}f}"
    return "0" + s[1:] if s.startswith("-") else s  # never print "-0.00"


def format_box(box: Box | Sequence[float], decimals: int = 2) -> str:
    """``"[0.12,0.40,0.33,0.61]"``: values clamped to [0, 1], ``decimals`` digits, no spaces."""
    _check_decimals(decimals)
    b = _as_box(box)
    return "[" + ",".join(_fmt(v, decimals) for v in b.as_tuple()) + "]"


def format_boxes(boxes: Sequence[Box | Sequence[float]], decimals: int = 2) -> str:
    """Several boxes in one bracket: ``"[a,b,c,d;e,f,g,h]"`` (order kept; ``"[]"`` for none)."""
    _check_decimals(decimals)
    return "[" + ";".join(format_box(b, decimals)[1:-1] for b in boxes) + "]"


def format_keypoints(points: Sequence[Sequence[float]], decimals: int = 2) -> str:
    """``"[x,y]"`` or ``"[x,y;x,y]"`` with the same clamping/rounding as :func:`format_box`."""
    _check_decimals(decimals)
    parts = []
    for p in points:
        vals = tuple(float(v) for v in p)
        if len(vals) != 2 or not all(math.isfinite(v) for v in vals):
            raise BoxFormatError(f"a keypoint must be two finite numbers x,y, got {p!r}")
        parts.append(",".join(_fmt(v, decimals) for v in vals))
    return "[" + ";".join(parts) + "]"


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise BoxFormatError(f"expected model output text (str), got {type(text).__name__}")
    return text


def _groups(body: str, arity: int) -> list[tuple[float, ...]]:
    """Split one bracket's body on ``;`` into groups of ``arity`` in-range numbers; skip the rest."""
    out = []
    for part in body.split(";"):
        tokens = [t.strip() for t in part.split(",")]
        if len(tokens) != arity or not all(_NUMBER.match(t) for t in tokens):
            continue
        vals = tuple(float(t) for t in tokens)
        if not all(math.isfinite(v) and -PARSE_TOLERANCE <= v <= 1 + PARSE_TOLERANCE for v in vals):
            continue
        out.append(tuple(_clamp01(v) for v in vals))
    return out


def parse_boxes(text: str) -> list[Box]:
    """Every well-formed box in ``text``, in reading order; never raises on a str.

    Tolerates spaces, any decimal count, several brackets, ``;``-separated boxes in one bracket and
    ``<p>phrase</p>`` prefixes (ignored here; see :func:`parse_grounded`). A ``;``-part that is not
    exactly four numbers within [-0.05, 1.05] is skipped; kept values are clamped to [0, 1]. The
    order of the corners is kept as written (an inverted box simply has zero area / IoU).
    """
    text = _check_text(text)
    return [Box(*g) for m in _BRACKET.finditer(text) for g in _groups(m.group(1), 4)]


def parse_keypoints(text: str) -> list[tuple[float, float]]:
    """Every ``[x,y]`` point (``;`` separates several in one bracket), with parse_boxes' tolerance."""
    text = _check_text(text)
    return [(g[0], g[1]) for m in _BRACKET.finditer(text) for g in _groups(m.group(1), 2)]


def parse_grounded(text: str) -> list[tuple[str | None, list[Box]]]:
    """``<p>red circle</p> [..;..] <p>cup</p>[..]`` -> ``[("red circle", [...]), ("cup", [...])]``.

    Each bracket holding at least one box is paired with the nearest ``<p>`` phrase before it that
    no earlier bracket has taken (None when there is none), so grounded captions keep their labels.
    """
    text = _check_text(text)
    phrases = [(m.end(), m.group(1).strip()) for m in _PHRASE.finditer(text)]
    out: list[tuple[str | None, list[Box]]] = []
    taken_upto = -1  # phrases ending at or before this position are used up
    for m in _BRACKET.finditer(text):
        boxes = [Box(*g) for g in _groups(m.group(1), 4)]
        if not boxes:
            continue
        label = None
        for end, phrase in reversed(phrases):
            if taken_upto < end <= m.start():
                label = phrase
                taken_upto = end
                break
        out.append((label, boxes))
    return out


# ---- pixel <-> padded-square conversion ----------------------------------------------------------


def box_from_pixels(x1: float, y1: float, x2: float, y2: float, h: int, w: int) -> Box:
    """Original-image pixel edges of an ``h x w`` image -> box relative to its padded square (unclamped)."""
    g = pad_to_square(h, w)
    s = float(g.side)
    return Box((x1 + g.left) / s, (y1 + g.top) / s, (x2 + g.left) / s, (y2 + g.top) / s)


def box_to_pixels(box: Box | Sequence[float], h: int, w: int, clip: bool = True) -> tuple[float, float, float, float]:
    """Box relative to the padded square -> pixel edges in the original ``h x w`` image.

    With ``clip`` the result is clipped to the image (a predicted box may reach into the padding);
    values stay floats so callers choose their own rounding.
    """
    b = _as_box(box)
    g = pad_to_square(h, w)
    x1, y1 = b.x1 * g.side - g.left, b.y1 * g.side - g.top
    x2, y2 = b.x2 * g.side - g.left, b.y2 * g.side - g.top
    if clip:
        x1, x2 = (min(max(v, 0.0), float(w)) for v in (x1, x2))
        y1, y2 = (min(max(v, 0.0), float(h)) for v in (y1, y2))
    return (x1, y1, x2, y2)


def iou(a: Box | Sequence[float], b: Box | Sequence[float]) -> float:
    """Intersection over union of two boxes (any common frame); 0.0 when the union is empty."""
    a, b = _as_box(a), _as_box(b)
    iw = min(a.x2, b.x2) - max(a.x1, b.x1)
    ih = min(a.y2, b.y2) - max(a.y1, b.y1)
    inter = max(0.0, iw) * max(0.0, ih)
    union = a.area + b.area - inter
    return inter / union if union > 0.0 else 0.0


__all__ = ["Box", "BoxFormatError", "PARSE_TOLERANCE", "format_box", "format_boxes", "format_keypoints",
           "parse_boxes", "parse_keypoints", "parse_grounded", "box_from_pixels", "box_to_pixels", "iou"]
