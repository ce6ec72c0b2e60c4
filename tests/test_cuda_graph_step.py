"""GraphedDecodeStep, run eagerly on CPU, against the decoder's ordinary cached path.

The static-shape step writes K/V with index_copy_ at a position tensor and attends over the whole
cache under a mask; the ordinary path slices the cache with Python ints. Same numbers expected (fp32).
Capture itself needs CUDA and is exercised by bench/gpu_decode.py.
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
