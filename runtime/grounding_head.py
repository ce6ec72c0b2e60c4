"""A grounding head: boxes read off the visual tokens, written into the decoder's answer.

A small LLM tuned for a few CPU-hours learns *when* to answer with a box, but printing coordinates digit
by digit from its hidden state is a readout it does not learn on that budget (the demo's boxes stayed
on one stock position; docs/training.md). The visual tokens do carry the boxes, so a small head reads
them directly, as LISA's mask decoder or VisionLLM's task decoders do, and is trained in minutes on the
frozen connector's tokens (:mod:`edgevlm.train.grounding`)::

    question ids -> decoder token embeddings      [L, D]  -> LayerNorm -> Q attention pools -> q [d]
    visual tokens of the image                    [T, D]  -> grid cells [first_cell : first_cell + g*g]
    cells -> LayerNorm -> Linear -> + position + q -> GELU             [g*g, d]
          -> ``layers`` pre-norm self-attention blocks                 [g*g, d]
          -> Linear -> (score logit, box)                              [g*g], [g*g, 4] (sigmoid, 0..1)

A cell scores high when an object the question asks about is centred in it; its box is that object's
``x1, y1, x2, y2`` relative to the padded square (the runtime's box convention, :mod:`.boxes`).

At generation time (:class:`BoxWriter`) the decoder runs as usual; when it emits the trigger token
that opens a box answer (``"["``), the head's boxes are written after it as forced tokens
(``0.40,0.26,0.51,0.37]``) and the decoder continues from there, so the answer, the streamed text and
the KV cache are exactly what the decoder would hold had it printed those digits itself.

With ``cfg.answers`` the same cells also answer short questions (which colour, which shape, how many,
which digit)::

    cells [g*g, d] -> (softmax(score) attention pool, mean, sum(sigmoid(score)) / 4) -> MLP -> logits [K]

With ``cfg.global_token`` the image's global token (the one just before the grid) joins the cells in
the self-attention blocks, and its output joins the answer's pooled features.

The summed cell probabilities are an expected object count, which a count answer needs and a softmax
pool alone cannot give. :class:`AnswerPrior` fuses these logits with the decoder's first answer token:
the decoder keeps its total probability for the ``answers`` tokens, and the head shares it out (product
of the two, the head's to the power ``answer_weight``). A caption or a box answer, which the decoder
does not open with one of these words, is left as it was.

Under token dropping the tokens hold only the kept cells. A head trained with cells missing
(``cfg.dropped_cells``, :func:`edgevlm.train.grounding.drop_cells`) puts a learned stand-in at every
dropped cell and reads the grid as before; any other head stands aside there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.config import GroundingHeadConfig
from edgevlm.errors import CheckpointError, ConfigError, ShapeError

from .boxes import Box, format_boxes, iou

PREFIX = "grounding_head."
NMS_IOU = 0.3  # the demo's objects never overlap; two cells boxing the same object overlap far more


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class HeadOutput(NamedTuple):
    scores: torch.Tensor  # [B, G] logit: an asked-for object is centred in this cell
    boxes: torch.Tensor  # [B, G, 4] that object's x1, y1, x2, y2 in 0..1
    answers: torch.Tensor | None  # [B, K] logits over cfg.answers (None without answers)


class GroundingHead(nn.Module):
    """``forward(visual [B, T, D], question [B, L, D], question_mask [B, L] bool) -> HeadOutput``."""

    def __init__(self, cfg: GroundingHeadConfig):
        super().__init__()
        self.cfg = cfg
        d, dv = cfg.width, cfg.visual_width
        self.question_norm = nn.LayerNorm(dv)
        self.query_pool = nn.Linear(dv, cfg.query_heads)  # one attention score per pool and token
        self.query = nn.Linear(cfg.query_heads * dv, d)
        self.cell_norm = nn.LayerNorm(dv)
        self.cell = nn.Linear(dv, d)
        self.pos = nn.Parameter(torch.randn(cfg.cells, d) * 0.02)
        if cfg.dropped_cells:  # stands in for each cell token dropping left out
            self.dropped = nn.Parameter(torch.zeros(dv))
        if cfg.global_token:
            self.global_pos = nn.Parameter(torch.randn(d) * 0.02)
        self.blocks = nn.ModuleList(_Block(d, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 5)
        if cfg.answers:
            n = 2 * d + 1 + (d if cfg.global_token else 0)
            self.answer = nn.Sequential(nn.LayerNorm(n), nn.Linear(n, d), nn.GELU(), nn.Linear(d, len(cfg.answers)))

    def forward(self, visual: torch.Tensor, question: torch.Tensor,
                question_mask: torch.Tensor | None = None, cells: torch.Tensor | None = None) -> HeadOutput:
        """``cells`` [B, K] (ascending): token dropping kept only these grid cells, so ``visual`` holds K
        cell tokens from ``first_cell``; the others are filled with the learned ``dropped`` vector
        (``cfg.dropped_cells``)."""
        c = self.cfg
        k = c.cells if cells is None else cells.shape[1]
        if visual.dim() != 3 or visual.shape[1] < c.first_cell + k or visual.shape[2] != c.visual_width:
            raise ShapeError(f"grounding head: visual tokens must be [B, >= {c.first_cell + k}, {c.visual_width}], "
                             f"got {list(visual.shape)}")
        if cells is not None and not c.dropped_cells:
            raise ConfigError("this grounding head was not trained with dropped cells (dropped_cells=False); "
                              "it needs the whole grid")
        if question.dim() != 3 or question.shape[0] != visual.shape[0] or question.shape[2] != c.visual_width:
            raise ShapeError(f"grounding head: question embeddings must be [{visual.shape[0]}, L, {c.visual_width}], "
                             f"got {list(question.shape)}")
        qn = self.question_norm(question)  # [B, L, D]
        scores = self.query_pool(qn)  # [B, L, Q]
        if question_mask is not None:
            scores = scores.masked_fill(~question_mask[..., None], float("-inf"))
        pooled = torch.einsum("blq,bld->bqd", scores.softmax(dim=1), qn).flatten(1)  # [B, Q*D]
        q = self.query(pooled)  # [B, d]
        grid = visual[:, c.first_cell: c.first_cell + k]  # [B, K, D]
        if cells is not None:
            full = self.dropped.to(grid.dtype).expand(grid.shape[0], c.cells, -1).clone()  # [B, G, D]
            grid = full.scatter(1, cells[..., None].expand(-1, -1, grid.shape[2]), grid)
        h = F.gelu(self.cell(self.cell_norm(grid)) + self.pos + q[:, None])  # [B, G, d]
        if c.global_token:  # the whole image's token, just before the grid, joins the cells
            g = visual[:, c.first_cell - 1]  # [B, D]
            h = torch.cat([F.gelu(self.cell(self.cell_norm(g)) + self.global_pos + q)[:, None], h], dim=1)
        for blk in self.blocks:
            h = blk(h)
        h = self.norm(h)
        whole = None
        if c.global_token:
            whole, h = h[:, 0], h[:, 1:]  # [B, d], [B, G, d]
        out = self.out(h)  # [B, G, 5]
        score = out[..., 0]
        answers = None
        if self.cfg.answers:
            pooled = [torch.einsum("bg,bgd->bd", score.softmax(-1), h), h.mean(1),
                      score.sigmoid().sum(-1, keepdim=True) / 4] + ([whole] if whole is not None else [])
            answers = self.answer(torch.cat(pooled, dim=-1))  # [B, K]
        return HeadOutput(score, out[..., 1:].sigmoid(), answers)

    @torch.inference_mode()
    def boxes(self, visual: torch.Tensor, question: torch.Tensor, cells: torch.Tensor | None = None) -> list[Box]:
        """Boxes for one image ``[T, D]`` (``cells`` [K]: its kept cells under token dropping) and one
        question ``[L, D]``, left to right (then top to bottom): every cell scoring above the threshold,
        overlapping duplicates suppressed; at least one."""
        out = self.single(visual, question, cells)
        prob, boxes = out.scores[0].float().sigmoid(), out.boxes[0].float()
        order = prob.argsort(descending=True).tolist()
        kept: list[Box] = []
        for i in order:
            if kept and prob[i] < self.cfg.threshold:
                break
            b = Box(*boxes[i].tolist())
            if all(iou(b, k) < NMS_IOU for k in kept):
                kept.append(b)
        return sorted(kept, key=lambda b: (b.x1, b.y1))

    @torch.inference_mode()
    def single(self, visual: torch.Tensor, question: torch.Tensor, cells: torch.Tensor | None = None) -> HeadOutput:
        """:meth:`forward` for one image ``[T, D]`` and one question ``[L, D]`` (batch of 1)."""
        p = next(self.parameters())
        return self(visual[None].to(p.device, p.dtype), question[None].to(p.device, p.dtype),
                    cells=None if cells is None else cells[None].to(p.device))


def build_grounding_head(cfg: GroundingHeadConfig, state: dict[str, torch.Tensor]) -> GroundingHead:
    """The head with its ``grounding_head.*`` tensors from ``state`` (all of them, exactly)."""
    head = GroundingHead(cfg)
    mine = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not mine:
        raise CheckpointError("the model config has a grounding_head section but the weights hold no "
                              f"{PREFIX}* tensors")
    want = head.state_dict()
    wrong = sorted(set(mine) ^ set(want)) or [k for k in mine if mine[k].shape != want[k].shape]
    if wrong:
        raise CheckpointError(f"the {PREFIX}* tensors do not fit the config's GroundingHeadConfig: "
                              f"{wrong[:3]} differ in name or shape")
    head.load_state_dict({k: v.float() for k, v in mine.items()})
    return head.eval()


def trigger_id(cfg: GroundingHeadConfig, tokenizer) -> int:
    """The token id of ``cfg.trigger`` (it must be one token: the head fires on a sampled id)."""
    ids = tokenizer.encode(cfg.trigger, add_bos=False)
    if len(ids) != 1:
        raise ConfigError(f"grounding head trigger {cfg.trigger!r} must be one token of this tokenizer, got {len(ids)}")
    return ids[0]


def answer_ids(cfg: GroundingHeadConfig, tokenizer) -> list[int]:
    """The first token id of each of ``cfg.answers``. The head weighs the decoder's first answer token,
    so the answers must start with distinct tokens (the decoder writes the rest, e.g. ``tri|angle``)."""
    firsts = [(tokenizer.encode(a, add_bos=False) or [None])[0] for a in cfg.answers]
    if None in firsts or len(set(firsts)) != len(firsts):
        raise ConfigError(f"grounding head answers {list(cfg.answers)} must start with distinct tokens of this "
                          f"tokenizer; their first tokens are {firsts}")
    return firsts


class HeadQuestion:
    """The question's token embeddings ``[L, D]``, worked out on first use (an answer that needs no head
    pays nothing), or None for a question with no tokens."""

    def __init__(self, tokenizer, text: str, embed: Callable[[torch.Tensor], torch.Tensor], device):
        self.tokenizer, self.text, self.embed, self.device = tokenizer, text, embed, device
        self._value: torch.Tensor | None = None
        self._done = False

    def get(self) -> torch.Tensor | None:
        if not self._done:
            self._done = True
            ids = self.tokenizer.encode(self.text, add_bos=False)
            if ids:
                with torch.inference_mode():
                    self._value = self.embed(torch.tensor(ids, device=self.device))
        return self._value


def _fuse(decoder_logp: torch.Tensor, head_logp: torch.Tensor, weight: float) -> torch.Tensor:
    """[K] log p_decoder + weight * log p_head, renormalised to the decoder's total for the answers."""
    fused = decoder_logp + weight * head_logp
    return fused - fused.logsumexp(-1) + decoder_logp.logsumexp(-1)


class AnswerPrior:
    """The head's answer fused into the decoder's first answer token, for one generation.

    ``__call__(logits [1, V]) -> log-probabilities [1, V]``: the decoder's total probability for the
    ``answers`` tokens is kept and shared out within them in proportion to
    ``p_decoder * p_head ** answer_weight``; every other token keeps the decoder's probability.
    ``info`` says what the head chose and with what probability, once it has run, with both sides'
    log-probabilities over the ``answers`` (and the decoder's best other token), so that another
    ``answer_weight`` can be tried without running the model again (:func:`fused_answer`)."""

    def __init__(self, head: GroundingHead, answer_token_ids: list[int], visual: torch.Tensor, question: HeadQuestion,
                 cells: torch.Tensor | None = None):
        self.head, self.visual, self.question, self.cells = head, visual, question, cells
        self.ids = torch.tensor(answer_token_ids, device=visual.device)
        self.info: dict | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        q = self.question.get()
        if q is None:
            return logits
        with torch.inference_mode():
            head = self.head.single(self.visual, q, self.cells).answers[0].float().log_softmax(-1).to(logits.device)
            logp = logits.float().log_softmax(-1)  # [1, V]
            mine = logp[0, self.ids]  # [K]
            fused = _fuse(mine, head, self.head.cfg.answer_weight)
            out = logp.clone()
            out[0, self.ids] = fused
        k, own = int(head.argmax()), int(mine.argmax())
        other = logp[0].clone()
        other[self.ids] = float("-inf")
        self.info = {"answer": self.head.cfg.answers[k], "p": round(float(head[k].exp()), 4),
                     "decoder_answer": self.head.cfg.answers[own],  # the decoder's own pick among the answers
                     "decoder_share": round(float(mine.logsumexp(-1).exp()), 4),
                     # what fusing at another answer_weight would need (edgevlm.train.answer_weight)
                     "decoder_logp": [round(float(v), 4) for v in mine],
                     "head_logp": [round(float(v), 4) for v in head],
                     "other_logp": round(float(other.max()), 4)}
        return out


def fused_answer(decoder_logp: torch.Tensor, head_logp: torch.Tensor, other_logp: float, weight: float) -> int | None:
    """The index among the answers that :class:`AnswerPrior` at ``answer_weight=weight`` makes the greedy
    first token, from its ``info`` (``decoder_logp`` [K], ``head_logp`` [K], ``other_logp``); None when a
    token outside the answers still wins (the fusion keeps the answers' total, so it cannot change that)."""
    fused = _fuse(decoder_logp, head_logp, weight)
    k = int(fused.argmax())
    return k if float(fused[k]) > other_logp else None


class BoxWriter:
    """The forced continuation of a box answer for one generation (at most once per answer).

    ``__call__(token)`` -> the token ids to force after ``token``: the head's boxes after the ``trigger``
    id (``"0.40,0.26,0.51,0.37]"``), else nothing."""

    def __init__(self, head: GroundingHead, tokenizer, trigger: int, visual: torch.Tensor, question: HeadQuestion,
                 cells: torch.Tensor | None = None):
        self.head, self.tokenizer, self.trigger, self.visual, self.question = head, tokenizer, trigger, visual, question
        self.cells = cells
        self.boxes: list[Box] | None = None  # what the head wrote, once it has

    def __call__(self, token: int) -> list[int]:
        if token != self.trigger or self.boxes is not None:
            return []
        q = self.question.get()  # [L, D]
        if q is None:
            return []
        self.boxes = self.head.boxes(self.visual, q, self.cells)
        text = format_boxes(self.boxes, self.head.cfg.decimals)
        return self.tokenizer.encode(text[len("["):], add_bos=False)


__all__ = ["GroundingHead", "HeadOutput", "build_grounding_head", "trigger_id", "answer_ids", "BoxWriter",
           "AnswerPrior", "HeadQuestion", "PREFIX", "fused_answer"]
