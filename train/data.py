"""Data the project generates itself: synthetic table-top scenes and rendered handwritten digits.

Everything is a pure function of ``(split, seed, index)``: each scene / digit image and each task's
question draw from their own ``numpy.random.Generator`` seeded with a SeedSequence of integers, so
the same call gives identical pixels and questions on any machine for the same numpy and Pillow
versions (the pixel arithmetic is +, *, floor and linear interpolation -- no sin/exp whose last bit
depends on the platform's libm), and asking for fewer tasks does not change the others' questions.

Splits: ``"train"`` and ``"heldout"`` scenes use disjoint seed spaces (the split code is part of the
SeedSequence); digits use a fixed index split of scikit-learn's ``load_digits()`` -- the first 80 %
train, the last 20 % held out -- so no held-out digit image is ever rendered into the train split.

Boxes follow SPHINX (reference/architecture.md §1.6, :mod:`edgevlm.runtime.boxes`): answers carry
``[x1,y1,x2,y2]`` relative to the padded square, 2 decimals; ``meta["boxes"]`` keeps the exact values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError
from ..runtime.boxes import box_from_pixels, format_boxes

TASKS = ("caption", "color", "shape", "count", "ground", "digit")
SPLITS = ("train", "heldout")

# Saturated, far apart from each other and from the desaturated table tones below.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 38, 38), "green": (40, 165, 60), "blue": (40, 85, 225),
    "yellow": (242, 208, 36), "purple": (140, 60, 190), "orange": (246, 128, 24),
}
SHAPES = ("square", "circle", "triangle")
# (h, w): landscape, portrait and square, so the pad-to-square offset matters on both axes.
SCENE_SIZES = ((240, 320), (320, 240), (288, 288), (224, 300), (300, 224), (256, 256))
DIGIT_CANVAS = 160
DIGIT_TRAIN_FRACTION = 0.8
BOX_DECIMALS = 2

COLOR_JITTER = 12      # per channel, per object (flat fill: the object's pixels are exactly its rgb)
OUTLINE_SHADE = 0.6    # outline colour = rgb * shade, drawn on about half the objects
SIZE_RANGE = (0.12, 0.30)  # object side as a fraction of the image's short side
GAP = 6                # px kept free between objects and from the border, so boxes never touch

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

_SPLIT_CODE = {"train": 0, "heldout": 1}
_SCENE_STREAM, _DIGIT_STREAM, _QUESTION_STREAM, _DIGIT_ORDER_STREAM = 0, 1, 2, 3


# ---- data types ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value; identity is what we want
class Sample:
    """One question about one image. ``image`` is HWC uint8 RGB, read-only, shared by its group."""

    image: np.ndarray
    question: str
    answer: str
    task: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    box_px: tuple[int, int, int, int]  # (x1, y1, x2, y2) tight pixel edges, x2/y2 exclusive
    rgb: tuple[int, int, int]          # exact fill colour
    outline: tuple[int, int, int] | None

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered table-top scene; ``objects`` are ordered left to right (by x1, then y1)."""

    scene_id: str
    image: np.ndarray
    objects: tuple[SceneObject, ...]

    def rel_box(self, obj: SceneObject) -> tuple[float, float, float, float]:
        h, w = self.image.shape[:2]
        return box_from_pixels(*obj.box_px, h=h, w=w).as_tuple()


@dataclass(frozen=True, eq=False)
class ImageGroup:
    """An image and every sample asking about it: encode ``image`` once, train on all ``samples``."""

    image_id: str
    image: np.ndarray
    samples: tuple[Sample, ...]


# ---- rendering -----------------------------------------------------------------------------------


def _rng(seed: int, split: str, stream: int, index: int, sub: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], stream, int(index), int(sub)])


def _table(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Wood-grain or laminate table top: base tone + grain stripes + lighting gradient + noise."""
    if rng.random() < 0.6:  # wood: warm, desaturated brown
        r = rng.uniform(150, 195)
        base = np.array([r, r * rng.uniform(0.72, 0.8), r * rng.uniform(0.5, 0.6)])
        grain_amp = rng.uniform(6, 14)
    else:  # laminate: light gray with a slight warm tint
        v = rng.uniform(140, 190)
        base = np.array([v + rng.uniform(0, 8), v, v - rng.uniform(0, 8)])
        grain_amp = rng.uniform(1, 4)
    # float32 on one luminance plane, broadcast to RGB only at the end: ~4x faster than float64 RGB.
    f32 = np.float32
    ys = np.arange(h, dtype=f32)[:, None]
    xs = np.arange(w, dtype=f32)[None, :]
    # Grain: a triangle wave across rows whose phase wobbles slowly along x (linear interpolation of a
    # few random knots), i.e. planks with wavy rings, without sin() so every platform agrees bit-wise.
    knots = rng.uniform(-1.0, 1.0, 6)
    wobble = np.interp(np.arange(w), np.linspace(0, w - 1, knots.size), knots).astype(f32)[None, :]
    phase = ys * f32(rng.uniform(0.04, 0.12)) + wobble * f32(rng.uniform(1.0, 3.0))
    grain = (np.abs(phase - np.floor(phase) - f32(0.5)) * f32(2.0) - f32(0.5)) * f32(grain_amp)
    gx, gy = rng.uniform(-1.0, 1.0, 2)
    light = (f32(gx) * (xs / f32(w) - f32(0.5)) + f32(gy) * (ys / f32(h) - f32(0.5))) * f32(rng.uniform(10, 30))
    lum = grain + light + rng.standard_normal((h, w), dtype=f32) * f32(2.5)  # noise shared by channels
    img = base.astype(f32)[None, None, :] + lum[:, :, None]
    np.clip(img, 0.0, 255.0, out=img)
    img += f32(0.5)  # round half up, then truncate: rint without another pass
    return img.astype(np.uint8)


@lru_cache(maxsize=512)
def _shape_mask(shape: str, s: int, outline: bool) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``s x s`` uint8 mask (255 fill, 128 outline, 0 outside) and its tight bbox (l, t, r, b)."""
    im = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(im)
    kw = {"fill": 255, "outline": 128 if outline else 255, "width": 2}
    if shape == "square":
        d.rectangle([0, 0, s - 1, s - 1], **kw)
    elif shape == "circle":
        d.ellipse([0, 0, s - 1, s - 1], **kw)
    else:  # isosceles triangle pointing up
        d.polygon([((s - 1) / 2, 0), (s - 1, s - 1), (0, s - 1)], **kw)
    mask = np.asarray(im)
    mask.flags.writeable = False  # cached and shared
    return mask, im.getbbox()


def make_scene(seed: int, split: str, index: int) -> Scene:
    """Render scene ``index`` of ``split`` (1-5 objects with distinct (colour, shape) pairs, no overlap)."""
    _check_split(split)
    rng = _rng(seed, split, _SCENE_STREAM, index)
    h, w = SCENE_SIZES[rng.integers(len(SCENE_SIZES))]
    img = _table(rng, h, w)
    n = int(rng.integers(1, 6))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]
    short = min(h, w)
    placed: list[tuple[int, int, int]] = []  # (x0, y0, side) of each object's square footprint
    objects = []
    for color, shape in chosen:
        side = int(round(rng.uniform(*SIZE_RANGE) * short))
        for _ in range(60):  # rejection sampling; an object that finds no room is dropped
            x0 = int(rng.integers(GAP, w - side - GAP + 1))
            y0 = int(rng.integers(GAP, h - side - GAP + 1))
            if all(x0 >= px + ps + GAP or px >= x0 + side + GAP or y0 >= py + ps + GAP or py >= y0 + side + GAP
                   for px, py, ps in placed):
                break
        else:
            continue
        placed.append((x0, y0, side))
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3),
                                            0, 255))
        has_outline = bool(rng.random() < 0.5)
        outline = tuple(int(v * OUTLINE_SHADE) for v in rgb) if has_outline else None
        mask, (l, t, r, b) = _shape_mask(shape, side, has_outline)
        region = img[y0:y0 + side, x0:x0 + side]  # a view: writes go into img
        region[mask == 255] = rgb
        if outline is not None:
            region[mask == 128] = outline
        objects.append(SceneObject(color, shape, (x0 + l, y0 + t, x0 + r, y0 + b), rgb, outline))
    if not objects:  # cannot happen with these sizes (the first object always fits); guard the invariant
        raise ConfigError(f"scene {index} of {split} ended up empty")
    objects.sort(key=lambda o: (o.box_px[0], o.box_px[1]))
    img.flags.writeable = False
    return Scene(scene_id=f"{split}/s{seed}/scene{index:05d}", image=img, objects=tuple(objects))


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    return d.images.astype(np.float64), d.target.astype(np.int64)


def digit_indices(split: str) -> np.ndarray:
    """The fixed ``load_digits`` indices of a split: first 80 % train, last 20 % held out."""
    _check_split(split)
    n = len(_digits()[1])
    cut = int(n * DIGIT_TRAIN_FRACTION)
    return np.arange(0, cut) if split == "train" else np.arange(cut, n)


def render_digit(index: int, rng: np.random.Generator) -> np.ndarray:
    """Digit ``index`` of load_digits as dark ink on light paper, ``DIGIT_CANVAS`` square, HWC uint8."""
    images, _ = _digits()
    c = DIGIT_CANVAS
    paper = rng.uniform(222, 248) + rng.uniform(-6, 6, 3)
    ink = rng.uniform(15, 70) + rng.uniform(-10, 10, 3)
    s = int(rng.integers(96, 141))
    glyph = Image.fromarray(np.rint(images[index] * (255.0 / 16.0)).astype(np.uint8), mode="L")
    alpha = np.zeros((c, c), dtype=np.float64)
    y0, x0 = (int(v) for v in rng.integers(0, c - s + 1, 2))
    up = np.asarray(glyph.resize((s, s), Image.BICUBIC), dtype=np.float64) / 255.0
    # A contrast ramp turns the blurry 8x8 upscale into ink strokes with soft edges.
    alpha[y0:y0 + s, x0:x0 + s] = np.clip((up - 0.15) * 1.7, 0.0, 1.0)
    img = paper[None, None, :] * (1.0 - alpha[..., None]) + ink[None, None, :] * alpha[..., None]
    img += rng.normal(0.0, 3.0, (c, c, 1))
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    out.flags.writeable = False
    return out


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


def scene_questions(scene: Scene, task: str, rng: np.random.Generator) -> tuple[str, str, dict] | None:
    """One (question, answer, task-specific meta) for ``task`` about ``scene``; None if not askable."""
    objs = scene.objects
    colors = [o.color for o in objs]
    shapes = [o.shape for o in objs]
    t = TEMPLATES[task]
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


def _check_split(split: str) -> None:
    if split not in _SPLIT_CODE:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")


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
    _check_split(split)
    tasks = _check_tasks(tasks)
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
                qrng = _rng(seed, split, _QUESTION_STREAM, i, TASKS.index(task))
                seen = set()
                for _ in range(per_task):
                    qa = scene_questions(scene, task, qrng)
                    if qa is None or qa[0] in seen:
                        continue
                    seen.add(qa[0])
                    samples.append(Sample(scene.image, qa[0], qa[1], task, {**base, "task": task, **qa[2]}))
            if samples:
                yield ImageGroup(scene.scene_id, scene.image, tuple(samples))
    if "digit" in tasks and n_digits:
        pool = digit_indices(split)
        order = _rng(seed, split, _DIGIT_ORDER_STREAM, 0).permutation(pool)
        labels = _digits()[1]
        for k in range(n_digits):
            # Beyond the pool the indices cycle, but each instance gets its own paper, size and offset.
            idx = int(order[k % len(order)])
            drng = _rng(seed, split, _DIGIT_STREAM, k)
            img = render_digit(idx, drng)
            image_id = f"{split}/s{seed}/digit{k:05d}"
            meta = {"scene_id": image_id, "image_id": image_id, "size": img.shape[:2], "task": "digit",
                    "digit": int(labels[idx]), "digit_index": idx}
            q = _pick(drng, TEMPLATES["digit"]["digit"])
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


__all__ = ["TASKS", "SPLITS", "COLORS", "SHAPES", "SCENE_SIZES", "TEMPLATES", "Sample", "SceneObject", "Scene",
           "ImageGroup", "make_scene", "render_digit", "digit_indices", "caption_for", "scene_questions",
           "iter_split", "build_split", "group_by_image"]
