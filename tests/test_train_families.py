"""``edgevlm train stage1|stage2`` beyond SPHINX fusion: an MLP projector (LLaVA), a Q-Former (BLIP-2) and a
perceiver resampler (xGen-MM), each on its own family's decoder (LLaVA: LLaMA; BLIP-2: OPT with learned
positions, LayerNorm, ReLU and biases; xGen-MM: Phi-3, whose fused qkv / gate_up are split on read, with
its decoupled biased head). Tiny random-weight models shaped like the presets train through the
connector's prepare / from_prepared split: the loss goes down, only the connector and LoRA change, and
the exported checkpoint loaded by ``edgevlm.load`` gives the logits training computed. LoRA reaches
every projection of every decoder family the readers know, and the CLI trains a transformers BLIP-2
folder whose language model is OPT."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from edgevlm_testkit import assert_within_noise, float64_copy, max_abs, randomize_params
from torch import nn

import edgevlm
from edgevlm.config import DecoderConfig, LoRAConfig, ModelConfig, QFormerTextConfig
from edgevlm.errors import ConfigError
from edgevlm.presets import DECODERS, get_preset
from edgevlm.runtime.checkpoint import load_checkpoint, save_checkpoint
from edgevlm.runtime.decoder import Decoder
from edgevlm.runtime.lora import LoRALinear, apply_lora, merge_lora
from edgevlm.runtime.readers import hf_decoders
from edgevlm.runtime.readers.hf_decoders import LM_HEAD_BIAS_KEY, config_from_hf
from edgevlm.train.data import build_split
from edgevlm.train.vlm import TrainConfig, VLMTrainer

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


def _trainer(cfg, pipe, samples, cache, stage: str, steps: int, init=None) -> VLMTrainer:
    lora = dict(lora_rank=4, lora_lr=1e-2) if stage == "stage2" else dict(lora_rank=0)
    # stage1's connector-only alignment gets a higher rate to move visibly in 6 steps
    tc = TrainConfig(stage=stage, steps=steps, batch_size=2, lr=5e-2 if stage == "stage1" else 1e-2, warmup=1,
                     autocast="none", text_batch=0, save_every=steps, **lora)
    return VLMTrainer(cfg, tc, tower_model=pipe.tower.model, decoder=pipe.decoder, tokenizer=pipe.tokenizer,
                      preprocessor=pipe.tower.preprocessor, samples=samples, init_state=init, feature_cache=cache)


def _fixed_batch_loss(tr: VLMTrainer, idx: list[int]) -> float:
    with torch.no_grad():
        return tr.vlm_loss(idx).item()


def _decoder_linears(decoder: nn.Module) -> set[str]:
    """Every projection inside the decoder's blocks (``lm_head`` and embeddings are not LoRA targets)."""
    return {n.removesuffix(".base") for n, m in decoder.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("layers.")}


def _assert_frozen(tower, decoder, tower_before, decoder_before, what: str) -> None:
    """Encoders and the decoder's own weights bit-identical; every connector tensor moved."""
    tower_after = tower.state_dict()
    for k, v in tower_before.items():
        if k.startswith("connector."):
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
    fixed1 = s1.batch_indices(0)
    before1 = _fixed_batch_loss(s1, fixed1)
    s1.train(tmp_path / "s1", progress=False)
    after1 = _fixed_batch_loss(s1, fixed1)
    assert after1 < before1 - 0.09, (before1, after1)
    _assert_frozen(tower, decoder, tower_before, decoder_before, f"{preset} stage 1")

    s2 = _trainer(cfg, pipe, samples, cache, "stage2", 8, init=s1.trainable_state())
    # LoRA wraps every projection of the family's blocks: OPT's biased q/k/v/o and fc1/fc2 (up/down),
    # Phi-3's q/k/v and gate/up as its reader split them out of qkv_proj / gate_up_proj.
    wrapped = {n for n, m in decoder.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == _decoder_linears(decoder)
    assert len(wrapped) == d.layers * (6 + d.mlp_gated)
    fixed2 = s2.batch_indices(0)
    before2 = _fixed_batch_loss(s2, fixed2)
    s2.train(tmp_path / "s2", progress=False)
    after2 = _fixed_batch_loss(s2, fixed2)
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
    img = images[ex.image]
    with torch.no_grad():
        # training side: cached encoder outputs -> connector -> per image -> LoRA-wrapped decoder (unmerged)
        vis = s2.visual_embeddings([ex.image])
        logits_train = decoder(inputs_embeds=ex.sequence.embed(decoder.embed, vis))[0, -1]
        # runtime side: the image through the loaded tower (preprocess, encoders, connector), merged decoder
        emb = loaded.tower.embed_each([img])
        logits_rt = loaded.decoder(inputs_embeds=ex.sequence.embed(loaded.decoder.embed, emb))[0, -1]
        # Both again in float64 from the same inputs: each side's fp32 rounding noise. The runtime side also
        # runs the encoders on its own (one image, not a batch of 16 as the cache did).
        v = s2.views_per_image[ex.image]
        prepared64 = {k: t[ex.image, :v].double() if t.is_floating_point() else t[ex.image, :v]
                      for k, t in s2.features.items()}
        t64, d64 = float64_copy(tower), float64_copy(decoder)
        vis64 = t64.per_image(t64.connector.from_prepared(prepared64), [v], [s2.image_sizes[ex.image]])
        logits_train64 = d64(inputs_embeds=ex.sequence.embed(d64.embed, vis64))[0, -1]
        pre = loaded.tower.preprocessor([img])
        lt64, ld64 = float64_copy(loaded.tower.model), float64_copy(loaded.decoder)
        per_view64 = lt64({k: x.double() for k, x in pre.views.items()}, pre.token_masks, order=pre.token_order)
        emb64 = lt64.per_image(per_view64, pre.views_per_image, pre.image_sizes)
        logits_rt64 = ld64(inputs_embeds=ex.sequence.embed(ld64.embed, emb64))[0, -1]
    assert_within_noise(emb[0], vis[0], f"{preset}: runtime vs training visual embeddings",
                        noise=max(max_abs(vis[0], vis64[0]), max_abs(emb[0], emb64[0])))
    assert_within_noise(logits_rt, logits_train, f"{preset}: runtime vs training last-position logits",
                        noise=max(max_abs(logits_train, logits_train64), max_abs(logits_rt, logits_rt64)))


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


def test_instructblip_qformer_is_refused():
    """An InstructBLIP Q-Former reads the question; the trainer feeds the connector none, so it refuses."""
    cfg = tiny_family("blip2")
    conn = cfg.tower.connector
    cfg = replace(cfg, tower=replace(cfg.tower, connector=replace(
        conn, qformer=replace(conn.qformer, text=QFormerTextConfig(vocab_size=64, max_positions=16)))))
    with pytest.raises(ConfigError, match="InstructBLIP"):
        VLMTrainer(cfg, TrainConfig(stage="stage1"), tower_model=None, decoder=None, tokenizer=None,
                   preprocessor=None, samples=[])


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
