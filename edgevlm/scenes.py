"""The demo task's images, generated rather than downloaded: synthetic table-top scenes and rendered
handwritten digits. Training (:mod:`edgevlm.train.data` asks questions about them) and export
(:mod:`edgevlm.export.calibration` calibrates INT8 on them) both use this module, so it sits below both.

Everything is a pure function of ``(split, seed, index)``: each scene / digit image draws from its own
``numpy.random.Generator`` seeded with a SeedSequence of integers (:func:`split_rng`), so the same call
gives identical pixels on any machine for the same numpy and Pillow versions (the pixel arithmetic is
+, *, floor and linear interpolation -- no sin/exp whose last bit depends on the platform's libm).

Splits: ``"train"`` and ``"heldout"`` scenes use disjoint seed spaces (the split code is part of the
SeedSequence); digits use a fixed index split of scikit-learn's ``load_digits()`` -- the first 80 %
train, the last 20 % held out -- so no held-out digit image is ever rendered into the train split.
``"novel"`` is held out too and also rendered differently from what training saw: image sizes outside
``SCENE_SIZES`` (very wide, very tall, larger and smaller), plain, gradient and speckled backgrounds in
slate, paper and charcoal tones instead of the wooden and laminate table, a wider range of object
sizes, and the held-out digits in coloured ink on tinted paper on a larger canvas.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from edgevlm.runtime.boxes import box_from_pixels

from .errors import ConfigError

SPLITS = ("train", "heldout", "novel")

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
COLOR_JITTER = 12      # per channel, per object (flat fill: the object's pixels are exactly its rgb)
OUTLINE_SHADE = 0.6    # outline colour = rgb * shade, drawn on about half the objects
SIZE_RANGE = (0.12, 0.30)  # object side as a fraction of the image's short side
GAP = 6                # px kept free between objects and from the border, so boxes never touch

_SPLIT_CODE = {"train": 0, "heldout": 1, "novel": 2}
# "novel": renderings training never saw (see the module docstring)
NOVEL_SCENE_SIZES = ((200, 400), (400, 200), (360, 360), (192, 192), (270, 480))
NOVEL_SIZE_RANGE = (0.09, 0.36)
NOVEL_DIGIT_CANVAS = 224
SCENE_STREAM, DIGIT_STREAM, QUESTION_STREAM, DIGIT_ORDER_STREAM = 0, 1, 2, 3


# ---- types and rendering -------------------------------------------------------------------------

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


def split_rng(seed: int, split: str, stream: int, index: int, sub: int = 0) -> np.random.Generator:
    """The generator of item ``index`` of ``stream`` (``SCENE_STREAM``, ...) in ``split``; ``sub`` splits
    it further (one stream per question task, so dropping a task leaves the others unchanged)."""
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


def _plain_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A "novel" backdrop: a flat, gradient or speckled surface in slate, paper or charcoal tones
    (desaturated, so no object colour is among them)."""
    tone = _pick_tone(rng)
    f32 = np.float32
    ys = np.arange(h, dtype=f32)[:, None] / f32(h) - f32(0.5)
    xs = np.arange(w, dtype=f32)[None, :] / f32(w) - f32(0.5)
    kind = int(rng.integers(3))
    if kind == 0:  # flat, with faint noise
        lum = rng.standard_normal((h, w), dtype=f32) * f32(1.5)
    elif kind == 1:  # a strong lighting gradient
        gx, gy = rng.uniform(-1.0, 1.0, 2)
        lum = (f32(gx) * xs + f32(gy) * ys) * f32(rng.uniform(40, 70)) + rng.standard_normal((h, w), dtype=f32)
    else:  # speckle: sparse dark and light dots, like stone or foam board
        lum = (rng.random((h, w), dtype=f32) < f32(0.04)) * f32(rng.uniform(-40, 40))
        lum += rng.standard_normal((h, w), dtype=f32) * f32(3.0)
    img = tone.astype(f32)[None, None, :] + lum[:, :, None]
    np.clip(img, 0.0, 255.0, out=img)
    img += f32(0.5)
    return img.astype(np.uint8)


def _pick_tone(rng: np.random.Generator) -> np.ndarray:
    """Slate blue-grey, warm paper or charcoal: saturation at most ~15 % of the value."""
    which = int(rng.integers(3))
    if which == 0:
        v = rng.uniform(110, 150)
        return np.array([v - 8, v, v + 12])
    if which == 1:
        v = rng.uniform(215, 240)
        return np.array([v, v - 4, v - 14])
    v = rng.uniform(45, 75)
    return np.array([v, v, v + 4])


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
    check_split(split)
    rng = split_rng(seed, split, SCENE_STREAM, index)
    novel = split == "novel"
    sizes = NOVEL_SCENE_SIZES if novel else SCENE_SIZES
    h, w = sizes[rng.integers(len(sizes))]
    img = _plain_background(rng, h, w) if novel else _table(rng, h, w)
    size_range = NOVEL_SIZE_RANGE if novel else SIZE_RANGE
    n = int(rng.integers(1, 6))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]
    short = min(h, w)
    placed: list[tuple[int, int, int]] = []  # (x0, y0, side) of each object's square footprint
    objects = []
    for color, shape in chosen:
        side = int(round(rng.uniform(*size_range) * short))
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
def digit_dataset() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``load_digits()``: (images float64 [1797, 8, 8] in 0..16, labels int64 [1797])."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    return d.images.astype(np.float64), d.target.astype(np.int64)


def digit_indices(split: str) -> np.ndarray:
    """The fixed ``load_digits`` indices of a split: first 80 % train, last 20 % held out ("heldout" and
    "novel" share them: no novel digit was trained on either)."""
    check_split(split)
    n = len(digit_dataset()[1])
    cut = int(n * DIGIT_TRAIN_FRACTION)
    return np.arange(0, cut) if split == "train" else np.arange(cut, n)


def render_digit(index: int, rng: np.random.Generator, novel: bool = False) -> np.ndarray:
    """Digit ``index`` of load_digits as dark ink on light paper, ``DIGIT_CANVAS`` square, HWC uint8;
    ``novel``: blue, red or green ink on tinted paper, ``NOVEL_DIGIT_CANVAS`` square, smaller or larger."""
    images, _ = digit_dataset()
    c = NOVEL_DIGIT_CANVAS if novel else DIGIT_CANVAS
    if novel:
        paper = np.array([235.0, 228.0, 205.0]) if rng.random() < 0.5 else np.array([215.0, 228.0, 238.0])
        paper = paper + rng.uniform(-8, 8, 3)
        ink = np.array(((30.0, 50.0, 150.0), (150.0, 30.0, 30.0), (25.0, 110.0, 50.0))[int(rng.integers(3))])
        s = int(rng.integers(70, 181))
    else:
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


def check_split(split: str) -> None:
    if split not in _SPLIT_CODE:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")


__all__ = ["SPLITS", "COLORS", "SHAPES", "SCENE_SIZES", "NOVEL_SCENE_SIZES", "SceneObject", "Scene", "make_scene", "render_digit",
           "digit_indices", "digit_dataset", "split_rng", "check_split", "SCENE_STREAM", "DIGIT_STREAM",
           "QUESTION_STREAM", "DIGIT_ORDER_STREAM"]
