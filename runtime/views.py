"""View geometry: where every view of an image comes from. Pure integer geometry, no pixels.

Conventions: sizes are ``(h, w)`` / ``(rows, cols)``, boxes are ``(y0, x0, y1, x1)`` half-open, all in
pixels. The recipes follow reference/architecture.md:

- ``pad_square`` (SPHINX §1.2/§1.5, LLaVA-1.5 §5.1): the image is centred on a ``side x side`` square,
  ``side = max(h, w)``, at offset ``(side - short) // 2`` on the short axis. With ``crop_grid = n > 0``
  the square is resized to an ``n*R`` canvas; the views are the global view (canvas resized to R)
  followed by the ``n x n`` crops in row-major order (n=2: TL, TR, BL, BR).
- ``stretch`` (BLIP-2): one view, the image resized to R x R ignoring aspect.
- ``anyres`` (LLaVA-NeXT §5.2, BLIP-3 §3.2): a base view (stretch), then the tiles, row-major, of the
  grid chosen by :func:`select_best_grid`; the image keeps its aspect on the grid's canvas, centred,
  and the rest of the canvas is fill. :func:`unpad_box` says which cells of the tiles' stitched
  feature map show the image (LLaVA-NeXT drops the others).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgevlm.config import ViewConfig
from edgevlm.errors import ConfigError, ImageSizeError

Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), half-open

CROP_NAMES_2X2 = ("TL", "TR", "BL", "BR")


def _check_size(h: int, w: int) -> None:
    if not (isinstance(h, (int, np.integer)) and isinstance(w, (int, np.integer))) or h < 1 or w < 1:
        raise ImageSizeError(f"image size must be positive ints (h, w), got ({h!r}, {w!r})")


@dataclass(frozen=True)
class PadGeometry:
    """An ``h x w`` image centred on a ``side x side`` square at ``(top, left)``."""

    h: int
    w: int
    side: int
    top: int
    left: int

    @property
    def image_box(self) -> Box:
        return (self.top, self.left, self.top + self.h, self.left + self.w)


def pad_to_square(h: int, w: int) -> PadGeometry:
    """SPHINX's ``padded_resize`` geometry: ``side = max(h, w)``, offset ``(side - short) // 2``."""
    _check_size(h, w)
    side = max(h, w)
    return PadGeometry(h=h, w=w, side=side, top=(side - h) // 2, left=(side - w) // 2)


def crop_boxes(size: int, n: int) -> list[Box]:
    """The ``n x n`` crops of a ``n*size`` canvas, row-major (n=2: TL, TR, BL, BR)."""
    if n < 1 or size < 1:
        raise ConfigError(f"crop_boxes needs size >= 1 and n >= 1, got size={size}, n={n}")
    return [(i * size, j * size, (i + 1) * size, (j + 1) * size) for i in range(n) for j in range(n)]


def view_names(view_cfg: ViewConfig, n_views: int | None = None) -> list[str]:
    """Human-readable names in output order, e.g. ``['global', 'TL', 'TR', 'BL', 'BR']``."""
    if view_cfg.kind == "pad_square":
        n = view_cfg.crop_grid
        if n == 0:
            return ["global"]
        crops = list(CROP_NAMES_2X2) if n == 2 else [f"r{i}c{j}" for i in range(n) for j in range(n)]
        return ["global", *crops]
    if view_cfg.kind == "stretch":
        return ["global"]
    n_views = view_cfg.max_views if n_views is None else n_views
    return ["base", *[f"tile{i}" for i in range(n_views - 1)]]


# ---- any-resolution grids ------------------------------------------------------------------------


def select_best_grid(h: int, w: int, grids: Sequence[tuple[int, int]], base: int) -> tuple[int, int]:
    """Pick the ``(rows, cols)`` grid whose ``(cols*base) x (rows*base)`` canvas shows the image best.

    LLaVA's ``select_best_resolution`` semantics: the image is scaled by ``s = min(cw/w, ch/h)``; its
    effective resolution is ``min(int(w*s) * int(h*s), w*h)`` (upscaling adds nothing). The largest
    effective resolution wins; ties go to the least wasted canvas area ``cw*ch - effective``, and
    remaining ties to the earlier grid in ``grids``.
    """
    _check_size(h, w)
    if base < 1 or not grids:
        raise ConfigError(f"select_best_grid needs base >= 1 and at least one grid, got base={base}, grids={grids}")
    best, best_eff, best_waste = None, -1, math.inf
    for rows, cols in grids:
        if rows < 1 or cols < 1:
            raise ConfigError(f"grid {(rows, cols)} must be positive (rows, cols)")
        cw, ch = cols * base, rows * base
        scale = min(cw / w, ch / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (rows, cols), eff, waste
    assert best is not None
    return best


@dataclass(frozen=True)
class AnyresLayout:
    """The image resized to ``(resized_h, resized_w)`` keeping aspect, centred at ``(top, left)`` on a
    ``rows*base x cols*base`` canvas; tiles are ``base x base`` crops of the canvas, row-major."""

    h: int
    w: int
    base: int
    rows: int
    cols: int
    resized_h: int
    resized_w: int
    top: int
    left: int

    @property
    def canvas(self) -> tuple[int, int]:
        return (self.rows * self.base, self.cols * self.base)

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    @property
    def image_box(self) -> Box:
        return (self.top, self.left, self.top + self.resized_h, self.left + self.resized_w)

    def tile_boxes(self) -> list[Box]:
        b = self.base
        return [(i * b, j * b, (i + 1) * b, (j + 1) * b) for i in range(self.rows) for j in range(self.cols)]


def anyres_layout(h: int, w: int, grid: tuple[int, int], base: int) -> AnyresLayout:
    """LLaVA-NeXT's ``resize_and_pad_image`` for an already chosen ``grid = (rows, cols)``.

    The side that limits the scale fills the canvas exactly; the other is ``ceil(size * scale)``
    capped at the canvas (the current LLaVA-NeXT rounding), and the image is centred with offsets
    ``(canvas - resized) // 2``.
    """
    _check_size(h, w)
    rows, cols = grid
    ch, cw = rows * base, cols * base
    scale_w, scale_h = cw / w, ch / h
    if scale_w < scale_h:
        nw, nh = cw, min(math.ceil(h * scale_w), ch)
    else:
        nh, nw = ch, min(math.ceil(w * scale_h), cw)
    nh, nw = max(nh, 1), max(nw, 1)
    return AnyresLayout(h=h, w=w, base=base, rows=rows, cols=cols, resized_h=nh, resized_w=nw,
                        top=(ch - nh) // 2, left=(cw - nw) // 2)


def unpad_box(h: int, w: int, map_h: int, map_w: int) -> Box:
    """The part of an anyres canvas's ``map_h x map_w`` feature map that shows an ``h x w`` image.

    LLaVA-NeXT's ``unpad_image``, judged on the feature map rather than on the canvas pixels: the side
    that limits the fit spans the whole map; the other keeps ``new = int(size * map / limiting size)``
    cells (rounded to 7 decimals first, as transformers does, so 11.9999999 counts as 12) and loses
    ``(map - new) // 2`` cells at *both* ends, so an odd difference keeps one padding cell. The box is
    ``(y0, x0, y1, x1)`` in map cells, half-open, and may be empty for extreme aspect ratios.
    """
    _check_size(h, w)
    if map_h < 1 or map_w < 1:
        raise ConfigError(f"unpad_box needs a positive feature map, got {map_h}x{map_w}")
    if w / h > map_w / map_h:  # wider than the map: full width, rows trimmed top and bottom
        new_h = int(round(h * (map_w / w), 7))
        pad = (map_h - new_h) // 2
        return (pad, 0, map_h - pad, map_w)
    new_w = int(round(w * (map_h / h), 7))
    pad = (map_w - new_w) // 2
    return (0, pad, map_h, map_w - pad)


def tile_token_mask(layout: AnyresLayout, patch_grid: tuple[int, int], patch_px: int | None = None) -> np.ndarray:
    """bool ``[n_tiles, gh*gw]``: False for patch tokens lying entirely in the canvas padding.

    Patch ``(i, j)`` of a tile covers ``[i*p, (i+1)*p) x [j*q, (j+1)*q)`` of that tile with
    ``p = patch_px`` (a ViT's patch size: pixels past ``g*p`` are never seen) or, when None,
    ``p = base / gh`` and ``q = base / gw`` (a CNN's receptive grid). This is BLIP-3's padding mask
    for the perceiver's keys; the base view has no padding and needs no mask.
    """
    gh, gw = patch_grid
    if gh < 1 or gw < 1:
        raise ConfigError(f"patch_grid must be positive, got {patch_grid}")
    b = layout.base
    ph = float(patch_px) if patch_px else b / gh
    pw = float(patch_px) if patch_px else b / gw
    y0, x0, y1, x1 = layout.image_box
    masks = []
    for ty, tx, _, _ in layout.tile_boxes():
        py0 = ty + np.arange(gh) * ph  # patch extents in canvas pixels
        px0 = tx + np.arange(gw) * pw
        rows_hit = (py0 < y1) & (py0 + ph > y0)
        cols_hit = (px0 < x1) & (px0 + pw > x0)
        masks.append((rows_hit[:, None] & cols_hit[None, :]).reshape(-1))
    return np.stack(masks)


# ---- view counts -------------------------------------------------------------------------------


def views_for(view_cfg: ViewConfig, h: int, w: int, base: int | None = None) -> int:
    """Number of views an ``h x w`` image yields. ``anyres`` needs ``base`` (the tile size used to
    choose the grid; :class:`~edgevlm.runtime.preprocess.Preprocessor` uses the first encoder's)."""
    _check_size(h, w)
    if view_cfg.kind == "pad_square":
        n = view_cfg.crop_grid
        return 1 + n * n if n else 1
    if view_cfg.kind == "stretch":
        return 1
    if base is None:
        raise ConfigError("views_for: anyres views need the tile size `base` to choose a grid")
    rows, cols = select_best_grid(h, w, view_cfg.anyres_grids, base)
    return 1 + rows * cols


__all__ = ["Box", "PadGeometry", "pad_to_square", "crop_boxes", "view_names", "select_best_grid", "AnyresLayout",
           "anyres_layout", "unpad_box", "tile_token_mask", "views_for"]
