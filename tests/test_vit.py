"""ViT parity against transformers' own CLIP, DINOv2, SigLIP and BLIP-2 vision models.

Each reference is a tiny random model saved with ``save_pretrained`` into a temporary folder and read
back through :func:`read_hf_vision_dir` (or :func:`vit_from_hf` for a whole BLIP-2 checkpoint), so the
test covers the on-disk key layout of the installed transformers, not just in-memory names.
transformers' init leaves norms at 1/0, biases at 0 and layer scales at 1 (BLIP-2's vision init is
~1e-10), which would hide swapped or missing tensors; every parameter is re-drawn first.

Each bound is the reference's own fp32 rounding noise, measured by running a float64 copy of the
transformers model on the same pixels (:func:`edgevlm_testkit.assert_within_noise`).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from edgevlm.config import CLIP_MEAN, HALF_MEAN, IMAGENET_MEAN
from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.runtime.readers.hf_vision import read_hf_vision_dir, vit_from_hf
from edgevlm.runtime.readers.safetensors_io import load_safetensors_dir
from edgevlm.runtime.vision import build_encoder
from edgevlm.runtime.vision.vit import ViT
from edgevlm_testkit import assert_within_noise, float64_copy, max_abs

transformers = pytest.importorskip("transformers")

MAX_ERR: dict[str, float] = {}  # test id -> measured max abs error (read by whoever wants numbers)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)

    def rand(p, scale=1.0, offset=0.0):
        p.copy_(offset + scale * torch.randn(p.shape, generator=g))

    with torch.no_grad():
        for mod in model.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, nn.LayerNorm):
                    rand(p, 0.2, 1.0 if name == "weight" else 0.0)
                elif isinstance(mod, (nn.Linear, nn.Conv2d)) and name == "weight":
                    rand(p, p[0].numel() ** -0.5)  # unit-variance activations
                elif name == "lambda1":  # DINOv2 layer scale
                    rand(p, 0.3, 0.5)
                else:  # biases, class token, position tables
                    rand(p, 0.3)
    return model.eval()


def _save(model: nn.Module, folder) -> None:
    model.save_pretrained(str(folder))


def _pixels(h: int, w: int, n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _run(cfg, sd, x) -> torch.Tensor:
    m = ViT(cfg).eval()
    m.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return m(x)


def _refs(model: nn.Module, fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(model, x)`` in fp32 and again on a float64 copy of the model and pixels (the noise measure)."""
    with torch.no_grad():
        return fn(model, x), fn(float64_copy(model), x.double())


def _check(request, ours: torch.Tensor, refs: tuple[torch.Tensor, torch.Tensor]) -> None:
    ref, ref64 = refs
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    MAX_ERR[request.node.name] = assert_within_noise(ours, ref, f"{request.node.name}: tokens vs transformers",
                                                     noise=max_abs(ref, ref64))


# ---- fixtures: one saved folder per family per module ----------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    # head dim 40 (80 / 2 heads) and a 10x10 grid (40 px, patch 4): neither a power of two
    cfg = transformers.CLIPVisionConfig(hidden_size=80, intermediate_size=112, num_hidden_layers=3,
                                        num_attention_heads=2, image_size=40, patch_size=4)
    model = _randomize(transformers.CLIPVisionModel(cfg), seed=10)
    folder = tmp_path_factory.mktemp("clip_vision")
    _save(model, folder)
    return folder, model


def _dinov2(tmp_path_factory, swiglu: bool):
    cfg = transformers.Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, image_size=28,
                                    patch_size=4, use_swiglu_ffn=swiglu)
    model = _randomize(transformers.Dinov2Model(cfg), seed=20 + swiglu)
    folder = tmp_path_factory.mktemp("dinov2_swiglu" if swiglu else "dinov2")
    _save(model, folder)
    return folder, model


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    return _dinov2(tmp_path_factory, swiglu=False)


@pytest.fixture(scope="module")
def dinov2_swiglu(tmp_path_factory):
    return _dinov2(tmp_path_factory, swiglu=True)


_BLIP2_VISION = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     image_size=28, patch_size=7)


@pytest.fixture(scope="module")
def blip2_vision(tmp_path_factory):
    model = _randomize(transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**_BLIP2_VISION)), seed=30)
    folder = tmp_path_factory.mktemp("blip2_vision")
    _save(model, folder)
    return folder, model


@pytest.fixture(scope="module")
def blip2_whole(tmp_path_factory):
    cfg = transformers.Blip2Config(
        vision_config=_BLIP2_VISION,
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
                            encoder_hidden_size=48, vocab_size=100),
        text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, ffn_dim=40, num_attention_heads=2,
                         vocab_size=100, word_embed_proj_dim=32, max_position_embeddings=64),
        num_query_tokens=4)
    model = _randomize(transformers.Blip2ForConditionalGeneration(cfg), seed=31)
    with torch.no_grad():  # EVA has no k bias: the hub layout (q_bias, v_bias) implies zeros there
        for layer in model.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[48:96] = 0
    folder = tmp_path_factory.mktemp("blip2_whole")
    _save(model, folder)
    return folder, model


# ---- CLIP ------------------------------------------------------------------------------------------


def test_clip_last_hidden_state(clip, request):
    folder, model = clip
    x = _pixels(40, 40)
    cfg, sd = read_hf_vision_dir(folder, name="clip")
    assert (cfg.final_norm, cfg.pre_norm, cfg.patch_bias, cfg.mlp_act, cfg.mean) == (False, True, False,
                                                                                     "quick_gelu", CLIP_MEAN)
    assert cfg.tokens == 101 and cfg.head_dim == 40
    refs = _refs(model, lambda m, x: m(pixel_values=x).last_hidden_state, x)
    _check(request, _run(cfg, sd, x), refs)


def test_clip_penultimate_layer_without_class_token(clip, request):
    # LLaVA's recipe: hidden_states[-2], patch tokens only, no post-norm; the last block is never built.
    folder, model = clip
    x = _pixels(40, 40)
    cfg, sd = read_hf_vision_dir(folder, name="clip", feature_layer=-2, keep_class_token=False)
    assert cfg.blocks_run == 2 and not any(k.startswith("blocks.2.") for k in sd)
    refs = _refs(model, lambda m, x: m(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:], x)
    assert cfg.tokens == 100
    _check(request, _run(cfg, sd, x), refs)


def test_clip_penultimate_layer_with_class_token(clip, request):
    folder, model = clip
    x = _pixels(40, 40)
    cfg, sd = read_hf_vision_dir(folder, name="clip", feature_layer=-2)
    refs = _refs(model, lambda m, x: m(pixel_values=x, output_hidden_states=True).hidden_states[-2], x)
    _check(request, _run(cfg, sd, x), refs)


def test_clip_final_norm_on_all_tokens(clip, request):
    # SPHINX runs OpenCLIP's ln_post over every token, which transformers applies to the pooled one only.
    folder, model = clip
    x = _pixels(40, 40)
    cfg, sd = read_hf_vision_dir(folder, name="clip", final_norm=True)
    refs = _refs(model, lambda m, x: m.post_layernorm(m(pixel_values=x).last_hidden_state), x)
    _check(request, _run(cfg, sd, x), refs)


def test_clip_interpolated_non_square_grid(clip, request):
    folder, model = clip
    x = _pixels(48, 36)  # 12 x 9 grid against the trained 10 x 10
    cfg, sd = read_hf_vision_dir(folder, name="clip")
    refs = _refs(model, lambda m, x: m(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state, x)
    assert refs[0].shape[1] == 1 + 12 * 9
    _check(request, _run(cfg, sd, x), refs)


def test_clip_whole_model_folder(tmp_path, request):
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=24,
                  patch_size=6)
    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = _randomize(transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text)), 11)
    _save(model, tmp_path)
    cfg, sd = read_hf_vision_dir(tmp_path, name="clip")
    x = _pixels(24, 24)
    refs = _refs(model.vision_model, lambda m, x: m(pixel_values=x).last_hidden_state, x)
    _check(request, _run(cfg, sd, x), refs)


# ---- DINOv2 ----------------------------------------------------------------------------------------


def test_dinov2_trained_grid(dinov2, request):
    folder, model = dinov2
    x = _pixels(28, 28)
    cfg, sd = read_hf_vision_dir(folder, name="dino")
    assert (cfg.layer_scale, cfg.final_norm, cfg.mean, cfg.pos_grid) == (True, True, IMAGENET_MEAN, 0)
    refs = _refs(model, lambda m, x: m(pixel_values=x).last_hidden_state, x)
    _check(request, _run(cfg, sd, x), refs)


def test_dinov2_interpolated_position_table(dinov2, request):
    # 36 x 44 px -> a 9 x 11 grid against the trained 7 x 7: the bicubic resize must match transformers'.
    folder, model = dinov2
    x = _pixels(36, 44)
    cfg, sd = read_hf_vision_dir(folder, name="dino", image_size=36)
    assert cfg.pos_grid == 7 and cfg.grid == (9, 9)
    refs = _refs(model, lambda m, x: m(pixel_values=x).last_hidden_state, x)
    assert refs[0].shape[1] == 1 + 9 * 11
    _check(request, _run(cfg, sd, x), refs)


def test_dinov2_intermediate_layer(dinov2, request):
    folder, model = dinov2
    x = _pixels(36, 44)
    cfg, sd = read_hf_vision_dir(folder, name="dino", feature_layer=1, final_norm=False)
    assert "norm.weight" not in sd
    refs = _refs(model, lambda m, x: m(pixel_values=x, output_hidden_states=True).hidden_states[1], x)
    _check(request, _run(cfg, sd, x), refs)


def test_dinov2_swiglu_and_floored_input(dinov2_swiglu, request):
    # 38 x 45 px is no multiple of the patch: the conv floors to 9 x 11, as transformers' does.
    folder, model = dinov2_swiglu
    x = _pixels(38, 45)
    cfg, sd = read_hf_vision_dir(folder, name="dino")
    assert cfg.mlp_act == "swiglu" and cfg.mlp_dim == 128  # (int(48 * 4 * 2 / 3) + 7) // 8 * 8
    refs = _refs(model, lambda m, x: m(pixel_values=x).last_hidden_state, x)
    _check(request, _run(cfg, sd, x), refs)


# ---- SigLIP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("whole", [False, True], ids=["vision", "whole"])
def test_siglip(tmp_path, request, whole):
    vision = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    if whole:
        text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
        full = _randomize(transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision,
                                                                             text_config=text)), 40)
        _save(full, tmp_path)
        model = full.vision_model
    else:
        model = _randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision)), 41)
        _save(model, tmp_path)
    cfg, sd = read_hf_vision_dir(tmp_path, name="siglip")
    assert (cfg.class_token, cfg.global_token, cfg.tokens, cfg.mlp_act, cfg.mean) == (False, False, 16,
                                                                                      "gelu_tanh", HALF_MEAN)
    x = _pixels(32, 32)
    refs = _refs(model, lambda m, x: m(pixel_values=x).last_hidden_state, x)
    _check(request, _run(cfg, sd, x), refs)


# ---- BLIP-2 ----------------------------------------------------------------------------------------


def test_blip2_vision_folder(blip2_vision, request):
    folder, model = blip2_vision
    x = _pixels(28, 28)
    cfg, sd = read_hf_vision_dir(folder, name="eva")
    assert (cfg.final_norm, cfg.pre_norm, cfg.mean) == (True, False, CLIP_MEAN)
    k_bias = sd["blocks.0.attn.qkv.bias"][48:96]
    assert k_bias.abs().max() > 0  # transformers 5 saves a fused, trainable bias: kept as stored
    refs = _refs(model, lambda m, x: m(pixel_values=x).last_hidden_state, x)
    _check(request, _run(cfg, sd, x), refs)


@pytest.mark.parametrize("layout", ["fused_bias", "q_v_bias"])
def test_blip2_whole_checkpoint_prefix(blip2_whole, request, layout):
    folder, model = blip2_whole
    hf = json.loads((folder / "config.json").read_text())
    state = load_safetensors_dir(folder)
    assert "vision_model.embeddings.patch_embedding.weight" in state
    if layout == "q_v_bias":  # the hub's (LAVIS-converted) layout: separate q and v biases, no k bias
        for i in range(2):
            fused = state.pop(f"vision_model.encoder.layers.{i}.self_attn.qkv.bias")
            state[f"vision_model.encoder.layers.{i}.self_attn.q_bias"] = fused[:48].clone()
            state[f"vision_model.encoder.layers.{i}.self_attn.v_bias"] = fused[96:].clone()
    cfg, sd = vit_from_hf(hf["vision_config"], state, "vision_model.", name="eva")
    assert torch.equal(sd["blocks.1.attn.qkv.bias"][48:96], torch.zeros(48))
    x = _pixels(28, 28)
    refs = _refs(model.vision_model, lambda m, x: m(pixel_values=x).last_hidden_state, x)
    _check(request, _run(cfg, sd, x), refs)


def test_blip2_whole_folder(blip2_whole, request):
    folder, model = blip2_whole
    cfg, sd = read_hf_vision_dir(folder, name="eva", feature_layer=-2, final_norm=False)
    x = _pixels(28, 28)
    refs = _refs(model.vision_model, lambda m, x: m(pixel_values=x, output_hidden_states=True).hidden_states[-2], x)
    _check(request, _run(cfg, sd, x), refs)


# ---- module behaviour and bad input ----------------------------------------------------------------


def test_build_encoder_registry_builds_vit(dinov2):
    cfg, sd = read_hf_vision_dir(dinov2[0], name="dino")
    m = build_encoder(cfg)
    assert isinstance(m, ViT)
    m.load_state_dict(sd, strict=True)
    assert set(m.state_dict()) == set(sd)


def test_truncated_safetensors(clip, tmp_path):
    folder, _ = clip
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_hf_vision_dir(tmp_path)


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit_mae", "hidden_size": 32}))
    with pytest.raises(CheckpointError) as e:
        read_hf_vision_dir(tmp_path)
    msg = str(e.value)
    assert "'vit_mae'" in msg
    for t in ("clip_vision_model", "dinov2", "siglip_vision_model", "blip_2_vision_model"):
        assert t in msg


def test_wrong_shape_names_key_and_shapes(dinov2):
    folder, _ = dinov2
    hf = json.loads((folder / "config.json").read_text())
    state = dict(load_safetensors_dir(folder))
    key = "encoder.layer.1.attention.attention.key.weight"
    state[key] = torch.zeros(48, 40)
    with pytest.raises(CheckpointError) as e:
        vit_from_hf(hf, state, "", name="dino")
    assert key in str(e.value) and "(48, 40)" in str(e.value) and "(48, 48)" in str(e.value)


def test_missing_tensor_names_key(dinov2):
    folder, _ = dinov2
    hf = json.loads((folder / "config.json").read_text())
    state = dict(load_safetensors_dir(folder))
    del state["encoder.layer.0.layer_scale2.lambda1"]
    with pytest.raises(CheckpointError, match="encoder.layer.0.layer_scale2.lambda1"):
        vit_from_hf(hf, state, "", name="dino")
    with pytest.raises(CheckpointError, match="vision_model.embeddings"):  # wrong prefix
        vit_from_hf(hf, state, "vision_model.", name="dino")


def test_config_mismatch_and_bad_overrides(clip):
    folder, _ = clip
    hf = json.loads((folder / "config.json").read_text())
    state = load_safetensors_dir(folder)
    with pytest.raises(CheckpointError, match="more than depth=2 blocks"):
        vit_from_hf({**hf, "num_hidden_layers": 2}, state, "", name="clip")
    with pytest.raises(ConfigError, match="feature_layr"):
        vit_from_hf(hf, state, "", name="clip", feature_layr=-2)
    with pytest.raises(CheckpointError, match="hidden_act"):
        vit_from_hf({**hf, "hidden_act": "relu2"}, state, "", name="clip")


def test_bad_pixels_raise_shape_error(dinov2):
    from edgevlm.errors import ShapeError

    cfg, sd = read_hf_vision_dir(dinov2[0], name="dino")
    m = ViT(cfg)
    for bad in (torch.zeros(1, 1, 28, 28), torch.zeros(3, 28, 28), torch.zeros(1, 3, 3, 28)):
        with pytest.raises(ShapeError):
            m(bad)
