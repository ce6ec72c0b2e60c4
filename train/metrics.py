"""Scoring model answers on the generated tasks (:mod:`edgevlm.train.data`).

- color / shape / count / digit: exact match after normalising case, punctuation, whitespace and the
  articles a/an/the; number words count as digits ("three" == "3"), so "Three." is right for "3".
- ground: predicted boxes (any format :func:`~edgevlm.runtime.boxes.parse_boxes` accepts) are matched
  one-to-one to the ground-truth boxes greedily by descending IoU; a GT box is a hit when its match has
  IoU >= 0.5. The exact (unrounded) GT boxes in ``meta["boxes"]`` are used, not the 2-decimal answer.
- caption: recall of the "colour shape" mentions, plus how many mentioned pairs are not in the scene.

:func:`aggregate` reports micro averages (grounding and caption recall over boxes / mentions, the
others over questions); a metric with no samples is None (JSON-friendly, unlike NaN). Every accuracy
comes with its 95 % Wilson score interval (``<metric>_lo`` / ``<metric>_hi``), so that two runtimes'
or two recipes' figures can be told from noise: with 60 questions an accuracy of 80 % is 68-88 %.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from edgevlm.errors import ConfigError
from edgevlm.runtime.boxes import BoxFormatError, iou, parse_boxes
from edgevlm.scenes import COLORS, SHAPES

from .data import TASKS, Sample

IOU_THRESHOLD = 0.5

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """``" The  Red. "`` -> ``"red"``; ``"Three!"`` -> ``"3"``."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def match_boxes(pred: list, gt: list) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching by descending IoU: ``[(pred_i, gt_j, iou), ...]`` for IoU > 0."""
    pairs = sorted(((iou(p, g), i, j) for i, p in enumerate(pred) for j, g in enumerate(gt)),
                   key=lambda t: (-t[0], t[1], t[2]))  # ties: earlier boxes first, deterministic
    used_p, used_g, out = set(), set(), []
    for v, i, j in pairs:
        if v <= 0.0:
            break
        if i in used_p or j in used_g:
            continue
        used_p.add(i)
        used_g.add(j)
        out.append((i, j, v))
    return out


# Every "colour shape" phrase a caption could mention, plural included ("two red circles").
_PAIR = re.compile(r"\b(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")


def score(sample: Sample, prediction: str) -> dict:
    """Score one prediction. Always has ``task``; see the module docstring for the other keys."""
    if not isinstance(prediction, str):
        raise BoxFormatError(f"prediction must be str, got {type(prediction).__name__}")
    task = sample.task
    if task in ("color", "shape", "count", "digit"):
        return {"task": task, "correct": normalize(prediction) == normalize(sample.answer)}
    if task == "ground":
        gt = [tuple(b) for b in sample.meta["boxes"]]
        pred = parse_boxes(prediction)
        matches = match_boxes(pred, gt)
        hits = sum(1 for _, _, v in matches if v >= IOU_THRESHOLD)
        return {"task": task, "n_gt": len(gt), "n_pred": len(pred), "hits": hits,
                "mean_iou": sum(v for _, _, v in matches) / len(gt) if gt else 0.0,
                "correct": hits == len(gt) and len(pred) == len(gt)}
    if task == "caption":
        wanted = set(sample.meta["mentions"])
        said = {f"{c} {s}" for c, s in _PAIR.findall(prediction.lower())}
        n_hit = len(wanted & said)
        return {"task": task, "n_mentions": len(wanted), "n_recalled": n_hit,
                "recall": n_hit / len(wanted) if wanted else 1.0, "n_hallucinated": len(said - wanted)}
    raise ConfigError(f"cannot score task {task!r}; expected one of {TASKS}")


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (95 % by default): the proportions p
    with ``|k/n - p| <= z * sqrt(p (1 - p) / n)``. Unlike the normal approximation it stays inside [0, 1]
    and is not empty at 0 or n successes. ``(None, None)`` for n = 0."""
    if n <= 0:
        return None, None
    if not 0 <= k <= n:
        raise ConfigError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    phat, z2 = k / n, z * z
    centre = (phat + z2 / (2 * n)) / (1 + z2 / n)
    half = z * ((phat * (1 - phat) / n + z2 / (4 * n * n)) ** 0.5) / (1 + z2 / n)
    # at 0 or n successes an end is exactly 0 or 1; the closed form reaches it only up to rounding
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def paired_difference_interval(pairs: Iterable[tuple[bool, bool]], z: float = Z95
                               ) -> tuple[float, float, float] | tuple[None, None, None]:
    """Difference of two accuracies measured on the same questions, ``p_a - p_b``, with its 95 % interval
    -> ``(diff, lo, hi)``; ``pairs`` holds ``(a correct, b correct)`` per question.

    Two runtimes answer the same questions, so their errors are correlated and two independent Wilson
    intervals overstate the noise of their difference. This is Newcombe's square-and-add interval for
    paired proportions (his method 10, 1998): each accuracy's Wilson interval, combined with the
    correlation ``phi`` of the 2x2 table of outcomes. ``(None, None, None)`` for no pairs."""
    both = only_a = only_b = neither = 0
    for a, b in pairs:
        a, b = bool(a), bool(b)
        both += a and b
        only_a += a and not b
        only_b += b and not a
        neither += not a and not b
    n = both + only_a + only_b + neither
    if n == 0:
        return None, None, None
    pa, pb = (both + only_a) / n, (both + only_b) / n
    la, ua = wilson_interval(both + only_a, n, z)
    lb, ub = wilson_interval(both + only_b, n, z)
    den = ((both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)) ** 0.5
    phi = (both * neither - only_a * only_b) / den if den else 0.0
    diff = pa - pb
    lo = diff - max(0.0, (pa - la) ** 2 - 2 * phi * (pa - la) * (ub - pb) + (ub - pb) ** 2) ** 0.5
    hi = diff + max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2) ** 0.5
    return diff, max(-1.0, lo), min(1.0, hi)


def aggregate(scores: Iterable[dict]) -> dict:
    """Summary metrics over :func:`score` results (any mix of tasks)."""
    by_task: dict[str, list[dict]] = {t: [] for t in TASKS}
    for s in scores:
        if s["task"] not in by_task:
            raise ConfigError(f"score for unknown task {s['task']!r}")
        by_task[s["task"]].append(s)

    counts: dict[str, tuple[int, int]] = {}  # accuracy metric -> (successes, trials), for the intervals

    def acc(tasks: tuple[str, ...], name: str) -> float | None:
        rows = [s for t in tasks for s in by_task[t]]
        counts[name] = (sum(bool(s["correct"]) for s in rows), len(rows))
        return _ratio(*counts[name])

    g, c = by_task["ground"], by_task["caption"]
    counts["grounding_iou50"] = (sum(s["hits"] for s in g), sum(s["n_gt"] for s in g))  # over boxes
    out = {
        "qa_accuracy": acc(("color", "shape"), "qa_accuracy"),
        "color_accuracy": acc(("color",), "color_accuracy"),
        "shape_accuracy": acc(("shape",), "shape_accuracy"),
        "count_accuracy": acc(("count",), "count_accuracy"),
        "grounding_iou50": _ratio(*counts["grounding_iou50"]),
        "grounding_exact": acc(("ground",), "grounding_exact"),  # every GT box hit and no extra boxes
        "grounding_mean_iou": _ratio(sum(s["mean_iou"] * s["n_gt"] for s in g), sum(s["n_gt"] for s in g)),
        "digit_accuracy": acc(("digit",), "digit_accuracy"),
        "caption_recall": _ratio(sum(s["n_recalled"] for s in c), sum(s["n_mentions"] for s in c)),
        "caption_hallucinated": _ratio(sum(s["n_hallucinated"] for s in c), len(c)),  # per caption
    }
    out.update({f"n_{t}": len(rows) for t, rows in by_task.items()})
    for name, (k, n) in counts.items():
        out[f"{name}_lo"], out[f"{name}_hi"] = wilson_interval(k, n)
    return out


__all__ = ["IOU_THRESHOLD", "normalize", "match_boxes", "score", "aggregate", "wilson_interval",
           "paired_difference_interval", "Z95"]
