"""xGen-MM's released any-resolution path (``anyres_patch_sampling``: tiles regrouped into strips before the
resampler) with token dropping and as an exported ONNX graph.

The reference is the one of tests/test_xgenmm.py (open_flamingo's ``_encode_vision_x_anyres``, LAVIS branch
``xgen-mm`` commit d699f7e5, ``open_flamingo/src/vlm.py`` l.187-281, and the perceiver of ``xgenmm.py``
l.123-162, rebuilt from transformers' real ``SiglipVisionModel``). With token dropping it is computed the
compact way, independently of edgevlm's masked one: SigLIP runs on each view's kept patches only, and each
group is resampled over its kept, unpadded tokens alone (no mask), found by their place on the stitched map.
Tolerances: within the reference's own fp32 noise (float64 copy) for torch; the export's fp32 bound
(``edgevlm.export.validate.TOLERANCES``, justified there) for ONNX Runtime against torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import edgevlm  # noqa: E402
from edgevlm.errors import ShapeError  # noqa: E402
from edgevlm.export import export_tower, open_export  # noqa: E402
from edgevlm.export.validate import TOLERANCES, compare  # noqa: E402
from edgevlm.runtime.image_io import load_images  # noqa: E402
from edgevlm.runtime.token_keep import keep_count  # noqa: E402
from edgevlm_testkit import assert_within_noise, float64_copy, max_abs  # noqa: E402
from test_token_drop import _gather_rows  # noqa: E402
from test_xgenmm import (  # noqa: E402,F401
    ANYRES_IMAGES, G_ANY, GRIDS_WH, N_LAT, S_ANY, TEXT, _image, ref_anyres_tokens, ref_best_resolution,
    ref_unpad_mask, xgenmm_anyres,
)


def ref_anyres_kept_tokens(model, px: torch.Tensor, size_wh, cells: torch.Tensor) -> torch.Tensor:
    """One image's tokens ``[(1 + rows*cols) * N_LAT, width]`` with views' patches ``cells [V, K]`` kept: SigLIP
    on the kept patches, then for each group of the strip regrouping (vlm.py l.255-259: raster chunks of g*g
    on the ``rows*g x cols*g`` stitched map) the resampler over its tokens that are kept and not padding
    (``unpad_image``'s mask, l.248), compacted, without a mask."""
    vm = model.vlm.vision_encoder
    h = _gather_rows(vm.embeddings(px, interpolate_pos_encoding=True), cells)
    h = vm.post_layernorm(vm.encoder(inputs_embeds=h).last_hidden_state)  # [V, K, d]
    g = G_ANY
    gw, gh = ref_best_resolution(size_wh, GRIDS_WH)
    cols, rows = gw // S_ANY, gh // S_ANY
    unpad = ref_unpad_mask(torch.zeros(1, rows * g, cols * g), size_wh).bool()  # [rows*g, cols*g]
    groups: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(rows * cols)]
    for v in range(1, 1 + rows * cols):  # tile v-1, row-major on the canvas
        r, c = divmod(v - 1, cols)
        for k, patch in enumerate(cells[v].tolist()):
            i, j = divmod(patch, g)
            y, x = r * g + i, c * g + j
            if unpad[y, x]:
                raster = y * cols * g + x
                groups[raster // (g * g)].append((raster, h[v, k]))
    media = [h[0]]  # the base view: every kept token, never padding
    for members in groups:
        members.sort(key=lambda m: m[0])
        media.append(torch.stack([t for _, t in members]) if members else h.new_zeros(0, h.shape[-1]))
    return torch.cat([model.vlm.vision_tokenizer(m.unsqueeze(0))[0] for m in media])


def _one_image_cells(tower, img) -> tuple[torch.Tensor, torch.Tensor]:
    """The preprocessed views of one image and the cells the tower keeps for them."""
    pre = tower.preprocessor(load_images([img]))
    return pre.views["siglip"], tower.kept_cells(pre.views)


def test_anyres_token_dropping_matches_the_compact_reference(xgenmm_anyres):
    model, folder, _ = xgenmm_anyres
    tower = edgevlm.load(folder).tower  # its own: the token-keep setting is per tower
    m64 = float64_copy(model)
    for i, ((h, w), (rows, cols)) in enumerate(ANYRES_IMAGES.items()):
        img = _image(40 + i, (h, w, 3))
        (full,) = tower.embed_each([img])
        tower.set_token_keep(0.5, "random", seed=5 + i)
        px, cells = _one_image_cells(tower, img)
        assert cells.shape == (1 + rows * cols, keep_count(G_ANY * G_ANY, 0.5))
        (ours,) = tower.embed_each([img])
        with torch.no_grad():
            ref = ref_anyres_kept_tokens(model, px, (w, h), cells)
            ref64 = ref_anyres_kept_tokens(m64, px.double(), (w, h), cells)
        assert ours.shape == full.shape == ((1 + rows * cols) * N_LAT, TEXT["hidden_size"])
        assert_within_noise(ours, ref, f"xgenmm anyres kept tokens {h}x{w} ({rows}x{cols})", noise=max_abs(ref, ref64))
        assert max_abs(ours, full) > 0  # the dropped patches mattered: the check above can fail
        tower.set_token_keep(1.0)
    # the compact reference with every patch kept is the plain strip reference: it is not a copy of ours
    (h, w), (rows, cols) = next(iter(ANYRES_IMAGES.items()))
    px = tower.preprocessor(load_images([_image(40, (h, w, 3))])).views["siglip"]
    every = torch.arange(G_ANY * G_ANY).expand(px.shape[0], -1)
    with torch.no_grad():
        a, b = ref_anyres_kept_tokens(m64, px.double(), (w, h), every), ref_anyres_tokens(m64, px.double(), (w, h))
    assert max_abs(a, b) < 1e-9


def test_anyres_pipeline_answers_with_token_dropping(xgenmm_anyres):
    _, folder, _ = xgenmm_anyres
    (h, w), (rows, cols) = next(iter(ANYRES_IMAGES.items()))
    out = edgevlm.load(folder, keep_ratio=0.5).generate(_image(50, (h, w, 3)), "user: <image>\nWhat?\nassistant:",
                                                        raw=True, max_new_tokens=4)
    assert out.visual_tokens == (1 + rows * cols) * N_LAT and 1 <= len(out.token_ids) <= 4


@pytest.fixture(scope="module")
def anyres_export(xgenmm_anyres, tmp_path_factory):
    pytest.importorskip("onnxruntime", reason="exported towers run with onnxruntime (pip install 'edgevlm[onnx]')")
    _, folder, _ = xgenmm_anyres
    out = tmp_path_factory.mktemp("xgenmm_anyres_export") / "export"
    return out, export_tower(folder, out=out, max_images=3, progress=False)


def test_anyres_export_takes_masks_and_order_and_was_validated_at_every_grid(anyres_export):
    _, manifest = anyres_export
    c = manifest.contract
    assert c.input_names == ["pixels.siglip", "token_mask.siglip", "token_order.siglip"]
    assert c.token_masks == "input" and c.view_counts == (3, 4, 5)
    v = manifest.validation["fp32"]
    metric, bound = TOLERANCES["fp32"]
    assert v[metric] <= bound
    # one batch of mixed grids, then one image alone per view count (the smallest included)
    assert v["batches"] == 1 + len(c.view_counts) and sorted(v["batch_views"][1:]) == list(c.view_counts)


def test_exported_anyres_tower_matches_torch_and_answers_alike(xgenmm_anyres, anyres_export, tmp_path, monkeypatch):
    _, folder, ref = xgenmm_anyres
    out, _ = anyres_export
    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path / "cache"))
    pipe = edgevlm.load(folder, vision_backend="onnxruntime", vision_export=out)
    assert pipe.tower.backend == "onnxruntime"
    metric, bound = TOLERANCES["fp32"]
    imgs = [_image(60 + i, (h, w, 3)) for i, (h, w) in enumerate(ANYRES_IMAGES)]
    for want, got, (h, w) in zip(ref.tower.embed_each(imgs[:2]), pipe.tower.embed_each(imgs[:2]), ANYRES_IMAGES):
        assert got.shape == want.shape  # two grids (2x2 and 1x3) in one graph call
        assert compare(got.numpy(), want.numpy())[metric] <= bound, f"{h}x{w}"
    for img in imgs[2:]:
        (want,), (got,) = ref.tower.embed_each([img]), pipe.tower.embed_each([img])
        assert compare(got.numpy(), want.numpy())[metric] <= bound
    (h, w), _ = next(iter(ANYRES_IMAGES.items()))
    prompt, img = "user: <image>\nWhat is this?\nassistant:", _image(70, (h, w, 3))
    a = pipe.generate(img, prompt, raw=True, max_new_tokens=8)
    b = ref.generate(img, prompt, raw=True, max_new_tokens=8)
    assert a.token_ids == b.token_ids and len(b.token_ids) > 0


def test_exported_anyres_runner_refuses_views_without_their_masks_and_order(xgenmm_anyres, anyres_export):
    _, folder, ref = xgenmm_anyres
    out, _ = anyres_export
    runner, _ = open_export(out, backend="onnxruntime", model=ref.tower.model)
    (h, w), _ = next(iter(ANYRES_IMAGES.items()))
    pre = ref.tower.preprocessor(load_images([_image(80, (h, w, 3))]))
    with pytest.raises(ShapeError, match="token_mask.siglip"):
        runner(pre.views)
    with pytest.raises(ShapeError, match="token_order.siglip"):
        runner(pre.views, pre.token_masks)
    got = runner(pre.views, pre.token_masks, order=pre.token_order)
    want = ref.tower.model(pre.views, pre.token_masks, order=pre.token_order)
    assert compare(got.numpy(), want.detach().numpy())[TOLERANCES["fp32"][0]] <= TOLERANCES["fp32"][1]
    # a shuffled order is a different regrouping: the graph really reads it
    shuffled = {k: v.flip(1) for k, v in pre.token_order.items()}
    other = runner(pre.views, pre.token_masks, order=shuffled)
    assert np.abs(other.numpy() - got.numpy()).max() > 1e-3


def test_anyres_fp16_graph_keeps_its_mask_and_order_inputs(xgenmm_anyres, tmp_path):
    """fp16 conversion turns float tensors to half; the bool masks and int64 order stay as they are, and the
    graph passes its precision's bound against eager at every grid."""
    import onnx

    _, folder, _ = xgenmm_anyres
    manifest = export_tower(folder, out=tmp_path / "fp16", precision="fp16", max_images=2, progress=False)
    metric, bound = TOLERANCES["fp16"]
    assert manifest.validation["fp16"][metric] <= bound
    graph = onnx.load(str(manifest.path(tmp_path / "fp16", "graph")))
    types = {i.name: i.type.tensor_type.elem_type for i in graph.graph.input}
    assert types == {"pixels.siglip": onnx.TensorProto.FLOAT, "token_mask.siglip": onnx.TensorProto.BOOL,
                     "token_order.siglip": onnx.TensorProto.INT64}


def test_anyres_resampler_without_regrouping_exports_with_its_tile_masks(xgenmm_anyres, tmp_path):
    """The same weights with tiles resampled one by one under their own padding masks (regroup=None, as
    LLaVA-NeXT-style towers with a resampler would run): the graph takes the masks alone, no order."""
    from dataclasses import replace

    from edgevlm.export import export_model
    from edgevlm.runtime.tower import VisionTowerModel

    _, _, pipe = xgenmm_anyres
    cfg = replace(pipe.tower.config, regroup=None)
    model = VisionTowerModel(cfg)
    model.load_state_dict(pipe.tower.model.state_dict())
    manifest = export_model(model, out=tmp_path / "export", max_images=2, progress=False)
    assert manifest.contract.input_names == ["pixels.siglip", "token_mask.siglip"]
    v = manifest.validation["fp32"]
    assert v[v["metric"]] <= v["bound"] and sorted(v["batch_views"][1:]) == list(manifest.contract.view_counts)
    # the graph reads the masks: the preprocessor's per-tile padding masks of a wide image give the eager
    # model's output, and all-ones masks give another
    from edgevlm.runtime.preprocess import Preprocessor

    (h, w), _ = next(iter(ANYRES_IMAGES.items()))
    pre = Preprocessor(cfg)(load_images([_image(90, (h, w, 3))]))
    assert pre.token_order is None and not bool(pre.token_masks["siglip"].all())
    runner, _ = open_export(tmp_path / "export", backend="onnxruntime", model=model)
    got = runner(pre.views, pre.token_masks)
    ones = runner(pre.views, {"siglip": torch.ones_like(pre.token_masks["siglip"])})
    want = model(pre.views, pre.token_masks).detach().numpy()
    assert compare(got.numpy(), want)[TOLERANCES["fp32"][0]] <= TOLERANCES["fp32"][1]
    assert np.abs(got.numpy() - ones.numpy()).max() > 1e-3
