"""Every decoder family through the one Decoder, against transformers' own classes: OPT (BLIP-2's,
MiniGPT-4 v1's) and Phi-3 (xGen-MM's) beside the LLaMA / Mistral checks in test_decoder.py.

Each family is a tiny random model saved by transformers. Parity bounds are transformers' own fp32
rounding noise, measured by running its model again in float64 (:func:`assert_within_noise`);
greedy tokens must be identical. The runtime paths that do not care which family a decoder is
(KV cache, chunked prefill, int8/int4 layers, GGUF blocks, the Pipeline, sessions, deadlines) are run
on each family too.
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch

import edgevlm
from edgevlm.config import DecoderConfig, QuantConfig
from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.runtime import quant as Q
from edgevlm.runtime.decoder import Decoder
from edgevlm.runtime.readers.gguf_reader import read_gguf
from edgevlm.runtime.readers.hf_decoders import config_from_hf, read_decoder_dir
from edgevlm_testkit import assert_within_noise, float64_copy, max_abs, randomize_params, write_byte_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 300
PHI3 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
_HALF = 64 // 4 // 2  # rotary frequencies per head
LONGROPE = dict(max_position_embeddings=256, original_max_position_embeddings=16,
                rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                 "short_factor": [round(1.0 + 0.1 * i, 3) for i in range(_HALF)],
                                 "long_factor": [round(1.0 + 0.9 * i, 3) for i in range(_HALF)]})
FAMILIES = {
    "opt": ("OPTForCausalLM", "OPTConfig",
            dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2)),
    "opt_gelu_nobias": ("OPTForCausalLM", "OPTConfig",
                        dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=128, word_embed_proj_dim=64, activation_function="gelu",
                             enable_bias=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", PHI3),
    # prompts of 24 > 16 positions: the long factors and the attention factor really apply
    "phi3_longrope": ("Phi3ForCausalLM", "Phi3Config", {**PHI3, **LONGROPE}),
    "phi3_partial_rotary": ("Phi3ForCausalLM", "Phi3Config",
                            {**PHI3, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.5}}),
    "phi3_window": ("Phi3ForCausalLM", "Phi3Config", {**PHI3, "sliding_window": 64}),
}


def save_family(path, family: str):
    cls, cfg_cls, kwargs = FAMILIES[family]
    torch.manual_seed(3)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kwargs)).eval()
    randomize_params(model, 5)  # transformers zero-inits biases and unit-inits norms: make every tensor count
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_family(path, request.param)
    cfg, state = read_decoder_dir(path)
    return request.param, path, hf, Decoder.from_state(cfg, state).eval()


def test_config_is_data_not_code(family):
    name, _, _, dec = family
    c = dec.cfg
    if name.startswith("opt"):
        assert (c.norm, c.mlp_gated, c.positions, c.learned_pos_offset) == ("layer", False, "learned", 2)
        assert dec.layers[0].mlp.gate_proj is None and dec.embed_positions is not None and dec.rotary is None
        assert c.attention_bias == c.mlp_bias == (name == "opt")
    else:
        assert (c.norm, c.mlp_gated, c.positions) == ("rms", True, "rope")
    if name == "phi3_longrope":
        assert c.rope_scaling == "longrope" and c.rope_original_max_len == 16
        # transformers' default attention factor for a 16x extension: sqrt(1 + ln 16 / ln 16)
        assert c.rope_attention_factor == pytest.approx(2 ** 0.5)
    if name == "phi3_partial_rotary":
        assert c.rotary_dim == c.head_dim // 2
    if name == "phi3_window":
        assert c.max_seq_len == 64  # exact while the context fits the window; longer prompts are refused


def test_logits_match_transformers(family):
    name, _, hf, dec = family
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, ref64 = hf(ids).logits, float64_copy(hf)(ids).logits
        ours = dec(input_ids=ids)
    assert_within_noise(ours, ref, f"{name} logits vs transformers", noise=max_abs(ref, ref64))


def test_greedy_tokens_match_transformers_generate(family):
    name, _, hf, dec = family
    from edgevlm.runtime.generate import GenerationConfig, generate_tokens

    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, ids.shape[1]:].tolist()
    ours = list(generate_tokens(dec, dec.new_cache(max_len=64), prompt_ids=ids[0],
                                gen_cfg=GenerationConfig(max_new_tokens=24)))
    assert len(ref) == 24 and ours == ref, name


def test_cache_and_chunked_prefill_match_a_full_recompute(family):
    name, _, _, dec = family
    ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = dec(input_ids=ids)[0, -1]
        full64 = float64_copy(dec)(input_ids=ids)[0, -1]
        cache = dec.new_cache(max_len=40)
        dec(input_ids=ids[:, :10], cache=cache)
        dec(input_ids=ids[:, 10:29], cache=cache)
        step = dec(input_ids=ids[:, 29:], cache=cache)[0, -1]
    if name == "phi3_longrope":
        # LongRoPE switches to the long factors once the sequence passes 16: the first chunk's keys
        # (10 positions) were cached with the short ones, as in transformers' own cached decoding, so a full
        # recompute differs by design (see decoder.py).
        assert max_abs(step, full) > 1e-3
        return
    assert_within_noise(step, full, f"{name} cached chunks vs full recompute", noise=max_abs(full, full64))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantised_layers_work_for_every_family(family, scheme):
    name, _, _, dec = family
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    copy = lambda: Decoder.from_state(dec.cfg, {k: v.clone() for k, v in dec.state_dict().items()}).eval()  # noqa: E731
    with torch.inference_mode():
        ref = dec(input_ids=ids)
        fused = Q.quantize_decoder(copy(), QuantConfig.named(scheme))
        plain = Q.quantize_decoder(copy(), QuantConfig.named(scheme), fuse=False)
        a, b = fused(input_ids=ids), plain(input_ids=ids)
    assert torch.equal(a, b)  # fusing only saves calls
    gated = dec.cfg.mlp_gated
    s = Q.summary(fused)
    assert s["float_linears"] == 0 and sum(s["schemes"].values()) == dec.cfg.layers * (7 if gated else 6) + 1
    rel = ((a - ref).norm() / ref.norm()).item()
    # the same coarse bound as test_quant.py's: random weights, two or three layers; SmolLM2's
    # perplexity test is where the quantisers' real quality is held
    assert rel < (0.05 if scheme == "int8" else 0.5), (name, rel)


def test_pipeline_sessions_and_deadlines_run_every_family(family, tmp_path):
    name, path, _, _ = family
    import shutil

    folder = tmp_path / name
    shutil.copytree(path, folder)
    write_byte_tokenizer(folder)
    pipe = edgevlm.load(folder, max_context=64)
    assert pipe.decoder.cfg.norm == ("layer" if name.startswith("opt") else "rms")
    out = pipe.generate(None, "Hello there", raw=True, max_new_tokens=6)
    assert 1 <= len(out.token_ids) <= 6
    # a deadline already past still answers with what fits (at least the first token), typed as such
    late = pipe.generate(None, "Hello there", raw=True, max_new_tokens=6, deadline_s=1e-9)
    assert late.stop_reason == "deadline" and len(late.token_ids) >= 1
    qpipe = edgevlm.load(folder, quant="int4", max_context=64)
    assert 1 <= len(qpipe.generate(None, "Hello there", raw=True, max_new_tokens=4).token_ids) <= 4
    sess = pipe.session()
    first = sess.ask("Hello", max_new_tokens=3)
    second = sess.ask("again", max_new_tokens=3)
    assert first.token_ids and second.token_ids and second.cached_tokens > 0  # the first turn's prefix reused


# ---- GGUF: the architecture llama.cpp writes for Phi-3 ---------------------------------------------------

def write_phi3_gguf(path, hf, qtype=None):
    """A transformers Phi-3 converted the way llama.cpp's converter does: arch "phi3", fused attn_qkv and
    ffn_up kept fused and unpermuted (llama.cpp runs Phi-3 with NeoX RoPE), LongRoPE factors as tensors."""
    c = hf.config
    rp = c.rope_parameters
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(rp["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_token_types([3 if i < 3 else 1 for i in range(c.vocab_size)])
    w.add_token_merges(["t 1"])
    if rp.get("rope_type") == "longrope":
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        w.add_tensor("rope_factors_long.weight", np.asarray(rp["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rp["short_factor"], dtype=np.float32))
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.qkv_proj": "attn_qkv",
             "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for k, v in layer.items():
            names[f"model.layers.{i}.{k}.weight"] = f"blk.{i}.{v}.weight"
    for src, dst in names.items():
        t = sd[src]
        if qtype is not None and t.ndim == 2 and dst.startswith("blk."):
            w.add_tensor(dst, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(dst, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("variant", ["phi3", "phi3_longrope"])
def test_phi3_gguf_matches_transformers(tmp_path, variant):
    hf = save_family(tmp_path, variant)
    path = tmp_path / "phi3.gguf"
    write_phi3_gguf(path, hf)
    m = read_gguf(path)
    assert m.config == dataclasses.replace(config_from_hf(hf.config.to_dict()), max_seq_len=m.config.max_seq_len,
                                           rope_theta=m.config.rope_theta)
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref, ref64 = hf(ids).logits, float64_copy(hf)(ids).logits
        assert_within_noise(m.decoder()(ids), ref, f"{variant} GGUF F32 vs transformers", noise=max_abs(ref, ref64))


def test_phi3_gguf_blocks_split_bit_exactly(tmp_path):
    from edgevlm.runtime.loader import gguf_decoder
    from edgevlm.runtime.quant.formats import dequantize as dequantize_packed

    hf = save_family(tmp_path, "phi3")
    path = tmp_path / "phi3-q8.gguf"
    write_phi3_gguf(path, hf, qtype=gguf.GGMLQuantizationType.Q8_0)
    m = read_gguf(path)
    qkv = hf.model.layers[0].self_attn.qkv_proj.weight.detach().numpy()
    deq = gguf.quants.dequantize(gguf.quants.quantize(qkv, gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    q_rows = 64  # heads * head_dim
    assert np.array_equal(m.state["layers.0.attn.q_proj.weight"].numpy(), deq[:q_rows])
    assert np.array_equal(m.state["layers.0.attn.v_proj.weight"].numpy(), deq[q_rows + 32:])
    dec, _ = gguf_decoder(path, torch.float32, "cpu", keep_blocks=True)  # the file's blocks, never dequantised
    assert torch.equal(dequantize_packed(dec.layers[0].attn.qkv.packed)[:q_rows],
                       m.state["layers.0.attn.q_proj.weight"])


# ---- refusals -------------------------------------------------------------------------------------------

def test_unsupported_variants_are_refused_by_name():
    opt = FAMILIES["opt"][2]
    with pytest.raises(CheckpointError, match="OPT-350m"):
        config_from_hf({"model_type": "opt", **opt, "do_layer_norm_before": False})
    with pytest.raises(CheckpointError, match="project_in"):
        config_from_hf({"model_type": "opt", **opt, "word_embed_proj_dim": 32})
    with pytest.raises(CheckpointError, match="encoder-decoder.*supported decoders: llama, mistral, phi3, opt"):
        config_from_hf({"model_type": "t5"})
    with pytest.raises(CheckpointError, match="longrope"):
        config_from_hf({"model_type": "phi3", **PHI3, "rope_parameters": {"rope_type": "longrope"}})
    with pytest.raises(ConfigError, match="longrope needs"):
        DecoderConfig(vocab_size=8, hidden=16, layers=1, heads=2, kv_heads=2, intermediate=8, rope_scaling="longrope")
