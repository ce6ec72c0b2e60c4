"""Fitting the grounding head's answer_weight: replaying the answer prior's records must agree with the
prior itself, and the fit must pick what the records say."""

from __future__ import annotations

import pytest
import torch

from edgevlm.config import GroundingHeadConfig
from edgevlm.errors import ConfigError
from edgevlm.runtime.grounding_head import AnswerPrior, GroundingHead, fused_answer
from edgevlm.train.answer_weight import AnswerRecord, accuracy, choose

IDS = [4, 7, 9]


def _prior(weight: float, head_bias) -> AnswerPrior:
    cfg = GroundingHeadConfig(visual_width=16, first_cell=1, grid=2, width=8, layers=1, heads=2,
                              answers=("a", "b", "c"), answer_weight=weight)
    head = GroundingHead(cfg).eval()
    with torch.no_grad():
        head.answer[-1].weight.zero_()
        head.answer[-1].bias.copy_(torch.tensor(head_bias))
    q = torch.randn(3, 16)

    class Given:
        def get(self):
            return q

    return AnswerPrior(head, IDS, torch.randn(6, 16), Given())


@pytest.mark.parametrize("weight", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("seed", range(6))
def test_replaying_the_prior_info_picks_the_token_the_prior_makes_greedy(weight, seed):
    """fused_answer on the prior's info, at the prior's own weight, names the argmax of its output (or
    None when a token outside the answers wins), to the 4 decimals the info keeps."""
    g = torch.Generator().manual_seed(seed)
    prior = _prior(weight, (torch.randn(3, generator=g) * 2).tolist())
    logits = torch.randn(1, 12, generator=g) * 3
    out = prior(logits)
    top = int(out.argmax())
    info = prior.info
    pick = fused_answer(torch.tensor(info["decoder_logp"]), torch.tensor(info["head_logp"]), info["other_logp"], weight)
    assert pick == (IDS.index(top) if top in IDS else None)
    # and the info is the decoder's and the head's own log-probabilities
    assert torch.allclose(torch.tensor(info["decoder_logp"]), logits.log_softmax(-1)[0, IDS], atol=1e-4)
    assert torch.allclose(torch.tensor(info["head_logp"]).exp().sum(), torch.tensor(1.0), atol=1e-3)


def _record(task, truth, dec, head, other=-30.0):
    return AnswerRecord(0, task, truth, torch.tensor(dec).log_softmax(-1), torch.tensor(head).log_softmax(-1), other)


def test_the_fit_trusts_the_head_as_far_as_the_records_say():
    # Logits: the decoder favours the wrong count by 2.2 nats, the head the right one by 1.0, so only a
    # weight above 2.2 turns it round.
    wrong = _record("count", 0, [0.0, 2.2, -5.0], [1.0, 0.0, -5.0])
    # The decoder is right by 5 nats over "b", which the head favours by 0.9: weights up to 5.5 leave it.
    right = _record("color", 2, [-5.0, -5.0, 0.0], [0.0, 1.0, 0.1])
    recs = [wrong, right]
    assert accuracy(recs, 1.0) == {"count": (0, 1), "color": (1, 1), "all": (1, 2)}
    assert accuracy(recs, 3.0)["all"] == (2, 2)
    assert accuracy(recs, None)["all"] == (1, 2)  # the head alone gets the colour wrong
    assert choose(recs, (0.5, 1.0, 3.0, 4.0)) == 3.0  # ties go to the smaller weight
    assert choose(recs, (1.0, 2.0)) == 1.0


def test_a_token_outside_the_answers_keeps_its_place():
    # The decoder opens something else (a caption): no weight makes it one of the answers.
    r = _record("count", 1, [0.0, 0.0, 0.0], [0.0, 9.0, 0.0], other=0.0)
    assert fused_answer(r.decoder_logp, r.head_logp, r.other_logp, 100.0) is None
    assert accuracy([r], 100.0)["all"] == (0, 1)


def test_nothing_to_fit_is_an_error():
    with pytest.raises(ConfigError, match="no short-answer questions"):
        choose([])
