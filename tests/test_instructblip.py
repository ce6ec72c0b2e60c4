"""InstructBLIP's instruction-aware Q-Former, tower level, against transformers'
InstructBlipForConditionalGeneration.

A tiny random model (EVA ViT 40 px / patch 4 -> 101 tokens of width 80; Q-Former hidden 80 with
3 layers, cross-attention in layers 0 and 2, a 22-token WordPiece vocabulary and 24 positions; a tiny
LLaMA text side so that the folder is a valid checkpoint) is saved with save_pretrained, and an
InstructBlipProcessor (whose Q-Former tokenizer is a tiny BERT WordPiece) with its own
save_pretrained, which puts that tokenizer in ``qformer_tokenizer/``. Parity bounds are transformers'
own fp32 rounding noise, measured by running a float64 copy of its model on the same inputs
(:func:`edgevlm_testkit.assert_within_noise`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import edgevlm
from edgevlm import CheckpointError, ConfigError, ShapeError
from edgevlm.config import QFormerConfig, QFormerTextConfig, TowerConfig
from edgevlm.runtime import load_vision_tower
from edgevlm.runtime.connectors.qformer import QFormer
from edgevlm.runtime.embed_cache import image_digest, instruction_digest
from edgevlm.runtime.qformer_tokenizer import (
    QFORMER_TOKENIZER_DIR, QFormerTokenizer, find_qformer_tokenizer, load_qformer_tokenizer,
)
from edgevlm.runtime.readers.hf_connectors import blip2_connector_from_hf
from edgevlm.runtime.readers.safetensors_io import load_safetensors_dir, read_json
from edgevlm.runtime.tower import VisionTowerModel, build_tower_model
from edgevlm_testkit import (BYTE_VOCAB, IMAGE_ID, assert_close_rel, assert_differs, assert_within_noise,
                             float64_copy, max_abs, randomize_params, write_byte_tokenizer)

transformers = pytest.importorskip("transformers")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "in", "the", "image", "describe", "?", ".",
         "a", "cat", "##s", "dog", "photo", "short", "##ly", "answer", ","]
N_QUERIES, QF_HIDDEN, TEXT_HIDDEN, MAX_POS = 6, 80, 32, 24
PROMPTS = ["What is in the image?", "a cat", "Describe the photo shortly, answer in a short photo."]


def _bert(vocab):
    return transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


def _llm_tokenizer(tmp):
    """The language model's tokenizer: the testkit's byte-level vocabulary (<s> 1, </s> 2, <image> 259) as a
    transformers fast tokenizer that starts every text with BOS, as a LLaMA / Vicuna tokenizer does."""
    from tokenizers import Tokenizer, processors

    write_byte_tokenizer(tmp)
    tk = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<unk>")


@pytest.fixture(scope="module")
def ib_dir(tmp_path_factory):
    cfg = transformers.InstructBlipConfig(
        vision_config=dict(hidden_size=80, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                           image_size=40, patch_size=4),
        qformer_config=dict(hidden_size=QF_HIDDEN, num_hidden_layers=3, num_attention_heads=2, intermediate_size=96,
                            cross_attention_frequency=2, vocab_size=len(VOCAB), max_position_embeddings=MAX_POS),
        text_config=dict(model_type="llama", hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=BYTE_VOCAB,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        num_query_tokens=N_QUERIES, image_token_index=IMAGE_ID)
    torch.manual_seed(0)
    model = transformers.InstructBlipForConditionalGeneration(cfg).eval()
    randomize_params(model.vision_model, 3)
    randomize_params(model.qformer, 4, scale=0.2)
    randomize_params(model.language_projection, 5, scale=0.2)
    randomize_params(model.language_model, 6)
    with torch.no_grad():
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape))
    folder = tmp_path_factory.mktemp("instructblip")
    model.save_pretrained(folder)
    image_processor = transformers.BlipImageProcessor(size={"height": 40, "width": 40})
    processor = transformers.InstructBlipProcessor(image_processor=image_processor,
                                                   tokenizer=_llm_tokenizer(tmp_path_factory.mktemp("llm_tok")),
                                                   qformer_tokenizer=_bert(VOCAB), num_query_tokens=N_QUERIES)
    processor.save_pretrained(folder)
    return model, transformers.InstructBlipProcessor.from_pretrained(folder), folder


def _reference(model, px, ids, mask):
    with torch.no_grad():
        return model.get_image_features(px, qformer_input_ids=ids, qformer_attention_mask=mask).pooler_output


def test_processor_layout_and_tokenizer_match_transformers(ib_dir):
    _, processor, folder = ib_dir
    assert find_qformer_tokenizer(folder) == folder / QFORMER_TOKENIZER_DIR
    tok = QFormerTokenizer.from_folder(folder)
    want = processor(text=PROMPTS, padding=True, return_tensors="pt")
    ids, mask = tok(PROMPTS)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert torch.equal(ids, want["qformer_input_ids"]) and torch.equal(mask, want["qformer_attention_mask"].bool())
    assert ids[1, -1] == tok.pad_id == 0 and not mask[1, -1]  # "a cat" is padded on the right
    assert tok.encode("What is in the image?") == [2, 5, 6, 7, 8, 9, 11, 3]  # [CLS] ... [SEP], lower-cased
    # Longer than the position table: truncated to it, [CLS] first and [SEP] last kept.
    short = QFormerTokenizer.from_folder(folder / QFORMER_TOKENIZER_DIR, max_length=5)
    assert short.encode(" ".join(["cat"] * 30)) == [2, 14, 14, 14, 3]
    assert load_qformer_tokenizer(folder.parent) is None  # no tokenizer there


def test_instructblip_tower_matches_transformers(ib_dir):
    model, processor, folder = ib_dir
    tower = load_vision_tower(folder)
    assert tower.weights.random == [] and tower.takes_instruction
    qcfg = tower.config.connector.qformer
    assert qcfg.text == QFormerTextConfig(vocab_size=len(VOCAB), max_positions=MAX_POS, pad_id=0)
    assert tower.instruction_tokenizer is not None and tower.instruction_tokenizer.max_length == MAX_POS

    px = torch.randn(3, 3, 40, 40)
    enc = processor(text=PROMPTS, padding=True, return_tensors="pt")  # three lengths: a padded batch
    ids, mask = enc["qformer_input_ids"], enc["qformer_attention_mask"]
    assert not bool(mask.all())
    ref, ref64 = _reference(model, px, ids, mask), _reference(float64_copy(model), px.double(), ids, mask)
    noise = max_abs(ref, ref64)

    ours = tower.from_pixels(px, instruction=PROMPTS)  # text through the tower's own tokenizer
    assert ours.shape == (3, N_QUERIES, TEXT_HIDDEN) == ref.shape
    err = assert_within_noise(ours, ref, "instructblip tower vs transformers", noise=noise)
    print(f"instructblip tower: max abs err {err:.2e}, transformers fp32 noise {noise:.2e}")

    # The module API with transformers' own tensors (an int 0/1 mask), and the ids given per image.
    with torch.no_grad():
        direct = tower.model({"eva": px}, text=(ids, mask))
    assert_within_noise(direct, ref, "VisionTowerModel(text=(ids, int mask)) vs transformers", noise=noise)
    by_ids = tower.from_pixels(px, instruction=[r[m.bool()].tolist() for r, m in zip(ids, mask)])
    assert_within_noise(by_ids, ref, "instruction as token ids vs transformers", noise=noise)

    # One instruction alone (no padding) gives what it gave inside the padded batch.
    alone = tower.from_pixels(px[1:2], instruction=PROMPTS[1])
    assert_within_noise(alone[0], ours[1], "an instruction alone vs in a padded batch", noise=noise)


def test_query_path_without_instruction_matches_transformers(ib_dir):
    """No instruction: the Q-Former runs its BLIP-2 query path (transformers with input_ids=None)."""
    model, _, folder = ib_dir
    tower = load_vision_tower(folder)
    px = torch.randn(2, 3, 40, 40)

    def reference(m, x):
        with torch.no_grad():
            emb = m.vision_model(pixel_values=x).last_hidden_state
            q = m.query_tokens.expand(x.shape[0], -1, -1)
            out = m.qformer(input_ids=None, query_embeds=q, encoder_hidden_states=emb).last_hidden_state
            return m.language_projection(out[:, :N_QUERIES])

    ref, ref64 = reference(model, px), reference(float64_copy(model), px.double())
    assert_within_noise(tower.from_pixels(px), ref, "instructblip query path vs transformers",
                        noise=max_abs(ref, ref64))


def test_instructions_change_embeddings_and_cache_entries(ib_dir):
    _, _, folder = ib_dir
    tower = load_vision_tower(folder)
    img = np.random.default_rng(0).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    a = tower(img, instruction=PROMPTS[0])
    assert tower.last_timings["cached_images"] == 0
    b = tower(img, instruction=PROMPTS[1])
    assert tower.last_timings["cached_images"] == 0, "a second prompt on one image must not reuse the first"
    assert a.shape == b.shape == (1, N_QUERIES, TEXT_HIDDEN)
    assert_differs(a, b, "embeddings of one image under two instructions", rel=0.01)
    none = tower(img)  # the query path is its own entry too
    assert tower.last_timings["cached_images"] == 0 and len(tower.embedding_cache) == 3
    assert_differs(none, a, "embeddings without and with an instruction", rel=0.01)

    again = tower([img, img], instruction=[PROMPTS[1], PROMPTS[0]])  # both from the cache, each its own
    assert tower.last_timings["cached_images"] == 2
    assert torch.equal(again[0], b[0]) and torch.equal(again[1], a[0])

    key = image_digest(img)
    ids = tower.instruction_tokenizer.encode(PROMPTS[0])
    assert instruction_digest(key, None) == key  # towers without an instruction keep the plain image key
    assert instruction_digest(key, ids) != key != instruction_digest(key, ids[:-1])


def test_bad_instruction_inputs_raise(ib_dir):
    _, _, folder = ib_dir
    tower = load_vision_tower(folder)
    qf = tower.model.connector.qformer
    img_tokens = torch.randn(3, 101, 80)
    ids, mask = tower.tokenize_instruction(PROMPTS)  # [3, L]
    n, length = ids.shape
    with pytest.raises(ShapeError, match=rf"expected integer ids of shape \(3, L\) with L <= {MAX_POS}"):
        qf(img_tokens, None, ids[:2], mask[:2])
    with pytest.raises(ShapeError, match=rf"expected integer ids of shape \(3, L\).*got torch.int64 \({n * length},\)"):
        qf(img_tokens, None, ids.flatten(), None)
    with pytest.raises(ShapeError, match=r"expected integer ids.*got torch.float32"):
        qf(img_tokens, None, ids.float(), mask)
    with pytest.raises(ShapeError, match=rf"mask of shape \(3, {length}\) like the ids \(3, {length}\), got "
                                         rf"torch.bool \(3, {length - 1}\)"):
        qf(img_tokens, None, ids, mask[:, :-1])
    with pytest.raises(ShapeError, match=rf"L <= {MAX_POS}"):
        qf(img_tokens, None, torch.zeros(3, MAX_POS + 1, dtype=torch.long), None)
    with pytest.raises(ShapeError, match=rf"\[0, {len(VOCAB)}\)"):
        qf(img_tokens, None, torch.full((3, 4), len(VOCAB)), None)
    with pytest.raises(ShapeError, match=r"pair \(ids"):
        tower.model({"eva": torch.randn(3, 3, 40, 40)}, text=ids)
    with pytest.raises(ShapeError, match=r"one per image \(2\), got 3 instructions"):
        tower.from_pixels(torch.randn(2, 3, 40, 40), instruction=PROMPTS)

    # A tower whose Q-Former reads no instruction (BLIP-2) refuses one.
    c = tower.config.connector
    blip2_cfg = dataclasses.replace(tower.config, connector=dataclasses.replace(
        c, qformer=dataclasses.replace(c.qformer, text=None)))
    blip2 = VisionTowerModel(blip2_cfg)
    with pytest.raises(ConfigError, match="takes no instruction"):
        blip2({"eva": torch.randn(1, 3, 40, 40)}, text=(ids[:1], mask[:1]))
    with pytest.raises(ConfigError, match="takes no instruction"):
        blip2.connector.qformer(img_tokens[:1], None, ids[:1], mask[:1])


def test_config_round_trip_and_blip2_keys_unchanged():
    text = QFormerTextConfig(vocab_size=30, max_positions=8, pad_id=0)
    base = QFormerConfig(encoder="eva", encoder_width=12, num_queries=3, hidden=16, layers=2, heads=2, intermediate=32)
    with_text = dataclasses.replace(base, text=text)
    from edgevlm.config import QFormerConnectorConfig, ViTConfig

    eva = ViTConfig(name="eva", image_size=16, patch_size=4, width=12, depth=1, heads=2, mlp_dim=16)
    for qcfg in (base, with_text):
        tower = TowerConfig(encoders=(eva,), connector=QFormerConnectorConfig(qformer=qcfg, out_width=8))
        assert TowerConfig.from_dict(tower.to_dict()) == tower
    old = {k: v for k, v in base.__dict__.items() if k != "text"}  # a config written before the field existed
    assert QFormerConfig(**old) == base

    blip2_keys = set(QFormer(base).state_dict())
    assert not any("text" in k for k in blip2_keys)
    extra = set(QFormer(with_text).state_dict()) - blip2_keys
    assert extra == {"text_embed.weight", "text_pos_embed.weight"} | {
        f"layers.{i}.text_{m}.{p}" for i in range(2) for m in ("fc1", "fc2", "ffn_norm") for p in ("weight", "bias")}

    for bad in (dict(pad_id=30), dict(pad_id=-1), dict(vocab_size=0), dict(max_positions=0)):
        with pytest.raises(ConfigError):
            QFormerTextConfig(**{**dataclasses.asdict(text), **bad})


def test_reader_errors_name_key_and_shapes(ib_dir):
    _, _, folder = ib_dir
    hf = read_json(folder / "config.json")
    state = load_safetensors_dir(folder, keep=lambda k: "language_model" not in k)
    missing = dict(state)
    del missing["qformer.encoder.layer.1.output.dense.weight"]  # a text-FFN tensor
    with pytest.raises(CheckpointError, match=r"qformer\.encoder\.layer\.1\.output\.dense\.weight"):
        blip2_connector_from_hf(hf, missing, instruction=True)
    short_pos = dict(hf, qformer_config=dict(hf["qformer_config"], max_position_embeddings=MAX_POS - 1))
    with pytest.raises(CheckpointError, match=rf"position_embeddings\.weight.*\({MAX_POS}, {QF_HIDDEN}\).*"
                                              rf"\({MAX_POS - 1}, {QF_HIDDEN}\)"):
        blip2_connector_from_hf(short_pos, state, instruction=True)
    with pytest.raises(CheckpointError, match="none of the expected key prefixes"):  # not a BLIP-2 layout
        blip2_connector_from_hf(hf, state)

    # A tower state made from the checkpoint loads strictly; nothing is random.
    from edgevlm.runtime.readers.hf_models import read_instructblip_tower

    cfg, sd = read_instructblip_tower(folder)
    _, report = build_tower_model(cfg, sd, allow_random=False)
    assert report.random == []


def test_pipeline_feeds_the_user_prompt_to_the_qformer(ib_dir):
    _, _, folder = ib_dir
    pipe = edgevlm.load(folder)
    assert pipe.tower.takes_instruction and pipe.chat.image_placement == "before_bos"
    img = np.random.default_rng(2).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    for prompt in PROMPTS[:2]:
        out = pipe.generate(img, prompt, max_new_tokens=2)
        assert out.visual_tokens == N_QUERIES
        # the embeddings the Pipeline used are the ones the tower makes for exactly this instruction
        assert pipe.tower.last_timings["cached_images"] == 0
        assert torch.equal(pipe.tower.embed_each([img], instruction=prompt)[0],
                           pipe.tower.embed_each([img], instruction=prompt)[0])
        assert pipe.tower.last_timings["cached_images"] == 1
    assert len(pipe.tower.embedding_cache) == 2  # one entry per instruction, none for the bare image


def test_instructblip_greedy_tokens_and_logits_match_transformers_generate(ib_dir):
    """The whole model: InstructBlipProcessor's inputs (the query tokens' <image> slots, then BOS and the prompt;
    the prompt again for the Q-Former) into transformers' generate, against edgevlm.load(folder)."""
    from edgevlm.runtime.generate import GenerationConfig, generate_tokens
    from edgevlm.runtime.image_io import load_images

    model, processor, folder = ib_dir
    pipe = edgevlm.load(folder)
    prompt = PROMPTS[0]
    img = np.random.default_rng(5).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)  # the model's size: no resize
    enc = processor(images=img, text=prompt, return_tensors="pt")
    px = enc["pixel_values"]
    # the same pixels up to the rounding of the normalisation (no resize at 40x40): (x/255 - mean)/std in
    # another order rounds a few times, each at most an ulp of the result
    assert_close_rel(pipe.tower.preprocessor(load_images([img])).views["eva"], px, "preprocessed pixels", ulps=4)

    # The prompt the Pipeline lays out is the processor's: 6 query slots, BOS, the prompt's bytes -- no roles
    # (the folder's tokenizer has no chat template; see runtime/loader.py PLAIN_PROMPT_TEMPLATE).
    mp = pipe.chat.build(pipe.tokenizer, [{"role": "user", "content": prompt}], [N_QUERIES])
    ids = [IMAGE_ID if i < 0 else i for i in mp.input_ids]
    assert ids == enc["input_ids"][0].tolist()
    assert ids[N_QUERIES] == 1 and pipe.tokenizer.decode(ids[N_QUERIES + 1:]) == prompt

    emb = pipe.tower.from_pixels(px, instruction=prompt)[0]  # the Q-Former reads the prompt
    x = mp.embed(pipe.decoder.embed, [emb])
    with torch.no_grad():
        ref = model(**enc).logits[0, -1]
        ref64 = float64_copy(model)(**{**enc, "pixel_values": px.double()}).logits[0, -1]
        ours = pipe.decoder(inputs_embeds=x)[0, -1]
    assert_within_noise(ours, ref, "instructblip next-token logits vs transformers", noise=max_abs(ref, ref64))

    n = 24
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0].tolist()
    ref_tokens = out[-n:]
    ours_tokens = list(generate_tokens(pipe.decoder, pipe.decoder.new_cache(max_len=96), prompt_embeds=x,
                                       gen_cfg=GenerationConfig(max_new_tokens=n)))
    assert ours_tokens == ref_tokens

    # and the Pipeline itself on the image (its own preprocessing), stopping at EOS where transformers' did not
    answer = pipe.generate(img, prompt, max_new_tokens=n)
    got = answer.token_ids
    assert answer.visual_tokens == N_QUERIES and answer.prompt_tokens == len(ids)
    assert got == ref_tokens[:len(got)]
    assert len(got) == n or ref_tokens[len(got) - 1] == 2 or ref_tokens[len(got)] == 2  # stopped at EOS (2)


class _KeptVision(torch.nn.Module):
    """Stands in for InstructBLIP's ``vision_model``: its own embeddings, the kept rows (class token first),
    its encoder and post-LN -- so that transformers' get_image_features runs its Q-Former, instruction and
    all, on the kept patches."""

    def __init__(self, vm, rows):
        super().__init__()
        self.vm, self.rows = vm, rows

    def forward(self, pixel_values, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        vm = self.vm
        h = vm.embeddings(pixel_values)
        h = h.gather(1, self.rows[..., None].expand(-1, -1, h.shape[-1]))
        h = vm.post_layernorm(vm.encoder(inputs_embeds=h).last_hidden_state)
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=vm.post_layernorm(h[:, 0]))


def test_token_dropping_with_an_instruction_matches_transformers_on_kept_patches(ib_dir):
    import copy

    from edgevlm.runtime.token_keep import keep_count

    model, processor, folder = ib_dir
    tower = load_vision_tower(folder)
    px = torch.randn(3, 3, 40, 40)
    enc = processor(text=PROMPTS, padding=True, return_tensors="pt")
    ids, mask = enc["qformer_input_ids"], enc["qformer_attention_mask"]
    full = tower.from_pixels(px, instruction=PROMPTS)
    tower.set_token_keep(0.5, "random", seed=4)
    ours = tower.from_pixels(px, instruction=PROMPTS)
    cells = tower.kept_cells({"eva": px})
    assert cells.shape == (3, keep_count(100, 0.5)) and ours.shape == full.shape == (3, N_QUERIES, TEXT_HIDDEN)

    def reference(m, x):
        m = copy.deepcopy(m)
        rows = torch.cat([torch.zeros(3, 1, dtype=torch.long), cells + 1], dim=1)  # class token + kept patches
        m.vision_model = _KeptVision(m.vision_model, rows)
        return _reference(m, x, ids, mask)

    ref, ref64 = reference(model, px), reference(float64_copy(model), px.double())
    assert_within_noise(ours, ref, "instructblip tower on kept patches, with instructions, vs transformers fed them",
                        noise=max_abs(ref, ref64))
    assert_differs(ours, full, "kept patches vs all patches", rel=0.01)
