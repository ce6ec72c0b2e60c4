"""edgevlm.load's plumbing: one frozen LoadOptions, one resolve_source() for the full and tower-only
loaders, and a Pipeline/VisionTower constructed once with what they need (nothing set afterwards)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from edgevlm_testkit import SMOLLM_GGUF_NAME, needs_smollm, smollm_dir

import edgevlm
from edgevlm.config import QuantConfig
from edgevlm.errors import CheckpointError, ConfigError, UnknownPresetError, WeightsNotFoundError
from edgevlm.options import LoadOptions
from edgevlm.runtime.checkpoint import save_checkpoint
from edgevlm.runtime.source import resolve_source
from edgevlm.runtime.tower import resolve_tower_source


# ---- LoadOptions ---------------------------------------------------------------------------------

def test_options_are_normalised_once():
    o = LoadOptions(device="cpu", dtype="bf16", quant="int4-g64")
    assert o.device == torch.device("cpu") and o.dtype is torch.bfloat16
    assert o.quant == QuantConfig(scheme="int4", group=64) and not o.keeps_gguf_blocks
    assert LoadOptions(quant="none").quant is None and LoadOptions().keeps_gguf_blocks
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.quant = "int8"


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_puts_the_tower_in_bf16_only_where_bf16_is_native(native, monkeypatch):
    monkeypatch.setattr("edgevlm.cpu_features.native_bf16", lambda device: native)
    o = LoadOptions(dtype="auto")
    assert o.dtype is torch.float32  # the decoder: the quantised kernels take fp32
    assert o.tower_dtype is (torch.bfloat16 if native else torch.float32)
    assert LoadOptions(dtype="auto", tower_dtype="float32").tower_dtype is torch.float32
    assert LoadOptions(dtype="bf16").tower_dtype is torch.bfloat16  # default: the tower follows dtype


def test_auto_dtype_loads_a_bf16_tower_that_tracks_the_fp32_one(monkeypatch):
    """The demo's real tower in bf16 beside an fp32 decoder: the image tokens it hands the decoder stay
    within a few percent of fp32's (bench/vision.py measured 1.3 % relative RMS on the bundled images)."""
    from edgevlm.scenes import make_scene

    monkeypatch.setattr("edgevlm.cpu_features.native_bf16", lambda device: True)
    auto = edgevlm.load("demo", dtype="auto", quant="none", embedding_cache_bytes=0)
    ref = edgevlm.load("demo", quant="none", embedding_cache_bytes=0)
    assert auto.tower.dtype is torch.bfloat16 and auto.decoder.dtype is torch.float32
    image = make_scene(0, "heldout", 3).image
    (a,), (r,) = auto.tower.embed_each([image]), ref.tower.embed_each([image])
    a, r = a.float(), r.float()
    rel = ((a - r).pow(2).mean().sqrt() / r.pow(2).mean().sqrt()).item()
    assert 1e-4 < rel < 0.05, rel  # bf16 really ran (not fp32 again), and stayed close


@pytest.mark.parametrize("kwargs, match", [
    ({"quant": "int3"}, "QuantConfig.scheme"),
    ({"quant": 8}, "quant must be"),
    ({"dtype": "float64"}, "dtype 'float64' not supported"),
    ({"kv_cache": "fp8"}, "kv_cache"),
    ({"embedding_cache_bytes": -1}, "embedding_cache_bytes"),
    ({"max_context": 0}, "max_context"),
    ({"keep_ratio": 0.0}, "keep_ratio"),
    ({"keep_mode": "score"}, "keep mode"),
    ({"vision_backend": "openvino"}, "vision_backend must be one of"),
    ({"vision_export": "x"}, "pass vision_backend"),
    ({"vision_precision": "int4"}, "precision"),
    ({"vision_backend": "onnxruntime", "keep_ratio": 0.5}, "token dropping runs on the torch backend only"),
])
def test_bad_options_fail_before_anything_is_read(kwargs, match, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a source was resolved for bad options")

    monkeypatch.setattr("edgevlm.runtime.source.resolve_source", boom)
    with pytest.raises(ConfigError, match=match):
        LoadOptions(**kwargs)
    with pytest.raises(ConfigError, match=match):
        edgevlm.load("tiny", **kwargs)


def test_load_takes_an_options_object_and_keyword_overrides():
    opts = LoadOptions(quant="int8", kv_cache="int8", max_context=64, reuse_prefix=False, embedding_cache_bytes=0)
    a = edgevlm.load("tiny", opts)
    b = edgevlm.load("tiny", quant="int8", kv_cache="int8", max_context=64, reuse_prefix=False,
                     embedding_cache_bytes=0)
    c = edgevlm.load("tiny", opts, kv_cache="float")
    for pipe in (a, b):
        assert pipe.kv_int8 and pipe.max_context == 64 and not pipe.reuse_prefix
        assert pipe.tower.embedding_cache.capacity_bytes == 0
        assert pipe.info()["decoder"]["quantization"].startswith("int8")
    assert not c.kv_int8 and c.max_context == 64
    assert a.generate(None, "hi", max_new_tokens=4).token_ids == b.generate(None, "hi", max_new_tokens=4).token_ids
    with pytest.raises(TypeError, match="unknown options \\['kv_cahce'\\]"):
        edgevlm.load("tiny", kv_cahce="int8")
    with pytest.raises(TypeError, match="LoadOptions"):
        edgevlm.load("tiny", "cuda")


def test_token_dropping_is_set_at_construction():
    pipe = edgevlm.load("tiny", keep_ratio=0.5, keep_mode="random")
    assert (pipe.tower.keep_ratio, pipe.tower.keep_mode) == (0.5, "random")
    assert edgevlm.load("tiny").tower.keep_ratio == 1.0


@needs_smollm
def test_options_that_need_a_tower_refuse_a_text_only_model():
    gguf = os.path.join(smollm_dir(), SMOLLM_GGUF_NAME)
    with pytest.raises(ConfigError, match="has no vision tower"):
        edgevlm.load(gguf, keep_ratio=0.5)
    with pytest.raises(ConfigError, match="has no vision tower"):
        edgevlm.load(gguf, vision_backend="onnxruntime")


# ---- one source resolution -----------------------------------------------------------------------

def test_resolve_source_kinds(tmp_path):
    assert resolve_source("tiny").kind == "config" and resolve_source("tiny").allows_random
    cfg = edgevlm.get_preset("tiny")
    assert resolve_source(cfg).config is cfg
    pipe_cfg = dataclasses.replace(cfg, name="mine")
    save_checkpoint(tmp_path / "ck", pipe_cfg, {})
    ck = resolve_source(tmp_path / "ck")
    assert (ck.kind, ck.path, ck.allows_random) == ("checkpoint", tmp_path / "ck", False)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llava"}')
    hf = resolve_source(str(tmp_path / "hf"))
    assert (hf.kind, hf.model_type) == ("transformers", "llava")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_source(tmp_path / "m.gguf").kind == "gguf"


def test_full_and_tower_loaders_refuse_the_same_sources_alike(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "w.bin").write_bytes(b"x")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    for bad, err in [("no-such-model", UnknownPresetError), (tmp_path / "empty", WeightsNotFoundError),
                     (tmp_path / "w.bin", CheckpointError)]:
        with pytest.raises(err):
            edgevlm.load(bad)
        with pytest.raises(err):
            resolve_tower_source(bad)
    with pytest.raises(CheckpointError, match="no vision tower"):
        resolve_tower_source(tmp_path / "m.gguf")
