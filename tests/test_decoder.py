"""Decoder + KVCache + the transformers reader, against transformers' own LlamaForCausalLM.

Parity bounds are the reference's own fp32 rounding noise, measured by running it again in float64
(:func:`edgevlm_testkit.assert_within_noise`); the decoder's self-consistency checks (cache vs full
recompute, chunked prefill, shifted positions) measure theirs with a float64 copy of our decoder."""

import dataclasses
import json

import pytest
import torch

from edgevlm.errors import CheckpointError, ShapeError
from edgevlm.runtime.decoder import Decoder
from edgevlm.runtime.kv_cache import ContextLengthError, KVCache
from edgevlm.runtime.readers.hf_decoders import config_from_hf, decoder_from_hf, read_decoder_dir
from edgevlm.runtime.readers.safetensors_io import find_prefix, load_safetensors_dir
from edgevlm_testkit import assert_differs, assert_within_noise, float64_copy, max_abs

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
VARIANTS = {
    "base": {},
    "tied": dict(tie_word_embeddings=True),
    "linear": dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    # trained context 16 < the 24-token prompt, so the NTK base really changes
    "dynamic": dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                    max_position_embeddings=16),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                    "rope_theta": 500000.0}),
    "head_dim_bias": dict(head_dim=24, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5),
}


def save_tiny(path, cls="LlamaForCausalLM", **overrides):
    cfg_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "MistralForCausalLM": transformers.MistralConfig}[cls]
    torch.manual_seed(1)
    model = getattr(transformers, cls)(cfg_cls(**{**TINY, **overrides})).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = save_tiny(path)
    cfg, state = read_decoder_dir(path)
    return path, hf, Decoder.from_state(cfg, state).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    hf = save_tiny(tmp_path, **VARIANTS[variant])
    cfg, state = read_decoder_dir(tmp_path)
    dec = Decoder.from_state(cfg, state).eval()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref, out = hf(ids).logits, dec(ids)
        ref64 = float64_copy(hf)(ids).logits
    err = assert_within_noise(out, ref, f"{variant}: logits vs transformers", noise=max_abs(ref, ref64))
    print(f"{variant}: max |logit err| = {err:.2e}")
    if variant != "base":  # the feature under test must matter, or the comparison proves nothing
        plain = dataclasses.replace(cfg, rope_scaling="none", head_dim_override=0, attention_bias=False,
                                    mlp_bias=False, rope_theta=10000.0)
        if variant == "tied":
            assert dec.lm_head.weight is dec.embed_tokens.weight and "lm_head.weight" not in state
        elif variant == "head_dim_bias":
            assert cfg.head_dim == 24 and cfg.attention_bias and cfg.mlp_bias and cfg.norm_eps == 1e-5
        else:
            with torch.no_grad():
                other = Decoder.from_state(plain, {k: v for k, v in state.items()})(ids)
            assert_differs(other, ref, f"{variant}: logits without the feature", rel=1e-3)


def test_mistral_within_its_window(tmp_path):
    hf = save_tiny(tmp_path, cls="MistralForCausalLM", sliding_window=32)
    cfg, state = read_decoder_dir(tmp_path)
    assert cfg.max_seq_len == 32  # clamped to the window: beyond it Mistral is not LLaMA
    ids = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        ref, ref64 = hf(ids).logits, float64_copy(hf)(ids).logits
        err = assert_within_noise(Decoder.from_state(cfg, state)(ids), ref, "mistral: logits vs transformers",
                                  noise=max_abs(ref, ref64))
    print(f"mistral: max |logit err| = {err:.2e}")


def test_cached_decode_equals_full_recompute(tiny):
    _, _, dec = tiny
    seq = torch.randint(0, 256, (1, 8))
    cache = dec.new_cache(max_len=64)
    steps, fulls = [], []
    with torch.no_grad():
        step_logits = dec(seq, cache=cache, last_only=True)[:, -1]  # [1, V]
        for _ in range(32):
            fulls.append(dec(seq)[:, -1])  # recompute everything, no cache
            steps.append(step_logits)
            nxt = step_logits.argmax(-1, keepdim=True)  # [1, 1]
            seq = torch.cat([seq, nxt], dim=1)
            step_logits = dec(nxt, cache=cache)[:, -1]
        # the same 32 positions' logits in one float64 pass (causal: position i sees only seq[:i+1])
        full64 = float64_copy(dec)(seq[:, :-1])[0, 7:]  # [32, V]
    full = torch.cat(fulls)  # [32, V]
    assert cache.length == 8 + 32
    err = assert_within_noise(torch.cat(steps), full, "cached decode vs full recompute, 32 steps",
                              noise=max_abs(full, full64))
    print(f"cached vs full, 32 steps: max |logit err| = {err:.2e}")


def test_chunked_prefill_after_prefix_equals_one_shot(tiny):
    _, _, dec = tiny
    ids = torch.randint(0, 256, (2, 23))
    with torch.no_grad():
        ref = dec(ids)  # [2, 23, V]
        cache = dec.new_cache(batch=2, max_len=32)
        parts = [dec(ids[:, a:b], cache=cache) for a, b in ((0, 10), (10, 17), (17, 18), (18, 23))]
        err = max_abs(torch.cat(parts, dim=1), ref)
        # multi-turn reuse: rewind to the prefix and prefill a different continuation
        other = torch.randint(0, 256, (2, 5))
        cache.truncate(10)
        reused = dec(other, cache=cache)
        fresh = dec(torch.cat([ids[:, :10], other], dim=1))[:, 10:]
        dec64 = float64_copy(dec)
        ref64 = dec64(ids)
        fresh64 = dec64(torch.cat([ids[:, :10], other], dim=1))[:, 10:]
    print(f"chunked prefill: max |logit err| = {err:.2e}")
    assert cache.length == 15
    assert_within_noise(torch.cat(parts, dim=1), ref, "chunked prefill vs one shot", noise=max_abs(ref, ref64))
    assert_within_noise(reused, fresh, "prefill after a reused prefix vs fresh", noise=max_abs(fresh, fresh64))


def test_inputs_embeds_and_explicit_positions(tiny):
    _, _, dec = tiny
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        a = dec(ids)
        b = dec(inputs_embeds=dec.embed(ids))
        c = dec(ids, positions=torch.arange(12)[None])
        shifted = dec(ids, positions=torch.arange(5, 17))
        gapped = dec(ids, positions=torch.cat([torch.arange(6), torch.arange(10, 16)]))
        a64 = float64_copy(dec)(ids)
    assert torch.equal(a, b) and torch.equal(a, c)
    # RoPE only sees relative offsets: a uniform shift changes nothing, a gap changes the second half.
    # (The RoPE angles are fp32 in both runs, so their rounding is not in the measured noise; it is
    # ~1e-7 relative, inside the bound's floor of 32 ulps of scale.)
    noise = max_abs(a, a64)
    assert_within_noise(shifted, a, "logits with positions shifted by 5", noise=noise)
    assert_within_noise(gapped[:, :6], a[:, :6], "logits before a position gap", noise=noise)
    assert_differs(gapped[:, 6:], a[:, 6:], "logits after a position gap", rel=1e-3)
    with pytest.raises(ShapeError):
        dec(ids, inputs_embeds=dec.embed(ids))
    with pytest.raises(ShapeError, match=r"\[B, T, 64\]"):
        dec(inputs_embeds=torch.zeros(1, 3, 65))


def test_cache_limits_are_typed(tiny):
    _, _, dec = tiny
    cache = dec.new_cache(max_len=16)
    with torch.no_grad():
        dec(torch.randint(0, 256, (1, 10)), cache=cache)
        with pytest.raises(ContextLengthError, match=r"10 cached \+ 7 new = 17 .*max_len=16"):
            dec(torch.randint(0, 256, (1, 7)), cache=cache)
    assert cache.length == 10  # a refused write leaves the cache as it was
    with pytest.raises(ShapeError, match="holding 10 positions to 11"):
        cache.truncate(11)
    with pytest.raises(ContextLengthError, match="max_seq_len 256"):
        KVCache.for_config(dec.cfg, max_len=300)
    with pytest.raises(ShapeError, match="batch 1, inputs have batch 2"):
        dec(torch.randint(0, 256, (2, 3)), cache=cache)
    cache.reset()
    assert cache.length == 0 and cache.k.shape == (3, 1, 2, 16, 16)


def test_llava_language_model_prefixes(tmp_path):
    # transformers 5.x writes language_model.model.* and language_model.lm_head.* on disk.
    text = transformers.LlamaConfig(**TINY)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(2)
    llava = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=255)).eval()
    llava.save_pretrained(tmp_path)
    state = load_safetensors_dir(tmp_path)
    prefix = find_prefix(state, ["model.language_model.", "language_model.model."], "embed_tokens.weight")
    text_cfg = json.loads((tmp_path / "config.json").read_text())["text_config"]
    cfg, dstate = decoder_from_hf(text_cfg, state, prefix)
    cfg2, _ = read_decoder_dir(tmp_path)
    assert cfg == cfg2
    ids = torch.randint(0, 250, (1, 9))
    with torch.no_grad():
        ref, ref64 = llava(input_ids=ids).logits, float64_copy(llava)(input_ids=ids).logits
        err = assert_within_noise(Decoder.from_state(cfg, dstate)(ids), ref, "llava language model logits",
                                  noise=max_abs(ref, ref64))
    print(f"llava language model: max |logit err| = {err:.2e}")


def test_truncated_safetensors_is_a_checkpoint_error(tmp_path):
    save_tiny(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_decoder_dir(tmp_path)


def test_unknown_model_type_lists_supported(tmp_path):
    save_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(CheckpointError, match="'gpt_neox' is not supported; supported: llama, mistral"):
        read_decoder_dir(tmp_path)
    with pytest.raises(CheckpointError, match="supported: llama, mistral"):
        config_from_hf({**cfg, "model_type": "qwen2"})
    with pytest.raises(CheckpointError, match="not supported"):
        config_from_hf({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})


def test_wrong_shapes_and_missing_tensors_are_named(tmp_path):
    save_tiny(tmp_path)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    state = load_safetensors_dir(tmp_path)
    bad = dict(state)
    bad["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError, match=r"k_proj.weight.*expected shape \(32, 64\).*found \(64, 64\)"):
        decoder_from_hf(hf_cfg, bad)
    del bad["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match="lacks tensor 'model.layers.1.self_attn.k_proj.weight'"):
        decoder_from_hf(hf_cfg, bad)
    cfg, good = decoder_from_hf(hf_cfg, state)
    good.pop("norm.weight")
    with pytest.raises(CheckpointError, match="norm.weight"):
        Decoder.from_state(cfg, good)


def test_transformers_4x_config_layout():
    # 4.x wrote rope_theta at the top and rope_scaling with "type"; 5.x nests both in rope_parameters.
    base = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=100)
    cfg = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor) == (5e5, "dynamic", 2.0)
    assert (cfg.rope_original_len, cfg.max_seq_len, cfg.kv_heads, cfg.norm_eps) == (100, 200, 4, 1e-6)
    assert config_from_hf({**base, "rope_scaling": None}).rope_scaling == "none"
    with pytest.raises(CheckpointError, match="hidden_act 'gelu'"):
        config_from_hf({**base, "hidden_act": "gelu"})
