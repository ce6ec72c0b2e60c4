"""xGen-MM's (BLIP-3's) regrouping of an any-resolution image's tile tokens before the resampler.

With ``anyres_patch_sampling`` the public open_flamingo code (LAVIS ``xgen-mm`` branch, commit d699f7e5,
``open_flamingo/src/vlm.py`` ``_encode_vision_x_anyres`` l.187-303) does not resample tile by tile.
For one image with a ``rows x cols`` grid, ``g x g`` patch tokens per view (T = g*g) and width C::

    views   [1 + rows*cols, T, C]     encoder output: base view, then the tiles row-major
    map     [rows*g, cols*g, C]       the tiles stitched into the canvas's layout (l.244-247)
    mask    [rows*g, cols*g]          unpad_image(keep_original_shape=True) on that map (l.248;
                                      train/any_res_data_utils.py l.23-60): the rows (or columns)
                                      showing only canvas padding are 0
    groups  [rows*cols, T, C]         the map in raster order cut into chunks of T tokens
                                      (``view(-1, rows, cols, g*g)``, l.255-259): with cols > 1 a
                                      group is a horizontal strip (g/cols rows of the map), not a tile
    out     [1 + rows*cols, T, C]     base view (all-ones mask, l.261) then the groups, each resampled
                                      on its own under its mask (xgenmm.py l.123-139); the image's
                                      latents are then joined group after group, base first
                                      (xgenmm.py l.158-162), with no separator

The regrouping is a fixed permutation of the image's tokens, so it is carried as a gather index:
``order [N, T]`` (int64) says which of the encoder's ``N*T`` tokens (all views of all images,
flattened) lands at each place, and ``masks [N, T]`` (bool, True = real) says which the connector
may attend to. :func:`regroup_inputs` builds both from each image's size and view count;
:func:`apply_order` gathers the encoder's tokens with them
(:meth:`~edgevlm.runtime.tower.VisionTowerModel.encode`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgevlm.config import TowerConfig
from edgevlm.errors import ConfigError, ShapeError
from edgevlm.runtime.views import select_best_grid


def strip_order(rows: int, cols: int, g: int) -> torch.Tensor:
    """-> int64 ``[rows*cols, g*g]``: for each group, the indices of its tokens among the tiles' tokens
    flattened tile by tile (``[rows*cols*g*g]``, tile ``r*cols + c``, token ``i*g + j`` inside it)."""
    if rows < 1 or cols < 1 or g < 1:
        raise ConfigError(f"strip_order needs a positive grid and patch grid, got {rows}x{cols}, g={g}")
    tiles = torch.arange(rows * cols * g * g).view(rows, cols, g, g)  # [r, c, i, j] -> tile-major index
    raster = tiles.permute(0, 2, 1, 3).reshape(-1)  # map raster order (y = r*g + i, x = c*g + j)
    return raster.view(rows * cols, g * g)  # consecutive chunks of g*g: the reference's groups


def unpad_token_mask(h: int, w: int, map_h: int, map_w: int) -> torch.Tensor:
    """bool ``[map_h, map_w]``: open_flamingo's ``unpad_image(..., keep_original_shape=True)`` mask for
    an ``h x w`` image on a ``map_h x map_w`` token map (any_res_data_utils.py l.34-60). The side
    that limits the fit keeps the whole map; the other keeps ``new = int(size * (map / limiting size))``
    cells and loses ``(map - new) // 2`` at *both* ends (an odd difference keeps one padding cell)."""
    if h < 1 or w < 1 or map_h < 1 or map_w < 1:
        raise ShapeError(f"unpad_token_mask needs positive sizes, got image {h}x{w}, map {map_h}x{map_w}")
    mask = torch.ones(map_h, map_w, dtype=torch.bool)
    if w / h > map_w / map_h:  # wider than the map: rows trimmed
        pad = (map_h - int(h * (map_w / w))) // 2  # the reference's float order: size * (current / original)
        mask[:pad] = False
        mask[map_h - pad:] = False
    else:
        pad = (map_w - int(w * (map_h / h))) // 2
        mask[:, :pad] = False
        mask[:, map_w - pad:] = False
    return mask


def image_regroup(h: int, w: int, grid: tuple[int, int], g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``h x w`` image on a ``grid = (rows, cols)`` canvas -> ``(order [1 + n, g*g], mask [1 + n, g*g])``
    with ``n = rows*cols``: ``order`` indexes the image's own ``(1 + n)*g*g`` tokens (view-major), the base
    view first and unchanged, then the groups; ``mask`` is all-ones for the base view."""
    rows, cols = grid
    t = g * g
    groups = strip_order(rows, cols, g) + t  # the tiles follow the base view's t tokens
    order = torch.cat([torch.arange(t).unsqueeze(0), groups])
    tile_mask = unpad_token_mask(h, w, rows * g, cols * g).reshape(rows * cols, t)  # raster chunks, as the tokens
    mask = torch.cat([torch.ones(1, t, dtype=torch.bool), tile_mask])
    return order, mask


def regroup_inputs(config: TowerConfig, views_per_image: Sequence[int], image_sizes: Sequence[tuple[int, int]] | None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """-> ``({encoder: order [N, T]}, {encoder: masks [N, T]})`` for all views of these images
    (``N = sum(views_per_image)``); ``image_sizes[i] = (h, w)`` of image i as given (before any resize).
    The grid is the one the preprocessor picks (:func:`select_best_grid` at the first encoder's size)."""
    if config.regroup is None:
        raise ConfigError("regroup_inputs: this tower does not regroup its tiles (TowerConfig.regroup is None)")
    if image_sizes is None or len(image_sizes) != len(views_per_image):
        raise ShapeError(f"regrouping any-resolution tiles needs each image's original (h, w): got "
                         f"{None if image_sizes is None else len(image_sizes)} sizes for {len(views_per_image)} images")
    e = config.encoders[0]
    g = e.grid[0]
    orders, masks, offset = [], [], 0
    for i, ((h, w), v) in enumerate(zip(image_sizes, views_per_image)):
        rows, cols = select_best_grid(int(h), int(w), config.views.anyres_grids, e.image_size)
        if v != 1 + rows * cols:
            raise ShapeError(f"image {i} ({h}x{w}) has a {rows}x{cols} grid, so 1 + {rows * cols} views, but "
                             f"views_per_image says {v}")
        order, mask = image_regroup(int(h), int(w), (rows, cols), g)
        orders.append(order + offset)
        masks.append(mask)
        offset += v * g * g
    return {e.name: torch.cat(orders)}, {e.name: torch.cat(masks)}


def apply_order(tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """tokens ``[N, T, C]``, order ``[N, T]`` (indices into the ``N*T`` tokens) -> ``[N, T, C]``."""
    if tokens.dim() != 3 or order.dim() != 2 or tuple(order.shape) != tuple(tokens.shape[:2]):
        raise ShapeError(f"token regrouping: expected tokens [N, T, C] and order [N, T], got tokens "
                         f"{list(tokens.shape)} and order {list(order.shape)}")
    n, t, c = tokens.shape
    return tokens.reshape(n * t, c).index_select(0, order.reshape(-1).to(tokens.device)).view(n, t, c)


__all__ = ["strip_order", "unpad_token_mask", "image_regroup", "regroup_inputs", "apply_order"]
