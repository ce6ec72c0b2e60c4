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

With token dropping each view brings only its kept tokens ``[K, D]`` and their patch ids ``kept [K]``
(ascending). The layout is the same, with the dropped places left out: the base view's kept tokens,
then each kept map row's tokens followed by its newline (a row whose tokens were all dropped keeps its
newline, so rows stay countable). With every patch kept this is the packing above.
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

    def forward(self, views: torch.Tensor, image_size: tuple[int, int],
                kept: torch.Tensor | None = None) -> torch.Tensor:
        """``kept [1 + rows*cols, K]``: the patch ids each view kept (token dropping); ``views`` then holds
        those ``K`` tokens per view."""
        h, w = (int(v) for v in image_size)
        rows, cols = select_best_grid(h, w, self.grids, self.tile)
        gh, gw = self.grid
        per_view = gh * gw if kept is None else kept.shape[-1]
        if views.dim() != 3 or views.shape[0] != 1 + rows * cols or views.shape[1] != per_view or \
                (kept is not None and tuple(kept.shape) != tuple(views.shape[:2])):
            raise ShapeError(f"anyres packing: a {h}x{w} image has 1 + {rows}x{cols} views of {per_view} tokens "
                             f"({gh}x{gw}{'' if kept is None else ' kept ' + str(per_view)}), got views "
                             f"{list(views.shape)}" + ("" if kept is None else f" and kept ids {list(kept.shape)}"))
        d = views.shape[-1]
        base = views[0]  # [gh*gw or K, D]
        present = None
        if kept is not None:  # dropped places back as holes: the layout below is the full one
            n = views.shape[0]
            ids = kept.to(views.device)
            views = views.new_zeros(n, gh * gw, d).scatter(1, ids.unsqueeze(-1).expand(n, ids.shape[1], d), views)
            present = torch.zeros(n, gh * gw, dtype=torch.bool, device=views.device).scatter_(1, ids, True)
        # [rows*cols, gh*gw, D] -> [rows, cols, gh, gw, D] -> [rows, gh, cols, gw, D] -> [rows*gh, cols*gw, D]
        fmap = views[1:].reshape(rows, cols, gh, gw, d).permute(0, 2, 1, 3, 4).reshape(rows * gh, cols * gw, d)
        if present is not None:
            present = present[1:].reshape(rows, cols, gh, gw).permute(0, 2, 1, 3).reshape(rows * gh, cols * gw)
        if self.cfg.unpad:
            y0, x0, y1, x1 = unpad_box(h, w, rows * gh, cols * gw)
            fmap = fmap[y0:y1, x0:x1]  # [H', W', D]
            present = None if present is None else present[y0:y1, x0:x1]
        if self.newline is not None:
            nl = self.newline.to(fmap.dtype).expand(fmap.shape[0], 1, d)  # [H', 1, D]
            fmap = torch.cat([fmap, nl], dim=1)  # [H', W' + 1, D]
            if present is not None:  # every row keeps its newline
                present = torch.cat([present, present.new_ones(present.shape[0], 1)], dim=1)
        fmap = fmap.reshape(-1, d)
        if present is not None:
            fmap = fmap[present.reshape(-1)]
        return torch.cat([base, fmap])  # [gh*gw + H' * (W' + 1), D] (fewer with dropped tokens)


__all__ = ["AnyresPacker"]
