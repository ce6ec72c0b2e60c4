"""The generation loop, sampler and stop-string matcher."""

import pytest
import torch

from edgevlm.errors import ConfigError, ShapeError
from edgevlm.runtime.decoder import Decoder
from edgevlm.runtime.generate import GenerationConfig, Sampler, StopStringMatcher, generate_tokens
from edgevlm.runtime.kv_cache import ContextLengthError, KVCache
from edgevlm.runtime.readers.hf_decoders import read_decoder_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    dcfg, state = read_decoder_dir(path)
    return hf, Decoder.from_state(dcfg, state).eval()


PROMPT = [5, 17, 99, 3, 200, 42, 42, 7, 130, 1]


def run(dec, cfg, cache=None, **kw):
    cache = cache or dec.new_cache(max_len=64)
    kw.setdefault("prompt_ids", PROMPT)
    stream = generate_tokens(dec, cache, gen_cfg=cfg, **kw)
    return list(stream), stream.stats


def test_greedy_matches_transformers_generate(tiny):
    hf, dec = tiny
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(PROMPT):].tolist()
    out, stats = run(dec, GenerationConfig(max_new_tokens=32))
    assert out == ref
    assert stats.new_tokens == 32 and stats.stop_reason == "max_new_tokens"
    assert stats.prefill_ms > 0 and len(stats.decode_ms) == 31 and stats.decode_tokens_per_s > 0


def test_prompt_embeds_give_the_same_tokens(tiny):
    _, dec = tiny
    greedy, _ = run(dec, GenerationConfig(max_new_tokens=12))
    with torch.no_grad():
        embeds = dec.embed(torch.tensor([PROMPT]))[0]  # [T, D], as a Pipeline splicing images would pass
    out, _ = run(dec, GenerationConfig(max_new_tokens=12), prompt_ids=None, prompt_embeds=embeds)
    assert out == greedy


def test_sampling_is_seeded_and_top_k1_top_p_tiny_are_greedy(tiny):
    _, dec = tiny
    greedy, _ = run(dec, GenerationConfig(max_new_tokens=20))
    a, _ = run(dec, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=123))
    b, _ = run(dec, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=123))
    c, _ = run(dec, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=124))
    assert a == b and a != c and a != greedy
    k1, _ = run(dec, GenerationConfig(max_new_tokens=20, temperature=1.5, top_k=1, seed=5))
    p0, _ = run(dec, GenerationConfig(max_new_tokens=20, temperature=1.5, top_p=1e-6, seed=5))
    assert k1 == greedy and p0 == greedy


def test_sampler_filters_and_temperature():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    top_k = Sampler(GenerationConfig(temperature=1.0, top_k=3))
    assert torch.isfinite(top_k.filtered_logits(logits)).tolist() == [[True, True, True, False]]
    top_p = Sampler(GenerationConfig(temperature=1.0, top_p=0.6))  # 0.4 < 0.6 <= 0.4 + 0.3: keep two
    assert torch.isfinite(top_p.filtered_logits(logits)).tolist() == [[True, True, False, False]]
    both = Sampler(GenerationConfig(temperature=1.0, top_k=3, top_p=0.95))  # top_p over the renormalised 3
    assert torch.isfinite(both.filtered_logits(logits)).sum().item() == 3
    # empirical frequencies: temperature 1 keeps p = 0.7; temperature 0.25 sharpens it to ~0.97
    two = torch.log(torch.tensor([0.7, 0.3])).expand(4000, 2)
    f1 = (Sampler(GenerationConfig(temperature=1.0, seed=0))(two) == 0).float().mean().item()
    sharp = 0.7 ** 4 / (0.7 ** 4 + 0.3 ** 4)
    f4 = (Sampler(GenerationConfig(temperature=0.25, seed=0))(two) == 0).float().mean().item()
    assert abs(f1 - 0.7) < 0.03 and abs(f4 - sharp) < 0.02
    assert torch.equal(Sampler(GenerationConfig())(two[:3]), torch.zeros(3, dtype=torch.long))


def test_stop_ids_and_callback_stop(tiny):
    _, dec = tiny
    greedy, _ = run(dec, GenerationConfig(max_new_tokens=20))
    stop = greedy[6]
    first = greedy.index(stop)
    out, stats = run(dec, GenerationConfig(max_new_tokens=20, stop_token_ids=(stop, 255)))
    assert out == greedy[:first] and stats.stop_reason == "stop_token" and stats.stop_token == stop
    seen = []
    out, stats = run(dec, GenerationConfig(max_new_tokens=20), on_token=lambda t: seen.append(t) or len(seen) == 4)
    assert out == greedy[:4] == seen and stats.stop_reason == "callback"


def test_caller_can_stop_and_cache_holds_what_was_fed(tiny):
    _, dec = tiny
    cache = dec.new_cache(max_len=64)
    stream = generate_tokens(dec, cache, prompt_ids=PROMPT, gen_cfg=GenerationConfig(max_new_tokens=20))
    got = [next(stream) for _ in range(3)]
    stream.close()
    assert stream.stats.stop_reason == "closed" and stream.tokens == got
    assert cache.length == len(PROMPT) + 2  # the last yielded token was never fed back


def test_multi_turn_prefix_reuse(tiny):
    _, dec = tiny
    turn2 = [11, 12, 13]
    full, _ = run(dec, GenerationConfig(max_new_tokens=10), prompt_ids=PROMPT + turn2)
    cache = dec.new_cache(max_len=64)
    run(dec, GenerationConfig(max_new_tokens=5), cache=cache)  # turn 1 fills the cache past the prompt
    cache.truncate(len(PROMPT))  # keep the shared prefix only
    reused, stats = run(dec, GenerationConfig(max_new_tokens=10), cache=cache, prompt_ids=turn2, continue_cache=True)
    assert reused == full and stats.cached_prefix == len(PROMPT) and stats.prompt_tokens == 3


def test_prompt_longer_than_context_names_both_lengths(tiny):
    _, dec = tiny
    with pytest.raises(ContextLengthError, match=r"prompt of 10 tokens \+ max_new_tokens 8 = 18 .*KV cache .*16"):
        run(dec, GenerationConfig(max_new_tokens=8), cache=dec.new_cache(max_len=16))
    big = KVCache(3, 1, 2, 400, 16)  # larger than the model's context: max_seq_len is the limit then
    with pytest.raises(ContextLengthError, match=r"= 210 positions exceeds the decoder's max_seq_len 128"):
        run(dec, GenerationConfig(max_new_tokens=200), cache=big)
    with pytest.raises(ShapeError):  # ContextLengthError is a ShapeError, and so is a bad prompt
        run(dec, GenerationConfig(), prompt_ids=[1, 256])
    with pytest.raises(ShapeError):
        run(dec, GenerationConfig(), prompt_ids=[])
    with pytest.raises(ConfigError):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ConfigError):
        GenerationConfig(max_new_tokens=0)


@pytest.mark.parametrize("pieces,stops,expected_emitted,stopped", [
    (["Hello", " wor", "ld</", "s", "top>more"], ["</stop>"], ["Hello", " wor", "ld", "", ""], True),
    (["a<", "/b", "c"], ["</s>"], ["a", "</b", "c"], False),
    (["x", "ST", "O", "P"], ["STOP", "ST!"], ["x", "", "", ""], True),
    (["END"], ["END"], [""], True),
])
def test_stop_string_matcher(pieces, stops, expected_emitted, stopped):
    m = StopStringMatcher(stops)
    emitted, done = [], False
    for p in pieces:
        text, done = m.feed(p)
        emitted.append(text)
        if done:
            break
    assert done == stopped
    assert emitted == expected_emitted[: len(emitted)]
    if not stopped:
        assert m.flush() == "" and "".join(emitted) == "".join(pieces)


def test_stop_string_matcher_holds_back_partials_then_releases():
    m = StopStringMatcher(["<|im_end|>"])
    assert m.feed("Paris<|im") == ("Paris", False) and m.held == "<|im"
    assert m.feed("_e") == ("", False) and m.held == "<|im_e"
    assert m.flush() == "<|im_e"  # generation ended without the stop: the held text is real text
    m = StopStringMatcher(["<|im_end|>"])
    text, done = m.feed("ok<|im_end|> trailing")
    assert (text, done, m.matched) == ("ok", True, "<|im_end|>")
    assert m.feed("more") == ("", True)  # once stopped, nothing more comes out


def test_forced_tokens_continue_as_if_the_decoder_had_chosen_them(tiny):
    """`force` (a grounding head writing a box) puts its ids after the trigger token; what follows is the
    greedy continuation of prompt + those ids, and max_new_tokens counts the forced ids too."""
    _, dec = tiny
    first, _ = run(dec, GenerationConfig(max_new_tokens=1))
    forced = [21, 22, 23]
    calls = []

    def force(tok):
        calls.append(tok)
        return forced if tok == first[0] and len(calls) == 1 else []

    got, stats = run(dec, GenerationConfig(max_new_tokens=9), force=force)
    assert got[:4] == first + forced and len(got) == 9 and stats.new_tokens == 9
    ref, _ = run(dec, GenerationConfig(max_new_tokens=5), prompt_ids=PROMPT + first + forced)
    assert got[4:] == ref
    assert calls == [first[0], *got[4:]]  # asked after each decoded token, never after a forced one
    calls.clear()
    capped, stats = run(dec, GenerationConfig(max_new_tokens=3), force=force)
    assert capped == first + forced[:2] and stats.stop_reason == "max_new_tokens"


def test_a_prior_reweights_the_first_token_only(tiny):
    """`prior` (a grounding head's short answer) sees the prefill logits and its choice is sampled; the
    tokens after it are the decoder's greedy continuation of prompt + that choice."""
    _, dec = tiny
    first, _ = run(dec, GenerationConfig(max_new_tokens=1))
    pick = (first[0] + 5) % dec.cfg.vocab_size
    seen = []

    def prior(logits):
        seen.append(logits.shape)
        out = torch.full_like(logits, -30.0)
        out[0, pick] = 0.0
        return out

    got, _ = run(dec, GenerationConfig(max_new_tokens=6), prior=prior)
    assert got[0] == pick and seen == [(1, dec.cfg.vocab_size)]  # once, on the first token's logits
    ref, _ = run(dec, GenerationConfig(max_new_tokens=5), prompt_ids=PROMPT + [pick])
    assert got[1:] == ref
