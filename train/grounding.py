"""Training the grounding head (:mod:`edgevlm.runtime.grounding_head`) of a trained SPHINX-fusion model.

    edgevlm train grounding --model demo --out runs/grounding --threads 2

The model's connector and decoder stay frozen: the head learns from the visual tokens the trained
connector makes of each training image (frozen encoders cached once, as ``edgevlm train`` caches them)
and from the decoder's token embeddings of each question. No decoder forward runs, so a step costs a
few milliseconds and thousands of them fit in minutes on a CPU.

Targets, per question:

- cells: the cell holding the box centre of each object the question is about (a box question's
  objects, a colour or shape question's object, the counted objects) scores 1 and regresses that
  object's box; every other cell scores 0. Loss: binary cross-entropy over all cells + L1 of the boxes
  at the target cells. Digit images have no objects and no cell targets.
- answers (colour, shape, count and digit questions): cross-entropy over the head's answer words.

Each batch draws its questions task by task in equal shares, so a few hundred digit images weigh as
much as thousands of scene questions. With ``drop_share`` that share of the steps sees the grid as token
dropping leaves it (:func:`drop_cells`, FLIP-style), and the head learns a stand-in for missing cells
(``GroundingHeadConfig.dropped_cells``), so the runtime keeps using it under ``keep_ratio < 1``. The cells
are dropped from the full image's tokens; at run time the ViT also sees only the kept patches, so its
kept tokens differ a little from these. The output checkpoint is the source's own trained tensors plus
``grounding_head.*``, with the head in its config: ``edgevlm.load(out / "checkpoint")`` answers with the
head, and its ``model.safetensors`` is what the demo ships.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from edgevlm.config import GroundingHeadConfig, ModelConfig, SphinxFusionConfig
from edgevlm.errors import ConfigError
from edgevlm.runtime.grounding_head import PREFIX, GroundingHead
from edgevlm.scenes import COLORS, SHAPES

HEAD_TASKS = ("ground", "color", "shape", "count", "digit")  # what the head learns; captions stay the decoder's
ANSWER_TASKS = ("color", "shape", "count", "digit")

BOX_L1_WEIGHT = 5.0  # an edge off by 0.1 costs as much as a cell's score off by ~0.4 in BCE


@dataclass(frozen=True)
class GroundingTrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    n_scenes: int = 1500
    # three renders (paper, ink, size, offset) of each of the 1,437 training-pool digits: on digits held out
    # from the pool, one render per digit gave 90.0 %, two 91.5 %, three 94.5 % (docs/training.md)
    n_digits: int = 4311
    per_task: int = 8  # questions drawn per scene and task (repeats dropped)
    tasks: tuple[str, ...] = HEAD_TASKS
    drop_share: float = 0.3  # share of steps that drop grid cells (a random 40-90 % kept), as token dropping does
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if min(self.steps, self.batch_size, self.n_scenes, self.per_task) < 1 or self.n_digits < 0:
            raise ConfigError("steps, batch_size, n_scenes and per_task must be >= 1 and n_digits >= 0")
        bad = [t for t in self.tasks if t not in HEAD_TASKS]
        if bad or not self.tasks:
            raise ConfigError(f"the grounding head learns a subset of {HEAD_TASKS}, got {self.tasks}")
        if self.tasks == ("digit",) or ("digit" in self.tasks and self.n_digits == 0):
            raise ConfigError("digit questions need n_digits >= 1 and, for the grid, scene tasks beside them")
        if not 0.0 <= self.drop_share < 1.0:
            raise ConfigError(f"drop_share must be in [0, 1), got {self.drop_share}")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.warmup >= 0):
            raise ConfigError("lr must be > 0, weight_decay and warmup >= 0")


def head_config_for(model_cfg: ModelConfig, **overrides) -> GroundingHeadConfig:
    """The head that reads ``model_cfg``'s first view's fused grid (SPHINX fusion only: its cells are
    ``[start] [Q-Former queries] [global] grid*grid [end]``), the global token included."""
    conn = model_cfg.tower.connector if model_cfg.tower is not None else None
    if not isinstance(conn, SphinxFusionConfig):
        raise ConfigError(f"a grounding head reads a SPHINX fusion grid; this model's connector is "
                          f"{type(conn).__name__ if conn is not None else 'absent'}")
    if model_cfg.tower.pack is not None:
        raise ConfigError("a grounding head needs the views' tokens in order; this tower packs them")
    first = int(conn.separators) + (conn.qformer.num_queries if conn.qformer else 0) + 1
    return GroundingHeadConfig(**{"visual_width": conn.out_width, "first_cell": first, "grid": conn.grid,
                                  "global_token": True, **overrides})


def answer_vocabulary(tasks: tuple[str, ...]) -> tuple[str, ...]:
    """The head's answer words for ``tasks``: colours, shapes, then the numbers a count (0..5) or a
    digit (0..9) can be; () when no task has a short answer."""
    words: list[str] = []
    if "color" in tasks:
        words += list(COLORS)
    if "shape" in tasks:
        words += list(SHAPES)
    if "digit" in tasks:
        words += [str(i) for i in range(10)]
    elif "count" in tasks:
        words += [str(i) for i in range(6)]  # scenes hold 1..5 objects, and absent kinds count 0
    return tuple(words)


def question_boxes(sample) -> list[tuple[float, float, float, float]]:
    """The boxes of the objects a scene question is about (left to right); [] for a digit or a count of
    something absent."""
    meta = sample.meta
    if sample.task == "ground":
        return list(meta["boxes"])
    objs = meta.get("objects", [])
    if sample.task == "color":  # about the one object of that shape
        return [o["box"] for o in objs if o["shape"] == meta["target"]]
    if sample.task == "shape":
        return [o["box"] for o in objs if o["color"] == meta["target"]]
    if sample.task == "count":
        if meta["kind"] == "total":
            return [o["box"] for o in objs]
        return [o["box"] for o in objs if o[meta["kind"]] == meta["target"]]
    return []


def drop_cells(visual: torch.Tensor, first: int, grid: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Visual tokens ``[B, T, D]`` as token dropping leaves them: a random 40-90 % of the ``grid x grid``
    cells kept, in the runtime's uniform pattern (half the time) or FLIP's random one per row.
    -> (tokens ``[B, first + K, D]`` up to the kept cells, kept cells ``[B, K]``)."""
    from edgevlm.runtime.token_keep import select_cells

    b = visual.shape[0]
    ratio = 0.4 + 0.5 * float(torch.rand((), generator=gen))
    mode = "uniform" if float(torch.rand((), generator=gen)) < 0.5 else "random"
    cells = select_cells(b, grid, ratio, mode, generator=gen)  # [B, K]
    kept = visual[:, first: first + grid * grid].gather(1, cells[..., None].expand(-1, -1, visual.shape[2]))
    return torch.cat([visual[:, :first], kept], dim=1), cells


def cell_targets(boxes: list[tuple[float, float, float, float]], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score [G], box [G, 4])``: 1 and the box at the cell of each box centre (the first box wins a
    shared cell), 0 elsewhere."""
    score, target = torch.zeros(grid * grid), torch.zeros(grid * grid, 4)
    for b in boxes:
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        cell = min(grid - 1, int(cy * grid)) * grid + min(grid - 1, int(cx * grid))
        if score[cell] == 0:
            score[cell], target[cell] = 1.0, torch.tensor(b)
    return score, target


def head_loss(logits: torch.Tensor, boxes: torch.Tensor, score: torch.Tensor, target: torch.Tensor,
              rows: torch.Tensor | None = None) -> torch.Tensor:
    """BCE over every cell + ``BOX_L1_WEIGHT`` x mean L1 of the boxes at target cells, over the questions
    whose ``rows`` [B] bool are set (default: all); 0 when none is."""
    if rows is not None:
        logits, boxes, score, target = logits[rows], boxes[rows], score[rows], target[rows]
    if logits.numel() == 0:
        return boxes.sum() * 0
    bce = F.binary_cross_entropy_with_logits(logits, score)
    pos = score > 0
    l1 = (boxes[pos] - target[pos]).abs().mean() if pos.any() else boxes.sum() * 0
    return bce + BOX_L1_WEIGHT * l1


def answer_loss(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer logits [B, K] over the questions with an answer (``answer`` [B] >= 0)."""
    has = answer >= 0
    return F.cross_entropy(logits[has], answer[has]) if has.any() else logits.sum() * 0


def train_grounding(model, out: Path, cfg: GroundingTrainConfig = GroundingTrainConfig(), *, threads: int = 0,
                    feature_cache: Path | None = None, progress: bool = True) -> Path:
    """Train a head on ``model`` (a preset or an edgevlm checkpoint folder with a trained SPHINX fusion),
    write ``out/checkpoint`` (the model + head) and ``out/log.json``; returns the checkpoint folder."""
    import edgevlm
    from edgevlm.presets import PRESETS, get_preset
    from edgevlm.runtime.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, is_checkpoint_dir, load_checkpoint,
                                            save_checkpoint)
    from edgevlm.runtime.readers import resolve_weights_path
    from edgevlm.runtime.readers.safetensors_io import load_safetensors

    from .data import build_split, iter_split
    from .vlm import SIZE_KEY, VIEWS_KEY, cached_features, warmup_cosine

    if threads:
        torch.set_num_threads(threads)
    if model in PRESETS:
        src_cfg = get_preset(model)
        if src_cfg.weights is None:
            raise ConfigError(f"preset {model!r} ships no trained weights; train its connector first (edgevlm train demo)")
        trained = load_safetensors(resolve_weights_path(src_cfg.weights))
        base_cfg = replace(src_cfg, weights=None)
    elif is_checkpoint_dir(model):
        base_cfg, trained = load_checkpoint(model)
    else:
        raise ConfigError(f"train grounding takes a preset or an edgevlm checkpoint folder, got {model!r}")
    # a new head replaces any old one; clone: the reader may map the file, which `cp` onto the shipped
    # weights (as docs/training.md does next) would change under a run still going
    trained = {k: v.clone() for k, v in trained.items() if not k.startswith(PREFIX)}
    head_cfg = head_config_for(base_cfg)
    pipe = edgevlm.load(model, quant="none", progress=False)  # float, LoRA merged: the tokens eval's runtime sees
    tower, decoder, tokenizer = pipe.tower, pipe.decoder, pipe.tokenizer

    t0 = time.perf_counter()
    groups = list(iter_split("train", cfg.n_scenes, cfg.n_digits, seed=0))
    row_of = {g.image_id: i for i, g in enumerate(groups)}
    feats = cached_features(tower.model, tower.preprocessor, [g.image for g in groups], base_cfg,
                            feature_cache or out / "features.safetensors")
    encode_s = time.perf_counter() - t0
    feats = {k: v for k, v in feats.items() if k not in (VIEWS_KEY, SIZE_KEY)}
    samples = build_split("train", cfg.n_scenes, cfg.n_digits if "digit" in cfg.tasks else 0, seed=0,
                          tasks=cfg.tasks, per_task=cfg.per_task)
    rows = sorted({row_of[s.meta["image_id"]] for s in samples})
    with torch.inference_mode():  # the connector is frozen: its tokens for every image, once
        vis = torch.cat([tower.model.connector.from_prepared({k: v[rows[i: i + 64], 0] for k, v in feats.items()})
                         for i in range(0, len(rows), 64)]).float()  # [images, T, D] of each first (global) view
    slot = {r: i for i, r in enumerate(rows)}
    image_of = torch.tensor([slot[row_of[s.meta["image_id"]]] for s in samples])  # [S]
    q_ids = [tokenizer.encode(s.question, add_bos=False) for s in samples]
    q_len = max(map(len, q_ids))
    ids = torch.zeros(len(samples), q_len, dtype=torch.long)
    mask = torch.zeros(len(samples), q_len, dtype=torch.bool)
    for i, q in enumerate(q_ids):
        ids[i, : len(q)], mask[i, : len(q)] = torch.tensor(q), True
    score, target = map(torch.stack, zip(*(cell_targets(question_boxes(s), head_cfg.grid) for s in samples)))
    has_cells = torch.tensor([s.task != "digit" for s in samples])
    answers = answer_vocabulary(cfg.tasks)
    head_cfg = replace(head_cfg, answers=answers, dropped_cells=cfg.drop_share > 0)
    answer = torch.tensor([answers.index(s.answer) if s.task in ANSWER_TASKS else -1 for s in samples])  # [S]
    by_task = [torch.tensor([i for i, s in enumerate(samples) if s.task == t]) for t in cfg.tasks]
    by_task = [t for t in by_task if len(t)]

    torch.manual_seed(cfg.seed)
    head = GroundingHead(head_cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    t1 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="grounding head", unit="step", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warmup_cosine(step, cfg.warmup, cfg.steps)
        task = torch.randint(len(by_task), (cfg.batch_size,), generator=gen)  # tasks in equal shares
        b = torch.stack([by_task[t][torch.randint(len(by_task[t]), (), generator=gen)] for t in task.tolist()])
        with torch.no_grad():
            emb = decoder.embed(ids[b]).float()  # [B, L, D]: frozen token embeddings of the questions
        visual, cells = vis[image_of[b]], None
        if cfg.drop_share and float(torch.rand((), generator=gen)) < cfg.drop_share:
            visual, cells = drop_cells(visual, head_cfg.first_cell, head_cfg.grid, gen)
        pred = head(visual, emb, mask[b], cells=cells)
        loss = head_loss(pred.scores, pred.boxes, score[b], target[b], has_cells[b])
        if pred.answers is not None:
            loss = loss + answer_loss(pred.answers, answer[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(history[-50:]):.4f}")
    train_s = time.perf_counter() - t1

    state = {**trained, **{PREFIX + k: v.detach().to(torch.float16) for k, v in head.state_dict().items()}}
    def copy_extra(folder: Path) -> None:  # a checkpoint source's tokenizers and other files come along
        if model in PRESETS:
            return
        for item in Path(model).iterdir():
            if item.name not in (CONFIG_NAME, WEIGHTS_NAME):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)

    ckpt = save_checkpoint(out / "checkpoint", replace(base_cfg, grounding_head=head_cfg), state,
                           metadata={"stage": "grounding", "steps": str(cfg.steps),
                                     "train_config": json.dumps(asdict(cfg))}, overwrite=True,
                           write_extra=copy_extra)
    log = {"model": str(model), "train_config": asdict(cfg), "head": asdict(head_cfg), "questions": len(samples),
           "questions_per_task": {t: sum(s.task == t for s in samples) for t in cfg.tasks}, "images": len(rows),
           "encode_seconds": encode_s, "train_seconds": train_s,
           "seconds": time.perf_counter() - t0, "final_loss": float(np.mean(history[-50:])),
           "history": history[::10]}
    (out / "log.json").write_text(json.dumps(log, indent=1))
    return ckpt


__all__ = ["GroundingTrainConfig", "HEAD_TASKS", "head_config_for", "answer_vocabulary", "question_boxes", "drop_cells",
           "cell_targets", "head_loss", "answer_loss", "train_grounding"]
