"""Token dropping on LLaVA-NeXT towers: the ViT runs on each view's kept patches, and the any-resolution
packing (stitched tiles, unpad, ``image_newline`` after every row) leaves the dropped places out.

Reference: transformers' own ``LlavaNextModel`` pieces. Its CLIP runs on the kept patches (its embeddings
over the whole grid, the kept rows gathered with the class token, ``pre_layrnorm``, its encoder layers),
its ``vision_feature_layer`` / ``vision_feature_select_strategy`` and projector follow, and its
``pack_image_features`` packs a full-size feature map whose dropped places hold NaN; removing the NaN rows
from its output gives the expected sequence (newlines are never NaN). So the layout is transformers' packing
and only the removal of dropped places is this project's definition. Tolerance: the reference's own fp32
noise, measured with a float64 copy.
"""

from __future__ import annotations

import copy

import pytest
import torch

import edgevlm
from edgevlm.runtime import load_vision_tower
from edgevlm.runtime.token_keep import keep_count
from edgevlm_testkit import assert_within_noise, float64_copy, max_abs
from test_llava_next import PROMPT, SHAPES, TILE, PATCH, clip_folder, image_processor, photo  # noqa: F401
from test_token_drop import _gather_rows, _kept_rows

transformers = pytest.importorskip("transformers")

G = TILE // PATCH  # 5x5 patches per view


class _KeptEmbeddings(torch.nn.Module):
    """CLIP's embeddings (class token + positions over the whole grid), then only the kept rows."""

    def __init__(self, emb, rows):
        super().__init__()
        self.emb, self.rows = emb, rows

    def forward(self, pixel_values, **kwargs):
        return _gather_rows(self.emb(pixel_values, **kwargs), self.rows)  # [V, 1 + K, C]


def _kept_packed_reference(model, px: torch.Tensor, hw: tuple[int, int], cells: torch.Tensor) -> torch.Tensor:
    """transformers' LLaVA-NeXT features of one image ``[tokens, D]`` with the views' patches ``cells [V, K]`` kept."""
    m = copy.deepcopy(model.model)
    cfg = model.config
    m.vision_tower.embeddings = _KeptEmbeddings(m.vision_tower.embeddings, _kept_rows(cells))
    with torch.no_grad():
        hidden = m.vision_tower(px, output_hidden_states=True).hidden_states  # its own forward on 1 + K rows
        sel = hidden[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            sel = sel[:, 1:]
        feats = m.multi_modal_projector(sel)  # [V, K, D]
        v, _, d = feats.shape
        full = torch.full((v, G * G, d), float("nan"), dtype=feats.dtype)
        full.scatter_(1, cells.unsqueeze(-1).expand(-1, -1, d), feats)
        packed, _ = m.pack_image_features([full], torch.tensor([hw]), cfg.vision_feature_select_strategy,
                                          image_newline=m.image_newline)
    (packed,) = packed  # one image
    return packed[~packed.isnan().any(-1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_packed_features_with_dropped_tokens_match_transformers(clip_folder, shape):
    model, folder = clip_folder
    tower = load_vision_tower(folder)
    img = photo(*shape)
    hw = img.shape[:2]
    px = image_processor()(images=[img], return_tensors="pt")["pixel_values"][0]  # [1 + tiles, 3, 40, 40]
    full = tower.from_pixels(px, views_per_image=[px.shape[0]], image_sizes=[hw])[0]
    for mode in ("uniform", "random"):
        tower.set_token_keep(0.5, mode, seed=11)
        (name,) = tower.model.keep_plan().vits
        cells = tower.kept_cells({name: px})
        assert cells.shape == (px.shape[0], keep_count(G * G, 0.5))
        ours = tower.from_pixels(px, views_per_image=[px.shape[0]], image_sizes=[hw])[0]
        ref = _kept_packed_reference(model, px, hw, cells)
        ref64 = _kept_packed_reference(float64_copy(model), px.double(), hw, cells)
        assert ours.shape == ref.shape and ours.shape[0] < full.shape[0]
        assert_within_noise(ours, ref, f"llava-next kept packing ({mode}, {shape})", noise=max_abs(ref, ref64))
        # the images' own views (preprocessed by the tower) give a sequence of the same length
        assert tower.embed_each([img])[0].shape == ours.shape
    tower.set_token_keep(1.0)
    # with every patch kept, the NaN reference is transformers' plain packing: the removal drops nothing else
    every = torch.arange(G * G).expand(px.shape[0], -1)
    assert _kept_packed_reference(model, px, hw, every).shape == full.shape


def test_pipeline_prompt_shrinks_by_the_dropped_tokens(clip_folder):
    _, folder = clip_folder
    img = photo(*SHAPES[0])
    a = edgevlm.load(folder, quant="none").generate(img, PROMPT, raw=True, max_new_tokens=3)
    b = edgevlm.load(folder, quant="none", keep_ratio=0.5).generate(img, PROMPT, raw=True, max_new_tokens=3)
    views = 1 + 2  # a wide image on the 1x2 canvas: base view + two tiles
    assert a.visual_tokens - b.visual_tokens == views * (G * G - keep_count(G * G, 0.5))
    assert 1 <= len(b.token_ids) <= 3


def test_packing_checks_kept_ids_against_the_views(clip_folder):
    from edgevlm.errors import ShapeError

    _, folder = clip_folder
    tower = load_vision_tower(folder)
    pack = tower.model.pack
    views = torch.zeros(3, 4, tower.config.out_width)
    with pytest.raises(ShapeError, match="kept ids"):
        pack(views, (30, 70), kept=torch.zeros(3, 5, dtype=torch.long))
    # each view keeps the first four patches of its top row: the map's row 0 has them from both tiles, the
    # other rows none, and every row that survives unpadding still ends with its newline
    from edgevlm.runtime.views import unpad_box

    views = torch.arange(3 * 4, dtype=torch.float32).view(3, 4, 1).expand(3, 4, tower.config.out_width)
    with torch.no_grad():
        out = pack(views, (30, 70), kept=torch.tensor([[0, 1, 2, 3]] * 3))
    y0, _, y1, _ = unpad_box(30, 70, G, 2 * G)
    assert out.shape[0] == 4 + (8 if y0 == 0 else 0) + (y1 - y0)
    assert out[:4, 0].tolist() == [0, 1, 2, 3]  # the base view's kept tokens first
    if y0 == 0:
        assert out[4:12, 0].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]  # tile 1's then tile 2's, left to right
        assert torch.equal(out[12], tower.model.pack.newline.detach())
