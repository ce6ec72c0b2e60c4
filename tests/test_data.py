"""Generated images (edgevlm/scenes.py), the training / held-out data about them (train/data.py) and its
metrics (train/metrics.py)."""

import sys

import numpy as np
import pytest

from edgevlm.errors import ConfigError
from edgevlm.runtime.boxes import box_from_pixels, format_box, parse_boxes
from edgevlm.runtime.views import pad_to_square
from edgevlm.scenes import COLORS, SHAPES, digit_indices, make_scene
from edgevlm.train.data import TASKS, Sample, build_split, caption_for, group_by_image, iter_split
from edgevlm.train.metrics import aggregate, normalize, score


@pytest.fixture(scope="module")
def train():
    return build_split("train", n_scenes=24, n_digits=12, seed=0, per_task=2)


def qa(samples):
    return [(s.meta["image_id"], s.task, s.question, s.answer) for s in samples]


# ---- determinism and splits ----------------------------------------------------------------------


def test_same_seed_same_pixels_and_questions(train):
    again = build_split("train", n_scenes=24, n_digits=12, seed=0, per_task=2)
    assert qa(again) == qa(train)
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(again, train))
    other = build_split("train", n_scenes=4, n_digits=0, seed=1)
    assert other[0].image.tobytes() != train[0].image.tobytes()


def test_dropping_tasks_keeps_other_questions(train):
    only = build_split("train", n_scenes=24, n_digits=0, seed=0, tasks=("count",), per_task=2)
    assert qa(only) == [q for q in qa(train) if q[1] == "count"]


def test_splits_are_disjoint():
    tr = list(iter_split("train", 20, 0, seed=0))
    ho = list(iter_split("heldout", 20, 0, seed=0))
    assert not {g.image_id for g in tr} & {g.image_id for g in ho}
    assert not {g.image.tobytes() for g in tr} & {g.image.tobytes() for g in ho}
    tr_idx, ho_idx = set(digit_indices("train")), set(digit_indices("heldout"))
    assert not tr_idx & ho_idx and len(tr_idx) + len(ho_idx) == 1797 and len(ho_idx) >= 0.2 * 1797 - 1
    # More digits than the pool: indices cycle but never leave the split, and a repeat is a new render
    # (paper, ink, size, offset), which is what the grounding head's three renders per digit rely on.
    groups = list(iter_split("heldout", 0, len(ho_idx) + 10, tasks=("digit",)))
    assert {g.samples[0].meta["digit_index"] for g in groups} == ho_idx
    first, again = groups[0], groups[len(ho_idx)]
    assert first.samples[0].meta["digit_index"] == again.samples[0].meta["digit_index"]
    assert first.image.tobytes() != again.image.tobytes()


def test_novel_split_is_rendered_and_asked_unlike_training():
    """The "novel" evaluation split: held-out seeds and digits, and nothing rendered or phrased as in training:
    image sizes, backgrounds (no wood or laminate: their mean colour is a plain tone), object sizes, ink and
    every question template differ."""
    from edgevlm.scenes import NOVEL_SCENE_SIZES, SCENE_SIZES
    from edgevlm.train.data import NOVEL_TEMPLATES, TEMPLATES

    novel = list(iter_split("novel", 40, 10, seed=0))
    train_ids = {g.image_id for g in iter_split("train", 40, 10, seed=0)}
    assert not {g.image_id for g in novel} & train_ids
    sizes = {g.image.shape[:2] for g in novel if "/scene" in g.image_id}
    assert sizes <= set(NOVEL_SCENE_SIZES) and not sizes & set(SCENE_SIZES) and len(sizes) >= 3
    train_phrases = {q for task in TEMPLATES.values() for qs in task.values() for q in qs}
    novel_phrases = {q for task in NOVEL_TEMPLATES.values() for qs in task.values() for q in qs}
    assert not train_phrases & novel_phrases and set(NOVEL_TEMPLATES) == set(TEMPLATES)
    for g in novel:  # every question is a novel template filled in
        for smp in g.samples:
            assert any(_matches(t, smp.question) for t in novel_phrases), smp.question
    digits = [smp for g in novel for smp in g.samples if smp.task == "digit"]
    assert {smp.meta["digit_index"] for smp in digits} <= set(digit_indices("heldout"))
    assert all(smp.image.shape[:2] == (224, 224) for smp in digits)
    ink = [smp.image.reshape(-1, 3)[smp.image.reshape(-1, 3).sum(1).argmin()].astype(int) for smp in digits]
    assert max(int(c.max() - c.min()) for c in ink) > 60  # coloured ink, not the training's grey-black
    # object sizes reach beyond the training range on both sides
    sides = [max(o["box_px"][2] - o["box_px"][0], o["box_px"][3] - o["box_px"][1]) / min(g.image.shape[:2])
             for g in novel if "/scene" in g.image_id for o in g.samples[0].meta["objects"]]
    assert min(sides) < 0.12 and max(sides) > 0.30
    # deterministic
    again = list(iter_split("novel", 3, 2, seed=0))
    assert [g.image.tobytes() for g in again] == [g.image.tobytes() for g in novel[:3]] + \
        [g.image.tobytes() for g in novel[40:42]]


def _matches(template: str, question: str) -> bool:
    import re

    pattern = re.escape(template)
    for field in ("shape", "color", "plural"):
        pattern = pattern.replace(re.escape("{" + field + "}"), r"\w+")
    return re.fullmatch(pattern, question) is not None


def test_bad_arguments_raise_config_errors():
    for kwargs in ({"split": "test"}, {"tasks": ("color", "ocr")}, {"n_scenes": -1}):
        args = {"split": "train", "n_scenes": 1, "n_digits": 0, **kwargs}
        with pytest.raises(ConfigError):
            build_split(**args)


def test_samples_share_their_image_and_it_is_read_only():
    groups = list(iter_split("train", 3, 2))
    for g in groups:
        assert all(s.image is g.image for s in g.samples)
        assert g.image.dtype == np.uint8 and g.image.ndim == 3 and g.image.shape[2] == 3
        assert not g.image.flags.writeable
    flat = [s for g in groups for s in g.samples]
    regrouped = group_by_image(flat)
    assert [(g.image_id, len(g.samples)) for g in regrouped] == [(g.image_id, len(g.samples)) for g in groups]


# ---- scenes --------------------------------------------------------------------------------------


def test_scene_sizes_objects_and_layout():
    scenes = [make_scene(0, "train", i) for i in range(40)]
    kinds = {np.sign(s.image.shape[1] - s.image.shape[0]) for s in scenes}
    assert kinds == {-1, 0, 1}  # portrait, square and landscape all occur
    for s in scenes:
        h, w = s.image.shape[:2]
        assert 224 <= min(h, w) and max(h, w) <= 320
        assert 1 <= len(s.objects) <= 5
        assert len({(o.color, o.shape) for o in s.objects}) == len(s.objects)
        assert [o.box_px[0] for o in s.objects] == sorted(o.box_px[0] for o in s.objects)  # left to right
        for i, a in enumerate(s.objects):
            x1, y1, x2, y2 = a.box_px
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert 0.11 * min(h, w) <= max(x2 - x1, y2 - y1) <= 0.31 * min(h, w)
            for b in s.objects[i + 1:]:  # no overlaps
                assert b.box_px[0] >= x2 or a.box_px[0] >= b.box_px[2] or b.box_px[1] >= y2 or y1 >= b.box_px[3]


def _is_obj(pixels, o):
    hit = np.all(pixels == np.array(o.rgb, np.uint8), axis=-1)
    if o.outline is not None:
        hit |= np.all(pixels == np.array(o.outline, np.uint8), axis=-1)
    return hit


def test_object_boxes_are_tight():
    for i in range(12):
        s = make_scene(0, "heldout", i)
        img = s.image
        for o in s.objects:
            x1, y1, x2, y2 = o.box_px
            inside = img[y1:y2, x1:x2]
            # The drawn shape touches all four edges of its box ...
            assert _is_obj(inside[0], o).any() and _is_obj(inside[-1], o).any()
            assert _is_obj(inside[:, 0], o).any() and _is_obj(inside[:, -1], o).any()
            # ... and no pixel of its colour lies in the 1-px ring just outside it (objects keep a gap).
            ring = [img[y1 - 1, x1 - 1:x2 + 1], img[y2, x1 - 1:x2 + 1], img[y1:y2, x1 - 1], img[y1:y2, x2]]
            assert not any(_is_obj(r, o).any() for r in ring)
            # Independently: every pixel of the object's exact colours in the image lies in the box.
            ys, xs = np.nonzero(_is_obj(img, o))
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.box_px


def test_relative_boxes_match_hand_computation():
    for i in range(10):
        s = make_scene(3, "train", i)
        h, w = s.image.shape[:2]
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        for o in s.objects:
            x1, y1, x2, y2 = o.box_px
            want = ((x1 + left) / side, (y1 + top) / side, (x2 + left) / side, (y2 + top) / side)
            assert s.rel_box(o) == want  # integer sums, one float64 division each, as the library does: equal
    g = pad_to_square(240, 320)
    assert (g.side, g.top, g.left) == (320, 40, 0)  # the geometry the hand computation assumes


# ---- questions and answers -----------------------------------------------------------------------


def test_answers_consistent_with_meta(train):
    tasks_seen = set()
    for s in train:
        tasks_seen.add(s.task)
        m = s.meta
        if s.task == "digit":
            assert s.answer == str(m["digit"]) and m["digit_index"] in set(digit_indices("train"))
            continue
        objs = m["objects"]
        colors, shapes = [o["color"] for o in objs], [o["shape"] for o in objs]
        assert m["counts"]["total"] == len(objs)
        if s.task == "count":
            expected = {"total": len(objs), "color": colors.count(m.get("target")),
                        "shape": shapes.count(m.get("target"))}[m["kind"]]
            assert s.answer == str(expected) == str(m["count"])
        elif s.task == "color":
            assert shapes.count(m["target"]) == 1 and s.answer == colors[shapes.index(m["target"])]
            assert m["target"] in s.question
        elif s.task == "shape":
            assert colors.count(m["target"]) == 1 and s.answer == shapes[colors.index(m["target"])]
            assert m["target"] in s.question
        elif s.task == "ground":
            parsed = parse_boxes(s.answer)
            assert len(parsed) == len(m["boxes"]) >= 1
            for p, b in zip(parsed, m["boxes"]):
                # the answer prints 2 decimals (half a unit: 0.005); reading it back and subtracting round
                # at most twice more at a scale <= 1: 4 float64 ulps
                tol = 0.005 + 4 * sys.float_info.epsilon
                assert all(abs(x - y) <= tol for x, y in zip(p.as_tuple(), b, strict=True))
            assert [b[0] for b in m["boxes"]] == sorted(b[0] for b in m["boxes"])
            names = [f"{o['color']} {o['shape']}" for o in objs]
            h, w = m["size"]
            for name, b in zip(m["targets"], m["boxes"]):
                o = objs[names.index(name)]
                assert b == box_from_pixels(*o["box_px"], h=h, w=w).as_tuple()
        elif s.task == "caption":
            assert s.answer.endswith(" on a table.")
            pos = [s.answer.lower().index(n) for n in m["mentions"]]
            assert pos == sorted(pos) and len(m["mentions"]) == len(objs)
    assert tasks_seen == set(TASKS)


def test_caption_grammar():
    class O:
        def __init__(self, color, shape):
            self.color, self.shape, self.name = color, shape, f"{color} {shape}"
    assert caption_for([O("orange", "circle")]) == "An orange circle on a table."
    assert caption_for([O("red", "circle"), O("blue", "square"), O("green", "triangle")]) == \
        "A red circle, a blue square and a green triangle on a table."


# ---- metrics -------------------------------------------------------------------------------------

_IMG = np.zeros((4, 4, 3), np.uint8)


def _s(task, answer, **meta):
    return Sample(_IMG, "q", answer, task, meta)


def test_normalize():
    assert normalize("  The RED.  ") == "red"
    assert normalize("Three!") == "3" and normalize("3") == "3"


def test_exact_match_tasks():
    assert score(_s("color", "red"), "Red.")["correct"]
    assert not score(_s("color", "red"), "blue")["correct"]
    assert not score(_s("color", "red"), "red circle")["correct"]
    assert score(_s("count", "3"), "three")["correct"] and not score(_s("count", "3"), "4")["correct"]
    assert score(_s("digit", "7"), " 7 ")["correct"]
    assert score(_s("shape", "triangle"), "a triangle")["correct"]


def test_grounding_scores():
    gt = [(0.1, 0.1, 0.3, 0.3), (0.6, 0.6, 0.9, 0.9)]
    s = _s("ground", format_box(gt[0]), boxes=gt)
    both = score(s, "[0.6,0.6,0.9,0.9;0.1,0.1,0.3,0.3]")  # order does not matter
    assert both["hits"] == 2 and both["correct"]
    half = score(s, "[0.1,0.1,0.3,0.3;0.0,0.6,0.2,0.9]")  # one right, one far off
    assert half["hits"] == 1 and not half["correct"]
    shifted = score(s, "[0.15,0.1,0.35,0.3]")  # IoU 0.6 with the first: a hit
    assert shifted["hits"] == 1
    poor = score(s, "[0.2,0.1,0.4,0.3]")  # IoU 1/3: not a hit
    assert poor["hits"] == 0 and 0 < poor["mean_iou"] < 0.5
    extra = score(s, "<p>x</p>[0.1,0.1,0.3,0.3;0.6,0.6,0.9,0.9;0.4,0.4,0.5,0.5]")
    assert extra["hits"] == 2 and not extra["correct"]
    # One prediction cannot hit two GT boxes.
    dup = score(_s("ground", "", boxes=[gt[0], gt[0]]), format_box(gt[0]))
    assert dup["hits"] == 1
    assert score(s, "I don't know")["hits"] == 0
    agg = aggregate([both, half, poor])
    assert agg["grounding_iou50"] == 3 / 6 and agg["n_ground"] == 3  # a ratio of counts: one exact division


def test_caption_recall_and_aggregate():
    s = _s("caption", "", mentions=["red circle", "blue square"])
    sc = score(s, "Two red circles and a green triangle.")
    assert sc["recall"] == 0.5 and sc["n_hallucinated"] == 1
    scores = [sc, score(_s("color", "red"), "red"), score(_s("shape", "square"), "circle"),
              score(_s("count", "2"), "2"), score(_s("digit", "1"), "7")]
    agg = aggregate(scores)
    assert agg["qa_accuracy"] == 0.5 and agg["count_accuracy"] == 1.0 and agg["digit_accuracy"] == 0.0
    assert agg["caption_recall"] == 0.5 and agg["grounding_iou50"] is None
    assert {agg[f"n_{t}"] for t in TASKS} == {0, 1} and agg["n_ground"] == 0


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (48, 60), (60, 60), (1, 1)])
def test_wilson_interval_is_where_the_score_test_accepts(k, n):
    """The interval's ends are the proportions at which the score test |k/n - p| = z sqrt(p(1-p)/n) is
    at its bound, found here by bisection on that inequality rather than by the closed form."""
    from edgevlm.train.metrics import Z95, wilson_interval

    def inside(p):
        return abs(k / n - p) <= Z95 * (p * (1 - p) / n) ** 0.5

    def edge(lo, hi):  # inside(lo) != inside(hi): bisect to the crossing
        a_in = inside(lo)
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(mid) == a_in else (lo, mid)
        return (lo + hi) / 2

    lo, hi = wilson_interval(k, n)
    phat = k / n
    want_lo = 0.0 if k == 0 else edge(0.0, phat)
    want_hi = 1.0 if k == n else edge(phat, 1.0)
    # bisection to 2**-100 and the closed form agree to float64 rounding of a few operations (~1e-15)
    assert lo == pytest.approx(want_lo, abs=1e-12) and hi == pytest.approx(want_hi, abs=1e-12)
    assert lo <= phat <= hi


def test_aggregate_reports_intervals():
    from edgevlm.train.metrics import wilson_interval

    scores = [score(_s("color", "red"), "red")] * 48 + [score(_s("color", "red"), "blue")] * 12
    agg = aggregate(scores)
    assert agg["color_accuracy"] == 0.8
    assert (agg["color_accuracy_lo"], agg["color_accuracy_hi"]) == wilson_interval(48, 60)
    assert 0.68 < agg["color_accuracy_lo"] < 0.69 and 0.88 < agg["color_accuracy_hi"] < 0.89  # the docstring's
    assert agg["digit_accuracy"] is None and agg["digit_accuracy_lo"] is None
    with pytest.raises(ConfigError):
        wilson_interval(5, 4)


def test_paired_difference_interval_covers_the_true_difference():
    """Coverage by simulation: two correlated runtimes on 60 shared questions (accuracies 0.80 and 0.70,
    agreeing on most), 4,000 seeded draws. A 95 % interval should hold the true difference 0.10 in about
    95 % of draws; with 4,000 draws the binomial noise of that rate is 0.35 points, so [0.93, 0.975]
    leaves ~5 sigma below and allows the interval's known slight conservatism above."""
    from edgevlm.train.metrics import paired_difference_interval

    rng = np.random.default_rng(0)
    # joint outcomes (a, b): both right 0.65, only a 0.15, only b 0.05, neither 0.15
    cells = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=bool)
    hits = 0
    for _ in range(4000):
        draw = cells[rng.choice(4, size=60, p=[0.65, 0.15, 0.05, 0.15])]
        diff, lo, hi = paired_difference_interval(map(tuple, draw))
        assert lo <= diff <= hi
        hits += lo <= 0.10 <= hi
    assert 0.93 <= hits / 4000 <= 0.975


def test_paired_difference_interval_is_antisymmetric_and_narrow_for_identical_runtimes():
    from edgevlm.train.metrics import paired_difference_interval, wilson_interval

    pairs = [(True, True)] * 40 + [(True, False)] * 7 + [(False, True)] * 2 + [(False, False)] * 11
    d, lo, hi = paired_difference_interval(pairs)
    d2, lo2, hi2 = paired_difference_interval([(b, a) for a, b in pairs])
    assert d == pytest.approx(5 / 60) and (d2, lo2, hi2) == pytest.approx((-d, -hi, -lo))
    # identical answers: the difference is 0 and its interval far narrower than one accuracy's Wilson interval
    same = [(True, True)] * 45 + [(False, False)] * 15
    d, lo, hi = paired_difference_interval(same)
    w_lo, w_hi = wilson_interval(45, 60)
    assert d == 0 and lo <= 0 <= hi and hi - lo < (w_hi - w_lo) / 2
    assert paired_difference_interval([]) == (None, None, None)


def test_perfect_predictions_score_perfectly(train):
    agg = aggregate(score(s, s.answer) for s in train)
    for key in ("qa_accuracy", "count_accuracy", "grounding_iou50", "digit_accuracy", "caption_recall"):
        assert agg[key] == 1.0, key
    assert sum(agg[f"n_{t}"] for t in TASKS) == len(train)


def test_score_rejects_bad_input():
    with pytest.raises(ConfigError):
        score(_s("ocr", "x"), "x")
    with pytest.raises(TypeError):
        score(_s("color", "red"), None)


def test_palette_is_distinct():
    rgb = np.array(list(COLORS.values()), dtype=float)
    d = np.abs(rgb[:, None] - rgb[None]).max(-1) + np.eye(len(rgb)) * 1e9
    assert d.min() > 2 * 12 + 40  # jitter of +-12 per object cannot make two colours close
    assert len(SHAPES) == 3
