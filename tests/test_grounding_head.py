"""The grounding head: training it on a model (`edgevlm train grounding`), loading it, the Pipeline
writing its boxes into the answer after the decoder's box trigger, and its short answers fused with the
decoder's first answer token."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import edgevlm
from edgevlm.cli import main
from edgevlm.config import GroundingHeadConfig
from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.presets import get_preset
from edgevlm.runtime.boxes import Box, format_boxes, parse_boxes
from edgevlm.runtime.checkpoint import load_checkpoint, save_checkpoint
from edgevlm.runtime.grounding_head import (PREFIX, AnswerPrior, BoxWriter, GroundingHead, HeadQuestion, answer_ids,
                                             trigger_id)
from edgevlm.runtime.token_keep import select_cells
from edgevlm.train.data import build_split
from edgevlm.train.grounding import (HEAD_TASKS, answer_vocabulary, cell_targets, drop_cells, head_config_for,
                                     question_boxes)

SMALL = ["--n-scenes", "6", "--n-digits", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model's stage-1 checkpoint, then a head trained on it: (folder, its log)."""
    root = tmp_path_factory.mktemp("grounding")
    assert main(["train", "stage1", "--model", "tiny", "--out", str(root / "s1"), *SMALL, "--steps", "1",
                 "--batch-size", "2", "--json"]) == 0
    assert main(["train", "grounding", "--model", str(root / "s1" / "checkpoint"), "--out", str(root / "g"), *SMALL,
                 "--steps", "200", "--drop-share", "0.3", "--json"]) == 0
    return root / "g" / "checkpoint", json.loads((root / "g" / "log.json").read_text())


def test_training_fits_the_head_and_the_checkpoint_loads_with_it(trained):
    folder, log = trained
    # 6 scenes x up to 8 questions per task, 2 digits: 200 steps must bring the loss well below where it started
    assert log["final_loss"] < 0.5 * log["history"][0], (log["history"][0], log["final_loss"])
    assert log["images"] == 8 and log["questions_per_task"]["digit"] == 2
    assert all(log["questions_per_task"][t] >= 6 for t in ("ground", "count"))
    cfg, state = load_checkpoint(folder)
    assert cfg.grounding_head == head_config_for(get_preset("tiny"), answers=answer_vocabulary(HEAD_TASKS),
                                                 dropped_cells=True)
    assert len(cfg.grounding_head.answers) == 6 + 3 + 10
    assert cfg.grounding_head.first_cell == 10  # [s] 8 Q-Former queries [global], then the 4x4 grid
    pipe = edgevlm.load(folder)
    assert pipe.info()["grounding_head"]["grid"] == 4 and pipe.sources["grounding_head"] == "checkpoint"
    for k, v in pipe.grounding_head.state_dict().items():
        assert torch.equal(v, state[PREFIX + k].float()), k


def test_the_pipeline_writes_the_heads_boxes_after_the_trigger(trained, monkeypatch):
    folder, _ = trained
    pipe = edgevlm.load(folder)
    s = next(x for x in build_split("heldout", 4, 0, seed=0) if x.task == "ground")
    # The tiny decoder is random and never prints "[", so the trigger becomes whatever it prints first.
    first = pipe.generate(s.image, s.question, max_new_tokens=1).token_ids[0]
    make = pipe._head_helpers

    def helpers(*args):
        w, prior = make(*args)
        w.trigger = first
        return w, prior

    monkeypatch.setattr(pipe, "_head_helpers", helpers)
    out = pipe.generate(s.image, s.question, max_new_tokens=60)
    visual = pipe.tower.embed_each([s.image])[0]
    q = pipe.decoder.embed(torch.tensor(pipe.tokenizer.encode(s.question, add_bos=False)))
    boxes = pipe.grounding_head.boxes(visual, q)
    forced = pipe.tokenizer.encode(format_boxes(boxes)[1:], add_bos=False)
    assert out.token_ids[1: 1 + len(forced)] == forced and out.info["boxes_from_head"] == len(boxes) >= 1
    parsed = parse_boxes("[" + pipe.tokenizer.decode(out.token_ids[1: 1 + len(forced)]))
    assert len(parsed) == len(boxes)
    for a, b in zip(parsed, boxes):
        assert max(abs(u - v) for u, v in zip(a.as_tuple(), b.as_tuple())) <= 0.005 + 1e-9  # 2-decimal rounding
    # Several images: the decoder writes its own boxes.
    assert make([visual, visual], s.question, False) == (None, None)
    # Uniform token dropping keeps the same cells in every image: this head (trained with cells dropped)
    # reads those; FLIP's random cells it is not told about, so it stands aside.
    pipe.tower.set_token_keep(0.5)
    w, prior = make([pipe.tower.embed_each([s.image])[0]], s.question, False)
    assert torch.equal(w.cells, select_cells(1, 4, 0.5, "uniform")[0]) and torch.equal(prior.cells, w.cells)
    pipe.tower.set_token_keep(0.5, "random")
    assert make([visual], s.question, False) == (None, None)


def test_head_tensors_and_config_must_agree(trained, tmp_path):
    folder, _ = trained
    cfg, state = load_checkpoint(folder)
    plain = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    save_checkpoint(tmp_path / "no_tensors", cfg, plain)
    with pytest.raises(CheckpointError, match="hold no grounding_head"):
        edgevlm.load(tmp_path / "no_tensors")
    save_checkpoint(tmp_path / "no_config", dataclasses.replace(cfg, grounding_head=None), state)
    with pytest.raises(CheckpointError, match="no grounding_head"):
        edgevlm.load(tmp_path / "no_config")
    save_checkpoint(tmp_path / "narrow", dataclasses.replace(cfg, grounding_head=dataclasses.replace(
        cfg.grounding_head, width=64)), state)
    with pytest.raises(CheckpointError, match="do not fit"):
        edgevlm.load(tmp_path / "narrow")


def test_cell_targets_put_each_box_at_its_centre_cell():
    score, target = cell_targets([(0.1, 0.1, 0.3, 0.2), (0.6, 0.7, 0.9, 0.99)], grid=4)
    assert score.nonzero()[:, 0].tolist() == [0 * 4 + 0, 3 * 4 + 3]  # centres (0.2, 0.15) and (0.75, 0.845)
    assert target[15].tolist() == pytest.approx([0.6, 0.7, 0.9, 0.99])
    assert score.sum() == 2 and target[1:15].abs().sum() == 0


def test_head_decoding_keeps_one_box_per_object_and_at_least_one():
    cfg = GroundingHeadConfig(visual_width=16, first_cell=1, grid=2, width=8, layers=1, heads=2)
    head = GroundingHead(cfg)
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.copy_(torch.tensor([3.0, -1.0, -1.0, 1.0, 1.0]))  # every cell: sure, the same box
    visual, q = torch.randn(6, 16), torch.randn(3, 16)
    (box,) = head.boxes(visual, q)  # four identical boxes -> one
    assert box.as_tuple() == pytest.approx(tuple(torch.sigmoid(torch.tensor([-1.0, -1.0, 1.0, 1.0])).tolist()))
    with torch.no_grad():
        head.out.bias[0] = -6.0  # no cell above the threshold: the decoder asked for a box, so the best one
    assert len(head.boxes(visual, q)) == 1


def test_box_writer_fires_once_on_its_trigger_token():
    pipe = edgevlm.load("tiny")
    cfg = GroundingHeadConfig(visual_width=64, first_cell=10, grid=4, width=8, layers=1, heads=2, trigger="[")
    head = GroundingHead(cfg).eval()
    visual = pipe.tower.embed_each([build_split("heldout", 1, 0, seed=0)[0].image])[0]
    trig = trigger_id(cfg, pipe.tokenizer)
    assert trig == pipe.tokenizer.encode("[", add_bos=False)[0]
    w = BoxWriter(head, pipe.tokenizer, trig, visual, HeadQuestion(pipe.tokenizer, "Where is it?", pipe.decoder.embed,
                                                                   visual.device))
    assert w(trig + 1) == [] and w.boxes is None
    ids = w(trig)
    assert parse_boxes("[" + pipe.tokenizer.decode(ids)) and all(isinstance(b, Box) for b in w.boxes)
    assert w(trig) == []  # one box answer per generation
    with pytest.raises(ConfigError, match="must be one token"):
        trigger_id(dataclasses.replace(cfg, trigger="[["), pipe.tokenizer)


def test_a_grounding_head_needs_a_sphinx_grid():
    with pytest.raises(ConfigError, match="SPHINX fusion"):
        head_config_for(get_preset("llava-1.5"))
    tiny = get_preset("tiny")
    with pytest.raises(ConfigError, match="do not fit"):
        dataclasses.replace(tiny, grounding_head=GroundingHeadConfig(visual_width=64, first_cell=200, grid=4))


def test_convert_carries_the_head(trained, tmp_path):
    from edgevlm.runtime.convert import convert

    folder, _ = trained
    cfg, state = load_checkpoint(folder)
    out_cfg, out_state = load_checkpoint(convert(folder, tmp_path / "converted", progress=False))
    assert out_cfg.grounding_head == cfg.grounding_head
    heads = sorted(k for k in state if k.startswith(PREFIX))
    assert heads == sorted(k for k in out_state if k.startswith(PREFIX))
    for k in heads:
        assert torch.equal(out_state[k].float(), state[k].float()), k


def test_the_demo_presets_head_reads_its_fusion_grid():
    demo = get_preset("demo")  # written out in presets.py, which cannot import the trainer's helper
    trained = head_config_for(dataclasses.replace(demo, grounding_head=None), answers=answer_vocabulary(HEAD_TASKS),
                              dropped_cells=True)
    # answer_weight is fitted after training (edgevlm train answer-weight), not by the head's trainer
    assert demo.grounding_head == dataclasses.replace(trained, answer_weight=demo.grounding_head.answer_weight)
    assert demo.grounding_head.answer_weight == 3.0


def test_the_answer_prior_shares_out_the_decoders_answer_mass_by_the_heads_choice():
    """Within the answer tokens the fused probability is p_decoder * p_head ** weight, renormalised to the
    decoder's own total for them; every other token keeps the decoder's probability."""
    cfg = GroundingHeadConfig(visual_width=16, first_cell=1, grid=2, width=8, layers=1, heads=2,
                              answers=("a", "b", "c"), answer_weight=2.0)
    head = GroundingHead(cfg).eval()
    with torch.no_grad():
        last = head.answer[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 2.0, -1.0]))  # the head prefers "b" whatever it sees
    q = torch.randn(3, 16)

    class Given:  # a question already embedded
        def get(self):
            return q

    ids = [4, 7, 9]
    prior = AnswerPrior(head, ids, torch.randn(6, 16), Given())
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(0)) * 3
    out = prior(logits)
    p_dec, p_out = logits.softmax(-1)[0], out.exp()[0]
    p_head = torch.tensor([0.0, 2.0, -1.0]).softmax(-1)
    want = p_dec[ids] * p_head ** 2
    want = want / want.sum() * p_dec[ids].sum()
    assert torch.allclose(p_out[ids], want, rtol=1e-5, atol=1e-7)
    others = [i for i in range(12) if i not in ids]
    assert torch.allclose(p_out[others], p_dec[others], rtol=1e-5, atol=1e-7)
    assert abs(float(p_out.sum()) - 1) < 1e-5
    assert prior.info["answer"] == "b" and prior.info["p"] == pytest.approx(float(p_head[1]), abs=1e-4)
    # The decoder all but rules the answers out (it opens a caption): its first token stays its own.
    sure = torch.full((1, 12), -20.0)
    sure[0, 0] = 10.0
    assert int(prior(sure).argmax()) == 0


def test_answers_must_start_with_distinct_tokens():
    pipe = edgevlm.load("tiny")  # a byte-level tokenizer: an answer's first token is its first letter
    cfg = GroundingHeadConfig(visual_width=64, first_cell=10, grid=4, answers=("red", "green", "3"))
    assert answer_ids(cfg, pipe.tokenizer) == [pipe.tokenizer.encode(w, add_bos=False)[0] for w in ("r", "g", "3")]
    with pytest.raises(ConfigError, match="distinct tokens"):
        answer_ids(dataclasses.replace(cfg, answers=("red", "round")), pipe.tokenizer)
    with pytest.raises(ConfigError, match="distinct"):
        GroundingHeadConfig(visual_width=64, first_cell=10, grid=4, answers=("red", "red"))


def test_the_pipeline_fuses_the_heads_answer_into_the_first_token(trained):
    """The first answer token is the argmax of the decoder's logits after the prior; without the head
    (``grounding_head=False``) it is the decoder's own."""
    folder, _ = trained
    pipe = edgevlm.load(folder, quant="none")
    s = next(x for x in build_split("heldout", 4, 0, seed=0) if x.task == "color")
    out = pipe.generate(s.image, s.question, max_new_tokens=1)
    x, _, embeds, _ = pipe._prepare(s.image, s.question, False, None)
    with torch.no_grad():
        logits = pipe.decoder(inputs_embeds=x, cache=pipe.decoder.new_cache(batch=1, max_len=x.shape[1] + 1),
                              last_only=True)[:, -1]
    _, prior = pipe._head_helpers(embeds, s.question, False)
    assert out.token_ids[0] == int(prior(logits).argmax())
    assert out.info["answer_head"]["answer"] in pipe.grounding_head.cfg.answers
    alone = edgevlm.load(folder, quant="none", grounding_head=False)
    assert alone.grounding_head is None and alone.info()["grounding_head"] is None
    solo = alone.generate(s.image, s.question, max_new_tokens=1)
    assert solo.token_ids[0] == int(logits.argmax()) and "answer_head" not in solo.info


def test_question_boxes_name_the_objects_a_question_is_about():
    samples = build_split("train", 8, 1, seed=0)
    seen = set()
    for s in samples:
        boxes = question_boxes(s)
        objs = s.meta.get("objects", [])
        if s.task == "color":
            (o,) = [o for o in objs if o["shape"] == s.meta["target"]]
            assert boxes == [o["box"]] and o["color"] == s.answer
        elif s.task == "shape":
            (o,) = [o for o in objs if o["color"] == s.meta["target"]]
            assert boxes == [o["box"]] and o["shape"] == s.answer
        elif s.task == "count":
            assert len(boxes) == int(s.answer)
        elif s.task == "ground":
            assert boxes == s.meta["boxes"]
        elif s.task in ("digit", "caption"):
            assert boxes == []
        seen.add(s.task)
    assert seen >= {"color", "shape", "count", "ground", "digit"}
    assert answer_vocabulary(("ground",)) == ()
    assert answer_vocabulary(("count",)) == tuple(str(i) for i in range(6))
    assert answer_vocabulary(HEAD_TASKS)[-10:] == tuple(str(i) for i in range(10))


def test_dropped_cells_are_filled_with_the_learned_stand_in():
    """A head trained with cells missing reads K kept cell tokens as the full grid with its ``dropped``
    vector at every other cell; drop_cells gathers exactly the kept cells' tokens."""
    cfg = GroundingHeadConfig(visual_width=16, first_cell=2, grid=3, width=8, layers=1, heads=2, answers=("a", "b"),
                              dropped_cells=True)
    head = GroundingHead(cfg).eval()
    with torch.no_grad():
        head.dropped.normal_()
    visual, q = torch.randn(2, 2 + 9 + 1, 16), torch.randn(2, 3, 16)
    short, cells = drop_cells(visual, 2, 3, torch.Generator().manual_seed(0))
    k = cells.shape[1]
    assert 3 <= k <= 8 and short.shape == (2, 2 + k, 16)
    for r in range(2):
        assert torch.equal(short[r, 2:], visual[r, 2 + cells[r]])
    full = visual.clone()
    for r in range(2):
        gone = [c for c in range(9) if c not in cells[r].tolist()]
        full[r, [2 + c for c in gone]] = head.dropped.detach()
    a, b = head(short, q, cells=cells), head(full, q)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-6)
    with pytest.raises(ConfigError, match="whole grid"):
        GroundingHead(dataclasses.replace(cfg, dropped_cells=False))(short, q, cells=cells)


def test_answer_weight_fit_writes_its_choice_into_the_checkpoint(trained, tmp_path, capsys):
    """`edgevlm train answer-weight --write` on a checkpoint: the chosen weight is one of the candidates,
    the one the replayed records favour, and lands in edgevlm.json with the weights untouched."""
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(trained[0], folder)
    before = (folder / "model.safetensors").read_bytes()
    assert main(["train", "answer-weight", "--model", str(folder), "--seeds", "5", "--n-scenes", "3", "--n-digits",
                 "2", "--weights", "0.5,2", "--write", "--json", "--csv", str(tmp_path / "aw.csv")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["chosen"] in (0.5, 2.0) and doc["current"] == 1.0
    acc = doc["accuracy"]
    assert acc[f"{doc['chosen']:g}"]["all"] >= max(acc["0.5"]["all"], acc["2"]["all"])
    cfg, _ = load_checkpoint(folder)
    assert cfg.grounding_head.answer_weight == doc["chosen"]
    assert cfg == dataclasses.replace(load_checkpoint(trained[0])[0], grounding_head=cfg.grounding_head)
    assert (folder / "model.safetensors").read_bytes() == before
    rows = (tmp_path / "aw.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and "answer_weight" in rows[0]  # decoder alone, 0.5, 2, head alone


def test_answer_weight_write_refuses_a_preset(capsys):
    assert main(["train", "answer-weight", "--model", "demo", "--write"]) != 0  # before loading anything
    assert "ConfigError: --write needs an edgevlm checkpoint folder" in capsys.readouterr().err
