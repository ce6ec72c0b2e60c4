"""Rendered camera video for measuring temporal reuse and camera streams without a camera: a table-top
scene (:func:`edgevlm.scenes.make_scene`) seen over time, with a camera's sensor noise.

Kinds (each frame also gets Gaussian sensor noise of ``noise`` levels, independent per pixel and frame):

    static   the scene, still: only noise changes
    moving   an extra object slides across the still scene, ``speed`` pixels per frame, bouncing at the
             edges (its box is the ground truth of each frame)
    pan      the camera pans: a window of the frame's size moves ``speed`` pixels per frame across the
             scene enlarged 1.5x, bouncing at the edges (every object moves)
    flicker  the scene, still, under a light whose brightness jumps by up to ``flicker`` (a fraction) from
             frame to frame (mains flicker beating against the exposure)

Pure functions of their arguments: the same call gives the same pixels on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import ConfigError
from .scenes import COLORS, SHAPES, _shape_mask, make_scene, split_rng

KINDS = ("static", "moving", "pan", "flicker")
VIDEO_STREAM = 7  # split_rng stream of the video's own draws (noise, flicker), apart from the scenes'


@dataclass(frozen=True, eq=False)
class VideoFrame:
    """One frame: ``image`` HWC uint8, ``objects`` (name, (x1, y1, x2, y2) pixel box) visible in it,
    ``mover``: the moving object's name (kind "moving"), else None."""

    index: int
    image: np.ndarray
    objects: tuple[tuple[str, tuple[int, int, int, int]], ...]
    mover: str | None = None


def scene_video(kind: str, n_frames: int, *, seed: int = 0, index: int = 0, split: str = "heldout",
                speed: float = 4.0, noise: float = 2.0, flicker: float = 0.04) -> list[VideoFrame]:
    """``n_frames`` frames of scene ``index`` of ``split`` under ``kind`` (see the module docstring)."""
    if kind not in KINDS:
        raise ConfigError(f"video kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 1:
        raise ConfigError(f"n_frames must be an int >= 1, got {n_frames!r}")
    for name, v in (("speed", speed), ("noise", noise), ("flicker", flicker)):
        if not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
    scene = make_scene(seed, split, index)
    rng = split_rng(seed, split, VIDEO_STREAM, index)
    base = scene.image
    h, w = base.shape[:2]
    objs = tuple((o.name, o.box_px) for o in scene.objects)
    frames = []
    if kind == "moving":
        mover, mask, size = _mover(scene, rng)
    if kind == "pan":
        big = np.asarray(Image.fromarray(base).resize((int(w * 1.5), int(h * 1.5)), Image.BILINEAR))
    for t in range(n_frames):
        img = base.astype(np.float32)
        visible, moving = objs, None
        if kind == "moving":
            x = _bounce(t * speed, w - size)
            y = (h - size) // 2
            region = img[y:y + size, x:x + size]
            region[mask == 255] = COLORS_RGB[mover]
            ys, xs = np.nonzero(mask == 255)
            box = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)
            visible, moving = objs + ((mover, box),), mover
        elif kind == "pan":
            x0 = _bounce(t * speed, big.shape[1] - w)
            y0 = (big.shape[0] - h) // 2
            img = big[y0:y0 + h, x0:x0 + w].astype(np.float32)
            visible = tuple(v for v in (_shifted(n, b, 1.5, x0, y0, w, h) for n, b in objs) if v is not None)
        elif kind == "flicker":
            img *= np.float32(1.0 + flicker * rng.uniform(-1.0, 1.0))
        if noise:
            img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise)
        np.clip(img, 0.0, 255.0, out=img)
        img += np.float32(0.5)
        frames.append(VideoFrame(t, img.astype(np.uint8), visible, moving))
    return frames


COLORS_RGB = {f"{c} {s}": COLORS[c] for c in COLORS for s in SHAPES}


def _mover(scene, rng: np.random.Generator) -> tuple[str, np.ndarray, int]:
    """A (colour, shape) pair the scene lacks, its mask and side: the object that moves."""
    taken = {o.name for o in scene.objects}
    free = [n for n in COLORS_RGB if n not in taken]
    name = free[int(rng.integers(len(free)))]
    side = max(8, int(0.2 * min(scene.image.shape[:2])))
    mask, _ = _shape_mask(name.split(" ")[1], side, False)
    return name, mask, side


def _bounce(pos: float, span: int) -> int:
    """Position ``pos`` folded into 0..span, back and forth."""
    if span <= 0:
        return 0
    p = int(round(pos)) % (2 * span)
    return p if p <= span else 2 * span - p


def _shifted(name: str, box, scale: float, x0: int, y0: int, w: int, h: int):
    x1, y1, x2, y2 = (round(v * scale) for v in box)
    x1, x2 = max(x1 - x0, 0), min(x2 - x0, w)
    y1, y2 = max(y1 - y0, 0), min(y2 - y0, h)
    return (name, (x1, y1, x2, y2)) if x2 - x1 > 4 and y2 - y1 > 4 else None


__all__ = ["KINDS", "VideoFrame", "scene_video"]
