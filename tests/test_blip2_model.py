"""Whole transformers BLIP-2 folders (OPT and LLaMA language models) through ``edgevlm.load``, against
transformers' ``Blip2ForConditionalGeneration``: its image processor's pixels, next-token logits within
its own fp32 noise (measured with a float64 run), and greedy tokens identical to its ``generate``.
BLIP-2 puts the 32 query embeddings before BOS (``image_placement="before_bos"``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgevlm
from edgevlm.runtime.generate import GenerationConfig, generate_tokens
from edgevlm.runtime.image_io import load_images
from edgevlm_testkit import (BYTE_VOCAB, IMAGE_ID, assert_within_noise, float64_copy, max_abs, randomize_params,
                             write_byte_tokenizer)

transformers = pytest.importorskip("transformers")
QUERIES = 8
TEXT = {
    "opt": dict(model_type="opt", vocab_size=BYTE_VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=0,
                bos_token_id=1, eos_token_id=2),
    "llama": dict(model_type="llama", vocab_size=BYTE_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2),
}


@pytest.fixture(scope="module", params=list(TEXT))
def blip2(request, tmp_path_factory):
    cfg = transformers.Blip2Config(
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=48, vocab_size=100),
        text_config=TEXT[request.param], num_query_tokens=QUERIES, image_token_index=IMAGE_ID)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(cfg).eval()
    randomize_params(model, 11)
    folder = tmp_path_factory.mktemp(f"blip2_{request.param}")
    model.save_pretrained(folder)
    write_byte_tokenizer(folder)
    return request.param, model, folder


def test_blip2_pixels_logits_and_greedy_tokens_match_transformers(blip2):
    name, model, folder = blip2
    pipe = edgevlm.load(folder)
    assert pipe.chat.image_placement == "before_bos" and pipe.chat.kind == "qa"
    assert pipe.decoder.cfg.norm == ("layer" if name == "opt" else "rms")
    img = np.random.default_rng(0).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    px = pipe.tower.preprocessor(load_images([img])).views["eva"]
    # BLIP-2's processor: bicubic resize to a square ignoring aspect, CLIP mean/std. Compared in 8-bit
    # levels of the resized image: both resize with Pillow-style bicubic from the same uint8 pixels.
    proc = transformers.BlipImageProcessorPil(size={"height": 32, "width": 32})
    ref_px = proc(img, return_tensors="pt")["pixel_values"]
    std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
    assert ((px - ref_px).abs() * std * 255).max() <= 1.01  # at most one 8-bit level (rounding of the resize)

    emb = pipe.tower.from_pixels(ref_px)[0]  # the same pixels to both sides from here on
    assert emb.shape[0] == QUERIES
    mp = pipe.chat.build(pipe.tokenizer, [{"role": "user", "content": "What is this?"}], [QUERIES])
    ids = torch.tensor([[IMAGE_ID if i < 0 else i for i in mp.input_ids]])
    assert ids[0, :QUERIES].eq(IMAGE_ID).all() and ids[0, QUERIES] == 1  # queries, then BOS
    assert pipe.tokenizer.decode(ids[0, QUERIES + 1:].tolist()) == "Question: What is this? Answer:"
    x = mp.embed(pipe.decoder.embed, [emb])
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=ref_px).logits[0, -1]
        ref64 = float64_copy(model)(input_ids=ids, pixel_values=ref_px.double()).logits[0, -1]
        ours = pipe.decoder(inputs_embeds=x)[0, -1]
    assert_within_noise(ours, ref, f"blip-2 ({name}) next-token logits", noise=max_abs(ref, ref64))
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=ref_px, max_new_tokens=24, min_new_tokens=24,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[0].tolist()
    ref_tokens = out[-24:]
    ours_tokens = list(generate_tokens(pipe.decoder, pipe.decoder.new_cache(max_len=96), prompt_embeds=x,
                                       gen_cfg=GenerationConfig(max_new_tokens=24)))
    assert ours_tokens == ref_tokens


def test_blip2_pipeline_answers_an_image(blip2):
    _, _, folder = blip2
    pipe = edgevlm.load(folder, quant="int8")
    out = pipe.generate(np.full((20, 30, 3), 127, np.uint8), "What colour?", max_new_tokens=4)
    assert out.visual_tokens == QUERIES and 1 <= len(out.token_ids) <= 4
