"""View geometry and view order, checked on pixels for both preprocessing backends."""

from __future__ import annotations

import numpy as np
import pytest
from edgevlm_testkit import assert_close_rel

from edgevlm import get_preset
from edgevlm.config import SphinxFusionConfig, TowerConfig, ViewConfig, ViTConfig
from edgevlm.errors import ConfigError
from edgevlm.runtime.preprocess import Preprocessor
from edgevlm.runtime.views import (
    anyres_layout, crop_boxes, pad_to_square, select_best_grid, tile_token_mask, view_names, views_for,
)

BACKENDS = ["cpp", "reference"]
XGEN_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
PAD = (122, 116, 104)


def pixel_tower(view: ViewConfig, *sizes: int) -> TowerConfig:
    """Encoders whose normalisation is the identity on 0..255 pixel values (mean 0, std 1/255)."""
    encs = tuple(ViTConfig(name=f"e{i}", image_size=s, patch_size=min(8, s), width=16, depth=1, heads=2, mlp_dim=32,
                           mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3) for i, s in enumerate(sizes))
    fusion = SphinxFusionConfig(encoders=tuple(e.name for e in encs), in_widths=(16,) * len(encs), out_width=32)
    return TowerConfig(encoders=encs, connector=fusion, views=view)


def pixels(result, name: str = "e0") -> np.ndarray:
    """[n_views, R, R, 3] float pixel values back from the identity-normalised views."""
    return result.views[name].numpy().transpose(0, 2, 3, 1)


# Identity normalisation still runs in fp32 (pixel * a + b, or (pixel / 255 - mean) / std): at most two
# roundings of a value <= 255, so 4 fp32 ulps of the pixel scale; a pixel one 8-bit level off is ~10^5 ulps.
NORM_ULPS = 4


COLOURS = {"TL": (250, 0, 0), "TR": (0, 250, 0), "BL": (0, 0, 250), "BR": (250, 250, 0)}


def quadrants(h: int, w: int) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2:] = COLOURS["TL"], COLOURS["TR"]
    a[h // 2:, : w // 2], a[h // 2:, w // 2:] = COLOURS["BL"], COLOURS["BR"]
    return a


@pytest.mark.parametrize("backend", BACKENDS)
def test_view_order_global_then_tl_tr_bl_br(backend):
    pre = Preprocessor(pixel_tower(ViewConfig(kind="pad_square", crop_grid=2), 32), backend=backend)
    res = pre([quadrants(200, 200)])
    assert res.backend == backend and res.views_per_image == [5]
    v = pixels(res)
    assert v.shape == (5, 32, 32, 3)
    g = v[0]  # the global view holds all four colours, each in its own corner
    # atol=0.5 grey level: resized pixels are whole 8-bit levels, so this says "the same level"
    for (y, x), name in zip([(2, 2), (2, 29), (29, 2), (29, 29)], ["TL", "TR", "BL", "BR"]):
        np.testing.assert_allclose(g[y, x], COLOURS[name], atol=0.5)
    for k, name in enumerate(["TL", "TR", "BL", "BR"], start=1):
        crop = v[k]
        # away from the canvas centre lines (bicubic support) each crop is exactly its quadrant's colour
        ys = slice(0, 28) if name[0] == "T" else slice(4, 32)
        xs = slice(0, 28) if name[1] == "L" else slice(4, 32)
        np.testing.assert_allclose(crop[ys, xs], np.broadcast_to(COLOURS[name], crop[ys, xs].shape), atol=0.5)
        dist = [np.abs(crop - np.array(c)).sum(-1).mean() for c in COLOURS.values()]
        assert int(np.argmin(dist)) == list(COLOURS).index(name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h,w", [(60, 100), (61, 100), (100, 60), (100, 59)])
def test_pad_square_offsets(backend, h, w):
    g = pad_to_square(h, w)
    assert g.side == max(h, w) and (g.top, g.left) == ((g.side - h) // 2, (g.side - w) // 2)
    img = np.full((h, w, 3), (10, 200, 30), np.uint8)
    # R == side: the resize is the identity, so the padded square itself comes back
    v = pixels(Preprocessor(pixel_tower(ViewConfig(kind="pad_square"), g.side), backend=backend)([img]))[0]
    y0, x0, y1, x1 = g.image_box
    assert_close_rel(v[y0:y1, x0:x1], np.array((10, 200, 30)), "image inside the padded square", ulps=NORM_ULPS)
    mask = np.ones((g.side, g.side), bool)
    mask[y0:y1, x0:x1] = False
    assert mask.sum() == g.side ** 2 - h * w
    assert_close_rel(v[mask], np.array(PAD), "padding around the image", ulps=NORM_ULPS)


def test_crop_boxes_row_major():
    assert crop_boxes(224, 2) == [(0, 0, 224, 224), (0, 224, 224, 448), (224, 0, 448, 224), (224, 224, 448, 448)]
    b3 = crop_boxes(10, 3)
    assert len(b3) == 9 and b3[1] == (0, 10, 10, 20) and b3[3] == (10, 0, 20, 10)
    assert view_names(ViewConfig(kind="pad_square", crop_grid=2)) == ["global", "TL", "TR", "BL", "BR"]
    with pytest.raises(ConfigError):
        crop_boxes(10, 0)


@pytest.mark.parametrize("h,w,expected", [
    (384, 1152, (1, 3)),   # 3:1 wide: the 1152x384 canvas shows it unscaled
    (300, 600, (1, 2)),    # every canvas fits it without downscaling: least waste wins
    (1152, 384, (3, 1)),   # tall
    (1000, 1000, (2, 2)),  # big square: 768x768 keeps the most pixels
    (10, 10, (1, 2)),      # tiny: all tie at 100 px; (1, 2) and (2, 1) waste the same, the first wins
    (700, 900, (2, 2)),
])
def test_select_best_grid(h, w, expected):
    assert select_best_grid(h, w, XGEN_GRIDS, 384) == expected


def test_select_best_grid_effective_resolution_by_hand():
    # 500 x 1000 (h x w) at base 100: (1,2) 200x100 -> s=0.2 -> 200*100; (2,2) 200x200 -> s=0.2 -> same;
    # (1,3) 300x100 -> s=0.2 -> same; (2,4) 400x200 -> s=0.4 -> 400*200 wins.
    assert select_best_grid(500, 1000, ((1, 2), (2, 2), (1, 3), (2, 4)), 100) == (2, 4)
    assert select_best_grid(500, 1000, ((2, 2), (1, 2)), 100) == (1, 2)  # tie on pixels: less waste


def test_anyres_layout_and_token_mask():
    lay = anyres_layout(300, 500, (1, 2), 384)
    assert lay.canvas == (384, 768) and (lay.resized_h, lay.resized_w) == (384, 640) and (lay.top, lay.left) == (0, 64)
    assert lay.tile_boxes() == [(0, 0, 384, 384), (0, 384, 384, 768)]
    assert tile_token_mask(lay, (4, 4)).all()  # 96 px patches: each overlaps the image

    wide = anyres_layout(100, 600, (1, 2), 384)  # resized 128 x 768 at rows [128, 256)
    assert (wide.resized_h, wide.resized_w, wide.top) == (128, 768, 128)
    m = tile_token_mask(wide, (4, 4))
    assert m.shape == (2, 16)
    expected_rows = np.array([False, True, True, False])  # 96-px patch rows [0,96) and [288,384) are padding
    np.testing.assert_array_equal(m.reshape(2, 4, 4), np.broadcast_to(expected_rows[None, :, None], (2, 4, 4)))
    # 14-px ViT patches on a 27 grid: rows 9..18 ([126, 140) .. [252, 266)) overlap [128, 256) -> 10 rows
    vit = tile_token_mask(wide, (27, 27), patch_px=14)
    assert vit.reshape(2, 27, 27)[0].any(axis=1).sum() == 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_anyres_tiles_and_fill(backend):
    tower = pixel_tower(ViewConfig(kind="anyres", anyres_grids=((1, 2), (2, 1), (2, 2)), anyres_fill=(5, 6, 7)), 32)
    img = np.full((10, 60, 3), 200, np.uint8)  # wide strip -> (1, 2) grid, rows [..] padded with fill
    res = Preprocessor(tower, backend=backend)([img])
    assert res.views_per_image == [3]
    lay = anyres_layout(10, 60, (1, 2), 32)
    v = pixels(res)
    assert_close_rel(v[0], np.array(200.0), "anyres base view (stretched)", ulps=NORM_ULPS)
    assert_close_rel(v[1, 0], np.array((5, 6, 7)), "anyres tile, first row (fill)", ulps=NORM_ULPS)
    assert_close_rel(v[1, lay.top + lay.resized_h // 2, 5], np.array(200.0), "anyres tile, image row", ulps=NORM_ULPS)
    mask = res.token_masks["e0"]
    assert mask.shape == (3, 1 + 16)  # the class token leads and is always real
    assert mask[:, 0].all() and mask[0].all() and not mask[1].all()
    np.testing.assert_array_equal(mask[1:, 1:].numpy(), tile_token_mask(lay, (4, 4), patch_px=8))


def test_views_for():
    assert views_for(ViewConfig(kind="pad_square", crop_grid=2), 10, 20) == 5
    assert views_for(ViewConfig(kind="pad_square", crop_grid=3), 10, 20) == 10
    assert views_for(ViewConfig(kind="stretch"), 10, 20) == 1
    anyres = ViewConfig(kind="anyres", anyres_grids=XGEN_GRIDS)
    assert views_for(anyres, 384, 1152, base=384) == 4 and views_for(anyres, 1000, 1000, base=384) == 5
    with pytest.raises(ConfigError):
        views_for(anyres, 10, 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sphinx_1k_shapes(backend):
    tower = get_preset("sphinx-1k").tower
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (40, 70, 3), dtype=np.uint8), rng.integers(0, 256, (90, 30, 3), dtype=np.uint8)]
    res = Preprocessor(tower, backend=backend)(imgs)
    assert res.views_per_image == [5, 5]
    for e in tower.encoders:
        size = 256 if e.name == "convnext" else 224
        assert tuple(res.views[e.name].shape) == (10, 3, size, size), e.name
        assert res.views[e.name].dtype.is_floating_point and bool(res.views[e.name].isfinite().all())
