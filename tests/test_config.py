import json

import pytest

from edgevlm import ConfigError, UnknownPresetError, EdgeVLMError
from edgevlm.config import (
    ModelConfig, SphinxFusionConfig, TowerConfig, ViewConfig, ViTConfig, ConvNeXtConfig, EfficientNetConfig,
)
from edgevlm.presets import get_preset, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_presets_round_trip_through_json(name):
    cfg = get_preset(name)
    text = cfg.to_json()
    back = ModelConfig.from_json(text)
    assert back == cfg
    assert json.loads(back.to_json()) == json.loads(text)


def test_required_presets_exist():
    for n in ("sphinx", "sphinx-1k", "sphinx-tiny", "blip2", "llava-1.5", "xgen-mm", "demo", "tiny"):
        assert n in preset_names()


@pytest.mark.parametrize("name,tokens", [("sphinx", 291), ("sphinx-1k", 1455), ("sphinx-tiny", 259), ("blip2", 32),
                                         ("llava-1.5", 576), ("xgen-mm", 640), ("demo", 67), ("tiny", 135)])
def test_visual_tokens_per_image(name, tokens):
    assert get_preset(name).visual_tokens_per_image == tokens


def test_derived_encoder_layouts():
    t = get_preset("sphinx").tower
    assert t.encoder("clip").tokens == 257 and t.encoder("clip").width == 1024
    assert t.encoder("convnext").grid == (8, 8) and t.encoder("convnext").width == 3072
    assert t.encoder("dinov2").tokens == 257 and t.encoder("dinov2").width == 1536
    llava = get_preset("llava-1.5").tower.encoder("clip")
    assert llava.tokens == 576 and llava.blocks_run == 23
    sig = get_preset("xgen-mm").tower.encoder("siglip")
    assert sig.tokens == 729 and not sig.global_token
    eff = get_preset("demo").tower.encoder("effnet")
    assert eff.grid == (8, 8) and eff.width == 1280
    assert EfficientNetConfig(name="e", image_size=224).grid == (7, 7)


def test_frozen():
    cfg = get_preset("tiny")
    with pytest.raises(Exception):
        cfg.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize("bad", [
    dict(width=30, heads=4),           # not divisible
    dict(mlp_act="relu9"),
    dict(feature_layer=5, depth=2),
    dict(image_size=4, patch_size=8),
    dict(name="has space"),
])
def test_vit_validation(bad):
    kw = dict(name="v", image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64)
    kw.update(bad)
    with pytest.raises(ConfigError):
        ViTConfig(**kw)


def test_tower_validation_names_the_problem():
    vit = ViTConfig(name="v", image_size=32, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64)
    with pytest.raises(ConfigError, match="in_width for 'v' is 16"):
        TowerConfig(encoders=(vit,), connector=SphinxFusionConfig(encoders=("v",), in_widths=(16,), out_width=8))
    with pytest.raises(ConfigError, match="reads encoder 'w'"):
        TowerConfig(encoders=(vit,), connector=SphinxFusionConfig(encoders=("w",), in_widths=(32,), out_width=8))
    with pytest.raises(ConfigError, match="crop_grid applies"):
        ViewConfig(kind="stretch", crop_grid=2)


def test_model_validation_width_mismatch():
    cfg = get_preset("tiny")
    from dataclasses import replace
    with pytest.raises(ConfigError, match="out_width 64 != decoder hidden 576"):
        replace(cfg, decoder=get_preset("demo").decoder)


def test_from_json_errors_are_typed():
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json("{nope")
    d = get_preset("tiny").to_dict()
    d["tower"]["encoders"][0]["kind"] = "transformer9000"
    with pytest.raises(ConfigError, match="unknown kind 'transformer9000'"):
        ModelConfig.from_dict(d)
    d = get_preset("tiny").to_dict()
    d["decoder"]["bogus"] = 1
    with pytest.raises(ConfigError, match="unknown fields"):
        ModelConfig.from_dict(d)
    d = get_preset("tiny").to_dict()
    d["decoder"]["layers"] = "two"
    with pytest.raises(ConfigError, match="expected int"):
        ModelConfig.from_dict(d)


def test_unknown_preset():
    with pytest.raises(UnknownPresetError, match="presets: sphinx"):
        get_preset("gpt-5")
    assert issubclass(UnknownPresetError, EdgeVLMError)
