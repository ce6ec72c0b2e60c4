"""SPHINX fusion: layout alignment (class/mean token, repeat / pool / bilinear resize), projection,
Q-Former placement and separators, against hand-written references."""


import pytest
import torch
import torch.nn.functional as F
from edgevlm_testkit import assert_differs, assert_within_noise, float64_copy, max_abs

from edgevlm.config import ConvNeXtConfig, SphinxFusionConfig, TowerConfig, ViTConfig
from edgevlm.errors import ConfigError, ShapeError
from edgevlm.presets import get_preset
from edgevlm.runtime.connectors import build_connector
from edgevlm.runtime.connectors.sphinx import resize_grid


def _features(tower, n):
    return {e.name: torch.randn((n, e.tokens, e.width) if e.kind == "vit" else (n, e.width, *e.grid))
            for e in tower.encoders}


def _fusion(tower):
    fusion = build_connector(tower.connector, tower).eval()
    with torch.no_grad():  # non-default LayerNorms so the reference really checks them
        for m in fusion.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape))
    return fusion


def _map(tokens, g):  # row-major grid tokens [N, g*g, C] -> [N, C, g, g]
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], g, g)


def _tokens(m):  # [N, C, g, g] -> [N, g*g, C]
    return m.flatten(2).transpose(1, 2)


def _assert_matches_reference(got, reference, what):
    """``reference(dtype)`` is a hand-written reference built from the inputs cast to ``dtype``: ``got``
    must match its fp32 result within the fp32 noise measured against its float64 result."""
    want = reference(torch.float32)
    assert_within_noise(got, want, what, noise=max_abs(want, reference(torch.float64)))


def test_tiny_preset_layout_and_fused_tokens():
    tower = get_preset("tiny").tower  # vit 4x4 + cls, cnn 2x2 map -> 4x4, Q-Former (8 queries) over eva
    fusion = _fusion(tower)
    feats = _features(tower, 5)
    with torch.no_grad():
        out = fusion(feats)
    assert out.shape == (5, 27, 64) and tower.tokens_per_view == 27

    torch.testing.assert_close(out[:, 0], fusion.start_img[0].expand(5, -1), atol=0, rtol=0)
    torch.testing.assert_close(out[:, -1], fusion.end_img[0].expand(5, -1), atol=0, rtol=0)

    # Hand reference: SPHINX's ConvNeXt recipe (repeat_interleave 2x, mean as pseudo-CLS), CLS kept for the ViT.
    def reference(dt):
        vit, cnn = feats["vit"].to(dt), feats["cnn"].to(dt)
        up = cnn.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)  # [5, 32, 4, 4]
        cnn_tok = _tokens(up)
        aligned = torch.cat([vit, torch.cat([cnn_tok.mean(1, keepdim=True), cnn_tok], 1)], dim=-1)  # [5, 17, 64]
        lin, ln = fusion.visual_proj[0], fusion.visual_proj[1]
        with torch.no_grad():
            return F.layer_norm(aligned @ lin.weight.to(dt).T + lin.bias.to(dt), (64,), ln.weight.to(dt),
                                ln.bias.to(dt), 1e-5)

    _assert_matches_reference(out[:, 1 + 8:1 + 8 + 17], reference, "fused tokens vs hand reference")

    with torch.no_grad():  # Q-Former tokens sit between start and the fused tokens
        qf = fusion.qformer_proj(fusion.qformer(feats["eva"]))
    assert torch.equal(out[:, 1:9], qf)  # the fusion runs these very modules on the same input


def test_mlp_projection_matches_a_hand_reference():
    """proj_hidden > 0: Linear -> GELU (exact erf) -> Linear -> LayerNorm on the aligned tokens, keys
    visual_proj.{0,2,3}; the position table and separators are placed as with SPHINX's projection."""
    from dataclasses import replace

    base = get_preset("tiny").tower
    tower = replace(base, connector=replace(base.connector, proj_hidden=48, pos_embed=True))
    fusion = _fusion(tower)
    names = set(fusion.state_dict())
    assert {"visual_proj.0.weight", "visual_proj.2.weight", "visual_proj.3.weight", "visual_proj.3.bias"} <= names
    assert "visual_proj.1.weight" not in names and fusion.visual_proj[0].weight.shape == (48, 64)
    feats = _features(tower, 3)
    with torch.no_grad():
        out = fusion(feats)
        aligned = fusion.aligned_tokens(feats)  # [3, 17, 64], checked against SPHINX's layout above
    assert out.shape == (3, 27, 64)

    def reference(dt):
        l1, l2, ln = fusion.visual_proj[0], fusion.visual_proj[2], fusion.visual_proj[3]
        with torch.no_grad():
            h = F.gelu(aligned.to(dt) @ l1.weight.to(dt).T + l1.bias.to(dt))
            y = F.layer_norm(h @ l2.weight.to(dt).T + l2.bias.to(dt), (64,), ln.weight.to(dt), ln.bias.to(dt), 1e-5)
            return y + fusion.pos_embed.to(dt)

    _assert_matches_reference(out[:, 1 + 8:1 + 8 + 17], reference, "MLP-projected tokens vs hand reference")
    with pytest.raises(ConfigError, match="proj_hidden"):
        replace(base.connector, proj_hidden=-1)


def test_sphinx_parameter_names():
    names = set(_fusion(get_preset("tiny").tower).state_dict())
    for k in ("visual_proj.0.weight", "visual_proj.0.bias", "visual_proj.1.weight", "qformer_proj.0.weight",
              "qformer_proj.1.bias", "start_img", "end_img", "qformer.query_tokens"):
        assert k in names, k


def test_demo_preset_average_pools_the_vit_grid():
    tower = get_preset("demo").tower  # DINOv2-S 16x16 + cls -> 8x8; EfficientNet 8x8 map unchanged
    fusion = _fusion(tower)
    feats = _features(tower, 2)
    with torch.no_grad():
        aligned = fusion.aligned_tokens(feats)
        out = fusion(feats)
    assert out.shape == (2, 67, 576)
    assert aligned.shape == (2, 65, 384 + 1280)
    dino, eff = feats["dinov2"], feats["effnet"]

    def pooled_dino(dt):
        return torch.cat([dino[:, :1].to(dt), _tokens(F.avg_pool2d(_map(dino[:, 1:].to(dt), 16), 2))], 1)

    def eff_with_mean(dt):
        eff_tok = _tokens(eff.to(dt))
        return torch.cat([eff_tok.mean(1, keepdim=True), eff_tok], 1)

    _assert_matches_reference(aligned[..., :384], pooled_dino, "DINOv2 grid pooled 16 -> 8")
    _assert_matches_reference(aligned[..., 384:], eff_with_mean, "EfficientNet map with mean token")


def _two_vit_tower(grid_a: int, target: int, class_a: bool):
    a = ViTConfig(name="a", image_size=8 * grid_a, patch_size=8, width=12, depth=1, heads=2, mlp_dim=16,
                  class_token=class_a)
    b = ViTConfig(name="b", image_size=8 * target, patch_size=8, width=8, depth=1, heads=2, mlp_dim=16)
    fusion = SphinxFusionConfig(encoders=("a", "b"), in_widths=(12, 8), grid=target, separators=False, out_width=16)
    return TowerConfig(encoders=(a, b), connector=fusion)


def test_bilinear_path_for_non_integer_ratios():
    tower = _two_vit_tower(grid_a=7, target=4, class_a=True)  # 7x7 -> 4x4
    fusion = _fusion(tower)
    feats = _features(tower, 3)
    with torch.no_grad():
        aligned = fusion.aligned_tokens(feats)
        out = fusion(feats)
    a = feats["a"]

    def resized(dt):
        ref = F.interpolate(_map(a[:, 1:].to(dt), 7), size=(4, 4), mode="bilinear", align_corners=False,
                            antialias=True)
        return torch.cat([a[:, :1].to(dt), _tokens(ref)], 1)

    _assert_matches_reference(aligned[..., :12], resized, "ViT grid resized 7 -> 4 (bilinear)")
    torch.testing.assert_close(aligned[..., 12:], feats["b"], atol=0, rtol=0)  # equal grids: untouched
    assert out.shape == (3, 17, 16) and tower.tokens_per_view == 17  # no separators, no Q-Former


def test_vit_without_class_token_gets_the_mean_token():
    tower = _two_vit_tower(grid_a=4, target=4, class_a=False)
    fusion = _fusion(tower)
    feats = _features(tower, 2)
    assert feats["a"].shape[1] == 16
    with torch.no_grad():
        aligned = fusion.aligned_tokens(feats)
    a = feats["a"]
    _assert_matches_reference(aligned[:, 0, :12], lambda dt: a.to(dt).mean(1), "mean token of a ViT without CLS")
    torch.testing.assert_close(aligned[:, 1:, :12], a, atol=0, rtol=0)


@pytest.mark.parametrize("src,dst,how", [(4, 4, "same"), (8, 4, "pool"), (2, 6, "repeat"), (6, 4, "bilinear"),
                                         (3, 4, "bilinear")])
def test_resize_grid_rules(src, dst, how):
    m = torch.randn(2, 3, src, src)
    want = {"same": lambda: m,
            "pool": lambda: F.avg_pool2d(m, src // dst),
            "repeat": lambda: m.repeat_interleave(dst // src, -1).repeat_interleave(dst // src, -2),
            "bilinear": lambda: F.interpolate(m, size=(dst, dst), mode="bilinear", align_corners=False,
                                              antialias=True)}[how]()
    assert torch.equal(resize_grid(m, dst), want)  # the same torch op on the same tensor, or a pure copy


def test_qformer_mask_reaches_the_qformer_only():
    tower = get_preset("tiny").tower
    fusion = _fusion(tower)
    feats = _features(tower, 2)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[:, 9:] = False
    changed = dict(feats, eva=feats["eva"].clone())
    changed["eva"][:, 9:] += 50.0
    with torch.no_grad():
        a, b = fusion(feats, {"eva": mask}), fusion(changed, {"eva": mask})
        c = fusion(changed)
    # Masked keys add exact zeros to the cross-attention and nothing else reads them: bit-identical.
    assert torch.equal(a, b)
    # unmasked, the change shows in the Q-Former tokens: 1e-3 of their scale is ~8000 fp32 ulps
    assert_differs(c[:, 1:9], a[:, 1:9], "Q-Former tokens after changing masked features, mask off", rel=1e-3)


def test_shape_errors_name_the_encoder():
    tower = get_preset("tiny").tower
    fusion = _fusion(tower)
    feats = _features(tower, 2)
    with pytest.raises(ShapeError, match=r"'cnn'.*\[N, 32, 2, 2\]"):
        fusion(dict(feats, cnn=torch.randn(2, 32, 4, 4)))
    with pytest.raises(ShapeError, match="view counts"):
        fusion(dict(feats, vit=torch.randn(3, 17, 32)))
    with pytest.raises(ShapeError, match="reads encoder 'eva'"):
        fusion({k: v for k, v in feats.items() if k != "eva"})


def test_convnext_feeds_a_native_grid_unchanged():
    # SPHINX-Tiny: ConvNeXt at 512 gives 16x16 natively; its tokens pass through, mean token first.
    cnx = ConvNeXtConfig(name="cnx", image_size=128, depths=(1, 1, 1, 1), dims=(4, 8, 12, 16))  # 4x4 map
    cfg = SphinxFusionConfig(encoders=("cnx",), in_widths=(16,), grid=4, out_width=8)
    tower = TowerConfig(encoders=(cnx,), connector=cfg)
    fusion = _fusion(tower)
    m = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        aligned = fusion.aligned_tokens({"cnx": m})
    def with_mean(dt):
        tok = _tokens(m.to(dt))
        return torch.cat([tok.mean(1, keepdim=True), tok], 1)

    _assert_matches_reference(aligned, with_mean, "ConvNeXt native grid with mean token")


def test_position_table_is_added_to_the_fused_tokens():
    from dataclasses import replace

    from edgevlm.runtime.connectors.sphinx import SphinxFusion, sincos_2d

    tower = get_preset("demo").tower
    assert tower.connector.pos_embed
    fusion = SphinxFusion(tower.connector, tower).eval()
    plain = SphinxFusion(replace(tower.connector, pos_embed=False), tower).eval()
    plain.load_state_dict({k: v for k, v in fusion.state_dict().items() if k != "pos_embed"})
    aligned = torch.randn(2, 65, tower.connector.fused_width)
    fusion64, plain64 = float64_copy(fusion), float64_copy(plain)
    with torch.no_grad():
        diff = fusion.from_aligned(aligned) - plain.from_aligned(aligned)  # [2, 67, 576]
        diff64 = fusion64.from_aligned(aligned.double()) - plain64.from_aligned(aligned.double())
    # (x + pos) - x rounds at the scale of x, not of pos: the noise is that of the same subtraction in fp64
    assert_within_noise(diff[:, 1:-1], fusion.pos_embed.expand(2, -1, -1), "fused-token difference vs position table",
                        noise=max_abs(diff, diff64))
    assert torch.equal(diff[:, 0], torch.zeros_like(diff[:, 0]))  # separators untouched
    table = sincos_2d(8, 576)
    assert table.shape == (1, 65, 576) and torch.equal(table[0, 0], torch.zeros(576))
    assert len({tuple(r.tolist()) for r in table[0, 1:]}) == 64  # every cell distinct
