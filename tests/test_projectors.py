"""LLaVA projector parity against transformers, the linear connector, and every preset's connector shape.

Float comparisons are bounded by the reference's own fp32 rounding noise, measured by running it again
in float64 (:func:`edgevlm_testkit.assert_within_noise`)."""


import pytest
import torch
import torch.nn.functional as F

from edgevlm.config import ConvNeXtConfig, LinearConnectorConfig, MLPConnectorConfig, TowerConfig, ViTConfig
from edgevlm.errors import CheckpointError, ShapeError
from edgevlm.presets import get_preset, preset_names
from edgevlm.runtime.connectors import build_connector
from edgevlm.runtime.readers.hf_connectors import llava_projector_from_hf
from edgevlm.runtime.readers.safetensors_io import load_safetensors_dir, read_json
from edgevlm_testkit import assert_within_noise, float64_copy, max_abs

VISION, TEXT, GRID, N_VIEWS = 40, 48, 7, 3  # 7x7 = 49 patch tokens (CLS dropped, as LLaVA-1.5)


def _llava(tmp_path, **extra):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=VISION, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=GRID * 14, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=TEXT, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=128),
        image_token_index=127, **extra)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    proj = model.model.multi_modal_projector
    with torch.no_grad():  # make the weights clearly non-default
        for p in proj.parameters():
            p.copy_(0.3 * torch.randn(p.shape))
    model.save_pretrained(tmp_path)
    return proj, read_json(tmp_path / "config.json"), load_safetensors_dir(tmp_path)


def _clip_tower(conn):
    clip = ViTConfig(name="clip", image_size=GRID * 14, patch_size=14, width=VISION, depth=1, heads=2, mlp_dim=64,
                     keep_class_token=False)
    return TowerConfig(encoders=(clip,), connector=conn)


TANH_NO_BIAS = {"projector_hidden_act": "gelu_pytorch_tanh", "multimodal_projector_bias": False}


@pytest.mark.parametrize("extra", [{}, TANH_NO_BIAS], ids=["gelu_bias", "tanh_nobias"])
def test_llava_projector_matches_transformers(tmp_path, extra):
    proj, hf_cfg, state = _llava(tmp_path, **extra)
    assert any(k.startswith("multi_modal_projector.") for k in state)  # the on-disk layout of transformers 5
    cfg, sd = llava_projector_from_hf(hf_cfg, state)
    assert (cfg.in_width, cfg.hidden, cfg.out_width, cfg.encoder) == (VISION, TEXT, TEXT, "clip")
    assert cfg.act == ("gelu_tanh" if extra else "gelu")
    conn = build_connector(cfg, _clip_tower(cfg)).eval()
    conn.load_state_dict(sd, strict=True)
    x = torch.randn(N_VIEWS, GRID * GRID, VISION)
    with torch.no_grad():
        ref, ours = proj(x), conn({"clip": x})
        ref64 = float64_copy(proj)(x.double())
    assert ours.shape == (N_VIEWS, GRID * GRID, TEXT)
    err = assert_within_noise(ours, ref, f"llava projector {extra or 'default'} vs transformers",
                              noise=max_abs(ref, ref64))
    print(f"llava projector {extra or 'default'}: max abs err {err:.2e}")


def test_llava_reader_prefixes_and_errors(tmp_path):
    proj, hf_cfg, state = _llava(tmp_path)
    nested = {f"model.{k}": v for k, v in state.items()}  # transformers 5 in-memory layout
    _, sd = llava_projector_from_hf(hf_cfg, nested)
    torch.testing.assert_close(sd["fc2.weight"], proj.linear_2.weight, atol=0, rtol=0)

    bad = dict(state)
    bad["multi_modal_projector.linear_2.bias"] = torch.zeros(TEXT + 2)
    with pytest.raises(CheckpointError, match=rf"linear_2\.bias.*\({TEXT + 2},\).*\({TEXT},\)"):
        llava_projector_from_hf(hf_cfg, bad)
    with pytest.raises(CheckpointError, match="linear_1.bias"):
        llava_projector_from_hf(hf_cfg, {k: v for k, v in state.items() if not k.endswith("linear_1.bias")})
    with pytest.raises(CheckpointError, match="vision hidden_size"):
        llava_projector_from_hf(dict(hf_cfg, vision_config=dict(hf_cfg["vision_config"], hidden_size=VISION + 1)),
                                state)
    with pytest.raises(CheckpointError, match="projector_hidden_act"):
        llava_projector_from_hf(dict(hf_cfg, projector_hidden_act="relu2"), state)


def test_linear_connector_flattens_cnn_maps_row_major():
    cnn = ConvNeXtConfig(name="cnn", image_size=96, depths=(1, 1, 1, 1), dims=(4, 8, 12, 16))  # 3x3 map
    cfg = LinearConnectorConfig(encoder="cnn", in_width=16, out_width=10)
    conn = build_connector(cfg, TowerConfig(encoders=(cnn,), connector=cfg))
    m = torch.randn(2, 16, 3, 3)
    with torch.no_grad():
        out = conn({"cnn": m})
        want = F.linear(m[:, :, 1, 2], conn.proj.weight, conn.proj.bias)
        want64 = F.linear(m[:, :, 1, 2].double(), conn.proj.weight.double(), conn.proj.bias.double())
    assert out.shape == (2, 9, 10)
    # token (r, c) is map position r*3 + c (a wrong order puts another position's values there: O(1) off)
    assert_within_noise(out[:, 1 * 3 + 2], want, "linear connector token (1, 2) vs map position (1, 2)",
                        noise=max_abs(want, want64))
    with pytest.raises(ShapeError, match=r"\[N, 16, 3, 3\]"):
        conn({"cnn": torch.randn(2, 16, 4, 4)})
    with pytest.raises(ShapeError, match="reads encoder 'cnn'"):
        conn({"vit": m})


def test_mlp_connector_shape_check():
    cfg = MLPConnectorConfig(encoder="clip", in_width=VISION, hidden=TEXT, out_width=TEXT)
    conn = build_connector(cfg, _clip_tower(cfg))
    with pytest.raises(ShapeError, match=rf"\[N, {GRID * GRID}, {VISION}\]"):
        conn({"clip": torch.randn(1, GRID * GRID + 1, VISION)})  # a CLS token the encoder promised to drop


def _fake_features(tower, n, device=None):
    out = {}
    for e in tower.encoders:
        shape = (n, e.tokens, e.width) if e.kind == "vit" else (n, e.width, *e.grid)
        out[e.name] = torch.empty(shape, device=device)
    return out


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_connector_output_shape_on_meta(name):
    # Real-size presets (SPHINX's 29 M-weight visual_proj, xGen-MM's 6-layer resampler) on the meta
    # device: shapes flow through every op without allocating or computing.
    tower = get_preset(name).tower
    with torch.device("meta"):
        conn = build_connector(tower.connector, tower)
        out = conn(_fake_features(tower, 2, "meta"))
    assert out.shape == (2, tower.tokens_per_view, tower.out_width)
