"""The grounding head: training it on a model (`edgevlm train grounding`), loading it, and the Pipeline
writing its boxes into the answer after the decoder's box trigger."""

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
from edgevlm.runtime.grounding_head import PREFIX, BoxWriter, GroundingHead, trigger_id
from edgevlm.train.data import build_split
from edgevlm.train.grounding import cell_targets, head_config_for

SMALL = ["--n-scenes", "6", "--n-digits", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model's stage-1 checkpoint, then a head trained on it: (folder, its log)."""
    root = tmp_path_factory.mktemp("grounding")
    assert main(["train", "stage1", "--model", "tiny", "--out", str(root / "s1"), *SMALL, "--steps", "1",
                 "--batch-size", "2", "--json"]) == 0
    assert main(["train", "grounding", "--model", str(root / "s1" / "checkpoint"), "--out", str(root / "g"), *SMALL,
                 "--steps", "60", "--json"]) == 0
    return root / "g" / "checkpoint", json.loads((root / "g" / "log.json").read_text())


def test_training_fits_the_head_and_the_checkpoint_loads_with_it(trained):
    folder, log = trained
    # 6 scenes x up to 8 grounding questions: 60 steps must bring the loss well below where it started
    assert log["final_loss"] < 0.5 * log["history"][0], (log["history"][0], log["final_loss"])
    assert log["questions"] > 6 and log["scenes"] == 6
    cfg, state = load_checkpoint(folder)
    assert cfg.grounding_head == head_config_for(get_preset("tiny"))
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
    make = pipe._box_writer

    def writer(*args):
        w = make(*args)
        w.trigger = first
        return w

    monkeypatch.setattr(pipe, "_box_writer", writer)
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
    # Several images, or token dropping, leave the grid incomplete: the decoder writes its own boxes.
    assert make([visual, visual], s.question, False) is None
    pipe.tower.set_token_keep(0.5)
    assert make([visual], s.question, False) is None


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
    w = BoxWriter(head, pipe.tokenizer, trig, visual, "Where is it?", pipe.decoder.embed)
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
    assert demo.grounding_head == head_config_for(dataclasses.replace(demo, grounding_head=None))
