"""Scoring model answers on the generated tasks (:mod:`edgevlm.train.data`).

- color / shape / count / digit: exact match after normalising case, punctuation, whitespace and the
  articles a/an/the; number words count as digits ("three" == "3"), so "Three." is right for "3".
- ground: predicted boxes (any format :func:`~edgevlm.runtime.boxes.parse_boxes` accepts) are matched
  one-to-one to the ground-truth boxes greedily by descending IoU; a GT box is a hit when its match has
  IoU >= 0.5. The exact (unrounded) GT boxes in ``meta["boxes"]`` are used, not the 2-decimal answer.
- caption: recall of the "colour shape" mentions, plus how many mentioned pairs are not in the scene.

:func:`aggregate` reports micro averages (grounding and caption recall over boxes / mentions, the
others over questions); a metric with no samples is None (JSON-friendly, unlike NaN).
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


def aggregate(scores: Iterable[dict]) -> dict:
    """Summary metrics over :func:`score` results (any mix of tasks)."""
    by_task: dict[str, list[dict]] = {t: [] for t in TASKS}
    for s in scores:
        if s["task"] not in by_task:
            raise ConfigError(f"score for unknown task {s['task']!r}")
        by_task[s["task"]].append(s)

    def acc(tasks: tuple[str, ...]) -> float | None:
        rows = [s for t in tasks for s in by_task[t]]
        return _ratio(sum(bool(s["correct"]) for s in rows), len(rows))

    g, c = by_task["ground"], by_task["caption"]
    out = {
        "qa_accuracy": acc(("color", "shape")),
        "color_accuracy": acc(("color",)),
        "shape_accuracy": acc(("shape",)),
        "count_accuracy": acc(("count",)),
        "grounding_iou50": _ratio(sum(s["hits"] for s in g), sum(s["n_gt"] for s in g)),
        "grounding_exact": acc(("ground",)),  # every GT box hit and no extra boxes
        "grounding_mean_iou": _ratio(sum(s["mean_iou"] * s["n_gt"] for s in g), sum(s["n_gt"] for s in g)),
        "digit_accuracy": acc(("digit",)),
        "caption_recall": _ratio(sum(s["n_recalled"] for s in c), sum(s["n_mentions"] for s in c)),
        "caption_hallucinated": _ratio(sum(s["n_hallucinated"] for s in c), len(c)),  # per caption
    }
    out.update({f"n_{t}": len(rows) for t, rows in by_task.items()})
    return out


__all__ = ["IOU_THRESHOLD", "normalize", "match_boxes", "score", "aggregate"]
