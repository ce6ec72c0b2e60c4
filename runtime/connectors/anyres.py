"""Packing an any-resolution image's views into one token sequence (LLaVA-NeXT's ``spatial_unpad``).

The connector turns every view of an image into a ``gh x gw`` grid of tokens; :class:`AnyresPacker`
(configured by :class:`~edgevlm.config.AnyresPackConfig`) then makes one sequence per image::

    views  [1 + rows*cols, gh*gw, D]      base view, then the tiles of the chosen grid, row-major
    base   [gh*gw, D]                      views[0], unchanged
    map    [rows*gh, cols*gw, D]           the tiles' grids stitched back into the canvas's layout
    map    [H', W', D]                     unpad: rows/cols showing only canvas padding dropped
                                           (views.unpad_box, from the original image size)
    map    [H', W' + 1, D]                 newline: a learned [D] token ends every row
    out    [gh*gw + H' * (W' + 1), D]      base first, then the map row by row

The grid ``(rows, cols)`` is the one the preprocessor chose for this image
(:func:`~edgevlm.runtime.views.select_best_grid` on the original size with the first encoder's tile
size), so the packer needs the original ``(h, w)`` of each image and nothing else. The sequence length
therefore varies with the image: a wide image on a square canvas keeps fewer map rows than a square one.
This runs after the connector (token-wise projectors commute with this pure re-arrangement), so an
exported per-view graph stays valid and the packing happens beside it.
"""

from __future__ import annotations

import torch
from torch import nn

from edgevlm.config import AnyresPackConfig, TowerConfig
from edgevlm.errors import ShapeError

from edgevlm.runtime.views import select_best_grid, unpad_box


class AnyresPacker(nn.Module):
    """``forward(views [1 + rows*cols, gh*gw, D], image_size (h, w)) -> [tokens, D]`` for one image.

    Parameter: ``newline [D]`` when ``cfg.newline`` (transformers' ``image_newline``).
    """

    def __init__(self, cfg: AnyresPackConfig, tower_cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = tower_cfg.pack_grid  # (gh, gw) tokens of one view
        self.tile = tower_cfg.encoders[0].image_size  # the preprocessor chooses grids at this tile size
        self.grids = tower_cfg.views.anyres_grids
        self.newline = nn.Parameter(torch.zeros(tower_cfg.out_width)) if cfg.newline else None

    def forward(self, views: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        h, w = (int(v) for v in image_size)
        rows, cols = select_best_grid(h, w, self.grids, self.tile)
        gh, gw = self.grid
        if views.dim() != 3 or views.shape[0] != 1 + rows * cols or views.shape[1] != gh * gw:
            raise ShapeError(f"anyres packing: a {h}x{w} image has 1 + {rows}x{cols} views of {gh}x{gw} tokens, "
                             f"got views {list(views.shape)}")
        d = views.shape[-1]
        base = views[0]  # [gh*gw, D]
        # [rows*cols, gh*gw, D] -> [rows, cols, gh, gw, D] -> [rows, gh, cols, gw, D] -> [rows*gh, cols*gw, D]
        fmap = views[1:].reshape(rows, cols, gh, gw, d).permute(0, 2, 1, 3, 4).reshape(rows * gh, cols * gw, d)
        if self.cfg.unpad:
            y0, x0, y1, x1 = unpad_box(h, w, rows * gh, cols * gw)
            fmap = fmap[y0:y1, x0:x1]  # [H', W', D]
        if self.newline is not None:
            nl = self.newline.to(fmap.dtype).expand(fmap.shape[0], 1, d)  # [H', 1, D]
            fmap = torch.cat([fmap, nl], dim=1)  # [H', W' + 1, D]
        return torch.cat([base, fmap.reshape(-1, d)])  # [gh*gw + H' * (W' + 1), D]


__all__ = ["AnyresPacker"]
