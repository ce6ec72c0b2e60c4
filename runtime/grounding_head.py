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
"""

from __future__ import annotations

from collections.abc import Callable

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


class GroundingHead(nn.Module):
    """``forward(visual [B, T, D], question [B, L, D], question_mask [B, L] bool) -> (logits [B, G], boxes [B, G, 4])``."""

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
        self.blocks = nn.ModuleList(_Block(d, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 5)

    def forward(self, visual: torch.Tensor, question: torch.Tensor,
                question_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        if visual.dim() != 3 or visual.shape[1] < c.first_cell + c.cells or visual.shape[2] != c.visual_width:
            raise ShapeError(f"grounding head: visual tokens must be [B, >= {c.first_cell + c.cells}, {c.visual_width}], "
                             f"got {list(visual.shape)}")
        if question.dim() != 3 or question.shape[0] != visual.shape[0] or question.shape[2] != c.visual_width:
            raise ShapeError(f"grounding head: question embeddings must be [{visual.shape[0]}, L, {c.visual_width}], "
                             f"got {list(question.shape)}")
        qn = self.question_norm(question)  # [B, L, D]
        scores = self.query_pool(qn)  # [B, L, Q]
        if question_mask is not None:
            scores = scores.masked_fill(~question_mask[..., None], float("-inf"))
        pooled = torch.einsum("blq,bld->bqd", scores.softmax(dim=1), qn).flatten(1)  # [B, Q*D]
        q = self.query(pooled)  # [B, d]
        cells = visual[:, c.first_cell: c.first_cell + c.cells]  # [B, G, D]
        h = F.gelu(self.cell(self.cell_norm(cells)) + self.pos + q[:, None])  # [B, G, d]
        for blk in self.blocks:
            h = blk(h)
        out = self.out(self.norm(h))  # [B, G, 5]
        return out[..., 0], out[..., 1:].sigmoid()

    @torch.inference_mode()
    def boxes(self, visual: torch.Tensor, question: torch.Tensor) -> list[Box]:
        """Boxes for one image ``[T, D]`` and one question ``[L, D]``, left to right (then top to bottom):
        every cell scoring above the threshold, overlapping duplicates suppressed; at least one."""
        p = next(self.parameters())
        logits, boxes = self(visual[None].to(p.device, p.dtype), question[None].to(p.device, p.dtype))
        prob, boxes = logits[0].float().sigmoid(), boxes[0].float()
        order = prob.argsort(descending=True).tolist()
        kept: list[Box] = []
        for i in order:
            if kept and prob[i] < self.cfg.threshold:
                break
            b = Box(*boxes[i].tolist())
            if all(iou(b, k) < NMS_IOU for k in kept):
                kept.append(b)
        return sorted(kept, key=lambda b: (b.x1, b.y1))


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


class BoxWriter:
    """The forced continuation of a box answer for one generation (at most once per answer).

    ``__call__(token)`` -> the token ids to force after ``token``: the head's boxes after the ``trigger``
    id (``"0.40,0.26,0.51,0.37]"``), else nothing. The question is tokenised and embedded (``embed``: ids
    to the decoder's embeddings) only when the trigger comes, so answers without a box pay nothing."""

    def __init__(self, head: GroundingHead, tokenizer, trigger: int, visual: torch.Tensor, question: str,
                 embed: Callable[[torch.Tensor], torch.Tensor]):
        self.head, self.tokenizer, self.trigger, self.visual = head, tokenizer, trigger, visual
        self.question, self.embed = question, embed
        self.boxes: list[Box] | None = None  # what the head wrote, once it has

    def __call__(self, token: int) -> list[int]:
        if token != self.trigger or self.boxes is not None:
            return []
        ids = self.tokenizer.encode(self.question, add_bos=False)
        if not ids:
            return []
        with torch.inference_mode():
            q = self.embed(torch.tensor(ids, device=self.visual.device))  # [L, D]
        self.boxes = self.head.boxes(self.visual, q)
        text = format_boxes(self.boxes, self.head.cfg.decimals)
        return self.tokenizer.encode(text[len("["):], add_bos=False)


__all__ = ["GroundingHead", "build_grounding_head", "trigger_id", "BoxWriter", "PREFIX"]
