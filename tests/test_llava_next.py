"""LLaVA-NeXT transformers folders, end to end: any-resolution views, the packed image features (unpad +
image_newline), and the whole model through ``edgevlm.load`` against transformers.

Fixtures are tiny random ``LlavaNextForConditionalGeneration`` models saved by transformers: a CLIP tower
(40 px tiles, 8 px patches: a 5x5 grid per view), canvases ``[[40, 80], [80, 40], [80, 80]]`` (1x2, 2x1
and 2x2 tiles), and a small Llama. Variants: ``vision_feature_layer=-2`` with ``default`` (CLS dropped),
``[-2, -1]`` (two layers concatenated on channels), and a SigLIP tower (no class token) with ``full``.

Tolerances: model outputs are compared within transformers' own fp32 rounding noise, measured by
running a float64 copy of its model on the same pixels (:func:`edgevlm_testkit.assert_within_noise`).
Pixel values are compared in 8-bit levels against the resampling noise measured on the same image
(see :func:`_pass_order_levels`), plus the fp32 floor of the normalisation.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import edgevlm
from edgevlm import CheckpointError
from edgevlm.config import TowerConfig
from edgevlm.runtime import load_vision_tower
from edgevlm.runtime.chat import build_multimodal_ids
from edgevlm.runtime.generate import GenerationConfig, generate_tokens
from edgevlm.runtime.image_io import load_images
from edgevlm.runtime.preprocess import Preprocessor
from edgevlm.runtime.views import anyres_layout, select_best_grid, unpad_box
from edgevlm_testkit import (BYTE_VOCAB as VOCAB, EPS32, FLOOR_ULPS, IMAGE_ID, assert_within_noise, float64_copy, max_abs,
                             randomize_params, scale_of, write_byte_tokenizer)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TILE, PATCH = 40, 8  # a 5x5 token grid per view
PINPOINTS = [[40, 80], [80, 40], [80, 80]]  # (height, width) canvases: 1x2, 2x1, 2x2 tiles
PROMPT = "<s>user: <image>\nWhat is this?\nassistant:"

VARIANTS = {
    "clip": dict(vision="clip_vision_model", layer=-2, strategy="default"),
    "clip_layers": dict(vision="clip_vision_model", layer=[-2, -1], strategy="default"),
    "siglip_full": dict(vision="siglip_vision_model", layer=-2, strategy="full"),
}
# wide (1x2 canvas, rows unpadded), tall (2x1, columns unpadded), near-square (2x2)
SHAPES = [(30, 70), (70, 30), (61, 64)]


def build_folder(folder, *, vision: str, layer, strategy: str, seed: int = 7):
    cfg = transformers.LlavaNextConfig(
        vision_config=dict(model_type=vision, hidden_size=80, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=2, image_size=TILE, patch_size=PATCH),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512),
        image_token_index=IMAGE_ID, vision_feature_layer=layer, vision_feature_select_strategy=strategy,
        image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(0)
    model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    randomize_params(model, seed)  # image_newline and every bias included
    model.save_pretrained(folder)
    write_byte_tokenizer(folder)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def llava_next(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"llava_next_{request.param}")
    return request.param, build_folder(folder, **VARIANTS[request.param]), folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava_next_clip")
    return build_folder(folder, **VARIANTS["clip"]), folder


def image_processor(variant: str = "clip"):
    """transformers' LLaVA-NeXT image processor for these folders (the PIL one: no torchvision here)."""
    half = VARIANTS[variant]["vision"] == "siglip_vision_model"
    kw = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if half else {}
    return transformers.LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                                   image_grid_pinpoints=PINPOINTS, **kw)


def photo(h: int, w: int) -> np.ndarray:
    """A real photo crop (smooth areas and edges), so resampling differences look like a camera frame's."""
    from skimage import data

    a = data.astronaut()
    return np.ascontiguousarray(a[40:40 + 4 * h, 100:100 + 4 * w])  # 4x the nominal size: the canvases shrink it


# ---- geometry --------------------------------------------------------------------------------

def test_unpad_box_and_grid_choice_match_transformers():
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 2000, size=(300, 2))] + [(1, 999), (999, 1), (336, 672)]
    for h, w in sizes:
        rows, cols = select_best_grid(h, w, [(p[0] // TILE, p[1] // TILE) for p in PINPOINTS], TILE)
        assert (rows * TILE, cols * TILE) == tuple(select_best_resolution((h, w), PINPOINTS)), (h, w)
        for mh, mw in ((rows * 5, cols * 5), (24, 48), (48, 24), (72, 72)):
            y0, x0, y1, x1 = unpad_box(h, w, mh, mw)
            ref = unpad_image(torch.zeros(1, mh, mw), (h, w))
            assert (y1 - y0, x1 - x0) == tuple(ref.shape[1:]), (h, w, mh, mw)
            # the kept cells are the centre ones: unpad_image slices symmetrically
            assert y0 == mh - y1 and x0 == mw - x1


# ---- the tower -------------------------------------------------------------------------------

def test_tower_config_weights_and_json(clip_folder):
    _, folder = clip_folder
    tower = load_vision_tower(folder)
    c = tower.config
    assert tower.weights.random == [] and tower.weights.sources["pack"] == "checkpoint"
    assert c.views.kind == "anyres" and c.views.anyres_grids == ((1, 2), (2, 1), (2, 2))
    assert c.views.anyres_fill == (0, 0, 0) and c.pack is not None
    # the largest packed image: base 5x5, then a 10x10 map with a newline per row
    assert c.visual_tokens_per_image == 25 + 10 * 11
    assert TowerConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def _pass_order_levels(img: np.ndarray, sizes: list[tuple[int, int]]) -> int:
    """How far (8-bit levels) Pillow's own one-call bicubic resize of ``img`` to each ``(h, w)`` lies from
    the horizontal-then-vertical passes edgevlm's reference always runs (runtime/preprocess.py: Pillow 13
    runs the vertical pass first for some shapes, and each pass rounds to uint8). transformers' processor
    makes the one call, so this is the resampling noise between the two: 0 when Pillow keeps the order."""
    pil = Image.fromarray(img)
    worst = 0
    for rh, rw in sizes:
        one = np.asarray(pil.resize((rw, rh), Image.BICUBIC), dtype=np.int16)
        two = np.asarray(pil.resize((rw, img.shape[0]), Image.BICUBIC).resize((rw, rh), Image.BICUBIC), dtype=np.int16)
        worst = max(worst, int(np.abs(one - two).max()))
    return worst


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("shape", SHAPES)
def test_pixel_values_match_llava_next_processor(clip_folder, shape, backend):
    _, folder = clip_folder
    tower = load_vision_tower(folder)
    img = photo(*shape)
    h, w = img.shape[:2]
    theirs = image_processor()(images=[img], return_tensors="pt")
    px, sizes = theirs["pixel_values"][0], theirs["image_sizes"].tolist()
    pre = Preprocessor(tower.config, backend=backend)([img])
    ours = pre.views["clip"]
    assert ours.shape == px.shape and pre.views_per_image == [px.shape[0]]  # base + tiles of the same grid
    assert pre.image_sizes == [tuple(s) for s in sizes] == [(h, w)]

    lay = anyres_layout(h, w, select_best_grid(h, w, tower.config.views.anyres_grids, TILE), TILE)
    noise = _pass_order_levels(img, [(TILE, TILE), (lay.resized_h, lay.resized_w)])
    # the C++ path may move a pixel by one more level than the reference (its contract, test_preprocess.py)
    noise += 1 if backend == "cpp" else 0
    std = torch.tensor(tower.config.encoders[0].std, dtype=torch.float64).view(1, 3, 1, 1)
    levels = (ours.double() - px.double()).abs() * std * 255
    floor = FLOOR_ULPS * EPS32 * scale_of(px) * 255 * max(tower.config.encoders[0].std)  # fp32 normalisation
    assert levels.max().item() <= noise + floor, (levels.max().item(), noise)


def _reference_features(model, px: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    with torch.no_grad():
        out = model.model.get_image_features(px[None], torch.tensor([hw])).pooler_output
    return out[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_packed_image_features_match_transformers(llava_next, shape):
    variant, model, folder = llava_next
    tower = load_vision_tower(folder)
    img = photo(*shape)
    hw = img.shape[:2]
    px = image_processor(variant)(images=[img], return_tensors="pt")["pixel_values"][0]  # [1 + tiles, 3, 40, 40]
    ref = _reference_features(model, px, hw)
    ref64 = _reference_features(float64_copy(model), px.double(), hw)
    ours = tower.from_pixels(px, views_per_image=[px.shape[0]], image_sizes=[hw])[0]
    assert ours.shape == ref.shape
    assert ours.shape[0] <= tower.config.visual_tokens_per_image
    assert_within_noise(ours, ref, f"llava-next packed features ({variant}, {shape})", noise=max_abs(ref, ref64))
    # from the image itself: the tower's own views give a sequence of the same length
    assert tower.embed_each([img])[0].shape == ref.shape


def test_feature_width_counts_the_layers(llava_next):
    variant, _, folder = llava_next
    enc = load_vision_tower(folder).config.encoders[0]
    assert enc.feature_width == (2 * enc.width if variant == "clip_layers" else enc.width)


# ---- the whole model -------------------------------------------------------------------------

def test_folder_logits_and_greedy_tokens_match_transformers(llava_next):
    variant, model, folder = llava_next
    pipe = edgevlm.load(folder)
    assert pipe.tower is not None and pipe.chat.image_placement == "placeholder"
    img = np.random.default_rng(0).integers(0, 256, size=(30, 70, 3), dtype=np.uint8)
    pre = pipe.tower.preprocessor(load_images([img]))  # the same pixels go to both
    px, sizes = pre.views["clip"][None], torch.tensor(pre.image_sizes)
    emb = pipe.tower.embed_each([img])[0]
    mp = build_multimodal_ids(pipe.tokenizer, PROMPT, 1, [emb.shape[0]], "placeholder")
    ids = torch.tensor([[IMAGE_ID if i < 0 else i for i in mp.input_ids]])

    x = mp.embed(pipe.decoder.embed, [emb])
    with torch.no_grad():
        ref_logits = model(input_ids=ids, pixel_values=px, image_sizes=sizes).logits[0, -1]
        ref64 = float64_copy(model)(input_ids=ids, pixel_values=px.double(), image_sizes=sizes).logits[0, -1]
        ours_logits = pipe.decoder(inputs_embeds=x)[0, -1]
    assert_within_noise(ours_logits, ref_logits, f"llava-next next-token logits vs transformers ({variant})",
                        noise=max_abs(ref_logits, ref64))

    with torch.no_grad():
        ref = model.generate(input_ids=ids, pixel_values=px, image_sizes=sizes, max_new_tokens=24, min_new_tokens=24,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    ours = list(generate_tokens(pipe.decoder, pipe.decoder.new_cache(max_len=512), prompt_embeds=x,
                                gen_cfg=GenerationConfig(max_new_tokens=24)))
    assert len(ref) == 24 and ours == ref

    # and through the public call: the pipeline's own image path, prompt and stop at EOS
    out = pipe.generate(img, PROMPT, raw=True, max_new_tokens=24)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, pixel_values=px, image_sizes=sizes, max_new_tokens=24, do_sample=False,
                             eos_token_id=2, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert out.token_ids == (ref[: ref.index(2)] if 2 in ref else ref)
    assert out.visual_tokens == emb.shape[0] and out.prompt_tokens == ids.shape[1]


def test_pipeline_generate_runs_with_per_image_token_counts(clip_folder):
    _, folder = clip_folder
    pipe = edgevlm.load(folder)
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, size=(20, 70, 3), dtype=np.uint8)
    square = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    a = pipe.generate(wide, "Describe.", max_new_tokens=5)
    b = pipe.generate(square, "Describe.", max_new_tokens=5)
    # wide 20x70 -> a 1x2 canvas; its 5x10 map shows int(20 * 10/70) = 2 rows, so (5 - 2) // 2 = 1 padding
    # row goes at each end and 3 rows stay, each ended by a newline
    assert a.visual_tokens == 25 + 3 * 11
    assert b.visual_tokens == 25 + 10 * 11  # square: the whole 2x2 canvas
    assert 1 <= len(a.token_ids) <= 5 and {"preprocess", "vision", "prefill", "total"} <= set(a.timings)
    both = pipe.generate([wide, square], "<image><image>Compare.", raw=True, max_new_tokens=3)
    assert both.visual_tokens == a.visual_tokens + b.visual_tokens


# ---- bad folders -----------------------------------------------------------------------------

def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_configs_name_what_is_supported(clip_folder, tmp_path):
    _, folder = clip_folder
    bad = _edited_copy(folder, tmp_path / "strategy", vision_feature_select_strategy="cls_only")
    for load in (edgevlm.load, load_vision_tower):
        with pytest.raises(CheckpointError, match=r"'cls_only' not supported; supported: \['default', 'full'\]"):
            load(bad)
    # CLIP's class token kept ('full'): no patch grid to pack (transformers fails on this pairing too)
    bad = _edited_copy(folder, tmp_path / "full", vision_feature_select_strategy="full")
    with pytest.raises(CheckpointError, match="supported: 'default' with a class token"):
        load_vision_tower(bad)
    bad = _edited_copy(folder, tmp_path / "pinpoints", image_grid_pinpoints=[[40, 80], [60, 40]])
    with pytest.raises(CheckpointError, match=r"entry \[60, 40\] is not .* multiples of the vision tower's tile size 40"):
        load_vision_tower(bad)
    bad = _edited_copy(folder, tmp_path / "layer", vision_feature_layer="last")
    with pytest.raises(CheckpointError, match="must be an int or a non-empty list of ints"):
        load_vision_tower(bad)


# ---- LLaVA-1.5 with several feature layers (the same ViT path) ------------------------------

def test_llava_tower_with_a_list_of_feature_layers(tmp_path):
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=80, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=2, image_size=TILE, patch_size=PATCH),
        text_config=dict(model_type="llama", hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=128),
        image_token_index=127, vision_feature_layer=[-1, 0], vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    randomize_params(model, 3)
    model.save_pretrained(tmp_path)
    tower = load_vision_tower(tmp_path)
    assert tower.config.views.kind == "pad_square" and tower.config.pack is None  # LLaVA-1.5 views unchanged
    px = torch.randn(2, 3, TILE, TILE)

    def reference(m, x):
        with torch.no_grad():
            return torch.stack(list(m.get_image_features(x).pooler_output))

    ref, ref64 = reference(model, px), reference(float64_copy(model), px.double())
    ours = tower.from_pixels(px)
    assert ours.shape == ref.shape == (2, 25, 48)
    assert_within_noise(ours, ref, "llava tower, layers [-1, 0] vs transformers", noise=max_abs(ref, ref64))
