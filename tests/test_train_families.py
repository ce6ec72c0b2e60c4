"""``edgevlm train stage1|stage2`` beyond SPHINX fusion: an MLP projector (LLaVA), a Q-Former (BLIP-2) and a
perceiver resampler (xGen-MM), each on its own family's decoder (LLaVA: LLaMA; BLIP-2: OPT with learned
positions, LayerNorm, ReLU and biases; xGen-MM: Phi-3, whose fused qkv / gate_up are split on read, with
its decoupled biased head). Tiny random-weight models shaped like the presets train through the
connector's prepare / from_prepared split: the loss goes down, only the connector and LoRA change, and
the exported checkpoint loaded by ``edgevlm.load`` gives the logits training computed. LoRA reaches
every projection of every decoder family the readers know, and the CLI trains a transformers BLIP-2
folder whose language model is OPT.

Sources as their readers load them, from the builders of their own test files: a transformers InstructBLIP
folder (the Q-Former reads each example's question, through the folder's ``qformer_tokenizer/``), a
transformers LLaVA-NeXT folder (any-resolution views packed per image) and a MiniGPT-4 eval config (BLIP-2's
Q-Former with ``llama_proj``, Vicuna); the CLI trains the InstructBLIP folder."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from edgevlm_testkit import assert_differs, assert_within_noise, float64_copy, max_abs, randomize_params
from torch import nn

import edgevlm
from edgevlm.config import DecoderConfig, LoRAConfig, ModelConfig, QFormerTextConfig
from edgevlm.errors import ConfigError
from edgevlm.presets import DECODERS, get_preset
from edgevlm.runtime.checkpoint import load_checkpoint, save_checkpoint
from edgevlm.runtime.decoder import Decoder
from edgevlm.runtime.connectors.base import split_prepared
from edgevlm.runtime.lora import LoRALinear, apply_lora, merge_lora
from edgevlm.runtime.qformer_tokenizer import pad_ids
from edgevlm.runtime.readers import hf_decoders
from edgevlm.runtime.readers.hf_decoders import LM_HEAD_BIAS_KEY, config_from_hf
from edgevlm.train.cli import TrainComponents, training_components
from edgevlm.train.data import build_split
from edgevlm.train.vlm import Example, TrainConfig, VLMTrainer

DATA = dict(n_scenes=16, n_digits=8, seed=0)  # 24 images, 1-6 questions each

# A tiny transformers text config per decoder family the readers know (hf_decoders.FAMILIES), read by
# that family's own row (config_from_hf), so the test decoders are what a real checkpoint of the family
# becomes: the default tiny tokenizer's 512 ids, width 64, 2 layers, 4 heads.
_TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=1024)
TINY_TEXT = {
    "llama": dict(model_type="llama", **_TINY, intermediate_size=128, num_key_value_heads=2, rms_norm_eps=1e-5),
    "mistral": dict(model_type="mistral", **_TINY, intermediate_size=128, num_key_value_heads=2, sliding_window=512),
    "phi3": dict(model_type="phi3", **_TINY, intermediate_size=128, num_key_value_heads=4,
                 original_max_position_embeddings=1024),
    "opt": dict(model_type="opt", **_TINY, ffn_dim=128, word_embed_proj_dim=64),
}
# preset -> (its decoder family, extra text-config keys). xGen-MM's reader folds open_flamingo's decoupled
# embedding and head into one biased lm_head (readers/xgenmm.py marks the config with LM_HEAD_BIAS_KEY).
FAMILY_DECODER = {"llava-1.5": ("llama", {}), "blip2": ("opt", {}), "xgen-mm": ("phi3", {LM_HEAD_BIAS_KEY: True})}


def tiny_decoder(preset: str) -> DecoderConfig:
    family, extra = FAMILY_DECODER[preset]
    return config_from_hf({**TINY_TEXT[family], **extra})


def tiny_family(preset: str) -> ModelConfig:
    """The preset's tower and prompt layout at test size: its encoder's kind and flags (LLaVA's
    penultimate layer without CLS, EVA, SigLIP without a class token) with small dims, its connector
    kind with small dims, and its family's tiny decoder. xGen-MM keeps its anyres views; its tile is
    224 px (32-px patches) so that the test images choose different grids: 3 or 5 views."""
    cfg = get_preset(preset)
    anyres = cfg.tower.views.kind == "anyres"
    enc = replace(cfg.tower.encoders[0], image_size=224 if anyres else 32, patch_size=32 if anyres else 8,
                  width=32, depth=2, heads=2, mlp_dim=64)
    conn = cfg.tower.connector
    small = {
        "mlp": lambda c: replace(c, in_width=32, hidden=64, out_width=64),
        "qformer": lambda c: replace(c, out_width=64, qformer=replace(
            c.qformer, encoder_width=32, num_queries=4, hidden=32, layers=2, heads=2, intermediate=64)),
        "resampler": lambda c: replace(c, in_width=32, out_width=64, depth=1, heads=2, head_dim=16, num_latents=6),
    }[conn.kind]
    tower = replace(cfg.tower, encoders=(enc,), connector=small(conn))
    return replace(cfg, name=f"tiny-{preset}", tower=tower, decoder=tiny_decoder(preset))


# preset -> visual tokens per view the connector must give: LLaVA's MLP keeps the encoder's 4x4 patch
# tokens (CLS dropped), BLIP-2's Q-Former its 4 queries, xGen-MM's resampler its 6 latents.
FAMILIES = {"llava-1.5": 16, "blip2": 4, "xgen-mm": 6}
# preset -> its decoder's (norm, mlp_act, mlp_gated, positions, projection biases, lm_head bias): the
# three decoders really differ, as the families' do.
DECODER_TRAITS = {"llava-1.5": ("rms", "silu", True, "rope", False, False),
                  "blip2": ("layer", "relu", False, "learned", True, False),
                  "xgen-mm": ("rms", "silu", True, "rope", False, True)}


def _train_config(stage: str, steps: int, **extra) -> TrainConfig:
    lora = dict(lora_rank=4, lora_lr=1e-2) if stage == "stage2" else dict(lora_rank=0)
    # stage1's connector-only alignment gets a higher rate to move visibly in 6 steps
    return TrainConfig(stage=stage, steps=steps, batch_size=2, lr=5e-2 if stage == "stage1" else 1e-2, warmup=1,
                       autocast="none", text_batch=0, save_every=steps, **lora, **extra)


def _trainer(cfg, pipe, samples, cache, stage: str, steps: int, init=None) -> VLMTrainer:
    return VLMTrainer(cfg, _train_config(stage, steps), tower_model=pipe.tower.model, decoder=pipe.decoder,
                      tokenizer=pipe.tokenizer, preprocessor=pipe.tower.preprocessor, samples=samples, init_state=init,
                      feature_cache=cache)


def _source_trainer(c: TrainComponents, samples, cache, stage: str, steps: int, init=None, **extra) -> VLMTrainer:
    """A trainer on what ``edgevlm train --model <source>`` trains (training_components), as the CLI builds it."""
    return VLMTrainer(c.config, _train_config(stage, steps, **extra), tower_model=c.tower, decoder=c.decoder,
                      tokenizer=c.tokenizer, preprocessor=c.preprocessor, samples=samples, init_state=init,
                      feature_cache=cache, instruction_tokenizer=c.instruction_tokenizer)


def _fixed_batch_loss(tr: VLMTrainer, idx: list[int]) -> float:
    with torch.no_grad():
        return tr.vlm_loss(idx).item()


def _train_on_fixed_batch(tr: VLMTrainer, out) -> tuple[float, float]:
    """Train ``tr`` into ``out`` -> its loss on its first batch before and after."""
    fixed = tr.batch_indices(0)
    before = _fixed_batch_loss(tr, fixed)
    tr.train(out, progress=False)
    return before, _fixed_batch_loss(tr, fixed)


def _decoder_linears(decoder: nn.Module) -> set[str]:
    """Every projection inside the decoder's blocks (``lm_head`` and embeddings are not LoRA targets)."""
    return {n.removesuffix(".base") for n, m in decoder.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("layers.")}


def _assert_frozen(tower, decoder, tower_before, decoder_before, what: str, idle: frozenset = frozenset()) -> None:
    """Encoders (and LLaVA-NeXT's newline) and the decoder's own weights bit-identical; every connector tensor
    moved, except the ``idle`` ones, which no output depends on and which must stay as they were."""
    tower_after = tower.state_dict()
    assert idle <= tower_before.keys(), f"{what}: idle tensors {sorted(idle - tower_before.keys())} do not exist"
    for k, v in tower_before.items():
        if k in idle:
            assert torch.equal(tower_after[k], v), f"{what}: {k} feeds no output, yet it changed"
        elif k.startswith("connector."):
            assert not torch.equal(tower_after[k], v), f"{what}: connector tensor {k} did not train"
        else:
            assert torch.equal(tower_after[k], v), f"{what}: frozen tower tensor {k} changed"
    dec_after = {k.replace(".base.", "."): v for k, v in decoder.state_dict().items() if "lora_" not in k}
    assert dec_after.keys() == decoder_before.keys()
    for k, v in decoder_before.items():
        assert torch.equal(dec_after[k], v), f"{what}: frozen decoder tensor {k} changed"


@pytest.mark.parametrize("preset", list(FAMILIES))
def test_family_stage1_stage2_train_only_the_connector_and_export(preset, tmp_path):
    cfg = tiny_family(preset)
    d = cfg.decoder
    assert (d.norm, d.mlp_act, d.mlp_gated, d.positions, d.attention_bias and d.mlp_bias, d.lm_head_bias) \
        == DECODER_TRAITS[preset]
    assert (d == DECODERS["tiny"]) == (preset == "llava-1.5")  # LLaMA's row reads to the tiny preset decoder
    pipe = edgevlm.load(cfg)
    # Seeded noise in every decoder tensor: nn.LayerNorm's unit weight and zero bias would let a dropped OPT
    # norm bias pass the export parity below, and nn.Embedding's N(0, 1) rows, tied to OPT's head, start
    # the loss at ~44 nats instead of ~ln(512) = 6.2 (real checkpoints have 0.02-scale embeddings).
    randomize_params(pipe.decoder, seed=7)
    samples = build_split("train", **DATA)
    images = list({id(s.image): s.image for s in samples}.values())  # feature-cache row i is images[i]
    tower, decoder = pipe.tower.model, pipe.decoder
    tower_before = {k: v.clone() for k, v in tower.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in decoder.state_dict().items()}
    cache = tmp_path / "features.safetensors"

    s1 = _trainer(cfg, pipe, samples, cache, "stage1", 6)
    assert not any(p.requires_grad for p in decoder.parameters())  # stage 1: the decoder is frozen
    # The visual positions of every example are the connector's output: tokens per view x the image's views.
    per_view = FAMILIES[preset]
    for ex in s1.examples:
        (start, end), = ex.sequence.image_spans
        assert end - start == per_view * s1.views_per_image[ex.image]
    if preset == "xgen-mm":  # anyres: images of other aspect choose other grids, so view counts differ
        assert sorted(set(s1.views_per_image)) == [3, 5]
    # Training is seeded and deterministic: the fixed-batch loss moves only by what training does, while
    # fp32 rounding moves a ~6.5-nat cross-entropy by ~1e-5. Connector-only alignment measured 0.28 (OPT),
    # 0.75 (Phi-3) and 1.16 (LLaMA) nats in 6 steps (the images reach the answers only through attention);
    # 0.09 is a third of the least.
    before1, after1 = _train_on_fixed_batch(s1, tmp_path / "s1")
    assert after1 < before1 - 0.09, (before1, after1)
    _assert_frozen(tower, decoder, tower_before, decoder_before, f"{preset} stage 1")

    s2 = _trainer(cfg, pipe, samples, cache, "stage2", 8, init=s1.trainable_state())
    # LoRA wraps every projection of the family's blocks: OPT's biased q/k/v/o and fc1/fc2 (up/down),
    # Phi-3's q/k/v and gate/up as its reader split them out of qkv_proj / gate_up_proj.
    wrapped = {n for n, m in decoder.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == _decoder_linears(decoder)
    assert len(wrapped) == d.layers * (6 + d.mlp_gated)
    before2, after2 = _train_on_fixed_batch(s2, tmp_path / "s2")
    # Connector + LoRA measured 1.63 (LLaMA), 1.70 (OPT) and 1.85 (Phi-3) nat drops in 8 steps (from about
    # ln(512) = 6.2, the tiny vocabulary's uniform loss); half a nat is under a third of the least and
    # ~10^4 x the rounding noise above.
    assert after2 < before2 - 0.5, (before2, after2)

    # Encoders and the decoder's own weights (biases, norms, learned positions included) are bit-identical
    # after both stages; every connector tensor and LoRA B moved.
    _assert_frozen(tower, decoder, tower_before, decoder_before, f"{preset} stage 2")
    lora_b = [p for n, p in decoder.named_parameters() if n.endswith("lora_B")]
    assert len(lora_b) == len(wrapped) and all(p.abs().max() > 0 for p in lora_b)

    ckpt = s2.export(tmp_path / "ckpt", half=False)
    loaded = edgevlm.load(ckpt)
    assert "LoRA r=4 merged" in loaded.sources["decoder"]
    ex = s2.examples[0]
    _assert_export_matches_training(s2, loaded, ex, images[ex.image], preset)


def _assert_export_matches_training(tr: VLMTrainer, loaded, ex: Example, img, what: str,
                                    question: str | None = None) -> torch.Tensor:
    """The exported checkpoint, loaded by ``edgevlm.load``, gives example ``ex``'s image ``img`` (and its
    ``question``, for a Q-Former that reads it: the runtime tokenises it with the exported Q-Former
    tokenizer) the visual embedding and last-position logits training computes, within the fp32 rounding
    noise of either side. Returns the training side's embedding ``[visual_tokens, D]``."""
    instructions = None if ex.instruction is None else [ex.instruction]
    v = tr.views_per_image[ex.image]
    with torch.no_grad():
        # training side: cached encoder outputs -> connector (with the question) -> per image -> LoRA-wrapped
        # decoder (unmerged)
        vis = tr.visual_embeddings([ex.image], instructions)
        logits_train = tr.decoder(inputs_embeds=ex.sequence.embed(tr.decoder.embed, vis))[0, -1]
        # runtime side: the image through the loaded tower (preprocess, encoders, connector), merged decoder
        emb = loaded.tower.embed_each([img], instruction=question)
        logits_rt = loaded.decoder(inputs_embeds=ex.sequence.embed(loaded.decoder.embed, emb))[0, -1]
        # Both again in float64 from the same inputs: each side's fp32 rounding noise. The runtime side also
        # runs the encoders on its own (one image, not a batch of 16 as the cache did).
        prepared64 = {k: t[ex.image, :v].double() if t.is_floating_point() else t[ex.image, :v]
                      for k, t in tr.features.items()}
        t64, d64 = float64_copy(tr.tower), float64_copy(tr.decoder)
        if instructions is None:
            per_view64 = t64.connector.from_prepared(prepared64)
        else:  # the instruction, one row per view
            text = pad_ids(instructions * v, tr.model_cfg.tower.connector.qformer.text.pad_id)
            per_view64 = t64.connector(*split_prepared(prepared64), text=text)
        vis64 = t64.per_image(per_view64, [v], [tr.image_sizes[ex.image]])
        logits_train64 = d64(inputs_embeds=ex.sequence.embed(d64.embed, vis64))[0, -1]
        pre = loaded.tower.preprocessor([img])
        text_rt = None
        if question is not None:
            ids = loaded.tower.instruction_tokenizer.encode(question)
            assert tuple(ids) == ex.instruction, f"{what}: the exported Q-Former tokenizer gives other ids"
            text_rt = pad_ids([ids] * sum(pre.views_per_image), loaded.tower.config.connector.qformer.text.pad_id)
        lt64, ld64 = float64_copy(loaded.tower.model), float64_copy(loaded.decoder)
        per_view64 = lt64({k: x.double() for k, x in pre.views.items()}, pre.token_masks, text=text_rt,
                          order=pre.token_order)
        emb64 = lt64.per_image(per_view64, pre.views_per_image, pre.image_sizes)
        logits_rt64 = ld64(inputs_embeds=ex.sequence.embed(ld64.embed, emb64))[0, -1]
    assert_within_noise(emb[0], vis[0], f"{what}: runtime vs training visual embeddings",
                        noise=max(max_abs(vis[0], vis64[0]), max_abs(emb[0], emb64[0])))
    assert_within_noise(logits_rt, logits_train, f"{what}: runtime vs training last-position logits",
                        noise=max(max_abs(logits_train, logits_train64), max_abs(logits_rt, logits_rt64)))
    return vis[0]


@pytest.mark.parametrize("family", list(hf_decoders.FAMILIES))
def test_lora_reaches_every_projection_of_each_decoder_family(family):
    """Default LoRA targets on each family's decoder (as its reader builds it): every projection of every
    block is wrapped (OPT's biased q/k/v/o and fc1/fc2, Phi-3's q/k/v and gate/up split from its fused
    tensors), biases stay frozen in the base, the wrapped model at init gives bit-identical logits, the
    factors receive gradients and nothing else in the blocks does, and merging keeps the biases."""
    assert TINY_TEXT.keys() == hf_decoders.FAMILIES.keys(), "a decoder family without a tiny config here"
    cfg = config_from_hf(TINY_TEXT[family])
    dec = Decoder(cfg)
    randomize_params(dec, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dec(input_ids=ids)
    linears = _decoder_linears(dec)
    biased = {n for n in linears if dec.get_submodule(n).bias is not None}
    assert bool(biased) == cfg.attention_bias  # OPT: every projection has a bias; the others none

    wrapped = apply_lora(dec, LoRAConfig(rank=2, alpha=4.0))
    assert set(wrapped) == linears and len(wrapped) == cfg.layers * (6 + cfg.mlp_gated)
    for fused, parts in hf_decoders.FAMILIES[family].fused:  # Phi-3's qkv_proj / gate_up_proj
        for part in parts:
            for i in range(cfg.layers):
                name = f"layers.{i}.{part.removesuffix('.weight')}"
                assert name in wrapped, f"{family}: {name} (a slice of {fused}) has no LoRA"
    with torch.no_grad():
        assert torch.equal(dec(input_ids=ids), ref), f"{family}: LoRA at init changed the logits"
    for n in biased:
        base = dec.get_submodule(n).base
        assert not base.weight.requires_grad and not base.bias.requires_grad

    torch.nn.functional.cross_entropy(dec(input_ids=ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    lora = {n: m for n, m in dec.named_modules() if isinstance(m, LoRALinear)}
    for n, m in lora.items():
        assert m.base.weight.grad is None and (m.base.bias is None or m.base.bias.grad is None), n
        assert m.lora_B.grad is not None and m.lora_B.grad.abs().max() > 0, f"{family}: {n}.lora_B got no gradient"
        # B = 0 at init, so A's gradient is exactly zero until B moves: it is in the graph all the same
        assert m.lora_A.grad is not None, f"{family}: {n}.lora_A is not in the graph"

    with torch.no_grad():  # a trained adapter: B moved
        for m in lora.values():
            m.lora_B.normal_(std=0.1)
    dec.zero_grad()
    torch.nn.functional.cross_entropy(dec(input_ids=ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert all(m.lora_A.grad.abs().max() > 0 for m in lora.values())
    # merged (W + s B A, the base's bias kept) and unmerged agree, compared in float64 so rounding cannot hide
    # a dropped bias
    d64 = float64_copy(dec)
    with torch.no_grad():
        unmerged = d64(input_ids=ids)
        merged = merge_lora(d64)(input_ids=ids)
    assert not any(isinstance(m, LoRALinear) for m in d64.modules())
    assert (merged - unmerged).abs().max() < 1e-9 * unmerged.abs().max()
    assert (unmerged - ref.double()).abs().max() > 1e-3  # the adapters do change the model


def test_instructblip_without_its_qformer_tokenizer_is_refused():
    """A Q-Former that reads the question needs its own tokenizer to read it; without one the trainer says so
    (it would otherwise train the query path alone, which the runtime never runs with a question)."""
    cfg = tiny_family("blip2")
    conn = cfg.tower.connector
    cfg = replace(cfg, tower=replace(cfg.tower, connector=replace(
        conn, qformer=replace(conn.qformer, text=QFormerTextConfig(vocab_size=64, max_positions=16)))))
    with pytest.raises(ConfigError, match=r"needs its Q-Former tokenizer: pass instruction_tokenizer=.*"
                                          r"qformer_tokenizer/"):
        VLMTrainer(cfg, TrainConfig(stage="stage1"), tower_model=None, decoder=None, tokenizer=None,
                   preprocessor=None, samples=[])


# ---- sources read as their loaders read them: InstructBLIP, LLaVA-NeXT, MiniGPT-4 ---------------

# Questions with one-word answers: the InstructBLIP fixture's LLaMA has 128 positions, which a caption's
# byte-level prompt and answer overrun (the trainer refuses such examples before the first step).
SHORT_TASKS = ("color", "shape", "count", "digit")


@pytest.fixture(scope="module")
def instructblip_folder(tmp_path_factory):
    """test_instructblip.py's tiny InstructBLIP folder (EVA 40 px; a 3-layer Q-Former with 6 queries reading a
    22-token WordPiece vocabulary from qformer_tokenizer/; LLaMA, 128 positions), made by that file's own
    fixture function. Imported here, when a test asks for it, so that the other tests need no transformers."""
    pytest.importorskip("transformers")
    from test_instructblip import ib_dir

    return ib_dir.__wrapped__(tmp_path_factory)[2]


@pytest.fixture(scope="module")
def minigpt4_folder(tmp_path_factory):
    """test_minigpt4.py's tiny MiniGPT-4 source (a BLIP-2 folder's ViT and 8-query Q-Former, llama_proj in a
    .pth, a Vicuna-style LLaMA and tokenizer, the eval YAML naming them), made by that file's fixture function."""
    pytest.importorskip("transformers")
    pytest.importorskip("yaml")
    from test_minigpt4 import minigpt4

    return minigpt4.__wrapped__(tmp_path_factory)["folder"]


def _images(samples) -> list:
    return list({id(s.image): s.image for s in samples}.values())  # feature-cache row i is images[i]


def test_instructblip_stage1_trains_the_qformer_on_each_question(instructblip_folder, tmp_path):
    """InstructBLIP: every example carries its own question as Q-Former ids (the folder's qformer_tokenizer),
    questions about one image are not packed into one conversation although pack=True, the fixed-batch loss
    goes down, and the Q-Former's instruction path trains: its word and position embeddings and the text
    feed-forwards moved; only the last block's text feed-forward, which feeds no output, did not."""
    c = training_components(instructblip_folder)
    assert c.instruction_tokenizer is not None and c.config.tower.connector.qformer.text is not None
    tower, decoder = c.tower, c.decoder
    tower_before = {k: v.clone() for k, v in tower.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in decoder.state_dict().items()}
    samples = build_split("train", **DATA)
    asked = [s for s in samples if s.task in SHORT_TASKS]

    cache = tmp_path / "features.safetensors"
    with pytest.raises(ConfigError, match=r"longest training example has \d+ positions .* max_seq_len 128"):
        _source_trainer(c, samples, cache, "stage1", 6)  # stage 1's captions: refused before any step
    tr = _source_trainer(c, samples, cache, "stage1", 6, tasks=SHORT_TASKS)  # the cache written above
    assert tr.cfg.pack  # asked for, not done: the embedding depends on the question (VLMTrainer._examples)
    assert len(tr.examples) == len(asked) > len(_images(asked))  # packing would have merged some of them
    q_tok = c.instruction_tokenizer
    assert [e.instruction for e in tr.examples] == [tuple(q_tok.encode(s.question)) for s in asked]
    assert len({e.instruction for e in tr.examples}) >= 5  # the questions really differ, as ids
    for ex in tr.examples:  # one question, one image slot of the Q-Former's 6 queries
        (start, end), = ex.sequence.image_spans
        assert end - start == 6

    # Connector-only, 6 steps: measured 0.215 nats (fp32 rounding moves this ~5.8-nat loss by ~1e-5); a third.
    before, after = _train_on_fixed_batch(tr, tmp_path / "s1")
    assert after < before - 0.07, (before, after)
    last = c.config.tower.connector.qformer.layers - 1
    idle = frozenset(f"connector.qformer.layers.{last}.text_{m}.{p}" for m in ("fc1", "fc2", "ffn_norm")
                     for p in ("weight", "bias"))
    _assert_frozen(tower, decoder, tower_before, decoder_before, "instructblip stage 1", idle=idle)


def test_instructblip_training_embedding_is_the_runtime_towers_for_its_question(instructblip_folder, tmp_path):
    """After stage 2 (Q-Former + LoRA), the exported checkpoint's tower given an example's image and question
    (tokenised by the exported qformer_tokenizer/) gives the embedding training used, and the logits; another
    question about the same image, or none, gives a different embedding: the question reached the Q-Former."""
    c = training_components(instructblip_folder)
    samples = build_split("train", **DATA)
    asked = [s for s in samples if s.task in SHORT_TASKS]
    tr = _source_trainer(c, samples, None, "stage2", 3, tasks=SHORT_TASKS)
    tr.train(tmp_path / "s2", progress=False)
    loaded = edgevlm.load(tr.export(tmp_path / "ckpt", half=False, write_extra=c.write_extra))
    assert loaded.tower.takes_instruction and loaded.chat == edgevlm.load(instructblip_folder).chat

    # two questions (different ids) about one image
    i, j = next((i, j) for i in range(len(asked)) for j in range(len(asked)) if asked[i].image is asked[j].image
                and tr.examples[i].instruction != tr.examples[j].instruction)
    ex, img = tr.examples[i], asked[i].image
    vis = _assert_export_matches_training(tr, loaded, ex, img, "instructblip", question=asked[i].question)
    with torch.no_grad():
        other_train = tr.visual_embeddings([ex.image], [tr.examples[j].instruction])[0]
    other_rt = loaded.tower.embed_each([img], instruction=asked[j].question)[0]
    query_path = loaded.tower.embed_each([img])[0]
    # The tiny WordPiece vocabulary reads most words as [UNK], so two questions can differ by one id: measured
    # 5e-4 to 2e-2 of the embedding's scale over this split's pairs. 1e-4 of the scale is ~800 fp32 ulps, far
    # above the rounding noise the agreement above was held to, and 5x below the least measured difference.
    assert_differs(other_train, vis, "training embeddings of one image under two questions", rel=1e-4)
    assert_differs(other_rt, vis, "runtime embedding under another question vs training's", rel=1e-4)
    assert_differs(query_path, vis, "runtime embedding without a question vs training's", rel=1e-4)


def test_cli_stage2_trains_a_transformers_instructblip_folder(instructblip_folder, tmp_path, capsys):
    """`edgevlm train stage2 --model <transformers InstructBLIP folder> --tasks ...`: the export carries the
    Q-Former tokenizer (same ids), the folder's plain prompt (no roles; its tokenizer has no chat template) and
    its encoders bit for bit, and answers a question about an image."""
    from edgevlm.cli import main

    src = edgevlm.load(instructblip_folder)
    assert main(["train", "stage2", "--model", str(instructblip_folder), "--out", str(tmp_path / "run"),
                 "--steps", "2", "--batch-size", "2", "--lora-rank", "2", "--n-scenes", "3", "--n-digits", "1",
                 "--tasks", ",".join(SHORT_TASKS), "--json"]) == 0
    ckpt = json.loads(capsys.readouterr().out)["checkpoint"]
    pipe = edgevlm.load(ckpt)
    assert "LoRA r=2 merged" in pipe.sources["decoder"]
    assert pipe.chat == src.chat and pipe.tower.takes_instruction
    question = "What color is the cat in the image?"
    assert pipe.tower.instruction_tokenizer.encode(question) == src.tower.instruction_tokenizer.encode(question)
    for k, v in src.tower.model.encoders.state_dict().items():
        assert torch.equal(pipe.tower.model.encoders.state_dict()[k], v), f"encoder tensor {k} differs"
    conn_src, conn = src.tower.model.connector.state_dict(), pipe.tower.model.connector.state_dict()
    assert conn.keys() == conn_src.keys() and any(not torch.equal(conn[k], v) for k, v in conn_src.items())
    img = build_split("train", n_scenes=1, n_digits=0, seed=0)[0].image
    answer = pipe.generate(img, question, max_new_tokens=2)
    assert answer.visual_tokens == 6  # the Q-Former's queries, read with the question
    assert json.loads((tmp_path / "run" / "log.json").read_text())["train_config"]["tasks"] == list(SHORT_TASKS)


def test_llava_next_stage1_stage2_train_and_export(tmp_path):
    """LLaVA-NeXT (a transformers folder: CLIP on 40-px any-res tiles, 2x2 / 1x2 / 2x1 canvases, unpadded and
    packed with image_newline per image): stage 1 then stage 2 with LoRA lower the fixed-batch loss, only the
    projector and LoRA move (encoder, newline and decoder bit for bit), and the export loads with the trained
    tower tensors exactly and gives the packed embeddings and logits training computed."""
    pytest.importorskip("transformers")
    from test_llava_next import VARIANTS, build_folder

    folder = tmp_path / "llava_next"
    build_folder(folder, **VARIANTS["clip"])
    c = training_components(folder)
    assert c.config.tower.pack is not None and c.config.tower.views.kind == "anyres"
    tower, decoder = c.tower, c.decoder
    tower_before = {k: v.clone() for k, v in tower.state_dict().items()}
    assert "pack.newline" in tower_before  # transformers' image_newline: frozen, _assert_frozen holds it
    decoder_before = {k: v.clone() for k, v in decoder.state_dict().items()}
    samples = build_split("train", **DATA)
    images = _images(samples)
    cache = tmp_path / "features.safetensors"

    s1 = _source_trainer(c, samples, cache, "stage1", 6)
    # Each image's slot is its packed length: base view + its unpadded grid with a newline per row, which
    # depends on the image's aspect (scenes and digits differ).
    counts = set()
    for ex in s1.examples:
        (start, end), = ex.sequence.image_spans
        with torch.no_grad():
            assert end - start == s1.visual_embeddings([ex.image])[0].shape[0]
        counts.add(end - start)
    assert len(counts) > 1, counts
    before1, after1 = _train_on_fixed_batch(s1, tmp_path / "s1")
    # Projector-only, 6 steps: measured 1.15 nats (rounding moves this ~6-nat loss by ~1e-5); 0.35, under a third.
    assert after1 < before1 - 0.35, (before1, after1)
    _assert_frozen(tower, decoder, tower_before, decoder_before, "llava-next stage 1")

    s2 = _source_trainer(c, samples, cache, "stage2", 8, init=s1.trainable_state())
    before2, after2 = _train_on_fixed_batch(s2, tmp_path / "s2")
    assert after2 < before2 - 0.35, (before2, after2)  # projector + LoRA, 8 steps: measured 1.19 nats
    _assert_frozen(tower, decoder, tower_before, decoder_before, "llava-next stage 2")

    loaded = edgevlm.load(s2.export(tmp_path / "ckpt", half=False, write_extra=c.write_extra))
    assert "LoRA r=4 merged" in loaded.sources["decoder"] and loaded.chat == edgevlm.load(folder).chat
    trained, got = tower.state_dict(), loaded.tower.model.state_dict()
    assert got.keys() == trained.keys()
    for k, v in trained.items():
        assert torch.equal(got[k], v), f"exported tower tensor {k} is not the trained one"
    ex = max(s2.examples, key=lambda e: s2.views_per_image[e.image])
    _assert_export_matches_training(s2, loaded, ex, images[ex.image], "llava-next")


def test_minigpt4_stage1_trains_its_connector_and_exports(minigpt4_folder, tmp_path):
    """MiniGPT-4 (its eval YAML: BLIP-2's ViT and Q-Former, llama_proj, Vicuna): stage 1 lowers the fixed-batch
    loss with only the connector (Q-Former + llama_proj) moving, and the export loads with the trained tower
    tensors exactly, MiniGPT-4's ###Human prompt and the Vicuna tokenizer's ids, and gives the embeddings and
    logits training computed."""
    c = training_components(minigpt4_folder)
    tower, decoder = c.tower, c.decoder
    tower_before = {k: v.clone() for k, v in tower.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in decoder.state_dict().items()}
    samples = build_split("train", **DATA)

    tr = _source_trainer(c, samples, None, "stage1", 6)
    before, after = _train_on_fixed_batch(tr, tmp_path / "s1")
    # Connector-only, 6 steps: measured 0.40 nats (rounding moves this ~6.2-nat loss by ~1e-5); a third.
    assert after < before - 0.13, (before, after)
    _assert_frozen(tower, decoder, tower_before, decoder_before, "minigpt4 stage 1")

    loaded = edgevlm.load(tr.export(tmp_path / "ckpt", half=False, write_extra=c.write_extra))
    src = edgevlm.load(minigpt4_folder)
    assert loaded.chat == src.chat and loaded.chat.kind == "minigpt4"
    msgs = [{"role": "user", "content": "What is in the picture?"}]
    ids = loaded.chat.build(loaded.tokenizer, msgs, [8]).input_ids
    assert ids == src.chat.build(src.tokenizer, msgs, [8]).input_ids  # 8 queries: the fixture's
    trained, got = tower.state_dict(), loaded.tower.model.state_dict()
    assert got.keys() == trained.keys()
    for k, v in trained.items():
        assert torch.equal(got[k], v), f"exported tower tensor {k} is not the trained one"
    ex = tr.examples[0]
    _assert_export_matches_training(tr, loaded, ex, _images(samples)[ex.image], "minigpt4")


def test_cli_stage1_trains_a_checkpoint_folder(tmp_path, capsys):
    """`edgevlm train stage1 --model <folder>` trains that checkpoint (not a preset): the export keeps its
    frozen tensors bit for bit, carries its tokenizer, and loads with edgevlm.load."""
    from edgevlm.cli import main

    cfg = tiny_family("llava-1.5")
    src = edgevlm.load(cfg, seed=3)  # weights no preset load (seed 0) would give
    state = {f"tower.{k}": v for k, v in src.tower.model.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in src.decoder.state_dict().items()})
    folder = save_checkpoint(tmp_path / "mine", cfg, state)
    out = tmp_path / "run"
    assert main(["train", "stage1", "--model", str(folder), "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--n-scenes", "4", "--n-digits", "2", "--json"]) == 0
    ckpt = json.loads(capsys.readouterr().out)["checkpoint"]
    _, trained = load_checkpoint(ckpt)
    assert trained.keys() == state.keys()
    for k, v in state.items():
        if k.startswith("tower.connector."):
            assert not torch.equal(trained[k].float(), v), f"{k} did not train"
        else:
            assert torch.equal(trained[k], v), f"frozen {k} differs from the folder trained"
    pipe = edgevlm.load(ckpt)
    text = "Describe the image briefly."
    assert pipe.tokenizer.encode(text) == src.tokenizer.encode(text)
    emb = pipe.tower([build_split("train", n_scenes=1, n_digits=0, seed=0)[0].image])
    assert emb.shape == (1, 16, 64) and torch.isfinite(emb).all()
    log = json.loads((out / "log.json").read_text())
    assert log["train_config"]["steps"] == 2 and log["images"] == 6


def test_cli_stage2_trains_a_transformers_llava_folder(tmp_path, capsys):
    """`edgevlm train stage2 --model <transformers LLaVA folder>`: the export is a self-contained edgevlm
    checkpoint (every tensor, the folder's tokenizer and chat template) whose encoders are the folder's."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from edgevlm_testkit import BYTE_VOCAB, IMAGE_ID, randomize_params, write_byte_tokenizer

    from edgevlm.cli import main

    hf = transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=BYTE_VOCAB,
                         max_position_embeddings=1024),
        image_token_index=IMAGE_ID, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(hf).eval()
    randomize_params(model, 5)
    folder = tmp_path / "llava"
    model.save_pretrained(folder)
    write_byte_tokenizer(folder)
    src = edgevlm.load(folder, quant="none")

    assert main(["train", "stage2", "--model", str(folder), "--out", str(tmp_path / "run"), "--steps", "2",
                 "--batch-size", "2", "--lora-rank", "2", "--n-scenes", "3", "--n-digits", "1", "--json"]) == 0
    ckpt = json.loads(capsys.readouterr().out)["checkpoint"]
    pipe = edgevlm.load(ckpt)
    assert "LoRA r=2 merged" in pipe.sources["decoder"]
    assert pipe.chat == src.chat  # the folder's chat template and image placement came along
    text = "user: <image>\nHow many objects are there?\nassistant:"
    assert pipe.tokenizer.encode(text) == src.tokenizer.encode(text)
    for k, v in src.tower.model.encoders.state_dict().items():
        assert torch.equal(pipe.tower.model.encoders.state_dict()[k], v), f"encoder tensor {k} differs"
    img = build_split("train", n_scenes=1, n_digits=0, seed=0)[0].image
    assert pipe.tower([img]).shape == src.tower([img]).shape == (1, 16, 64)  # CLS dropped: 4x4 patches


def test_cli_stage2_trains_a_transformers_blip2_opt_folder(tmp_path, capsys):
    """`edgevlm train stage2 --model <transformers BLIP-2 folder with an OPT language model>`: the export
    loads with the folder's OPT decoder (LayerNorm, learned positions, biases), its Q-Former queries and its
    prompt layout; encoders, biases, norms and positions are the folder's bit for bit, and the LoRA-merged
    projections moved."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from edgevlm_testkit import BYTE_VOCAB, IMAGE_ID, write_byte_tokenizer

    from edgevlm.cli import main

    hf = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            encoder_hidden_size=32, vocab_size=100),
        text_config=dict(model_type="opt", vocab_size=BYTE_VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        num_query_tokens=4, image_token_index=IMAGE_ID)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(hf).eval()
    randomize_params(model, 5)
    folder = tmp_path / "blip2"
    model.save_pretrained(folder)
    write_byte_tokenizer(folder)
    src = edgevlm.load(folder, quant="none")
    d = src.decoder.cfg
    assert (d.norm, d.mlp_gated, d.positions, d.attention_bias) == ("layer", False, "learned", True)

    assert main(["train", "stage2", "--model", str(folder), "--out", str(tmp_path / "run"), "--steps", "2",
                 "--batch-size", "2", "--lora-rank", "2", "--n-scenes", "3", "--n-digits", "1", "--json"]) == 0
    ckpt = json.loads(capsys.readouterr().out)["checkpoint"]
    pipe = edgevlm.load(ckpt, quant="none")
    assert "LoRA r=2 merged" in pipe.sources["decoder"]
    assert pipe.decoder.cfg == src.decoder.cfg and pipe.chat == src.chat
    for k, v in src.tower.model.encoders.state_dict().items():
        assert torch.equal(pipe.tower.model.encoders.state_dict()[k], v), f"encoder tensor {k} differs"
    conn_src, conn = src.tower.model.connector.state_dict(), pipe.tower.model.connector.state_dict()
    assert conn.keys() == conn_src.keys() and any(not torch.equal(conn[k], v) for k, v in conn_src.items())
    targets = {f"{n}.weight" for n in _decoder_linears(src.decoder)}
    got = pipe.decoder.state_dict()
    for k, v in src.decoder.state_dict().items():
        if k in targets:  # W + s B A: every adapter's B moved in the two steps
            assert not torch.equal(got[k], v), f"LoRA-merged {k} did not change"
        else:  # biases, LayerNorms, learned positions, embeddings (tied head)
            assert torch.equal(got[k], v), f"frozen decoder tensor {k} differs from the folder's"
    img = build_split("train", n_scenes=1, n_digits=0, seed=0)[0].image
    assert pipe.tower([img]).shape == src.tower([img]).shape == (1, 4, 64)  # the Q-Former's 4 queries
