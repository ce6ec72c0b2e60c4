"""Which patches the vision encoders keep when token dropping is on: the tower's policy, applied
before the encoders run (the fused gather itself is :mod:`edgevlm.kernels.token_drop`).

FLIP showed that a ViT fed a subset of its patches loses little; here it is a latency knob. Where it
applies is data (:func:`keep_plan`): the connector's config names the encoders whose tokens it takes in
any number (``ConnectorConfig.token_drop_encoders``) and the grid the kept cells lie on
(``token_drop_grid``). A SPHINX-style tower keeps cells of its *fused* grid (``g x g``) so that every
encoder whose maps are concatenated keeps the same image regions; a single-ViT tower (LLaVA's MLP
projector, a BLIP-2 Q-Former, a perceiver resampler) keeps cells of that ViT's own patch grid (r = 1).
A ViT's class token always stays:

    cells [N, K]            kept cells, ascending, row-major on the g x g grid
    -> patch ids [N, K*r*r] a ViT whose grid is r times finer keeps the r x r patches under each
                            cell (cell-major, then row-major inside the cell), so its kept tokens
                            pool back to exactly those cells

Modes (:func:`select_cells`): ``"uniform"`` keeps an evenly spread, deterministic subset (ordered
dithering; the same cells for every image: a stable deployment default); ``"random"`` is FLIP's (argsort of
uniform noise, reproducible with a seeded generator); ``"score"`` keeps the top-scoring cells of a
caller's ``scores [N, g*g]`` (a saliency map, a detector's heat map).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgevlm.config import TowerConfig
from edgevlm.errors import ConfigError, ShapeError

MODES = ("uniform", "random", "score")


def keep_count(cells: int, keep_ratio: float) -> int:
    """Cells kept out of ``cells`` at ``keep_ratio`` in (0, 1]: ``round(cells * keep_ratio)``, at least 1."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    return max(1, min(cells, round(cells * keep_ratio)))


def select_cells(n: int, g: int, keep_ratio: float, mode: str = "uniform", *, scores: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """-> kept cells ``[n, K]`` (int64, ascending) of a ``g x g`` grid; see the module docstring."""
    total = g * g
    k = keep_count(total, keep_ratio)
    if mode == "uniform":
        # Ordered dithering: the K cells with the lowest Bayer-matrix thresholds are spread evenly at
        # every K (a checkerboard at one half), so every region of the image keeps some cells.
        cells = _bayer(g).reshape(-1).argsort()[:k].sort().values
        return cells.to(device).expand(n, k).contiguous()
    if mode == "random":
        noise = torch.rand(n, total, generator=generator, device=generator.device if generator else "cpu")
        return noise.argsort(dim=1)[:, :k].sort(dim=1).values.to(device)
    if mode == "score":
        if scores is None or tuple(scores.shape) != (n, total):
            raise ShapeError(f"keep mode 'score' needs scores [{n}, {total}] (one per cell of the keep grid), got "
                             f"{None if scores is None else tuple(scores.shape)}")
        return scores.topk(k, dim=1).indices.sort(dim=1).values.to(device)
    raise ConfigError(f"keep mode must be one of {', '.join(MODES)}, got {mode!r}")


def _bayer(g: int) -> torch.Tensor:
    """A ``g x g`` crop of the recursive Bayer threshold matrix (distinct values, well-spread ranks)."""
    m = torch.zeros(1, 1, dtype=torch.int64)
    while m.shape[0] < g:
        m = torch.cat([torch.cat([4 * m, 4 * m + 2], 1), torch.cat([4 * m + 3, 4 * m + 1], 1)], 0)
    return m[:g, :g]


def cells_to_patches(cells: torch.Tensor, g: int, grid: int) -> torch.Tensor:
    """Kept cells of the ``g x g`` grid -> kept patch ids of a ``grid x grid`` ViT (``grid = r * g``):
    ``[N, K] -> [N, K*r*r]``, the r x r patches of each cell together, cell by cell."""
    if grid % g:
        raise ConfigError(f"token dropping needs the encoder grid ({grid}) to be a whole multiple of the fused "
                          f"grid ({g})")
    r = grid // g
    cy, cx = cells // g, cells % g  # [N, K]
    dy, dx = torch.meshgrid(torch.arange(r, device=cells.device), torch.arange(r, device=cells.device),
                            indexing="ij")
    py = cy[..., None] * r + dy.reshape(-1)  # [N, K, r*r]
    px = cx[..., None] * r + dx.reshape(-1)
    return (py * grid + px).reshape(cells.shape[0], -1)


@dataclass(frozen=True)
class KeepPlan:
    """Where token dropping acts in a tower: kept cells ``[N, K]`` of a ``grid x grid`` grid; each ViT in
    ``vits`` runs only on the patches under them (:func:`cells_to_patches`); the connector's other
    drop encoders (CNNs under a fused grid) run on whole views and the connector picks the cells."""

    grid: int
    vits: tuple[str, ...]


def keep_plan(tower: TowerConfig) -> KeepPlan:
    """The tower's :class:`KeepPlan`, or a ConfigError saying why token dropping cannot apply to it."""
    c = tower.connector
    names = c.token_drop_encoders()
    if not names:
        raise ConfigError(f"token dropping needs a connector that takes a variable number of its encoders' "
                          f"tokens; this tower's {c.kind!r} connector needs a fixed count")
    encs = [tower.encoder(n) for n in names]
    g = c.token_drop_grid()
    if g is None:  # one patch per cell of the encoder's own grid
        cnn = [e for e in encs if e.kind != "vit"]
        if cnn:
            raise ConfigError(f"token dropping on encoder {cnn[0].name!r} ({cnn[0].kind}): a CNN's feature map needs "
                              "the whole view; only a ViT runs on a subset of its patches")
        grids = {e.grid for e in encs}
        if len(grids) != 1 or len({side for grid in grids for side in grid}) != 1:
            raise ConfigError(f"token dropping needs one square patch grid for encoders {list(names)}, got "
                              f"{sorted(grids)}")
        g = encs[0].grid[0]
    vits = tuple(e.name for e in encs if e.kind == "vit")
    for e in encs:
        if e.kind == "vit" and (e.grid[0] != e.grid[1] or e.grid[0] % g):
            raise ConfigError(f"token dropping needs the encoder grid of {e.name!r} ({e.grid[0]}x{e.grid[1]}) to be "
                              f"a whole multiple of the keep grid ({g})")
    return KeepPlan(g, vits)


__all__ = ["MODES", "KeepPlan", "keep_plan", "keep_count", "select_cells", "cells_to_patches"]
