"""GraphedDecodeStep and DecodeGraphs, run eagerly on CPU, against the decoder's ordinary cached path.

The static-shape step writes K/V with index_copy_ at a position tensor and attends over a bucket of the
cache under a mask; the ordinary path slices the cache with Python ints. Same numbers expected (fp32),
and the same tokens, greedy or sampled (the sampler's draw is the same uniform number on both paths).
Capture itself needs CUDA: tests/test_gpu.py and bench/gpu_decode.py.
"""

import dataclasses

import pytest
import torch
from edgevlm_testkit import assert_within_noise, float64_copy, max_abs

from edgevlm.config import DecoderConfig
from edgevlm.errors import BackendUnavailableError, ConfigError, EdgeVLMError
from edgevlm.runtime.cuda_graph import GraphedDecodeStep
from edgevlm.runtime.decoder import Decoder
from edgevlm.runtime.kv_cache import ContextLengthError

CFG = DecoderConfig(vocab_size=97, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_seq_len=64)
ROPES = {
    "none": {},
    "linear": dict(rope_scaling="linear", rope_scaling_factor=4.0),
    "llama3": dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_len=16, rope_theta=500000.0),
    "bias": dict(attention_bias=True, mlp_bias=True),
}


def tiny(**overrides) -> Decoder:
    torch.manual_seed(0)
    dec = Decoder(dataclasses.replace(CFG, **overrides)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a norm applied to the wrong tensor shows
        for p in dec.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return dec


@pytest.mark.parametrize("rope", list(ROPES))
@torch.no_grad()
def test_matches_cached_decoder_prompt_then_greedy(rope):
    dec = tiny(**ROPES[rope])
    dec64 = float64_copy(dec)  # the cached path in float64: the fp32 noise of each step's logits
    prompt = torch.randint(0, CFG.vocab_size, (1, 7))
    ref_cache, cache, cache64 = dec.new_cache(max_len=24), dec.new_cache(max_len=24), dec64.new_cache(max_len=24)
    ref_logits = dec(prompt, cache=ref_cache, last_only=True)[:, -1]  # [1, V]
    dec64(prompt, cache=cache64)
    logits = dec(prompt, cache=cache, last_only=True)[:, -1]  # prefill on the ordinary path
    step = GraphedDecodeStep(dec, cache)
    ref_tokens, tokens = [], []
    for i in range(8):
        ref_tok, tok = ref_logits.argmax(-1), logits.argmax(-1)  # [1]
        ref_tokens.append(ref_tok.item())
        tokens.append(tok.item())
        ref_logits = dec(ref_tok[:, None], cache=ref_cache)[:, -1]
        noise = max_abs(ref_logits, dec64(ref_tok[:, None], cache=cache64)[:, -1])
        # Alternate int and tensor positions: both must land at the same slot.
        pos = cache.length if i % 2 == 0 else torch.tensor([cache.length])
        logits = step(tok, pos)
        if isinstance(pos, torch.Tensor):
            cache.commit(int(pos) + 1)  # a tensor position is not committed by the step
        assert logits.shape == (1, CFG.vocab_size)
        assert_within_noise(logits, ref_logits, f"{rope}: step {i} logits, graphed vs cached", noise=noise)
    assert tokens == ref_tokens
    assert cache.length == ref_cache.length == 7 + 8
    n = cache.length
    for name in ("k", "v"):  # K/V of the decoded tokens depend on the attention outputs of earlier layers
        got, ref, ref64 = (getattr(c, name)[:, :, :, :n] for c in (cache, ref_cache, cache64))
        assert_within_noise(got, ref, f"{rope}: cached {name.upper()}, graphed vs cached", noise=max_abs(ref, ref64))


@torch.no_grad()
def test_stale_cache_entries_are_masked():
    """Entries past the position (a longer earlier conversation) must not leak into attention."""
    dec = tiny()
    prompt = torch.randint(0, CFG.vocab_size, (1, 5))
    clean, dirty = dec.new_cache(max_len=16), dec.new_cache(max_len=16)
    dirty.k.normal_()
    dirty.v.normal_(std=100.0)
    dec(prompt, cache=clean)
    dec(prompt, cache=dirty)
    a = GraphedDecodeStep(dec, clean)(3, 5)
    b = GraphedDecodeStep(dec, dirty)(3, 5)
    # Stale positions are masked out (weight exactly 0, and 0 * finite = 0) and everything else is the same
    # arithmetic on the same values: bit-identical.
    assert torch.equal(a, b)


def test_refuses_dynamic_rope_with_typed_error():
    dec = tiny(rope_scaling="dynamic", rope_scaling_factor=2.0, rope_original_max_len=16)
    with pytest.raises(ConfigError, match="dynamic"):
        GraphedDecodeStep(dec, dec.new_cache(max_len=8))


def test_refuses_bad_positions_batches_and_cpu_capture():
    dec = tiny()
    cache = dec.new_cache(max_len=8)
    step = GraphedDecodeStep(dec, cache)
    with pytest.raises(ContextLengthError):
        step(1, 1)  # nothing cached yet: position 1 would leave a hole at 0
    for p in range(8):
        step(1, p)
    with pytest.raises(ContextLengthError):
        step(1, 8)  # past the cache
    with pytest.raises(EdgeVLMError, match="batch"):
        GraphedDecodeStep(dec, dec.new_cache(batch=2, max_len=8))
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        GraphedDecodeStep(dec, dec.new_cache(max_len=8)).capture()


# ---- DecodeGraphs: one step per context bucket, sampling on the device ---------------------------

def _tokens(dec, gen, graphs_for=None, prompt=None, max_len=24):
    from edgevlm.runtime.generate import generate_tokens

    cache = dec.new_cache(max_len=max_len)
    graphs = graphs_for(cache) if graphs_for else None
    prompt = prompt if prompt is not None else [5, 17, 60, 3, 20, 42, 7]
    stream = generate_tokens(dec, cache, prompt_ids=prompt, gen_cfg=gen, graphs=graphs)
    return list(stream), stream.stats, graphs


@pytest.mark.parametrize("sampling", [{}, dict(temperature=1.0, seed=11), dict(temperature=0.8, top_k=5, seed=3),
                                      dict(temperature=1.2, top_p=0.7, seed=4)])
def test_bucketed_steps_give_the_ordinary_paths_tokens(sampling):
    from edgevlm.runtime.cuda_graph import DecodeGraphs
    from edgevlm.runtime.generate import GenerationConfig

    dec = tiny()
    gen = GenerationConfig(max_new_tokens=16, **sampling)
    want, _, _ = _tokens(dec, gen)
    # prompt 7 + 16 new: the answer crosses the 8- and 16-position buckets
    got, stats, graphs = _tokens(dec, gen, lambda c: DecodeGraphs(dec, c, buckets=(8, 16, 24), capture=False))
    assert got == want
    assert {b for b, _ in graphs.steps} == {8, 16, 24} and stats.capture_ms == 0.0
    assert len(stats.decode_ms) == len(got) - 1


def test_sampler_pick_is_the_samplers_draw():
    from edgevlm.runtime.generate import GenerationConfig, Sampler

    logits = torch.randn(3, 50)
    s = Sampler(GenerationConfig(temperature=0.9, top_k=10, top_p=0.9, seed=1))
    u = s.uniform(3)
    again = Sampler(GenerationConfig(temperature=0.9, top_k=10, top_p=0.9, seed=1))
    assert torch.equal(again(logits), s.pick(logits, u))
    probs = s.filtered_logits(logits).softmax(-1)
    for draw in (0.0, 0.5, 1 - 1e-9):  # the ends of [0, 1) land on tokens the filters kept
        ids = s.pick(logits, torch.full((3, 1), draw))
        assert (probs.gather(-1, ids[:, None]) > 0).all()


def test_decode_graphs_refuses_what_it_cannot_run():
    from edgevlm.runtime.cuda_graph import DecodeGraphs
    from edgevlm.runtime.generate import GenerationConfig, generate_tokens

    dec = tiny()
    cache = dec.new_cache(max_len=24)
    with pytest.raises(BackendUnavailableError, match="capture=False"):
        DecodeGraphs(dec, cache)
    with pytest.raises(ConfigError, match="end at the KV cache size 24"):
        DecodeGraphs(dec, cache, buckets=(8, 16), capture=False)
    with pytest.raises(ConfigError, match="dynamic"):
        d = tiny(rope_scaling="dynamic", rope_scaling_factor=2.0, rope_original_max_len=16)
        DecodeGraphs(d, d.new_cache(max_len=8), capture=False)
    other = DecodeGraphs(dec, dec.new_cache(max_len=24), capture=False)
    with pytest.raises(ConfigError, match="another KV cache"):
        generate_tokens(dec, cache, prompt_ids=[1, 2], gen_cfg=GenerationConfig(max_new_tokens=2), graphs=other)
    big = tiny(max_seq_len=300)
    assert DecodeGraphs(big, big.new_cache(max_len=300), capture=False).buckets == (128, 256, 300)


def test_pipeline_decodes_through_the_bucketed_steps():
    import edgevlm
    from edgevlm.cli import _asset

    scene = _asset("scene_a.png")
    plain = edgevlm.load("tiny", quant="none", max_context=256)
    stepped = edgevlm.load("tiny", quant="none", max_context=256, decode_graphs="eager")
    info = stepped.info()["decode_graphs"]
    assert info["buckets"] == [128, 256] and info["graphs"] is False and plain.info()["decode_graphs"] is None
    for kw in ({}, dict(temperature=1.0, top_k=20, seed=7)):
        a, b = plain.generate(scene, "what is here?", max_new_tokens=12, **kw), \
            stepped.generate(scene, "what is here?", max_new_tokens=12, **kw)
        assert a.token_ids == b.token_ids and len(a.token_ids) > 1
        assert "graph_capture" not in b.timings  # nothing is captured on the eager path
    # a follow-up reuses the cached prefix and decodes on from it
    a2, b2 = plain.generate(scene, "and now?", max_new_tokens=6), stepped.generate(scene, "and now?", max_new_tokens=6)
    assert a2.token_ids == b2.token_ids and b2.cached_tokens == a2.cached_tokens > 0


def test_load_refuses_graphs_it_cannot_capture():
    import edgevlm
    from edgevlm.options import LoadOptions

    with pytest.raises(ConfigError, match="eager"):
        LoadOptions(decode_graphs="on")  # CPU
    with pytest.raises(ConfigError, match="kv_cache='float'"):
        LoadOptions(decode_graphs="eager", kv_cache="int8")
    with pytest.raises(ConfigError, match="decode_graphs must be one of"):
        edgevlm.load("tiny", decode_graphs="yes")


def test_cli_flag_reaches_the_pipeline(capsys):
    from edgevlm.cli import main

    assert main(["info", "-m", "tiny", "--load", "--max-context", "256", "--decode-graphs", "eager"]) == 0
    assert "decode: static steps, uncaptured; context buckets 128, 256" in capsys.readouterr().out
    assert main(["run", "-m", "tiny", "hi", "--decode-graphs", "on", "--max-new-tokens", "2"]) == 2  # CPU: refused
    assert "decode_graphs='eager'" in capsys.readouterr().err
