"""FLIP-style masked image-encoder training (train/flip.py): token dropping, masked encoding, contrastive step."""

import argparse

import pytest
import torch
from edgevlm_testkit import assert_differs, assert_within_noise, float64_copy, max_abs

from edgevlm.config import ViTConfig
from edgevlm.errors import ConfigError, ShapeError
from edgevlm.train.flip import FLIPModel, _ratio, clip_loss, flip_step, masked_encode, random_keep

# 32x32 input, patch 8 -> L = 16 patches + class token = 17 tokens
VIT = ViTConfig(name="vit", image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64)
L = 16


def _tokens(n=3, c=5):
    # distinct values so a gathered token identifies its source position: tokens[i, j, :] = 1000 i + j
    base = 1000 * torch.arange(n)[:, None] + torch.arange(1 + L)[None, :]
    return base[..., None].expand(n, 1 + L, c).float().clone()


@pytest.mark.parametrize("ratio, k", [(0.5, 8), (0.75, 4), (0.3, 11), (0.0, 16)])
def test_random_keep_counts_and_class_token(ratio, k):
    tokens = _tokens()
    kept, ids = random_keep(tokens, ratio, torch.Generator().manual_seed(0))
    assert kept.shape == (3, 1 + k, 5) and ids.shape == (3, k)
    assert torch.equal(kept[:, 0], tokens[:, 0])  # class token first, never dropped
    for row in range(3):
        r = ids[row]
        assert len(set(r.tolist())) == k and torch.equal(r, r.sort().values)  # unique, ascending
        assert r.min() >= 0 and (k == 0 or r.max() < L)
        # kept patch tokens are exactly the patches named by ids (patch j sits at token 1 + j)
        assert torch.equal(kept[row, 1:, 0], 1000 * row + 1 + r.float())


def test_random_keep_seeded():
    tokens = _tokens()
    _, a = random_keep(tokens, 0.5, torch.Generator().manual_seed(1))
    _, b = random_keep(tokens, 0.5, torch.Generator().manual_seed(1))
    _, c = random_keep(tokens, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 3))  # each image draws its own subset


def test_ratio_zero_keeps_all_and_bad_ratios():
    tokens = _tokens()
    kept, ids = random_keep(tokens, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(kept, tokens) and torch.equal(ids, torch.arange(L).expand(3, L))
    for bad in (1.0, -0.1, 1.5, True):
        with pytest.raises(ConfigError, match="mask_ratio"):
            random_keep(tokens, bad)
    with pytest.raises(ShapeError, match="keeps no token"):
        random_keep(tokens[:, 1:], 0.99, class_token=False)  # int(16 * 0.01) = 0 and no class token
    with pytest.raises(argparse.ArgumentTypeError):
        _ratio("0.9x")
    assert _ratio("0.75") == 0.75


def test_masked_encode_ratio_zero_equals_full_vit():
    model = FLIPModel(VIT)
    vit = model.vit.eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = vit(pixels).mean(dim=1)  # [2, 32]
        full64 = float64_copy(vit)(pixels.double()).mean(dim=1)
        masked = masked_encode(vit, pixels, 0.0, torch.Generator().manual_seed(0))
        half = masked_encode(vit, pixels, 0.5, torch.Generator().manual_seed(0))
    assert_within_noise(masked, full, "masked_encode at ratio 0 vs the full ViT", noise=max_abs(full, full64))
    # half the patches dropped: a different embedding, far above noise (1e-3 of the scale is ~8000 fp32 ulps)
    assert_differs(half, full, "masked_encode at ratio 0.5 vs the full ViT", rel=1e-3)


@pytest.mark.parametrize("ratio, seen", [(0.0, 17), (0.5, 9), (0.75, 5)])
def test_blocks_see_fewer_tokens(ratio, seen):
    model = FLIPModel(VIT)
    shapes = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
             for blk in model.vit.blocks]
    masked_encode(model.vit, torch.randn(2, 3, 32, 32), ratio, torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    assert shapes == [(2, seen, 32)] * VIT.depth  # every block runs on 1 + K tokens


def test_clip_loss_prefers_matching_pairs():
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(2.0)
    assert clip_loss(e, e, scale) < clip_loss(e, e.roll(1, 0), scale)


def test_flip_steps_lower_contrastive_loss():
    torch.manual_seed(0)
    model = FLIPModel(VIT, embed_dim=32, text_width=32)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(4, 3, 32, 32, generator=g)
    ids, valid = model.tokenize(["a red cube", "two blue balls", "a green cone", "one yellow star"])

    def evaluate():  # fixed mask draw, so before/after see the same kept tokens
        with torch.no_grad():
            return model(pixels, ids, valid, 0.5, torch.Generator().manual_seed(9)).item()

    before = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = [flip_step(model, opt, pixels, ids, valid, mask_ratio=0.5, generator=gen) for _ in range(15)]
    after = evaluate()
    print("flip contrastive loss", round(before, 4), "->", round(after, 4), [round(x, 3) for x in losses[::5]])
    assert after < 0.5 * before
