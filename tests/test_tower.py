"""The assembled vision tower: transformers parity for whole LLaVA / BLIP-2 towers, the public API,
one batch per encoder, checkpoints (round trip and refusal of bad ones), and preset shapes.

Parity bounds are transformers' own fp32 rounding noise, measured by running a float64 copy of its model
on the same pixels (:func:`edgevlm_testkit.assert_within_noise`)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from edgevlm import CheckpointError, ShapeError, UnknownPresetError, WeightsNotFoundError
from edgevlm.presets import get_preset
from edgevlm.runtime import VisionTowerModel, load_vision_tower
from edgevlm.runtime.checkpoint import WEIGHTS_NAME, save_checkpoint
from edgevlm_testkit import assert_differs, assert_within_noise, float64_copy, max_abs, randomize_params

transformers = pytest.importorskip("transformers")


# ---- LLaVA: CLIP at layer -2, CLS dropped, mlp2x_gelu -------------------------------------

@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    cfg = transformers.LlavaConfig(
        # head dim 40 (80 / 2 heads) and a 10x10 patch grid (40 px / patch 4): odd sizes on purpose
        vision_config=dict(model_type="clip_vision_model", hidden_size=80, intermediate_size=96,
                           num_hidden_layers=3, num_attention_heads=2, image_size=40, patch_size=4),
        text_config=dict(model_type="llama", hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=128),
        image_token_index=127, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    randomize_params(model.model.vision_tower, 1)
    randomize_params(model.model.multi_modal_projector, 2)
    folder = tmp_path_factory.mktemp("llava")
    model.save_pretrained(folder)
    return model, folder


def test_llava_tower_matches_transformers(llava_dir):
    model, folder = llava_dir
    tower = load_vision_tower(folder)
    assert tower.weights.random == []  # everything came from the checkpoint
    assert tower.config.visual_tokens_per_image == 100
    px = torch.randn(3, 3, 40, 40)  # a batch of 3 images, one view each

    def reference(m, x):
        with torch.no_grad():
            ref = m.get_image_features(x, vision_feature_layer=-2,
                                       vision_feature_select_strategy="default").pooler_output
        return torch.stack(list(ref)) if isinstance(ref, (list, tuple)) else ref

    ref, ref64 = reference(model, px), reference(float64_copy(model), px.double())
    ours = tower.from_pixels(px)
    assert ours.shape == (3, 100, 48) == ref.shape
    assert_within_noise(ours, ref, "llava tower vs transformers", noise=max_abs(ref, ref64))


# ---- BLIP-2: EVA ViT -> Q-Former -> language_projection -----------------------------------

@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    cfg = transformers.Blip2Config(
        vision_config=dict(hidden_size=80, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           image_size=40, patch_size=4),
        qformer_config=dict(hidden_size=80, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                            cross_attention_frequency=2),
        text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         ffn_dim=64, vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=32),
        num_query_tokens=6)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(cfg).eval()
    randomize_params(model.vision_model, 3)
    randomize_params(model.qformer, 4)
    randomize_params(model.language_projection, 5)
    with torch.no_grad():
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape))
    folder = tmp_path_factory.mktemp("blip2")
    model.save_pretrained(folder)
    return model, folder


def test_blip2_tower_matches_transformers(blip2_dir):
    model, folder = blip2_dir
    tower = load_vision_tower(folder)
    assert tower.config.visual_tokens_per_image == 6
    px = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        ref = model.get_image_features(px).pooler_output  # projected query outputs
        ref64 = float64_copy(model).get_image_features(px.double()).pooler_output
    ours = tower.from_pixels(px)
    assert ours.shape == (3, 6, 32) == ref.shape
    assert_within_noise(ours, ref, "blip2 tower vs transformers", noise=max_abs(ref, ref64))


def test_blip2_tower_from_images_uses_stretch_views(blip2_dir):
    _, folder = blip2_dir
    tower = load_vision_tower(folder)
    img = np.random.default_rng(0).integers(0, 256, size=(30, 70, 3), dtype=np.uint8)
    out = tower([img, img[:, ::-1].copy()])
    assert out.shape == (2, 6, 32)
    assert_differs(out[0], out[1], "embeddings of an image and its mirror", rel=0.01)  # different images


# ---- the public API on the tiny SPHINX-shaped preset ---------------------------------------

def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w].copy()


def test_tiny_tower_images_one_batch_per_encoder():
    tower = load_vision_tower("tiny")
    calls: dict[str, list[int]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: calls.setdefault(name, []).append(inp[0].shape[0]))
             for name, m in tower.model.encoders.items()]
    try:
        out = tower([_photo(40, 60, 0), _photo(50, 30, 1), _photo(33, 33, 2)])
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (3, 135, 64)  # 5 views x (2 separators + 8 queries + 1 + 4x4)
    assert calls == {"vit": [15], "cnn": [15], "eva": [15]}  # 3 images x 5 views, one call each
    assert set(tower.last_timings) >= {"preprocess_ms", "vision_ms"}


def test_tiny_tower_equals_model_on_preprocessed_views():
    tower = load_vision_tower("tiny", preprocess_backend="reference")
    imgs = [_photo(40, 60, 0), _photo(50, 30, 1)]
    out = tower(imgs)
    from edgevlm.runtime.image_io import load_images
    pre = tower.preprocessor(load_images(imgs))
    via_dict = tower.from_pixels(pre.views)
    assert torch.equal(out, via_dict)
    # each image's block is the concatenation of its 5 views, in order
    with torch.no_grad():
        per_view = tower.model(pre.views)
    assert torch.equal(out[1], per_view[5:10].reshape(-1, 64))


def test_from_pixels_derives_other_encoders_views():
    tower = load_vision_tower("tiny")
    px = torch.randn(5, 3, 32, 32)  # normalised for the first encoder (CLIP mean/std, 32 px)
    out = tower.from_pixels(px)
    assert out.shape == (1, 135, 64)
    with pytest.raises(ShapeError, match="not a multiple of 5"):
        tower.from_pixels(torch.randn(4, 3, 32, 32))
    with pytest.raises(ShapeError, match=r"\[n_views, 3, H, W\]"):
        tower.from_pixels(torch.randn(5, 32, 32))


def test_presets_are_deterministic():
    a, b = load_vision_tower("tiny"), load_vision_tower("tiny")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_sphinx_1k_tower_shapes_on_meta_device():
    # The real-size SPHINX-1k tower (four encoders, ~3B parameters) on the meta device: shapes only.
    cfg = get_preset("sphinx-1k").tower
    with torch.device("meta"):
        model = VisionTowerModel(cfg)
        views = {e.name: torch.empty(5, 3, e.image_size, e.image_size) for e in cfg.encoders}
        out = model(views)
    assert tuple(out.shape) == (5, 291, 5120)
    assert out.shape[0] * out.shape[1] == 1455 == cfg.visual_tokens_per_image


# ---- checkpoints ---------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path):
    tower = load_vision_tower("tiny")
    sd = {f"tower.{k}": v for k, v in tower.model.state_dict().items()}
    save_checkpoint(tmp_path / "ckpt", get_preset("tiny"), sd)
    back = load_vision_tower(tmp_path / "ckpt")
    assert set(back.weights.sources.values()) == {"checkpoint"}
    px = torch.randn(5, 3, 32, 32)
    assert torch.equal(tower.from_pixels(px), back.from_pixels(px))


def test_checkpoint_refusals(tmp_path):
    tower = load_vision_tower("tiny")
    sd = {f"tower.{k}": v for k, v in tower.model.state_dict().items()}
    cfg = get_preset("tiny")

    partial = dict(sd)
    partial.pop("tower.connector.visual_proj.0.weight")
    save_checkpoint(tmp_path / "partial", cfg, partial)
    with pytest.raises(CheckpointError, match="lacks 1 tower tensors"):
        load_vision_tower(tmp_path / "partial")

    wrong = dict(sd)
    wrong["tower.connector.visual_proj.0.weight"] = torch.zeros(3, 3)
    save_checkpoint(tmp_path / "wrong", cfg, wrong)
    with pytest.raises(CheckpointError, match="visual_proj.0.weight"):
        load_vision_tower(tmp_path / "wrong")

    save_checkpoint(tmp_path / "trunc", cfg, sd)
    f = tmp_path / "trunc" / WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_vision_tower(tmp_path / "trunc")

    with pytest.raises(CheckpointError, match="exists"):
        save_checkpoint(tmp_path / "wrong", cfg, sd)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_unknown_sources(tmp_path):
    with pytest.raises(UnknownPresetError, match="neither a preset"):
        load_vision_tower("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="neither an edgevlm checkpoint"):
        load_vision_tower(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match=r"supported: \['blip-2', 'instructblip', 'llava'"):
        load_vision_tower(tmp_path / "other")
