"""Export and token dropping on the MiniGPT-4 and xGen-MM sources, read from their own layouts.

The mechanisms are tested elsewhere on generic towers (test_export.py, test_token_drop.py); here each
family's real container goes through them: the tower read from a MiniGPT-4 eval YAML (BLIP-2 ViT +
Q-Former + ``llama_proj``) and from an xGen-MM folder (SigLIP + perceiver resampler, base-image path).

References: for token dropping, the family's own reference modules (transformers' BLIP-2 / SigLIP and
the tests' open_flamingo resampler) run on the kept patches: the encoder's embeddings over the whole
grid, the kept rows gathered, then its layers and everything after them. Tolerances: the reference's own
fp32 noise, measured with a float64 copy (:func:`edgevlm_testkit.assert_within_noise`); exported graphs
within the export's validation bound (``TOLERANCES``); greedy tokens exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime", reason="exported towers run with onnxruntime (pip install 'edgevlm[onnx]')")

import edgevlm  # noqa: E402
from edgevlm.export import export_tower  # noqa: E402
from edgevlm.export.validate import TOLERANCES, compare  # noqa: E402
from edgevlm.runtime.token_keep import keep_count  # noqa: E402
from edgevlm.runtime.tower import load_vision_tower  # noqa: E402

from edgevlm_testkit import assert_within_noise, float64_copy, max_abs  # noqa: E402
from test_minigpt4 import IMAGE_SIZE, QUERIES, QUESTION, _encode_img, minigpt4  # noqa: E402,F401
from test_token_drop import _gather_rows, _KeptVision, _kept_rows  # noqa: E402
from test_xgenmm import N_LAT, SIGLIP, TEXT, _image, xgenmm  # noqa: E402,F401


def _minigpt4_kept_reference(m, px, cells):
    """MiniGPT-4's encode_img (transformers' BLIP-2 ViT + Q-Former, then llama_proj) with the ViT run on
    the class token and the kept patches."""
    blip2 = copy.deepcopy(m["blip2"])
    blip2.vision_model = _KeptVision(blip2.vision_model, _kept_rows(cells))
    with torch.no_grad():
        return _encode_img(blip2, m["llama_proj"], px)


def _xgenmm_kept_reference(model, px, cells):
    """SiglipVisionModel on the kept patches (no class token: the cells are the rows), its post-LayerNorm,
    then the open_flamingo resampler."""
    vm = model.vlm.vision_encoder
    with torch.no_grad():
        h = _gather_rows(vm.embeddings(px), cells)
        h = vm.post_layernorm(vm.encoder(inputs_embeds=h).last_hidden_state)
        return model.vlm.vision_tokenizer(h)


# ---- token dropping ---------------------------------------------------------------------------

def test_minigpt4_token_dropping_matches_its_reference_on_kept_patches(minigpt4):
    tower = load_vision_tower(minigpt4["folder"])
    (name,) = tower.model.keep_plan().vits
    grid = tower.config.encoder(name).grid[0]
    px = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    full = tower.from_pixels(px)
    for mode in ("uniform", "random"):
        tower.set_token_keep(0.5, mode, seed=3)
        cells = tower.kept_cells({name: px})
        assert cells.shape == (2, keep_count(grid * grid, 0.5))
        ours = tower.from_pixels(px)
        assert ours.shape == full.shape == (2, QUERIES, ours.shape[-1])  # still the Q-Former's queries
        ref = _minigpt4_kept_reference(minigpt4, px, cells)
        m64 = {"blip2": float64_copy(minigpt4["blip2"]), "llama_proj": float64_copy(minigpt4["llama_proj"])}
        ref64 = _minigpt4_kept_reference(m64, px.double(), cells)
        assert_within_noise(ours, ref, f"MiniGPT-4 tower on kept patches ({mode})", noise=max_abs(ref, ref64))
        assert max_abs(ours, full) > 0  # the dropped patches mattered: the check above can fail


def test_minigpt4_pipeline_answers_with_token_dropping(minigpt4):
    img = np.random.default_rng(0).integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    out = edgevlm.load(minigpt4["folder"], keep_ratio=0.5).generate(img, QUESTION, max_new_tokens=4)
    assert out.visual_tokens == QUERIES and 1 <= len(out.token_ids) <= 4


def test_xgenmm_token_dropping_matches_its_reference_on_kept_patches(xgenmm):
    model, folder, _ = xgenmm
    tower = load_vision_tower(folder)
    (name,) = tower.model.keep_plan().vits
    grid = SIGLIP["image_size"] // SIGLIP["patch_size"]
    px = torch.randn(2, 3, SIGLIP["image_size"], SIGLIP["image_size"])
    full = tower.from_pixels(px)
    tower.set_token_keep(0.5, "random", seed=4)
    cells = tower.kept_cells({name: px})
    assert cells.shape == (2, keep_count(grid * grid, 0.5))
    ours = tower.from_pixels(px)
    assert ours.shape == full.shape == (2, N_LAT, TEXT["hidden_size"])  # still the resampler's latents
    ref = _xgenmm_kept_reference(model, px, cells)
    ref64 = _xgenmm_kept_reference(float64_copy(model), px.double(), cells)
    assert_within_noise(ours, ref, "xgenmm tower on kept patches", noise=max_abs(ref, ref64))
    assert max_abs(ours, full) > 0


# ---- export -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["minigpt4", "xgenmm"])
def test_exported_tower_answers_like_torch(family, request, tmp_path, monkeypatch):
    """The tower read from the family's own container exports (validated against eager on real photos at
    export time), and ``edgevlm.load(src, vision_backend="onnxruntime")`` gives the torch backend's greedy
    tokens, with embeddings within the export's fp32 bound."""
    if family == "minigpt4":  # its chat format wraps the question in ###Human: <Img><ImageHere></Img>
        src, prompt, raw = request.getfixturevalue("minigpt4")["folder"], QUESTION, False
        img = np.random.default_rng(1).integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    else:  # raw prompt with xGen-MM's <image> placeholder
        src, prompt, raw = request.getfixturevalue("xgenmm")[1], "user: <image>\nWhat?\nassistant:", True
        img = _image(6)
    manifest = export_tower(src, out=tmp_path / "export", progress=False)
    metric, bound = TOLERANCES["fp32"]
    assert manifest.validation["fp32"][metric] <= bound
    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path / "cache"))
    ref = edgevlm.load(src)
    pipe = edgevlm.load(src, vision_backend="onnxruntime", vision_export=tmp_path / "export")
    assert pipe.tower.backend == "onnxruntime"
    (want,), (got,) = ref.tower.embed_each([img]), pipe.tower.embed_each([img])
    assert got.shape == want.shape
    assert compare(got.numpy(), want.numpy())[metric] <= bound
    a = pipe.generate(img, prompt, raw=raw, max_new_tokens=8)
    b = ref.generate(img, prompt, raw=raw, max_new_tokens=8)
    assert a.token_ids == b.token_ids and len(b.token_ids) > 0
