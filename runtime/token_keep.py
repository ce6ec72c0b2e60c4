"""Which patches the vision encoders keep when token dropping is on: the tower's policy, applied
before the encoders run (the fused gather itself is :mod:`edgevlm.kernels.token_drop`).

FLIP showed that a ViT fed a subset of its patches loses little; here it is a latency knob. The
subset is chosen on the *fused* grid of a SPHINX-style tower (``g x g`` cells) so that every encoder
whose maps are concatenated keeps the same image regions:

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

import torch

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
            raise ShapeError(f"keep mode 'score' needs scores [{n}, {total}] (one per fused-grid cell), got "
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


__all__ = ["MODES", "keep_count", "select_cells", "cells_to_patches"]
