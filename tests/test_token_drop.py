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

    def tower_of(encoder, **kw):
        model, _ = build_tower_model(TowerConfig(encoders=(encoder,), connector=MLPConnectorConfig(
            encoder=encoder.name, in_width=encoder.feature_width, hidden=16, out_width=16), **kw), allow_random=True)
        return VisionTower(model, device=torch.device("cpu"), dtype=torch.float32)

    # a CNN's map needs the whole view: an MLP projector over a ConvNeXt takes no kept patches
    cnn = ConvNeXtConfig(name="c", image_size=32, depths=(1, 1, 1, 1), dims=(8, 8, 8, 16), final_norm=True)
    with pytest.raises(ConfigError, match=r"'c' \(convnext\): a CNN's feature map needs the whole view"):
        tower_of(cnn).set_token_keep(0.5)
    # (LLaVA-NeXT packing leaves dropped places out: tests/test_llava_next_token_drop.py)
    tiny = edgevlm.runtime.load_vision_tower("tiny")
    tiny.backend = "onnxruntime"  # as a tower built with an exported graph's runner
    with pytest.raises(ConfigError, match="torch backend"):
        tiny.set_token_keep(0.5)
    with pytest.raises(ConfigError, match="keep_ratio"):
        edgevlm.load("tiny", quant="none", keep_ratio=0)
    # the eager model checks what it is handed
    with pytest.raises(ShapeError, match="kept 3 cells"):
        to_fusion_layout(torch.randn(1, 5, 24), _drop_tower().config.encoder("vit"), 4, cells=torch.tensor([[0, 1, 2]]))


# ---- single-ViT towers: LLaVA (MLP projector), BLIP-2 (Q-Former), xGen-MM-style (resampler) ------------------
# The keep grid is the ViT's own patch grid (one patch per cell); the class token always stays. References are
# transformers' own modules fed the kept tokens: its embeddings (class token + positions over the whole grid),
# the kept rows gathered, then its encoder layers and everything after them; their fp32 noise is measured with
# a float64 copy.

def _kept_rows(cells: torch.Tensor) -> torch.Tensor:
    """Kept patch cells [N, K] -> rows [N, 1 + K] of an embedding with the class token first."""
    return torch.cat([torch.zeros(cells.shape[0], 1, dtype=torch.long), cells + 1], dim=1)


def _gather_rows(h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return h.gather(1, rows[..., None].expand(-1, -1, h.shape[-1]))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from edgevlm_testkit import BYTE_VOCAB, IMAGE_ID, write_byte_tokenizer

    cfg = transformers.LlavaConfig(  # CLIP 40 px / patch 8: a 5x5 grid; features of layer -2, class token dropped
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                           num_attention_heads=2, image_size=40, patch_size=8),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=BYTE_VOCAB,
                         max_position_embeddings=256),
        image_token_index=IMAGE_ID, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    randomize_params(model, 7)
    folder = tmp_path_factory.mktemp("llava_drop")
    model.save_pretrained(folder)
    write_byte_tokenizer(folder)
    return model, folder


def _llava_kept_reference(m, px, cells):
    """transformers' CLIP on the kept patches: embeddings, kept rows, pre-LN, the layers up to layer -2, class
    token dropped ('default'), then its multi_modal_projector."""
    vt = m.model.vision_tower  # transformers 5: CLIPVisionModel holds the embeddings and layers itself
    vt = getattr(vt, "vision_model", vt)
    with torch.no_grad():
        h = vt.pre_layrnorm(_gather_rows(vt.embeddings(px), _kept_rows(cells)))
        for layer in vt.encoder.layers[:-1]:  # hidden_states[-2]: the output of all but the last layer
            h = layer(h, None)
        return m.model.multi_modal_projector(h[:, 1:])


def test_llava_tower_keeps_patch_tokens(llava_dir):
    from edgevlm.runtime.token_keep import KeepPlan

    model, folder = llava_dir
    tower = edgevlm.runtime.load_vision_tower(folder)
    assert tower.model.keep_plan() == KeepPlan(grid=5, vits=("clip",))
    px = torch.randn(3, 3, 40, 40)
    full = tower.from_pixels(px)
    assert full.shape == (3, 25, 32)
    tower.set_token_keep(1.0)
    assert torch.equal(tower.from_pixels(px), full)  # keep_ratio 1.0 is no dropping
    with torch.no_grad():  # every cell, row-major: the kept path runs the same ops on the same values
        assert torch.equal(tower.model({"clip": px}, cells=torch.arange(25).expand(3, 25)), full)

    tower.set_token_keep(0.5, "random", seed=3)
    cells = tower.kept_cells({"clip": px})
    k = keep_count(25, 0.5)
    assert cells.shape == (3, k) and not torch.equal(cells[0], cells[1])
    ours = tower.from_pixels(px)
    assert ours.shape == (3, k, 32)  # K image tokens for the decoder
    ref, ref64 = _llava_kept_reference(model, px, cells), _llava_kept_reference(float64_copy(model), px.double(), cells)
    assert_within_noise(ours, ref, "llava tower on kept patches vs transformers' CLIP fed them",
                        noise=max_abs(ref, ref64))
    # scores live on the ViT's own 5x5 grid
    tower.set_token_keep(0.25, "score", scorer=lambda v: F.avg_pool2d(v["clip"].mean(1, keepdim=True), 8).flatten(1))
    top = F.avg_pool2d(px.mean(1, keepdim=True), 8).flatten(1).topk(keep_count(25, 0.25), dim=1).indices.sort(1).values
    assert torch.equal(tower.kept_cells({"clip": px}), top)
    ref = _llava_kept_reference(model, px, top)
    assert_within_noise(tower.from_pixels(px), ref, "llava tower on top-scoring patches vs transformers",
                        noise=max_abs(ref, _llava_kept_reference(float64_copy(model), px.double(), top)))


def test_llava_pipeline_prompt_shrinks_by_the_dropped_tokens(llava_dir):
    _, folder = llava_dir
    img = (torch.rand(30, 50, 3) * 255).to(torch.uint8).numpy()
    full = edgevlm.load(folder).generate(img, "Describe.", max_new_tokens=3)
    pipe = edgevlm.load(folder, keep_ratio=0.5)
    half = pipe.generate(img, "Describe.", max_new_tokens=3)
    k = keep_count(25, 0.5)
    assert (full.visual_tokens, half.visual_tokens) == (25, k)
    assert half.prompt_tokens == full.prompt_tokens - (25 - k)  # the same text, K image positions
    assert 1 <= len(half.token_ids) <= 3
    assert pipe.tower.info()["token_keep"] == {"ratio": 0.5, "mode": "uniform"}


class _KeptVision(torch.nn.Module):
    """Stands in for a BLIP-2 / InstructBLIP ``vision_model``: its own embeddings, the kept rows, its encoder
    and post-LN, so that transformers' get_image_features runs its Q-Former on the kept patches."""

    def __init__(self, vm, rows):
        super().__init__()
        self.vm, self.rows = vm, rows

    def forward(self, pixel_values, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        vm = self.vm
        h = _gather_rows(vm.embeddings(pixel_values), self.rows)
        h = vm.post_layernorm(vm.encoder(inputs_embeds=h).last_hidden_state)
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=vm.post_layernorm(h[:, 0]))


def _blip2_kept_reference(m, px, cells):
    import copy

    m = copy.deepcopy(m)
    m.vision_model = _KeptVision(m.vision_model, _kept_rows(cells))
    with torch.no_grad():
        return m.get_image_features(px).pooler_output


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Blip2Config(  # EVA 40 px / patch 8: 1 + 5x5 tokens; 4 queries
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=40, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                            cross_attention_frequency=1, encoder_hidden_size=32),
        text_config=dict(model_type="opt", hidden_size=24, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                         vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=24),
        num_query_tokens=4)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(cfg).eval()
    randomize_params(model.vision_model, 3)
    randomize_params(model.qformer, 4)
    randomize_params(model.language_projection, 5)
    with torch.no_grad():
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape))
    folder = tmp_path_factory.mktemp("blip2_drop")
    model.save_pretrained(folder)
    return model, folder


def test_blip2_qformer_reads_kept_patches(blip2_dir):
    model, folder = blip2_dir
    tower = edgevlm.runtime.load_vision_tower(folder)
    px = torch.randn(3, 3, 40, 40)
    full = tower.from_pixels(px)
    tower.set_token_keep(1.0)
    assert torch.equal(tower.from_pixels(px), full)
    with torch.no_grad():
        assert torch.equal(tower.model({"eva": px}, cells=torch.arange(25).expand(3, 25)), full)
    for mode in ("uniform", "random"):
        tower.set_token_keep(0.5, mode, seed=1)
        cells = tower.kept_cells({"eva": px})
        with torch.no_grad():
            feats = tower.model.encode({"eva": px}, cells)
        assert feats["eva"].shape == (3, 1 + keep_count(25, 0.5), 32)  # class token + kept patches: the Q-Former's keys
        ours = tower.from_pixels(px)
        assert ours.shape == full.shape == (3, 4, 24)  # still num_queries outputs
        ref = _blip2_kept_reference(model, px, cells)
        ref64 = _blip2_kept_reference(float64_copy(model), px.double(), cells)
        assert_within_noise(ours, ref, f"blip-2 tower on kept patches ({mode}) vs transformers fed them",
                            noise=max_abs(ref, ref64))


def _resampler_tower():
    from edgevlm.config import ResamplerConnectorConfig

    # SigLIP-style (no class token), 40 px / patch 8 -> 5x5 media tokens, resampled to 5 latents
    vit = ViTConfig(name="siglip", image_size=40, patch_size=8, width=32, depth=2, heads=2, mlp_dim=48,
                    class_token=False, mlp_act="gelu_tanh")
    res = ResamplerConnectorConfig(encoder="siglip", in_width=32, depth=2, heads=2, head_dim=8, num_latents=5,
                                   out_width=24)
    model, _ = build_tower_model(TowerConfig(encoders=(vit,), connector=res), allow_random=True)
    randomize_params(model, 13, scale=0.2)
    return model.eval()


def test_resampler_reads_kept_patches_and_their_masks():
    from edgevlm.runtime.tower import VisionTower

    model = _resampler_tower()
    px = torch.randn(3, 3, 40, 40)
    masks = {"siglip": torch.rand(3, 25, generator=torch.Generator().manual_seed(0)) > 0.3}  # some padding
    cells = select_cells(3, 5, 0.5, "random", generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model({"siglip": px}, masks)
        assert torch.equal(model({"siglip": px}, masks, cells=torch.arange(25).expand(3, 25)), full)
        ours = model({"siglip": px}, masks, cells=cells)
        # by hand: the ViT's full embedding (positions over the whole grid), the kept rows, its blocks and norm,
        # and the resampler with the kept rows of the mask -- the same operations on the same values: exact
        vit = model.encoders["siglip"]
        h = _gather_rows(vit.embed(px), cells)
        for blk in vit.blocks:
            h = blk(h)
        want = model.connector.resampler(vit.norm(h), masks["siglip"].gather(1, cells))
    assert ours.shape == full.shape == (3, 5, 24)
    assert torch.equal(ours, want)
    tower = VisionTower(model, device=torch.device("cpu"), dtype=torch.float32)
    tower.set_token_keep(0.5, "random", seed=2)
    assert tower.from_pixels(px).shape == (3, 5, 24)
