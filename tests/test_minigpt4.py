"""MiniGPT-4 (v1, Vicuna V0) through ``edgevlm.load(<folder with its eval config>)``, against a reference
assembled from transformers' own classes the way MiniGPT-4's code wires them.

Facts relied on, from Vision-CAIR/MiniGPT-4 @ d94738a7:

- ``minigpt4/models/minigpt4.py`` L118-145 (``encode_img``): ``ln_vision(visual_encoder(image))`` ->
  ``Qformer.bert(query_embeds=query_tokens, encoder_hidden_states=...)`` -> ``llama_proj`` (an
  ``nn.Linear(Q-Former hidden, LLM hidden)``, L73-75). transformers' ``Blip2VisionModel`` applies
  ``post_layernorm`` (LAVIS's ``ln_vision``) to its last hidden state, and ``Blip2QFormerModel`` is the
  query path of LAVIS's BertLMHeadModel, so vision_model -> qformer -> Linear is that pipeline.
- ``minigpt4.py`` L189-193: the MiniGPT-4 checkpoint is ``torch.load(ckpt)["model"]``, loaded with
  ``strict=False``; the released ``pretrained_minigpt4*.pth`` holds ``llama_proj.weight`` / ``.bias``.
- ``minigpt4/models/minigpt_base.py`` L68-81 (``get_context_emb``): the prompt is split at
  ``<ImageHere>``, each piece tokenised by its own ``llama_tokenizer(seg, add_special_tokens=(i == 0))``
  call (L72-76: BOS on the first piece only; a SentencePiece tokenizer gives every piece its dummy-prefix
  "▁"), embedded with the LLM's ``embed_tokens``, and the image embeddings put between the pieces;
  the result goes to ``llama_model.generate(inputs_embeds=...)`` (conversation.py L162, L171-174, L204-208).
- ``minigpt4/models/base_model.py`` L174: the Vicuna tokenizer is ``LlamaTokenizer.from_pretrained(path)``.
  The tests stand in a LLaMA-style ``tokenizer.json`` (BPE with byte fallback, a ``Metaspace`` pre-tokenizer
  with ``prepend_scheme="first"``, as ``LlamaTokenizerFast`` writes) loaded by transformers' AutoTokenizer.
- ``minigpt4/conversation/conversation.py`` L38-46 (``get_prompt``, SINGLE), L110-118
  (``CONV_VISION_Vicuna0``: system text, roles ``"Human: "`` / ``"Assistant: "``, sep ``"###"``), L151-156
  (``ask`` joins the question to the ``<Img><ImageHere></Img>`` message with a space), L160
  (``answer_prepare`` appends the empty Assistant turn), L228 (``upload_img``).
- ``eval_configs/minigpt4_eval.yaml`` L1-8 and ``minigpt4/configs/models/minigpt4_vicuna0.yaml`` L1-18: the
  ``model:`` fields ``arch``, ``model_type``, ``ckpt``, ``llama_model``, ``num_query_token``, ``image_size``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import edgevlm
from edgevlm.errors import CheckpointError, WeightsNotFoundError
from edgevlm.runtime.generate import GenerationConfig, generate_tokens
from edgevlm.runtime.source import resolve_source
from edgevlm.runtime.tower import load_vision_tower
from edgevlm_testkit import assert_within_noise, float64_copy, max_abs, randomize_params

transformers = pytest.importorskip("transformers")
pytest.importorskip("yaml")

QUERIES = 8  # MiniGPT-4 uses 32 (minigpt4_vicuna0.yaml L13); any count exercises the same path
QF_HIDDEN, LLM_HIDDEN, IMAGE_SIZE = 32, 64, 32
NEW_TOKENS = 16
QUESTION = "What is in the picture?"
# conversation.py L110-118 + get_prompt L38-46 after upload_img (L228), ask (L151-156), answer_prepare (L160):
EXPECTED_PROMPT = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once "
                   "I provide it to you. Please answer my questions.###Human: <Img><ImageHere></Img> "
                   "What is in the picture?###Assistant: ")
MEAN = (0.48145466, 0.4578275, 0.40821073)  # minigpt4/processors/blip_processors.py L19-25
STD = (0.26862954, 0.26130258, 0.27577711)


class NotATensor:  # pickled by reference: torch.load(weights_only=True) must refuse to import it
    pass


def _yaml(ckpt: str, llama_model: str, q_former_model: str | None, **override) -> str:
    model = {"arch": "minigpt4", "model_type": "pretrain_vicuna0", "max_txt_len": 160, "end_sym": '"###"',
             "low_resource": "True", "prompt_template": "'###Human: {} ###Assistant: '", "ckpt": f"'{ckpt}'",
             "llama_model": f"'{llama_model}'", "num_query_token": QUERIES, "image_size": IMAGE_SIZE}
    if q_former_model is not None:
        model["q_former_model"] = f"'{q_former_model}'"
    model.update(override)
    lines = ["model:", *(f"  {k}: {v}" for k, v in model.items()),
             "", "datasets:", "  cc_sbu_align:", "    vis_processor:", "      train:",
             '        name: "blip2_image_eval"', f"        image_size: {IMAGE_SIZE}",
             "", "run:", "  task: image_text_pretrain", ""]
    return "\n".join(lines)


def _write_llama_tokenizer(folder) -> int:
    """A small Vicuna-style tokenizer folder -> its vocabulary size. LLaMA's id layout (<unk> 0, <s> 1, </s> 2,
    <0x00>..<0xFF> 3..258, then pieces); the pieces and merges are learnt from the MiniGPT-4 prompt words, so
    "▁</Img>"-style splits depend on the prefix space as they do in the real vocabulary."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    space = "\u2581"
    learn = Tokenizer(models.BPE(unk_token="<unk>"))
    learn.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="always", split=True)
    learn.train_from_iterator([EXPECTED_PROMPT, "<Img></Img> image picture question answer"],
                              trainers.BpeTrainer(vocab_size=120, show_progress=False))
    learnt = json.loads(learn.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learnt["vocab"], key=learnt["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learnt["merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))
    return tk.get_vocab_size()


def _save_proj(path, weight: torch.Tensor, bias: torch.Tensor, **extra) -> None:
    torch.save({"model": {"llama_proj.weight": weight, "llama_proj.bias": bias}, **extra}, path)


@pytest.fixture(scope="module")
def minigpt4(tmp_path_factory):
    root = tmp_path_factory.mktemp("minigpt4")
    cfg = transformers.Blip2Config(
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        qformer_config=dict(hidden_size=QF_HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=48, vocab_size=100),
        # only the vision model, Q-Former and query tokens are read: a one-layer OPT keeps the folder small
        text_config=dict(model_type="opt", vocab_size=300, hidden_size=40, ffn_dim=48, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=40),
        num_query_tokens=QUERIES)
    torch.manual_seed(0)
    blip2 = transformers.Blip2ForConditionalGeneration(cfg).eval()
    randomize_params(blip2, 21)
    blip2.save_pretrained(root / "blip2")

    (root / "vicuna").mkdir()
    vocab = _write_llama_tokenizer(root / "vicuna")
    llama_cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=LLM_HIDDEN, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llama = transformers.LlamaForCausalLM(llama_cfg).eval()
    randomize_params(llama, 22)
    llama.save_pretrained(root / "vicuna")

    llama_proj = torch.nn.Linear(QF_HIDDEN, LLM_HIDDEN)  # minigpt4.py L73-75
    randomize_params(llama_proj, 23)
    folder = root / "minigpt4"
    folder.mkdir()
    _save_proj(folder / "pretrained_minigpt4_7b.pth", llama_proj.weight.detach(), llama_proj.bias.detach())
    # ckpt relative to the YAML's folder, llama_model relative with "..", q_former_model absolute
    (folder / "minigpt4_eval.yaml").write_text(_yaml("pretrained_minigpt4_7b.pth", "../vicuna", str(root / "blip2")))
    return {"root": root, "folder": folder, "blip2": blip2, "llama": llama, "llama_proj": llama_proj}


def _encode_img(blip2, llama_proj, pixels):
    """minigpt4.py L118-145 with transformers' BLIP-2 modules: [B, 3, H, W] -> [B, queries, LLM hidden]."""
    image_embeds = blip2.vision_model(pixel_values=pixels).last_hidden_state  # ln_vision(visual_encoder(x))
    atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    query_tokens = blip2.query_tokens.expand(image_embeds.shape[0], -1, -1)
    q = blip2.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds,
                      encoder_attention_mask=atts).last_hidden_state
    return llama_proj(q)


def _reference_seg_ids(vicuna, prompt: str) -> list[list[int]]:
    """minigpt_base.py L70-76 with transformers' AutoTokenizer on the Vicuna folder: split at <ImageHere>, one
    tokenizer call per piece, special tokens (BOS) on the first piece only."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(vicuna)
    return [tokenizer(seg, add_special_tokens=i == 0).input_ids for i, seg in enumerate(prompt.split("<ImageHere>"))]


def _layout(seg_ids: list[list[int]], tokens_per_image: int) -> list[int]:
    """get_context_emb's positions as MultimodalPrompt.input_ids writes them: -1 for each image position."""
    return [t for i, ids in enumerate(seg_ids) for t in ([-1] * tokens_per_image if i else []) + ids]


def _context_emb(llama, vicuna, prompt: str, img_list):
    """minigpt_base.py L68-81: the pieces' embeddings with the image embeddings between them."""
    seg_ids = _reference_seg_ids(vicuna, prompt)
    assert len(seg_ids) == len(img_list) + 1
    embed = llama.get_input_embeddings()
    seg_embs = [embed(torch.tensor([ids])) for ids in seg_ids]
    mixed = [e for pair in zip(seg_embs[:-1], img_list) for e in pair] + [seg_embs[-1]]
    return torch.cat(mixed, dim=1), seg_ids


def _minigpt4_pixels(img: np.ndarray) -> torch.Tensor:
    """blip2_image_eval (blip_processors.py L114-121) for an image already at the ViT's size: ToTensor, Normalize."""
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
    return ((x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)).unsqueeze(0)


def test_minigpt4_prompt_matches_its_conversation(minigpt4):
    pipe = edgevlm.load(minigpt4["folder"])
    assert resolve_source(minigpt4["folder"]).kind == "minigpt4"
    assert resolve_source(minigpt4["folder"] / "minigpt4_eval.yaml").kind == "minigpt4"
    assert (pipe.chat.kind, pipe.chat.image_placement, pipe.chat.image_token) == ("minigpt4", "placeholder",
                                                                                 "<ImageHere>")
    assert pipe.chat.render([{"role": "user", "content": QUESTION}], n_images=1) == EXPECTED_PROMPT
    parts = [{"type": "image"}, {"type": "text", "text": QUESTION}]  # the same turn as content parts
    assert pipe.chat.render([{"role": "user", "content": parts}], n_images=1) == EXPECTED_PROMPT
    assert pipe.chat.stop_strings == ("###",)  # demo.py L72 stop words, conversation.py L190

    assert pipe.chat.separate_segments  # the "minigpt4" format encodes each piece on its own

    mp = pipe.chat.build(pipe.tokenizer, [{"role": "user", "content": QUESTION}], [QUERIES])
    ref = _reference_seg_ids(minigpt4["root"] / "vicuna", EXPECTED_PROMPT)
    head, tail = EXPECTED_PROMPT.split("<ImageHere>")
    start = len(ref[0])
    assert mp.input_ids == _layout(ref, QUERIES) and mp.input_ids[0] == 1  # BOS on the first piece only
    assert mp.image_spans == [(start, start + QUERIES)]
    assert pipe.tokenizer.decode(mp.input_ids[1:start]) == head
    assert pipe.tokenizer.decode(mp.input_ids[start + QUERIES:]) == tail
    # The piece after the image is a string of its own: SentencePiece's dummy prefix starts it ("▁", "</Img>",
    # ...), where a continuation of the text before the image would start at "</Img>".
    after = mp.input_ids[start + QUERIES:]
    assert pipe.tokenizer.id_to_token(after[0]).startswith("\u2581")
    continued = dataclasses.replace(pipe.chat, separate_segments=False).build(
        pipe.tokenizer, [{"role": "user", "content": QUESTION}], [QUERIES])
    assert continued.input_ids[:start + QUERIES] == mp.input_ids[:start + QUERIES]
    assert continued.input_ids[start + QUERIES] != after[0]
    assert continued.input_ids[start + QUERIES:] == pipe.tokenizer.encode(tail, continuation=True)

    # Two images and a second turn: every piece after an image gets its own prefix, as get_context_emb's.
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "And the colour?"}]
    text = pipe.chat.render(msgs, n_images=2)
    assert text.count("<Img><ImageHere></Img> <Img><ImageHere></Img> What") == 1
    two = pipe.chat.build(pipe.tokenizer, msgs, [QUERIES, 3])
    ref = _reference_seg_ids(minigpt4["root"] / "vicuna", text)
    assert two.input_ids == ref[0] + [-1] * QUERIES + ref[1] + [-1] * 3 + ref[2]


def test_minigpt4_logits_and_greedy_tokens_match_reference(minigpt4):
    blip2, llama, proj = minigpt4["blip2"], minigpt4["llama"], minigpt4["llama_proj"]
    pipe = edgevlm.load(minigpt4["folder"])
    img = np.random.default_rng(0).integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    px = _minigpt4_pixels(img)
    with torch.no_grad():
        ref_img = _encode_img(blip2, proj, px)  # [1, QUERIES, LLM_HIDDEN]
        ref_img64 = _encode_img(float64_copy(blip2), float64_copy(proj), px.double())
        ours_img = pipe.tower.from_pixels(px)[0]
    assert_within_noise(ours_img, ref_img[0], "MiniGPT-4 image embeddings", noise=max_abs(ref_img, ref_img64))

    vicuna = minigpt4["root"] / "vicuna"
    llama64 = float64_copy(llama)
    with torch.no_grad():
        embs, seg_ids = _context_emb(llama, vicuna, EXPECTED_PROMPT, [ref_img])
        embs64, _ = _context_emb(llama64, vicuna, EXPECTED_PROMPT, [ref_img64])
        mp = pipe.chat.build(pipe.tokenizer, [{"role": "user", "content": QUESTION}], [QUERIES])
        assert mp.input_ids == _layout(seg_ids, QUERIES)  # get_context_emb's token layout
        x = mp.embed(pipe.decoder.embed, [ours_img])
        ref = llama(inputs_embeds=embs).logits[0, -1]
        ref64 = llama64(inputs_embeds=embs64).logits[0, -1]
        ours = pipe.decoder(inputs_embeds=x)[0, -1]
    assert_within_noise(ours, ref, "MiniGPT-4 next-token logits", noise=max_abs(ref, ref64))

    with torch.no_grad():  # conversation.py L204-208: llama_model.generate(inputs_embeds=...), greedy here
        out = llama.generate(inputs_embeds=embs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=None, pad_token_id=0)[0].tolist()
    ref_tokens = out[-NEW_TOKENS:]
    ours_tokens = list(generate_tokens(pipe.decoder, pipe.decoder.new_cache(max_len=256), prompt_embeds=x,
                                       gen_cfg=GenerationConfig(max_new_tokens=NEW_TOKENS)))
    assert ours_tokens == ref_tokens

    # End to end from the uint8 image (resizing a 32x32 image to 32x32 keeps its pixels): the pipeline's
    # answer is the reference's greedy continuation. This seed's continuation holds no stop (EOS, "#"),
    # so all NEW_TOKENS tokens are compared.
    text_ids = [t for t in ref_tokens if t < pipe.tokenizer.vocab_size]  # rows past the vocabulary have no text
    assert 2 not in ref_tokens and "#" not in pipe.tokenizer.decode(text_ids)
    answer = pipe.generate(img, QUESTION, max_new_tokens=NEW_TOKENS)
    assert answer.visual_tokens == QUERIES and list(answer.token_ids) == ref_tokens

    tower = load_vision_tower(minigpt4["folder"])  # CONTAINER_TOWERS["minigpt4"]
    with torch.no_grad():
        assert torch.equal(tower.from_pixels(px)[0], ours_img)


def _variant(minigpt4, tmp_path, *, ckpt="proj.pth", q_former_model="BLIP2", **override):
    """A second eval config beside a copy of the good llama_proj (``proj.pth``), over the same folders."""
    folder = tmp_path / "variant"
    folder.mkdir(parents=True)
    proj = minigpt4["llama_proj"]
    _save_proj(folder / "proj.pth", proj.weight.detach(), proj.bias.detach())
    qf = str(minigpt4["root"] / "blip2") if q_former_model == "BLIP2" else q_former_model
    (folder / "eval.yaml").write_text(_yaml(ckpt, str(minigpt4["root"] / "vicuna"), qf, **override))
    return folder


def test_minigpt4_bad_sources_raise_typed_errors_naming_the_field(minigpt4, tmp_path):
    proj = minigpt4["llama_proj"]
    w, b = proj.weight.detach(), proj.bias.detach()

    folder = _variant(minigpt4, tmp_path / "in")  # llama_proj reads 31 Q-Former channels, not 32
    _save_proj(folder / "proj.pth", w[:, :-1].clone(), b)
    with pytest.raises(CheckpointError, match=r"model\.ckpt.*llama_proj\.weight has shape \(64, 31\)"):
        edgevlm.load(folder)
    folder = _variant(minigpt4, tmp_path / "out")  # projects to 48, the Vicuna is 64 wide
    _save_proj(folder / "proj.pth", w[:48].clone(), b[:48].clone())
    with pytest.raises(CheckpointError, match=r"model\.ckpt.*projects to 48.*model\.llama_model"):
        edgevlm.load(folder)

    folder = _variant(minigpt4, tmp_path / "missing", ckpt="missing.pth")
    with pytest.raises(WeightsNotFoundError, match=r"model\.ckpt = 'missing\.pth'.*does not exist"):
        edgevlm.load(folder)

    url = ("https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"
           "blip2_pretrained_flant5xxl.pth")
    folder = _variant(minigpt4, tmp_path / "url", q_former_model=url)  # MiniGPT-4's default (minigpt4.py L150)
    with pytest.raises(CheckpointError, match=r"model\.q_former_model is a URL"):
        edgevlm.load(folder)
    folder = _variant(minigpt4, tmp_path / "unset", q_former_model=None)
    with pytest.raises(CheckpointError, match=r"model\.q_former_model is not set"):
        edgevlm.load(folder)

    folder = _variant(minigpt4, tmp_path / "pickle")  # needs code to unpickle: refused, not run
    _save_proj(folder / "proj.pth", w, b, config=NotATensor())
    with pytest.raises(CheckpointError, match=r"model\.ckpt.*refused.*weights_only=True"):
        edgevlm.load(folder)

    folder = _variant(minigpt4, tmp_path / "llama2", model_type="pretrain_llama2")  # another conversation
    with pytest.raises(CheckpointError, match=r"model\.model_type 'pretrain_llama2' is not supported"):
        edgevlm.load(folder)
    folder = _variant(minigpt4, tmp_path / "size", image_size=224)  # the ViT in q_former_model takes 32
    with pytest.raises(CheckpointError, match=r"model\.image_size is 224"):
        edgevlm.load(folder)
    folder = _variant(minigpt4, tmp_path / "queries", num_query_token=32)  # the config disagrees with the Q-Former
    with pytest.raises(CheckpointError, match=r"model\.num_query_token is 32"):
        load_vision_tower(folder)
