"""How much the grounding head's short answers should count against the decoder's: ``answer_weight``.

:class:`~edgevlm.runtime.grounding_head.AnswerPrior` fuses the head's answer with the decoder's first
answer token as ``p_decoder * p_head ** answer_weight``. Which exponent is best is an empirical question
about two trained models, so it is fitted like any other hyper-parameter: on held-out draws that are not
the ones reported. One pass through the Pipeline records both sides' log-probabilities for every
short-answer question (colour, shape, count, digit); every candidate weight is then scored on those
records without running the model again::

    edgevlm train answer-weight --model demo --seeds 2,3,4 --csv bench/results/demo_answer_weight.csv

A question counts as right when the fused first token is the true answer's (the decoder writes the
rest of a longer word, e.g. ``tri|angle``). The decoder alone (weight 0) and the head alone (the head's
argmax) are reported beside the candidates, as references, and are not candidates themselves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
HEAD_TASKS = ("color", "shape", "count", "digit")


@dataclass(frozen=True)
class AnswerRecord:
    """One short-answer question: both sides' log-probabilities over the head's answers [K]."""

    seed: int
    task: str
    truth: int  # index of the true answer among the head's answers
    decoder_logp: torch.Tensor
    head_logp: torch.Tensor
    other_logp: float  # the decoder's best token outside the answers


def collect(pipe, samples: Sequence, seed: int, progress: bool = True) -> list[AnswerRecord]:
    """Run each sample's first answer token through ``pipe`` and keep what its answer prior saw. Samples
    whose answer is not one of the head's answers, or that the head did not weigh in on, are left out."""
    answers = list(pipe.grounding_head.cfg.answers)
    out = []
    for s in tqdm(samples, desc=f"answers of seed {seed}", unit="q", disable=not progress):
        if s.answer not in answers:
            continue
        info = pipe.generate(s.image, s.question, max_new_tokens=1).info.get("answer_head")
        if info is None:
            continue
        out.append(AnswerRecord(seed, s.task, answers.index(s.answer), torch.tensor(info["decoder_logp"]),
                                torch.tensor(info["head_logp"]), info["other_logp"]))
    return out


def accuracy(records: Iterable[AnswerRecord], weight: float | None) -> dict[str, tuple[int, int]]:
    """``{task: (right, asked)}`` and ``"all"`` at ``weight`` (None: the head alone)."""
    from edgevlm.runtime.grounding_head import fused_answer

    tally: dict[str, list[int]] = {}
    for r in records:
        pick = (int(r.head_logp.argmax()) if weight is None
                else fused_answer(r.decoder_logp, r.head_logp, r.other_logp, weight))
        for key in (r.task, "all"):
            t = tally.setdefault(key, [0, 0])
            t[0] += pick == r.truth
            t[1] += 1
    return {k: (v[0], v[1]) for k, v in tally.items()}


def choose(records: Sequence[AnswerRecord], weights: Sequence[float] = WEIGHTS) -> float:
    """The candidate weight with the most right answers over all tasks; ties go to the smaller weight
    (the one that overrides the decoder least)."""
    if not records:
        from edgevlm.errors import ConfigError

        raise ConfigError("no short-answer questions the head weighed in on: is there a grounding head with answers?")
    return max(sorted(weights), key=lambda w: (accuracy(records, w)["all"][0], -w))


__all__ = ["AnswerRecord", "collect", "accuracy", "choose", "WEIGHTS", "HEAD_TASKS"]
