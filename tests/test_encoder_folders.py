"""Plain transformers encoder folders as the encoders of an edgevlm checkpoint (weights format
``"transformers"``, runtime/readers/hf_encoders.py).

An ``edgevlm.json`` names, per encoder, the ``save_pretrained`` folder of a tiny random CLIPVisionModel,
Dinov2Model, ConvNextModel or SiglipVisionModel (the fixtures and randomisation of test_vit.py and
test_convnext.py); the checkpoint itself holds only the connector and the decoder. Loaded with
``edgevlm.load`` and ``load_vision_tower``, every encoder's output must be transformers' own feature for
what the EncoderConfig asks (CLIP's penultimate layer without its class token, the others'
``last_hidden_state``) within that model's fp32 noise, measured by a float64 copy
(:func:`edgevlm_testkit.assert_within_noise`). A folder whose architecture differs from the config is a
CheckpointError naming the first field that differs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import edgevlm
from edgevlm.config import (DecoderConfig, MLPConnectorConfig, ModelConfig, SphinxFusionConfig, TowerConfig,
                            ViewConfig, WeightsRef)
from edgevlm.errors import CheckpointError, WeightsNotFoundError
from edgevlm.runtime import load_vision_tower
from edgevlm.runtime.checkpoint import save_checkpoint
from edgevlm.runtime.decoder import Decoder
from edgevlm.runtime.readers import read_encoder_weights
from edgevlm.runtime.readers.hf_convnext import read_hf_convnext_dir
from edgevlm.runtime.readers.hf_vision import read_hf_vision_dir
from edgevlm.runtime.tower import VisionTowerModel
from edgevlm_testkit import assert_within_noise, max_abs
from test_convnext import _randomise as randomise_convnext
from test_vit import _randomize, _refs, clip, dinov2  # noqa: F401  (module fixtures, reused as they are)

transformers = pytest.importorskip("transformers")

DECODER = dict(vocab_size=300, layers=1, heads=2, kv_heads=2, intermediate=48)


def _ref(folder) -> WeightsRef:
    return WeightsRef(format="transformers", path=str(folder))


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    torch.manual_seed(1)
    cfg = transformers.ConvNextConfig(hidden_sizes=[12, 20, 36], depths=[1, 2, 1], num_stages=3, image_size=48)
    model = transformers.ConvNextModel(cfg)
    randomise_convnext(model)
    folder = tmp_path_factory.mktemp("convnext")
    model.save_pretrained(folder)
    return folder, model.eval()


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    cfg = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=32, patch_size=8)
    model = _randomize(transformers.SiglipVisionModel(cfg), 41)
    folder = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(folder)
    return folder, model


def _encoders(clip, dinov2, convnext):
    """The EncoderConfigs a user would write for the three folders (read off them, then the choices set)."""
    c, _ = read_hf_vision_dir(clip[0], name="clip", feature_layer=-2, keep_class_token=False)
    d, _ = read_hf_vision_dir(dinov2[0], name="dino")
    n, _ = read_hf_convnext_dir(convnext[0], name="cnx")
    return (dataclasses.replace(c, weights=_ref(clip[0])), dataclasses.replace(d, weights=_ref(dinov2[0])),
            dataclasses.replace(n, weights=_ref(convnext[0])))


def _write_checkpoint(folder, name, tower: TowerConfig) -> ModelConfig:
    """An edgevlm checkpoint whose tower encoders live in transformers folders: only the connector and
    the decoder are in its model.safetensors."""
    cfg = ModelConfig(name=name, tower=tower, decoder=DecoderConfig(hidden=tower.out_width, **DECODER))
    torch.manual_seed(3)
    model = VisionTowerModel(tower)  # random; the encoders' weights are read from their folders at load time
    state = {f"tower.{k}": v for k, v in model.state_dict().items() if k.startswith("connector.")}
    torch.manual_seed(5)
    state.update({f"decoder.{k}": v for k, v in Decoder(cfg.decoder).state_dict().items()})
    save_checkpoint(folder, cfg, state)
    return cfg


@pytest.fixture(scope="module")
def fused(tmp_path_factory, clip, dinov2, convnext):  # noqa: F811
    encoders = _encoders(clip, dinov2, convnext)
    tower = TowerConfig(encoders=encoders, views=ViewConfig(kind="stretch"),
                        connector=SphinxFusionConfig(out_width=32, encoders=tuple(e.name for e in encoders),
                                                     in_widths=tuple(e.feature_width for e in encoders), grid=5))
    folder = tmp_path_factory.mktemp("fused_ckpt") / "ckpt"
    return folder, _write_checkpoint(folder, "fused", tower)


def _pixels(size: int, seed: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


# What each EncoderConfig asks of its transformers model: fn(model, pixels) -> features.
FEATURES = {
    "clip": lambda m, x: m(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:],
    "dino": lambda m, x: m(pixel_values=x).last_hidden_state,
    "cnx": lambda m, x: m(pixel_values=x).last_hidden_state,
    "siglip": lambda m, x: m(pixel_values=x).last_hidden_state,
}


def _check_encoders(tower_model, hf_models: dict, cfg: TowerConfig) -> None:
    for e in cfg.encoders:
        x = _pixels(e.image_size, seed=len(e.name))
        ref, ref64 = _refs(hf_models[e.name], FEATURES[e.name], x)
        with torch.no_grad():
            ours = tower_model.encoders[e.name](x)
        assert ours.shape == ref.shape, f"{e.name}: shape {tuple(ours.shape)} != transformers {tuple(ref.shape)}"
        assert_within_noise(ours, ref, f"{e.name} encoder vs transformers", noise=max_abs(ref, ref64))


def test_fused_checkpoint_encoders_match_transformers(fused, clip, dinov2, convnext):  # noqa: F811
    folder, cfg = fused
    hf = {"clip": clip[1], "dino": dinov2[1], "cnx": convnext[1]}
    pipe = edgevlm.load(folder, quant=None)
    assert pipe.tower.config == cfg.tower
    assert pipe.tower.weights.sources["cnx"] == f"transformers:{convnext[0]}"
    assert pipe.tower.weights.sources["connector"] == "checkpoint"
    _check_encoders(pipe.tower.model, hf, cfg.tower)

    tower = load_vision_tower(folder)
    _check_encoders(tower.model, hf, cfg.tower)
    views = {e.name: _pixels(e.image_size, seed=9) for e in cfg.tower.encoders}
    emb = tower.from_pixels(views)
    assert emb.shape == (2, cfg.tower.tokens_per_view, 32) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb, pipe.tower.from_pixels(views), atol=0, rtol=0)  # same tensors, same ops
    assert isinstance(pipe.generate(None, "hi", max_new_tokens=2).text, str)


def test_siglip_with_mlp_projector(tmp_path, siglip):
    folder, hf = siglip
    enc, _ = read_hf_vision_dir(folder, name="siglip")
    enc = dataclasses.replace(enc, weights=_ref(folder))
    tower = TowerConfig(encoders=(enc,), views=ViewConfig(kind="stretch"),
                        connector=MLPConnectorConfig(out_width=32, encoder="siglip", in_width=enc.width, hidden=40))
    _write_checkpoint(tmp_path / "ckpt", "siglip_mlp", tower)
    pipe = edgevlm.load(tmp_path / "ckpt", quant=None)
    _check_encoders(pipe.tower.model, {"siglip": hf}, tower)
    assert pipe.tower.from_pixels(_pixels(32, 1)).shape == (2, 16, 32)


def test_mismatching_folders_name_the_first_field(fused, clip, dinov2, convnext):  # noqa: F811
    _, cfg = fused
    c, d, n = cfg.tower.encoders
    cases = [
        (dataclasses.replace(c, width=96, mlp_dim=112), "width: the config says 96, the folder has 80"),
        (dataclasses.replace(d, depth=3), "depth: the config says 3"),
        (dataclasses.replace(d, image_size=56), "pos_grid: the config says 0, the folder has 7"),
        (dataclasses.replace(c, pre_norm=False), "pre_norm"),
        (dataclasses.replace(n, dims=(12, 20, 40)), r"dims: the config says \(12, 20, 40\)"),
        (dataclasses.replace(n, layer_scale=False), "layer_scale"),
        (dataclasses.replace(d, weights=n.weights), "the folder holds a ConvNeXt, the config a 'vit'"),
        (dataclasses.replace(n, weights=d.weights), r"the folder holds a ViT \(dinov2\), the config a 'convnext'"),
    ]
    for enc, match in cases:
        with pytest.raises(CheckpointError, match=match) as info:
            read_encoder_weights(enc.weights, enc)
        assert f"encoder {enc.name!r}" in str(info.value) or "folder holds" in str(info.value)


def test_mismatch_through_load_and_missing_folder(tmp_path, fused):
    folder, cfg = fused
    c, d, n = cfg.tower.encoders
    wide = dataclasses.replace(c, width=96, mlp_dim=112)
    tower = dataclasses.replace(cfg.tower, encoders=(wide, d, n),
                                connector=dataclasses.replace(cfg.tower.connector, in_widths=(96, 48, 36)))
    _write_checkpoint(tmp_path / "wide", "wide", tower)
    with pytest.raises(CheckpointError, match="width: the config says 96"):
        edgevlm.load(tmp_path / "wide", quant=None)
    gone = dataclasses.replace(d, weights=_ref(tmp_path / "nowhere"))
    with pytest.raises(WeightsNotFoundError, match="folder .*nowhere"):
        read_encoder_weights(gone.weights, gone)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    bert = dataclasses.replace(d, weights=_ref(tmp_path / "other"))
    with pytest.raises(CheckpointError, match="model_type 'bert' is not a vision encoder"):
        read_encoder_weights(bert.weights, bert)
