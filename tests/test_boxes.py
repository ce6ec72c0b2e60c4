"""SPHINX box text format, tolerant parsing, padded-square pixel conversion and IoU."""

import math
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgevlm.errors import EdgeVLMError
from edgevlm.runtime.boxes import (
    Box, BoxFormatError, box_from_pixels, box_to_pixels, format_box, format_boxes, format_keypoints, iou,
    parse_boxes, parse_grounded, parse_keypoints,
)
from edgevlm.runtime.views import pad_to_square


EPS64 = sys.float_info.epsilon  # plain Python floats: IEEE float64, correctly rounded on every CPU


def close(a, b, ulps=0.0):
    """Element-wise |a - b| <= ulps float64 ulps of max|b| (ulps=0: equal)."""
    tol = ulps * EPS64 * max((abs(y) for y in b), default=0.0)
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# ---- formatting ----------------------------------------------------------------------------------


def test_format_box_rounds_clamps_and_never_prints_negative_zero():
    assert format_box(Box(0.123, 0.4, 0.3349, 0.6051)) == "[0.12,0.40,0.33,0.61]"
    assert format_box((-0.3, -0.001, 1.7, 0.999)) == "[0.00,0.00,1.00,1.00]"
    assert format_box([0.5, 0.25, 0.75, 1], decimals=3) == "[0.500,0.250,0.750,1.000]"
    assert format_box((0.2, 0.2, 0.4, 0.4), decimals=0) == "[0,0,0,0]"


def test_format_boxes_and_keypoints():
    assert format_boxes([Box(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.9, 0.9)]) == "[0.10,0.20,0.30,0.40;0.50,0.50,0.90,0.90]"
    assert format_boxes([]) == "[]"
    assert format_keypoints([(0.25, 0.5), (1.2, -1)]) == "[0.25,0.50;1.00,0.00]"


@pytest.mark.parametrize("bad", [(0.1, 0.2, 0.3), (0.1, 0.2, 0.3, float("nan")), "abcd", None, (0, 0, 0, "x")])
def test_format_box_rejects_non_boxes_with_typed_error(bad):
    with pytest.raises(BoxFormatError):
        format_box(bad)


@pytest.mark.parametrize("decimals", [-1, 7, 2.0, True])
def test_format_box_rejects_bad_decimals(decimals):
    with pytest.raises(BoxFormatError):
        format_box((0, 0, 1, 1), decimals=decimals)


# ---- parsing -------------------------------------------------------------------------------------

B1, B2 = (0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.9, 0.9)


@pytest.mark.parametrize("text,expected", [
    ("[0.1,0.2,0.3,0.4]", [B1]),
    ("[ 0.10 , 0.2,0.3 ,0.4 ]", [B1]),
    ("<p>red circle</p> [0.1, 0.2,0.3,0.4; 0.5,0.5,0.9,0.9]", [B1, B2]),
    ("first [0.1,0.2,0.3,0.4] then [0.5,0.5,0.9,0.9].", [B1, B2]),
    ("[0.1000,0.2,0.300000,.4]", [B1]),
    ("[[0.1,0.2,0.3,0.4]]", [B1]),
    ("[0.1,0.2,0.3,0.4;]", [B1]),                       # empty part skipped
    ("[0.1,0.2,0.3;0.5,0.5,0.9,0.9]", [B2]),             # 3 numbers: that part skipped
    ("[0.1,0.2,0.3,0.4,0.5]", []),                       # 5 numbers
    ("[a,b,c,d] [0.1,0.2,0.3,0.4]", [B1]),
    ("[12, 40, 330, 610]", []),                          # pixel convention: skipped, not clamped
    ("[1.02,-0.01,0.3,0.4]", [(1.0, 0.0, 0.3, 0.4)]),    # small overshoot clamped
    ("[0.1,0.2,0.3,0.4", []),                            # unbalanced
    ("0.1,0.2,0.3,0.4", []),
    ("[1e-1,2E-1,0.3,0.4]", [B1]),
    ("[nan,0.2,0.3,0.4] [inf,0,1,1]", []),
    ("", []),
    ("[]", []),
    ("[;;;,,,]", []),
    ("]][[", []),
])
def test_parse_boxes_formats(text, expected):
    got = parse_boxes(text)
    assert len(got) == len(expected)
    for b, e in zip(got, expected):
        assert isinstance(b, Box) and close(b.as_tuple(), e)  # float("0.1") is the literal 0.1: equal


@pytest.mark.parametrize("bad", [None, b"[0.1,0.2,0.3,0.4]", 3, ["[0,0,1,1]"]])
def test_parse_rejects_non_str_with_typed_error(bad):
    for fn in (parse_boxes, parse_keypoints, parse_grounded):
        with pytest.raises(BoxFormatError) as e:
            fn(bad)
        assert isinstance(e.value, EdgeVLMError) and isinstance(e.value, TypeError)


def test_parse_keypoints_and_boxes_do_not_mix():
    text = "nose [0.5,0.25] eyes [0.4,0.2;0.6,0.2] box [0.1,0.2,0.3,0.4]"
    assert parse_keypoints(text) == [(0.5, 0.25), (0.4, 0.2), (0.6, 0.2)]
    assert [b.as_tuple() for b in parse_boxes(text)] == [B1]


def test_parse_grounded_pairs_phrases_with_brackets():
    text = "<p>red circle</p> [0.1,0.2,0.3,0.4] and <p>squares</p>[0.5,0.5,0.9,0.9;0.1,0.2,0.3,0.4] [0,0,1,1]"
    got = parse_grounded(text)
    assert [(label, len(bs)) for label, bs in got] == [("red circle", 1), ("squares", 2), (None, 1)]


# ---- pixel geometry ------------------------------------------------------------------------------


def test_relative_box_matches_hand_computation_with_centring_offset():
    # One float64 division of the same integers on both sides: equal (close with ulps=0).
    # Landscape 240x320: side 320, image centred 40 px down. Portrait 320x240: 40 px right.
    assert close(box_from_pixels(32, 20, 96, 80, h=240, w=320).as_tuple(), (32 / 320, 60 / 320, 96 / 320, 120 / 320))
    assert close(box_from_pixels(32, 20, 96, 80, h=320, w=240).as_tuple(), (72 / 320, 20 / 320, 136 / 320, 80 / 320))
    # Odd padding floors: 225x300 -> top = 37, not 37.5.
    assert close(box_from_pixels(0, 0, 300, 225, h=225, w=300).as_tuple(), (0, 37 / 300, 1, 262 / 300))
    # Square images have no offset.
    assert close(box_from_pixels(10, 20, 30, 40, h=100, w=100).as_tuple(), (0.1, 0.2, 0.3, 0.4))


@pytest.mark.parametrize("h,w", [(240, 320), (320, 240), (225, 300), (301, 200)])
def test_pixel_box_round_trips_within_half_a_pixel(h, w):
    px = (17, 33, w - 41, h - 5)
    b = box_from_pixels(*px, h=h, w=w)
    # b = (x + left) / side, then b * side - left: two roundings at the scale of side (< 1.25 max|px| here)
    assert close(box_to_pixels(b, h, w), px, ulps=4)
    # Through text at 3 decimals (0.0005 * side < 0.5 px for side <= 1000).
    back = box_to_pixels(parse_boxes(format_box(b, decimals=3))[0], h, w)
    assert all(abs(a - e) <= 0.5 for a, e in zip(back, px))
    # The whole image maps to the image's footprint on the square.
    g = pad_to_square(h, w)
    full = box_from_pixels(0, 0, w, h, h=h, w=w)
    assert close(full.as_tuple(), (g.left / g.side, g.top / g.side, (g.left + w) / g.side, (g.top + h) / g.side))


def test_box_to_pixels_clips_padding_unless_asked_not_to():
    assert box_to_pixels((0, 0, 1, 1), 240, 320) == (0.0, 0.0, 320.0, 240.0)
    assert box_to_pixels((0, 0, 1, 1), 240, 320, clip=False) == (0.0, -40.0, 320.0, 280.0)


def test_iou():
    # exact: a box with itself gives inter == area and union = 2a - a = a (both exact in float64); the
    # integer boxes below have integer areas
    assert iou(B1, B1) == 1.0
    assert iou(B1, B2) == 0.0
    assert iou((0, 0, 2, 1), (1, 0, 3, 1)) == 1 / 3
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert iou((0.5, 0.5, 0.2, 0.2), (0, 0, 1, 1)) == 0.0  # inverted box: no area


# ---- property tests ------------------------------------------------------------------------------

_bracketish = st.text(alphabet="[];,.0123456789 -+eE<p>/\nabc", max_size=80)


@given(st.one_of(st.text(max_size=200), _bracketish))
def test_parse_never_raises_and_returns_unit_boxes(text):
    for b in parse_boxes(text):
        assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in b.as_tuple())
    for x, y in parse_keypoints(text):
        assert 0.0 <= x <= 1.0 and 0.0 <= y <= 1.0
    parse_grounded(text)


_coord = st.floats(min_value=-0.5, max_value=1.5, allow_nan=False)


@given(st.lists(st.tuples(_coord, _coord, _coord, _coord), max_size=6), st.integers(1, 5))
def test_format_parse_round_trip_within_rounding(boxes, decimals):
    parsed = parse_boxes(format_boxes(boxes, decimals))
    assert len(parsed) == len(boxes)
    # formatting rounds to `decimals` (half a unit of the last digit); reading the text back and the
    # subtraction each round once more at a scale <= 1 (values are clamped to [0, 1]): 4 float64 ulps
    tol = 0.5 * 10.0 ** -decimals + 4 * EPS64
    for b, p in zip(boxes, parsed):
        assert all(abs(x - min(max(v, 0.0), 1.0)) <= tol for x, v in zip(p.as_tuple(), b, strict=True))
