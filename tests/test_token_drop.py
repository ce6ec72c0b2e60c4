"""Token dropping: cell selection, the fused gather + position add (kernel vs reference, interpreted),
the ViT and SPHINX fusion on kept cells, and the tower / pipeline option."""


import pytest
import torch
import torch.nn.functional as F
from edgevlm_testkit import assert_within_noise, float64_copy, max_abs, randomize_params

import edgevlm
from edgevlm.config import ConvNeXtConfig, SphinxFusionConfig, TowerConfig, ViTConfig
from edgevlm.errors import ConfigError, ShapeError
from edgevlm.kernels.token_drop import gather_with_pos_reference, triton_gather_with_pos
from edgevlm.runtime.connectors.sphinx import to_fusion_layout
from edgevlm.runtime.token_keep import cells_to_patches, keep_count, select_cells
from edgevlm.runtime.tower import build_tower_model

# ---- which cells ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["uniform", "random"])
@pytest.mark.parametrize("g,ratio", [(8, 0.5), (8, 0.75), (3, 0.5), (16, 0.3), (4, 1.0)])
def test_selected_cells_are_sorted_unique_and_counted(mode, g, ratio):
    cells = select_cells(3, g, ratio, mode, generator=torch.Generator().manual_seed(0))
    k = keep_count(g * g, ratio)
    assert cells.shape == (3, k) and cells.dtype == torch.int64
    for row in cells:
        assert (row.diff() > 0).all() and row.min() >= 0 and row.max() < g * g


def test_uniform_is_spread_and_random_is_reproducible():
    half = select_cells(1, 4, 0.5)[0]
    grid = torch.zeros(16, dtype=torch.int64)
    grid[half] = 1
    assert torch.equal(grid.view(4, 4), torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]] * 2))  # a checkerboard
    a = select_cells(2, 8, 0.5, "random", generator=torch.Generator().manual_seed(7))
    b = select_cells(2, 8, 0.5, "random", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])  # per-view subsets, reproducible
    scores = torch.randn(2, 64)
    top = select_cells(2, 8, 0.25, "score", scores=scores)
    assert torch.equal(top, scores.topk(16, dim=1).indices.sort(dim=1).values)


def test_bad_keep_settings_are_typed_errors():
    with pytest.raises(ConfigError, match="keep_ratio"):
        select_cells(1, 8, 0.0)
    with pytest.raises(ConfigError, match="keep_ratio"):
        select_cells(1, 8, 1.5)
    with pytest.raises(ConfigError, match="keep mode"):
        select_cells(1, 8, 0.5, "checkerboard")
    with pytest.raises(ShapeError, match="scores"):
        select_cells(2, 8, 0.5, "score", scores=torch.randn(2, 10))
    with pytest.raises(ConfigError, match="whole multiple"):
        cells_to_patches(torch.tensor([[0]]), 4, 6)


def test_patches_of_kept_cells_pool_to_those_cells():
    g, grid, n, c = 4, 8, 2, 5
    tokens = torch.randn(n, grid * grid, c)
    cells = select_cells(n, g, 0.5, "random", generator=torch.Generator().manual_seed(1))

    def pooled_then_gathered(dt):
        full = F.avg_pool2d(tokens.to(dt).transpose(1, 2).reshape(n, c, grid, grid), 2).flatten(2).transpose(1, 2)
        return full.gather(1, cells[..., None].expand(-1, -1, c))  # [N, 8, C]

    ids = cells_to_patches(cells, g, grid)  # [N, 8 * 4]
    kept = tokens.gather(1, ids[..., None].expand(-1, -1, c)).reshape(n, -1, 4, c).mean(2)
    # a mean of 4 in another order than avg_pool2d's: equal up to the pooling's own fp32 noise
    want = pooled_then_gathered(torch.float32)
    assert_within_noise(kept, want, "patches of kept cells, pooled",
                        noise=max_abs(want, pooled_then_gathered(torch.float64)))


# ---- the fused gather -----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("n,length,w,k", [(2, 64, 384, 32), (3, 16, 72, 5), (1, 81, 300, 27), (2, 9, 20, 9)])
def test_gather_kernel_equals_reference(interpreter, cls, n, length, w, k):
    g = torch.Generator().manual_seed(n * 100 + length)
    patches = torch.randn(n, length, w, generator=g)
    pos = torch.randn(1, int(cls) + length, w, generator=g)
    token = torch.randn(1, 1, w, generator=g) if cls else None
    ids = torch.stack([torch.randperm(length, generator=g)[:k].sort().values for _ in range(n)])
    out = triton_gather_with_pos(patches, pos, ids, token)
    ref = gather_with_pos_reference(patches, pos, ids, token)
    assert torch.equal(out, ref)  # one add per element in both: bit-identical
    # and the reference is the unfused recipe: concatenate, add positions over the full grid, pick rows
    full = patches if token is None else torch.cat([token.expand(n, -1, -1), patches], 1)
    full = full + pos
    rows = ids + int(cls)
    if cls:
        rows = torch.cat([torch.zeros(n, 1, dtype=torch.int64), rows], 1)
    torch.testing.assert_close(ref, full.gather(1, rows[..., None].expand(-1, -1, w)), atol=0, rtol=0)


# ---- the model on kept cells ------------------------------------------------------------------

def _drop_tower(class_token: bool = True):
    # A ViT on an 8x8 grid (r = 2 under the 4x4 fused grid) beside a CNN whose 2x2 map is repeated to 4x4.
    vit = ViTConfig(name="vit", image_size=64, patch_size=8, width=24, depth=2, heads=2, mlp_dim=32,
                    class_token=class_token)
    cnn = ConvNeXtConfig(name="cnn", image_size=64, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), final_norm=True)
    fusion = SphinxFusionConfig(encoders=("vit", "cnn"), in_widths=(24, 32), grid=4, out_width=16, pos_embed=True)
    model, _ = build_tower_model(TowerConfig(encoders=(vit, cnn), connector=fusion), allow_random=True)
    randomize_params(model, 11, scale=0.2)
    return model.eval()


@pytest.mark.parametrize("class_token", [True, False])
def test_keeping_every_cell_equals_no_dropping(class_token):
    # All cells kept, but in cell-major patch order: attention does not care about token order, so the
    # result equals the full run up to summation order.
    model = _drop_tower(class_token)
    views = {"vit": torch.randn(3, 3, 64, 64), "cnn": torch.randn(3, 3, 64, 64)}
    every = torch.arange(16).expand(3, 16)
    model64, views64 = float64_copy(model), {k: v.double() for k, v in views.items()}
    with torch.no_grad():
        full = model(views)
        assert_within_noise(model(views, cells=every), full, "every cell kept (cell-major order) vs no dropping",
                            noise=max_abs(full, model64(views64)))


def test_dropping_keeps_the_same_cells_in_every_encoder():
    model = _drop_tower()
    views = {"vit": torch.randn(2, 3, 64, 64), "cnn": torch.randn(2, 3, 64, 64)}
    cells = select_cells(2, 4, 0.5, "random", generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(views, cells=cells)
        full_feats = model.encode(views)
        kept_feats = model.encode(views, cells)
    assert out.shape == (2, 2 + 1 + 8, 16)  # separators, global, the 8 kept cells
    assert kept_feats["vit"].shape == (2, 1 + 8 * 4, 24)  # class token + 4 patches per kept cell
    assert torch.equal(kept_feats["cnn"], full_feats["cnn"])  # the CNN always sees the whole view
    cnn_cfg = model.config.encoder("cnn")
    full_grid = to_fusion_layout(full_feats["cnn"], cnn_cfg, 4)
    kept_grid = to_fusion_layout(kept_feats["cnn"], cnn_cfg, 4, cells=cells)
    # the CNN's cells are copies of its repeated map either way: bit-identical
    assert torch.equal(kept_grid[:, 1:], full_grid[:, 1:].gather(1, cells[..., None].expand(-1, -1, 32)))


def test_tower_and_pipeline_option(tmp_path):
    tower = edgevlm.runtime.load_vision_tower("tiny")
    img = [(torch.rand(48, 64, 3) * 255).to(torch.uint8).numpy()]
    full = tower(img)
    tower.set_token_keep(0.5)
    half = tower(img)
    g2, v = 16, tower.config.views_per_image  # tiny: 4x4 fused grid, 5 views
    assert half.shape[1] == full.shape[1] - v * (g2 - 8)
    assert tower.info()["token_keep"] == {"ratio": 0.5, "mode": "uniform"}
    tower.set_token_keep(1.0)
    assert torch.equal(tower(img), full)  # off again, and the cache did not serve the dropped embedding
    with pytest.raises(ConfigError, match="takes a scorer"):
        tower.set_token_keep(0.5, "score")
    # keep by a score: the brightest cells of the ViT's view, as a stand-in for a saliency map
    seen = []

    def brightness(views):
        x = views["vit"].mean(1)  # [N, 32, 32]
        scores = torch.nn.functional.avg_pool2d(x[:, None], 8).flatten(1)  # [N, 16] on the 4x4 grid
        seen.append(scores.shape)
        return scores

    tower.set_token_keep(0.25, "score", scorer=brightness)
    assert tower(img).shape[1] == full.shape[1] - v * (g2 - 4) and seen == [(5, 16)]
    pipe = edgevlm.load("tiny", quant="none", keep_ratio=0.5)
    out = pipe.generate(img[0], "Describe.", max_new_tokens=2)
    assert out.visual_tokens == half.shape[1]


def test_token_dropping_is_refused_where_it_cannot_apply(tmp_path):
    from edgevlm.config import MLPConnectorConfig
    from edgevlm.runtime.tower import VisionTower

    vit = ViTConfig(name="v", image_size=32, patch_size=8, width=16, depth=1, heads=2, mlp_dim=16)
    model, _ = build_tower_model(TowerConfig(encoders=(vit,), connector=MLPConnectorConfig(
        encoder="v", in_width=16, hidden=16, out_width=16)), allow_random=True)
    tower = VisionTower(model, device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(ConfigError, match="SPHINX-fusion"):
        tower.set_token_keep(0.5)
    tiny = edgevlm.runtime.load_vision_tower("tiny")
    tiny.backend = "onnxruntime"  # as a tower built with an exported graph's runner
    with pytest.raises(ConfigError, match="torch backend"):
        tiny.set_token_keep(0.5)
    with pytest.raises(ConfigError, match="keep_ratio"):
        edgevlm.load("tiny", quant="none", keep_ratio=0)
    # the eager model checks what it is handed
    with pytest.raises(ShapeError, match="kept 3 cells"):
        to_fusion_layout(torch.randn(1, 5, 24), _drop_tower().config.encoder("vit"), 4, cells=torch.tensor([[0, 1, 2]]))
