"""Property-based fuzzing of the parsers robot code feeds untrusted bytes and text to: safetensors and
GGUF headers, and chat-template rendering. The only acceptable outcomes are a result or a typed
:class:`~edgevlm.errors.EdgeVLMError`; anything else (IndexError, UnicodeDecodeError, MemoryError,
a hang) is a bug. Image decoding and box/keypoint parsing are fuzzed in test_image_io.py and
test_boxes.py."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevlm.errors import ChatTemplateError, CheckpointError, EdgeVLMError, PromptError
from edgevlm.runtime.chat import ChatFormat, render_chat_template
from edgevlm.runtime.readers.safetensors_io import load_safetensors

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- safetensors ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def st_blob(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("st") / "ok.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(4, dtype=torch.float16)}, str(path))
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_safetensors_mutations_load_or_raise_checkpoint_error(st_blob, tmp_path, data):
    blob = bytearray(st_blob)
    n = struct.unpack("<Q", blob[:8])[0]
    kind = data.draw(st.sampled_from(["flip", "truncate", "length", "header"]))
    if kind == "flip":  # bit flips in the length prefix and the JSON header
        for pos in data.draw(st.lists(st.integers(0, 8 + n - 1), min_size=1, max_size=4)):
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "length":  # an absurd or off-by-some header length
        blob[:8] = struct.pack("<Q", data.draw(st.one_of(st.integers(0, 2 * n), st.integers(0, 2**64 - 1))))
    else:  # a structurally different header: wrong types, offsets, dtypes, shapes
        entry = data.draw(st.fixed_dictionaries({
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "Q4", 7]),
            "shape": st.one_of(st.lists(st.integers(-2, 5), max_size=3), st.text(max_size=3)),
            "data_offsets": st.one_of(st.lists(st.integers(-8, 64), min_size=0, max_size=3), st.none())}))
        header = json.dumps({"a": entry}).encode()
        blob = bytearray(struct.pack("<Q", len(header)) + header + bytes(data.draw(st.integers(0, 64))))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(blob))
    try:
        out = load_safetensors(path)
    except CheckpointError as e:
        assert "fuzz.safetensors" in str(e)
        return
    assert all(isinstance(t, torch.Tensor) for t in out.values())


# ---- GGUF -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    gguf = pytest.importorskip("gguf", reason="the GGUF fixture is written with the gguf package")
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "ok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in (("add_block_count", 1), ("add_context_length", 64), ("add_embedding_length", 16),
                   ("add_feed_forward_length", 32), ("add_head_count", 2), ("add_head_count_kv", 2),
                   ("add_layer_norm_rms_eps", 1e-5), ("add_vocab_size", 8), ("add_rope_dimension_count", 8)):
        getattr(w, add)(v)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(8)])
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (8, 16), "output_norm.weight": (16,), "blk.0.attn_norm.weight": (16,),
              "blk.0.ffn_norm.weight": (16,), "blk.0.attn_q.weight": (16, 16), "blk.0.attn_k.weight": (16, 16),
              "blk.0.attn_v.weight": (16, 16), "blk.0.attn_output.weight": (16, 16),
              "blk.0.ffn_gate.weight": (32, 16), "blk.0.ffn_up.weight": (32, 16), "blk.0.ffn_down.weight": (16, 32)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, gguf.GGUFReader(path).data_offset


@FUZZ
@given(data=st.data())
def test_gguf_header_mutations_load_or_raise_checkpoint_error(gguf_file, tmp_path, data):
    from edgevlm.runtime.readers.gguf_reader import read_gguf

    path, header_end = gguf_file
    blob = bytearray(path.read_bytes())
    if data.draw(st.booleans()):
        for pos in data.draw(st.lists(st.integers(0, header_end - 1), min_size=1, max_size=6)):
            blob[pos] = data.draw(st.integers(0, 255))
    else:
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    bad = tmp_path / "fuzz.gguf"
    bad.write_bytes(bytes(blob))
    try:
        read_gguf(bad, dequantize_weights=False)
    except CheckpointError as e:
        assert "fuzz.gguf" in str(e)


# ---- chat templates -----------------------------------------------------------------------------

_content = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
                       st.fixed_dictionaries({"type": st.just("image")}),
                       st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)), max_size=4),
    st.none(), st.integers(), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "", "USER"]),
                           "content": _content}),
    st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3),
    st.text(max_size=10), st.none())


# The default template (checkpoints without their own), LLaVA-style placeholders, and SPHINX's format.
CHAT_FORMATS = {"template": ChatFormat(), "placeholder": ChatFormat(image_placement="placeholder"),
                "sphinx": ChatFormat(kind="sphinx")}


@pytest.mark.parametrize("chat_format", sorted(CHAT_FORMATS))
@FUZZ
@given(messages=st.lists(_message, max_size=5), gen=st.booleans(), n_images=st.integers(0, 3))
def test_chat_rendering_returns_text_or_a_typed_error(chat_format, messages, gen, n_images):
    try:
        text = CHAT_FORMATS[chat_format].render(messages, add_generation_prompt=gen, n_images=n_images)
    except (PromptError, ChatTemplateError):
        return
    assert isinstance(text, str)


_template = st.one_of(
    st.text(max_size=60),
    st.builds(lambda a, b: "{% for m in messages %}" + a + "{{ m['content'] }}" + b + "{% endfor %}",
              st.text(max_size=10), st.text(max_size=10)),
    st.sampled_from(["{{ messages[99] }}", "{% for i in range(10**9) %}x{% endfor %}", "{{ raise_exception('no') }}",
                     "{{ ''.__class__.__mro__ }}", "{% set x = messages|length %}{{ x / 0 }}", "{{ undefined.attr }}",
                     "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "{{ messages|tojson }}"]))


@FUZZ
@given(template=_template, messages=st.lists(_message, max_size=3))
def test_untrusted_templates_render_or_raise_chat_template_error(template, messages):
    try:
        out = render_chat_template(template, messages, max_chars=1 << 16)
    except ChatTemplateError:
        return
    except EdgeVLMError as e:  # any other typed error is a mislabelled one
        pytest.fail(f"{type(e).__name__} instead of ChatTemplateError: {e}")
    assert isinstance(out, str) and len(out) <= 1 << 16
