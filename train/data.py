"""The demo task's training and held-out data: questions and answers about the generated images of
:mod:`edgevlm.scenes` (captions, colours, shapes, counts, boxes, digits).

Everything is a pure function of ``(split, seed, index)``: each task's question draws from its own
``numpy.random.Generator`` (:func:`edgevlm.scenes.split_rng` with the task as sub-stream), so the same
call gives identical questions on any machine, and asking for fewer tasks does not change the others'
questions. Splits and their disjoint seed spaces are those of :mod:`edgevlm.scenes`.

Boxes follow SPHINX (reference/architecture.md §1.6, :mod:`edgevlm.runtime.boxes`): answers carry
``[x1,y1,x2,y2]`` relative to the padded square, 2 decimals; ``meta["boxes"]`` keeps the exact values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgevlm.errors import ConfigError
from edgevlm.runtime.boxes import format_boxes
from edgevlm.scenes import (COLORS, DIGIT_ORDER_STREAM, DIGIT_STREAM, QUESTION_STREAM, SHAPES, Scene,
                            SceneObject, check_split, digit_dataset, digit_indices, make_scene, render_digit,
                            split_rng)

TASKS = ("caption", "color", "shape", "count", "ground", "digit")
BOX_DECIMALS = 2

# Question paraphrases per task and kind; answers are fixed strings (see the module docstring).
TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "caption": {"caption": ("Describe the image briefly.", "Provide a one-sentence caption for the provided image.",
                            "What is on the table?")},
    "color": {"color": ("What color is the {shape}?", "What is the color of the {shape}?",
                        "Which color does the {shape} have?", "Tell me the color of the {shape}.")},
    "shape": {"shape": ("What shape is the {color} object?", "What is the shape of the {color} object?",
                        "Which shape is the {color} one?")},
    "count": {"total": ("How many objects are on the table?", "How many objects are there?",
                        "Count the objects on the table."),
              "color": ("How many {color} objects are there?", "Count the {color} objects."),
              "shape": ("How many {plural} are there?", "Count the {plural} on the table.")},
    "ground": {"one": ("Where is the {color} {shape}? Answer with a bounding box.",
                       "Please provide the bounding box coordinate of the region this sentence describes: "
                       "the {color} {shape}.",
                       "Locate the {color} {shape}.", "Give the bounding box of the {color} {shape}."),
               "shape": ("Find all the {plural}.", "Detect all {plural} shown in the image."),
               "color": ("Find all the {color} objects.", "Detect all {color} objects shown in the image.")},
    "digit": {"digit": ("What digit is shown?", "What number is written in the image?", "Which digit is this?",
                        "Read the handwritten digit.")},
}


# The "novel" split's phrasings: none of them is a training template (tests/test_data.py checks it).
NOVEL_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "caption": {"caption": ("What do you see in this picture?", "Summarize the picture in one sentence.")},
    "color": {"color": ("Can you tell me what colour the {shape} is?", "The {shape} is which color?",
                        "Name the color of the {shape}.")},
    "shape": {"shape": ("Which shape is drawn in {color}?", "Tell me the shape of the {color} thing.")},
    "count": {"total": ("How many things can you see?", "What is the number of objects?"),
              "color": ("How many objects are {color}?", "What is the number of {color} objects?"),
              "shape": ("How many {plural} do you see?", "What is the number of {plural}?")},
    "ground": {"one": ("Draw a bounding box around the {color} {shape}.", "Box the {color} {shape}."),
               "shape": ("Give bounding boxes for every {plural}.",),
               "color": ("Give bounding boxes for everything {color}.",)},
    "digit": {"digit": ("Which number is written here?", "Read the number in the picture.")},
}


# ---- data types ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value; identity is what we want
class Sample:
    """One question about one image. ``image`` is HWC uint8 RGB, read-only, shared by its group."""

    image: np.ndarray
    question: str
    answer: str
    task: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ImageGroup:
    """An image and every sample asking about it: encode ``image`` once, train on all ``samples``."""

    image_id: str
    image: np.ndarray
    samples: tuple[Sample, ...]


# ---- questions -----------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(objects: Sequence[SceneObject]) -> str:
    """``"A red circle, a blue square and an orange triangle on a table."`` (objects left to right)."""
    parts = [f"{_article(o.color)} {o.name}" for o in objects]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return listed[0].upper() + listed[1:] + " on a table."


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def scene_questions(scene: Scene, task: str, rng: np.random.Generator,
                    templates: dict[str, dict[str, tuple[str, ...]]] = TEMPLATES) -> tuple[str, str, dict] | None:
    """One (question, answer, task-specific meta) for ``task`` about ``scene``; None if not askable."""
    objs = scene.objects
    colors = [o.color for o in objs]
    shapes = [o.shape for o in objs]
    t = templates[task]
    if task == "caption":
        return _pick(rng, t["caption"]), caption_for(objs), {"mentions": [o.name for o in objs]}
    if task == "color":  # only about a shape that occurs once, so the answer is unambiguous
        cands = [o for o in objs if shapes.count(o.shape) == 1]
        if not cands:
            return None
        o = _pick(rng, cands)
        return _pick(rng, t["color"]).format(shape=o.shape), o.color, {"target": o.shape}
    if task == "shape":  # colours are unique per scene only when they occur once
        cands = [o for o in objs if colors.count(o.color) == 1]
        if not cands:
            return None
        o = _pick(rng, cands)
        return _pick(rng, t["shape"]).format(color=o.color), o.shape, {"target": o.color}
    if task == "count":
        kind = _pick(rng, ("total", "color", "shape"))
        if kind == "total":
            return _pick(rng, t["total"]), str(len(objs)), {"count": len(objs), "kind": kind}
        # Mostly ask about something present, sometimes about something absent (answer "0").
        pool = colors if kind == "color" else shapes
        universe = list(COLORS) if kind == "color" else list(SHAPES)
        what = _pick(rng, pool) if rng.random() < 0.75 else _pick(rng, universe)
        q = _pick(rng, t[kind]).format(color=what, plural=what + "s")
        return q, str(pool.count(what)), {"count": pool.count(what), "kind": kind, "target": what}
    if task == "ground":
        r = rng.random()
        if r < 0.6:
            o = _pick(rng, objs)
            hits, kind = [o], "one"
            q = _pick(rng, t["one"]).format(color=o.color, shape=o.shape)
        elif r < 0.85:
            what, kind = _pick(rng, shapes), "shape"
            hits = [o for o in objs if o.shape == what]
            q = _pick(rng, t["shape"]).format(plural=what + "s")
        else:
            what, kind = _pick(rng, colors), "color"
            hits = [o for o in objs if o.color == what]
            q = _pick(rng, t["color"]).format(color=what)
        boxes = [scene.rel_box(o) for o in hits]  # objects are already left to right
        return q, format_boxes(boxes, BOX_DECIMALS), {"boxes": boxes, "kind": kind, "targets": [o.name for o in hits]}
    raise ConfigError(f"unknown scene task {task!r}; expected one of {TASKS[:-1]}")


# ---- splits --------------------------------------------------------------------------------------


def _check_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
    tasks = tuple(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ConfigError(f"unknown tasks {bad}; expected a subset of {TASKS}")
    return tasks


def _scene_meta(scene: Scene) -> dict:
    h, w = scene.image.shape[:2]
    objs = [{"color": o.color, "shape": o.shape, "box_px": o.box_px, "box": scene.rel_box(o), "rgb": o.rgb,
             "outline": o.outline} for o in scene.objects]
    counts = {"total": len(objs)}
    for key in (*COLORS, *SHAPES):
        counts[key] = sum(1 for o in scene.objects if key in (o.color, o.shape))
    return {"scene_id": scene.scene_id, "image_id": scene.scene_id, "size": (h, w), "objects": objs, "counts": counts}


def iter_split(split: str, n_scenes: int, n_digits: int, seed: int = 0, tasks: Iterable[str] = TASKS,
               per_task: int = 1) -> Iterator[ImageGroup]:
    """Yield each image once with all its samples: ``n_scenes`` scenes, then ``n_digits`` digits.

    ``per_task`` questions are drawn per scene and task (duplicates dropped; a task that cannot be
    asked about a scene -- e.g. ``color`` when no shape is unique -- is skipped, and a scene left with
    no samples is not yielded). Digits take one question each.
    """
    check_split(split)
    tasks = _check_tasks(tasks)
    templates = NOVEL_TEMPLATES if split == "novel" else TEMPLATES
    if n_scenes < 0 or n_digits < 0 or per_task < 1:
        raise ConfigError(f"need n_scenes >= 0, n_digits >= 0, per_task >= 1; got {n_scenes}, {n_digits}, {per_task}")
    scene_tasks = [t for t in tasks if t != "digit"]
    if scene_tasks:
        for i in range(n_scenes):
            scene = make_scene(seed, split, i)
            base = _scene_meta(scene)
            samples = []
            for task in scene_tasks:
                # Own stream per (scene, task): dropping a task leaves the other questions unchanged.
                qrng = split_rng(seed, split, QUESTION_STREAM, i, TASKS.index(task))
                seen = set()
                for _ in range(per_task):
                    qa = scene_questions(scene, task, qrng, templates)
                    if qa is None or qa[0] in seen:
                        continue
                    seen.add(qa[0])
                    samples.append(Sample(scene.image, qa[0], qa[1], task, {**base, "task": task, **qa[2]}))
            if samples:
                yield ImageGroup(scene.scene_id, scene.image, tuple(samples))
    if "digit" in tasks and n_digits:
        pool = digit_indices(split)
        order = split_rng(seed, split, DIGIT_ORDER_STREAM, 0).permutation(pool)
        labels = digit_dataset()[1]
        for k in range(n_digits):
            # Beyond the pool the indices cycle, but each instance gets its own paper, size and offset.
            idx = int(order[k % len(order)])
            drng = split_rng(seed, split, DIGIT_STREAM, k)
            img = render_digit(idx, drng, novel=split == "novel")
            image_id = f"{split}/s{seed}/digit{k:05d}"
            meta = {"scene_id": image_id, "image_id": image_id, "size": img.shape[:2], "task": "digit",
                    "digit": int(labels[idx]), "digit_index": idx}
            q = _pick(drng, templates["digit"]["digit"])
            yield ImageGroup(image_id, img, (Sample(img, q, str(int(labels[idx])), "digit", meta),))


def build_split(split: str, n_scenes: int, n_digits: int, seed: int = 0, tasks: Iterable[str] = TASKS,
                per_task: int = 1) -> list[Sample]:
    """The flat list of samples of :func:`iter_split` (samples of one image share its array)."""
    return [s for g in iter_split(split, n_scenes, n_digits, seed, tasks, per_task) for s in g.samples]


def group_by_image(samples: Iterable[Sample]) -> list[ImageGroup]:
    """Regroup samples (e.g. after filtering) by ``meta["image_id"]``, first-seen order."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.meta["image_id"], []).append(s)
    return [ImageGroup(k, v[0].image, tuple(v)) for k, v in groups.items()]


__all__ = ["TASKS", "TEMPLATES", "NOVEL_TEMPLATES", "Sample", "ImageGroup", "caption_for", "scene_questions", "iter_split",
           "build_split", "group_by_image"]
