"""Training a VLM's connector (and LoRA adapters) on frozen encoders, with the runtime's own modules.

Stages (the SPHINX recipe, at CPU scale):

* ``stage1`` — vision-language alignment: captions only; the connector trains, encoders and LLM are
  frozen. With ``unfreeze_llm`` the whole LLM trains too and a text-only batch of real English is
  added to every step (SPHINX's joint LAION + RefinedWeb loss) so it keeps its long-text ability.
* ``stage2`` — instruction tuning on every task template (caption, short VQA, counting, grounding with
  ``[x1,y1,x2,y2]`` boxes, digits): connector + LoRA adapters on the decoder, text batches mixed in.

The model is not a copy: it is the runtime's :class:`~edgevlm.runtime.tower.VisionTowerModel` (its
connector) and :class:`~edgevlm.runtime.decoder.Decoder` with LoRA applied from outside, prompts
are built by the runtime's :class:`~edgevlm.runtime.chat.ChatFormat`, so an exported checkpoint gives
the runtime exactly the logits training saw. Frozen encoders run once per image and what the
connector's ``prepare`` makes of their outputs is cached (:mod:`edgevlm.runtime.connectors.base`: an
MLP projector, a Q-Former or a perceiver resampler keep the encoder's tokens; SPHINX fusion its
channel-aligned tokens before ``visual_proj``); every step runs the connector's ``from_prepared``, so
the visual token count per image is whatever the connector makes (MLP: the encoder's tokens; Q-Former:
its queries; resampler: its latents; per view). An InstructBLIP Q-Former reads the question too: each
example then carries its question as Q-Former token ids (the tower's own instruction tokenizer, as the
runtime's :class:`~edgevlm.runtime.tower.VisionTower` makes them), the connector runs on them every step,
and such examples are never packed (see :meth:`VLMTrainer._examples`).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from edgevlm.config import LORA_TARGETS, LoRAConfig, ModelConfig, to_dict
from edgevlm.errors import CheckpointError, ConfigError, ShapeError
from edgevlm.runtime.chat import ChatFormat, MultimodalPrompt
from edgevlm.runtime.checkpoint import save_checkpoint
from edgevlm.runtime.connectors.base import Connector, split_prepared
from edgevlm.runtime.lora import LORA_SUFFIXES, apply_lora, lora_disabled, lora_state_dict
from edgevlm.runtime.qformer_tokenizer import QFORMER_TOKENIZER_DIR, pad_ids
from edgevlm.runtime.readers.safetensors_io import load_safetensors
from edgevlm.runtime.tower import takes_instruction

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "stage2"  # "stage1" | "stage2"
    steps: int = 400
    batch_size: int = 8
    lr: float = 1e-3  # connector
    lora_lr: float = 5e-4
    llm_lr: float = 2e-5  # only with unfreeze_llm
    lora_rank: int = 8  # 0: no adapters
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    unfreeze_llm: bool = False
    text_batch: int = 2  # text-only sequences per step whenever a decoder weight trains
    text_len: int = 96
    warmup: int = 20
    tasks: tuple[str, ...] = ()  # empty: the stage's default (stage1: caption; stage2: all)
    n_scenes: int = 1500
    n_digits: int = 600
    seed: int = 0
    save_every: int = 100
    weight_decay: float = 0.0
    # bf16 autocast for the forward/backward matmuls (weights and optimiser stay fp32): "bf16", "none" (plain
    # fp32) or "auto": bf16 only where the hardware has bf16 matmuls (AMX or AVX512-BF16, a bf16 GPU). On an
    # AMX Xeon bf16 matmul ran ~3x fp32; on an AVX2-only CPU oneDNN emulates it and a step took ~8x longer.
    autocast: str = "auto"
    # Several questions about one image in one multi-turn sequence (LLaVA-style): the image and the
    # system prompt are paid once for all of them. Falls back to single turns when the template can't, and
    # is never done for a tower whose Q-Former reads the question (InstructBLIP): see VLMTrainer._examples.
    pack: bool = True
    # What the text-only batches teach: "lm" (next-token loss on the text, SPHINX's recipe, used when the
    # whole LLM trains) or "kl_base" (stay close to the untuned LLM's predictions on the text: the
    # adapters may only change what images need, and general text keeps its perplexity).
    text_objective: str = "kl_base"
    # How answer tokens share the loss: "token" (each target token alike, LLaVA's mean) or "answer" (each
    # answer alike, its tokens sharing its weight). With "token" a 21-token box or a caption outweighs a
    # one-token colour or digit answer in the same conversation twentyfold.
    loss_weighting: str = "token"
    # A fresh connector's output scale: "learned" (as initialised: a LayerNorm output is ~sqrt(width) per
    # token, about 7x the demo LLM's token embeddings) or "text" (rescaled once, before the first step, to
    # the RMS of the decoder's token embeddings, so that image and text tokens start alike).
    visual_scale: str = "learned"

    def __post_init__(self) -> None:
        if self.stage not in ("stage1", "stage2"):
            raise ConfigError(f"stage must be 'stage1' or 'stage2', got {self.stage!r}")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ConfigError("steps and batch_size must be positive")
        if self.lora_rank < 0:
            raise ConfigError("lora_rank must be >= 0")
        if self.text_objective not in ("lm", "kl_base"):
            raise ConfigError(f"text_objective must be 'lm' or 'kl_base', got {self.text_objective!r}")
        if self.autocast not in ("auto", "bf16", "none"):
            raise ConfigError(f"autocast must be 'auto', 'bf16' or 'none', got {self.autocast!r}")
        if self.loss_weighting not in ("token", "answer"):
            raise ConfigError(f"loss_weighting must be 'token' or 'answer', got {self.loss_weighting!r}")
        if self.visual_scale not in ("learned", "text"):
            raise ConfigError(f"visual_scale must be 'learned' or 'text', got {self.visual_scale!r}")

    @property
    def trains_decoder(self) -> bool:
        return self.unfreeze_llm or (self.stage == "stage2" and self.lora_rank > 0)


@dataclass
class Example:
    """A conversation about one image, as positions: ``sequence`` covers it all (image slot included)
    and ``labels`` holds ``(p, id)`` pairs — position ``p`` predicts answer token ``id`` at ``p + 1``.
    ``instruction``: the question as Q-Former token ids, for a tower whose Q-Former reads it (InstructBLIP;
    one question per example), else None."""

    image: int  # row in the feature cache
    sequence: MultimodalPrompt
    labels: list[tuple[int, int]]
    tasks: tuple[str, ...] = ()
    instruction: tuple[int, ...] | None = None
    answer_of: tuple[int, ...] = ()  # per label: which answer of the conversation it belongs to

    def label_weights(self) -> list[float]:
        """Per label, ``1 / (tokens of its answer)``: every answer weighs one (``loss_weighting="answer"``)."""
        counts = Counter(self.answer_of)
        return [1.0 / counts[a] for a in self.answer_of]

    @property
    def length(self) -> int:
        return self.sequence.length


def _end_of_turn(tokenizer, chat: ChatFormat) -> int:
    return tokenizer.eos_id if tokenizer.eos_id is not None else sorted(chat.stop_ids(tokenizer))[0]


def make_example(tokenizer, chat: ChatFormat, image_row: int, qa: list[tuple[str, str]], visual_tokens: int,
                 tasks: tuple[str, ...] = ()) -> Example:
    """One example from ``qa`` pairs about one image.

    A single pair is the prompt exactly as the runtime builds it plus the answer and end-of-turn id.
    Several pairs become one multi-turn conversation rendered by the chat template (the image stays
    in the first user turn): the visual tokens and the system prompt are paid once for several
    answers. Packing needs a template that ends assistant turns with a stop token (ChatML does); with
    any other template the pairs are refused here and the caller keeps them single-turn.
    """
    eot = _end_of_turn(tokenizer, chat)
    if len(qa) == 1:
        q, a = qa[0]
        prompt = chat.build(tokenizer, [{"role": "user", "content": q}], [visual_tokens])
        target = tokenizer.encode(a, add_bos=False) + [eot]
        seq = MultimodalPrompt(prompt.segments + (("text", tuple(target)),), prompt.tokens_per_image)
        p0 = prompt.length - 1
        return Example(image_row, seq, [(p0 + i, t) for i, t in enumerate(target)], tasks,
                       answer_of=(0,) * len(target))
    msgs: list[dict] = []
    starts = []
    for q, a in qa:
        msgs.append({"role": "user", "content": q})
        starts.append(chat.build(tokenizer, msgs, [visual_tokens]).length)  # where the answer begins
        msgs.append({"role": "assistant", "content": a})
    seq = chat.build(tokenizer, msgs, [visual_tokens], add_generation_prompt=False)
    ids = seq.input_ids
    labels, answer_of = [], []
    for k, (start, (_, a)) in enumerate(zip(starts, qa)):
        target = tokenizer.encode(a, add_bos=False) + [eot]
        if ids[start: start + len(target)] != target:
            raise ConfigError("this chat template does not end assistant turns with the end-of-turn token "
                              "right after the answer; train with pack=False")
        labels += [(start - 1 + i, t) for i, t in enumerate(target)]
        answer_of += [k] * len(target)
    return Example(image_row, seq, labels, tasks, answer_of=tuple(answer_of))


# ---- feature cache -------------------------------------------------------------------------

VIEWS_KEY, SIZE_KEY = "_views", "_image_size"  # cache-file entries beside the prepared tensors


@torch.inference_mode()
def encode_images(tower_model, preprocessor, images: list[np.ndarray], batch: int = 16,
                  desc: str = "encoding images") -> dict[str, torch.Tensor]:
    """Frozen-encoder outputs per image, prepared by the connector (``connector.prepare``, see
    :mod:`edgevlm.runtime.connectors.base`) and kept in fp32 so training sees exactly what the runtime
    computes: ``{key: [n, V, ...]}`` with ``V`` the most views any image has (an ``anyres`` image with
    fewer has zero rows after its own), plus ``"_views"`` ``[n]`` (each image's view count) and
    ``"_image_size"`` ``[n, 2]`` (its original ``(h, w)``, for towers that pack their views)."""
    conn = tower_model.connector
    if not isinstance(conn, Connector):
        raise ConfigError(f"feature caching needs a connector with the training split (a "
                          f"edgevlm.runtime.connectors.base.Connector), got {type(conn).__name__}")
    rows: list[dict[str, torch.Tensor]] = []  # one prepared dict [V_i, ...] per image
    sizes: list[tuple[int, int]] = []
    for i in tqdm(range(0, len(images), batch), desc=desc, unit="batch", leave=False):
        pre = preprocessor(images[i: i + batch])
        # token_order: a tower that regroups its tiles (xGen-MM anyres) also regroups before caching
        prepared = conn.prepare(tower_model.encode(pre.views, order=pre.token_order), pre.token_masks)  # [n_views, ...]
        per_image = {k: torch.split(v, pre.views_per_image) for k, v in prepared.items()}
        rows += [{k: v[j] for k, v in per_image.items()} for j in range(len(pre.views_per_image))]
        sizes += pre.image_sizes
    views = [next(iter(r.values())).shape[0] for r in rows]
    v_max = max(views)
    out = {}
    for k in rows[0]:
        t = torch.zeros(len(rows), v_max, *rows[0][k].shape[1:], dtype=rows[0][k].dtype)
        for j, r in enumerate(rows):
            t[j, : views[j]] = r[k]
        out[k] = t
    out[VIEWS_KEY] = torch.tensor(views, dtype=torch.int64)
    out[SIZE_KEY] = torch.tensor(sizes, dtype=torch.int64).reshape(len(rows), 2)
    return out


def cached_features(tower_model, preprocessor, images: list[np.ndarray], model_cfg: ModelConfig,
                    path: Path | None) -> dict[str, torch.Tensor]:
    """:func:`encode_images`, stored at ``path`` and reused while the images and tower config match
    (the key hashes every pixel and the tower's config, so a stale file is never used)."""
    import hashlib

    from safetensors.torch import save_file

    # Only what shapes the cached tensors: the encoders, the views, and what the connector's prepare
    # depends on (not its trainable parts, so changing the projector keeps the cache). The entry is
    # named "fusion" because SPHINX fusion was cached first: its existing cache files keep their key.
    t = model_cfg.tower
    what = {"encoders": [to_dict(e) for e in t.encoders], "views": to_dict(t.views),
            "fusion": tower_model.connector.prepare_key()}
    h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
    for im in images:
        h.update(np.ascontiguousarray(im).data)
    key = h.hexdigest()
    if path is not None and Path(path).is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                feats = {k: f.get_tensor(k) for k in f.keys()}
                if VIEWS_KEY not in feats and t.views.fixed_views and t.pack is None:  # a file from before
                    n, v = next(iter(feats.values())).shape[:2]  # these entries: fixed views, sizes unused
                    feats[VIEWS_KEY] = torch.full((n,), v, dtype=torch.int64)
                    feats[SIZE_KEY] = torch.zeros(n, 2, dtype=torch.int64)
                if VIEWS_KEY in feats:
                    return feats
    feats = encode_images(tower_model, preprocessor, images)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        save_file(feats, str(tmp), metadata={"key": key})
        tmp.replace(path)
    return feats


# ---- the trainer ---------------------------------------------------------------------------

class VLMTrainer:
    """Holds the runtime modules, the cached features, the examples and the optimiser."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, *, tower_model, decoder, tokenizer,
                 preprocessor, samples, init_state: dict[str, torch.Tensor] | None = None,
                 text_source=None, feature_cache: Path | None = None, instruction_tokenizer=None):
        """``instruction_tokenizer``: the Q-Former's own tokenizer (a
        :class:`~edgevlm.runtime.qformer_tokenizer.QFormerTokenizer`, ``VisionTower.instruction_tokenizer``)
        for a tower whose Q-Former reads the question (InstructBLIP); required there, unused elsewhere."""
        self.takes_instruction = takes_instruction(model_cfg.tower)
        if self.takes_instruction:
            if instruction_tokenizer is None:
                raise ConfigError("this tower's Q-Former reads the question (InstructBLIP, QFormerConfig.text set), "
                                  "so training needs its Q-Former tokenizer: pass instruction_tokenizer= (a "
                                  "QFormerTokenizer; a transformers InstructBLIP folder or an edgevlm checkpoint "
                                  f"keeps it in {QFORMER_TOKENIZER_DIR}/, which this source lacks)")
            if type(tower_model.connector).prepare is not Connector.prepare:
                # visual_embeddings runs the connector's forward with the question on the cached tensors; that
                # equals from_prepared only while prepare passes the encoders' outputs through unchanged.
                raise ConfigError(f"{type(tower_model.connector).__name__} overrides prepare(); the trainer feeds a "
                                  "question only to a connector whose cached tensors are its encoders' outputs")
        self.instruction_tokenizer = instruction_tokenizer if self.takes_instruction else None
        self.model_cfg, self.cfg = model_cfg, train_cfg
        self.tower, self.decoder, self.tokenizer = tower_model, decoder, tokenizer
        self.chat = ChatFormat.from_config(model_cfg, tokenizer)
        self.autocast_dtype = _resolve_autocast(train_cfg.autocast, decoder.device)  # logged with each run
        torch.manual_seed(train_cfg.seed)
        for p in list(self.tower.parameters()) + list(self.decoder.parameters()):
            p.requires_grad_(False)
        self.lora_cfg = None
        if train_cfg.lora_rank > 0 and (train_cfg.stage == "stage2" or _has_lora(init_state)):
            self.lora_cfg = LoRAConfig(rank=train_cfg.lora_rank, alpha=train_cfg.lora_alpha,
                                       targets=train_cfg.lora_targets)
            apply_lora(self.decoder, self.lora_cfg)
        if init_state:
            self.load_trainable(init_state)
        self.connector = self.tower.connector
        for p in self.connector.parameters():
            p.requires_grad_(True)
        if train_cfg.unfreeze_llm:
            for name, p in self.decoder.named_parameters():
                p.requires_grad_(True)
        elif train_cfg.stage == "stage1":  # adapters carried over from an init stay frozen in stage 1
            for p in self.decoder.parameters():
                p.requires_grad_(False)

        rows: dict[int, int] = {}
        images = []
        for s in samples:  # samples of one image share the array object: encode it once
            if id(s.image) not in rows:
                rows[id(s.image)] = len(images)
                images.append(s.image)
        t0 = time.perf_counter()
        # Every image of the split is cached, not only this stage's tasks, so later stages reuse the file.
        self.features = dict(cached_features(self.tower, preprocessor, images, model_cfg, feature_cache))
        self.encode_s = time.perf_counter() - t0
        # What the connector's from_prepared takes stays in self.features ({key: [n_images, V, ...]}).
        self.views_per_image: list[int] = self.features.pop(VIEWS_KEY).tolist()
        self.image_sizes = [tuple(s) for s in self.features.pop(SIZE_KEY).tolist()]  # original (h, w)
        tasks = train_cfg.tasks or (("caption",) if train_cfg.stage == "stage1" else ())
        samples = [s for s in samples if not tasks or s.task in tasks]
        if not samples:
            raise ConfigError(f"no training samples for tasks {tasks}")
        self.examples = self._examples(samples, rows, self._visual_tokens())
        longest, limit = max(e.length for e in self.examples), decoder.cfg.max_seq_len
        if longest > limit:  # here, not at whichever step first draws it
            raise ConfigError(f"the longest training example has {longest} positions (visual tokens included), "
                              f"more than the decoder's max_seq_len {limit}; train tasks with shorter answers "
                              "(TrainConfig.tasks) or without packing (pack=False)")
        self.text = text_source
        self.text_used = 0  # batches taken from text_source: a resumed run skips as many to see the same text
        self.step_n = 0
        self.visual_scale_factor = None
        if train_cfg.visual_scale == "text" and not _has_connector(init_state):  # a carried-over one keeps its own
            self.visual_scale_factor = self._match_text_scale()
        self.optimizer = torch.optim.AdamW(self._param_groups(), weight_decay=train_cfg.weight_decay)
        self.history: list[dict[str, float]] = []

    @torch.no_grad()
    def _match_text_scale(self) -> float:
        """Rescale the connector so its tokens' RMS (over up to 16 cached images) is the decoder's token
        embeddings' RMS; returns the factor applied."""
        table = getattr(self.decoder.embed_tokens, "weight", None)
        if not isinstance(table, torch.Tensor) or not table.is_floating_point():
            raise ConfigError("visual_scale='text' needs the decoder's float token-embedding table")
        text_rms = table.float().pow(2).mean().sqrt().item()
        rows = list(range(min(16, len(self.views_per_image))))
        vis = torch.cat(self.visual_embeddings(rows, self._probe_instructions(rows))).float()
        factor = text_rms / vis.pow(2).mean().sqrt().item()
        self.connector.scale_output_(factor)
        return factor

    def _probe_instructions(self, rows: list[int]) -> list[tuple[int, ...]] | None:
        """For a tower whose Q-Former reads the question: the first example's question of each row."""
        if not self.takes_instruction:
            return None
        first = {}
        for e in self.examples:
            first.setdefault(e.image, e.instruction)
        return [first.get(r, ()) for r in rows]

    @torch.no_grad()
    def _visual_tokens(self) -> list[int]:
        """Visual positions of each cached image, from the connector's output: one view's tokens (MLP:
        the encoder's tokens; Q-Former: its queries; resampler: its latents; SPHINX: separators, queries,
        global and grid) times the image's views, or what the tower's packing makes of them."""
        one_image = {k: t[0, : self.views_per_image[0]] for k, t in self.features.items()}
        tpv, d = self.connector.from_prepared(one_image).shape[1:]  # [views, tokens_per_view, D]
        counts: dict[tuple, int] = {}
        out = []
        for v, size in zip(self.views_per_image, self.image_sizes):
            if (v, size) not in counts:  # packing keeps a number of rows that depends on the image's size
                counts[v, size] = self.tower.per_image(torch.zeros(v, tpv, d), [v], [size])[0].shape[0]
            out.append(counts[v, size])
        return out

    def visual_embeddings(self, rows: list[int],
                          instructions: list[tuple[int, ...]] | None = None) -> list[torch.Tensor]:
        """Cached images -> one ``[visual_tokens_i, D]`` per image, through the trainable connector
        (``from_prepared``) and the tower's per-image grouping, as the runtime's tower computes them.
        ``instructions`` (a tower whose Q-Former reads the question, and only there): one list of Q-Former
        ids per row, which every view of that row reads, as ``tower(image, instruction=question)`` does."""
        views = [self.views_per_image[r] for r in rows]
        prepared = {k: torch.cat([t[r, :v] for r, v in zip(rows, views)]) for k, t in self.features.items()}
        if not self.takes_instruction:
            if instructions is not None:
                raise ConfigError("instructions given, but this tower's connector reads no question")
            per_view = self.connector.from_prepared(prepared)  # [sum(views), tokens_per_view, D]
        else:
            if instructions is None or len(instructions) != len(rows):
                got = "none" if instructions is None else f"{len(instructions)}"
                raise ShapeError(f"this tower's Q-Former reads the question: expected one instruction (Q-Former ids) "
                                 f"per image row ({len(rows)}), got {got}")
            # Each view reads its row's question, right-padded with the config's pad id and masked, as
            # VisionTower._instruction_for_views builds them for the runtime.
            text = pad_ids([ids for ids, v in zip(instructions, views) for _ in range(v)],
                           self.model_cfg.tower.connector.qformer.text.pad_id)
            # Connector.from_prepared takes no question; the check in __init__ makes this its forward on them.
            feats, masks = split_prepared(prepared)
            per_view = self.connector(feats, masks, text=text)
        return self.tower.per_image(per_view, views, [self.image_sizes[r] for r in rows])

    def _examples(self, samples, rows: dict[int, int], vt: list[int]) -> list[Example]:
        """Single-turn examples, or with ``pack`` one shuffled conversation per image.

        A tower whose Q-Former reads the question (InstructBLIP) gets single turns whatever ``pack`` says,
        each carrying its question's Q-Former ids: its visual embedding is a function of the question, and
        a packed conversation has one image slot whose embedding every answer in it attends to. Giving
        that slot one question's embedding would train the other answers on an embedding the runtime
        never shows them (it reads the question being answered, VisionTower(image, instruction=...)); a
        slot per question would be a conversation the runtime never builds. The frozen encoder output
        is still cached once per image; only the Q-Former and projection run per example."""
        tok, chat = self.tokenizer, self.chat
        if self.takes_instruction:
            q_tok = self.instruction_tokenizer
            return [replace(make_example(tok, chat, rows[id(s.image)], [(s.question, s.answer)],
                                         vt[rows[id(s.image)]], (s.task,)), instruction=tuple(q_tok.encode(s.question)))
                    for s in samples]
        if not self.cfg.pack:
            return [make_example(tok, chat, rows[id(s.image)], [(s.question, s.answer)], vt[rows[id(s.image)]],
                                 (s.task,)) for s in samples]
        by_image: dict[int, list] = {}
        for s in samples:
            by_image.setdefault(id(s.image), []).append(s)
        out = []
        rng = np.random.default_rng(self.cfg.seed)
        for key, group in by_image.items():
            group = [group[i] for i in rng.permutation(len(group))]  # no fixed task order to lean on
            qa, tasks = [(s.question, s.answer) for s in group], tuple(s.task for s in group)
            n_vis = vt[rows[key]]
            try:
                out.append(make_example(tok, chat, rows[key], qa, n_vis, tasks))
            except ConfigError:  # the template cannot pack: keep this image's questions single-turn
                out += [make_example(tok, chat, rows[key], [(s.question, s.answer)], n_vis, (s.task,))
                        for s in group]
        return out

    # -- parameters -------------------------------------------------------------------------
    def _param_groups(self) -> list[dict]:
        c = self.cfg
        groups = [{"params": [p for p in self.connector.parameters() if p.requires_grad], "lr": c.lr, "name": "connector"}]
        lora = [p for n, p in self.decoder.named_parameters() if p.requires_grad and ("lora_A" in n or "lora_B" in n)]
        dense = [p for n, p in self.decoder.named_parameters() if p.requires_grad and "lora_" not in n]
        if lora:
            groups.append({"params": lora, "lr": c.lora_lr, "name": "lora"})
        if dense:
            groups.append({"params": dense, "lr": c.llm_lr, "name": "llm"})
        for g in groups:
            g["base_lr"] = g["lr"]
        return groups

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must carry: the connector, and LoRA factors or the whole decoder."""
        out = {f"tower.connector.{k}": v.detach().clone() for k, v in self.connector.state_dict().items()}
        if self.cfg.unfreeze_llm:
            out.update({f"decoder.{k}": v.detach().clone() for k, v in self.decoder.state_dict().items()})
        else:
            out.update({f"decoder.{k}": v.clone() for k, v in lora_state_dict(self.decoder).items()})
        return out

    def export_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs to rebuild the model: the trained tensors plus every frozen tensor
        that no WeightsRef in the config can supply (random-weight presets, encoders without refs)."""
        return {**self.trainable_state(), **self.frozen_state()}

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """The frozen tensors no WeightsRef in the config supplies (see :meth:`export_state`)."""
        out = {}
        for enc in self.model_cfg.tower.encoders:
            if enc.weights is None:
                out.update({f"tower.encoders.{enc.name}.{k}": v.detach().clone()
                            for k, v in self.tower.encoders[enc.name].state_dict().items()})
        if self.tower.pack is not None:  # LLaVA-NeXT's newline token: frozen, but no WeightsRef supplies it
            out.update({f"tower.pack.{k}": v.detach().clone() for k, v in self.tower.pack.state_dict().items()})
        if self.model_cfg.decoder_weights is None and not self.cfg.unfreeze_llm:
            out.update({f"decoder.{k.replace('.base.', '.')}": v.detach().clone()
                        for k, v in self.decoder.state_dict().items() if not k.endswith(LORA_SUFFIXES)})
        return out

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        conn = {k[len("tower.connector."):]: v for k, v in state.items() if k.startswith("tower.connector.")}
        if conn:
            mine = self.tower.connector.state_dict()
            wrong = sorted(set(conn) ^ set(mine)) or [k for k in conn if conn[k].shape != mine[k].shape]
            if wrong:  # e.g. a stage-1 checkpoint trained with another projector (--proj-hidden)
                raise CheckpointError(f"the init checkpoint's connector does not fit this model's "
                                      f"{type(self.tower.connector).__name__}: {wrong[:3]} differ in name or shape; "
                                      "train with the connector config the checkpoint was made with")
            self.tower.connector.load_state_dict(conn, strict=True)
        dec = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
        if dec:
            # A checkpoint stores a frozen layer under its plain name (export_state); with adapters applied
            # here that layer's weight lives at "<layer>.base.<leaf>" (a random-weight preset's stage 1 -> stage 2).
            have = set(self.decoder.state_dict())
            for k in [k for k in dec if k not in have]:
                stem, _, leaf = k.rpartition(".")
                if f"{stem}.base.{leaf}" in have:
                    dec[f"{stem}.base.{leaf}"] = dec.pop(k)
            missing, unexpected = self.decoder.load_state_dict(dec, strict=False)
            if unexpected:
                raise CheckpointError(f"init checkpoint has decoder tensors this model lacks: {unexpected[:3]}")

    # -- one step ---------------------------------------------------------------------------
    def _lr_factor(self) -> float:
        return warmup_cosine(self.step_n, self.cfg.warmup, self.cfg.steps)

    def batch_indices(self, step: int) -> list[int]:
        """Deterministic from (seed, step): resuming at step s sees exactly the batches it would have."""
        n, b = len(self.examples), self.cfg.batch_size
        per_epoch = max(1, n // b)
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
        return order[k * b: (k + 1) * b].tolist()

    def vlm_loss(self, idx: list[int]) -> torch.Tensor:
        ex = [self.examples[i] for i in idx]
        instructions = [e.instruction for e in ex] if self.takes_instruction else None
        visual = self.visual_embeddings([e.image for e in ex], instructions)  # B x [visual_tokens_i, D]
        seqs, labels, weights = [], [], []
        per_answer = self.cfg.loss_weighting == "answer"
        for e, vis in zip(ex, visual):
            seqs.append(e.sequence.embed(self.decoder.embed, [vis])[0])  # [L, D]
            lab = torch.full((e.length,), IGNORE, dtype=torch.long)
            pos, ids = zip(*e.labels)
            lab[list(pos)] = torch.tensor(ids)  # position p predicts token p + 1
            labels.append(lab)
            if per_answer:
                w = torch.zeros(e.length)
                w[list(pos)] = torch.tensor(e.label_weights())
                weights.append(w)
        return self._lm_loss(seqs, labels, weights if per_answer else None)

    def text_loss(self) -> torch.Tensor:
        chunks = next(self.text)
        self.text_used += 1
        x = torch.stack([self.decoder.embed(torch.tensor(c)) for c in chunks])  # [B, T, D], equal lengths
        if self.cfg.text_objective == "lm" or self.lora_cfg is None or self.cfg.unfreeze_llm:
            h = self.decoder.hidden_states(inputs_embeds=x)[:, :-1]  # position p predicts token p + 1
            y = torch.tensor([c[1:] for c in chunks])
            return F.cross_entropy(self.decoder.lm_head(h).flatten(0, 1).float(), y.flatten())
        with torch.no_grad(), lora_disabled(self.decoder):
            ref = F.log_softmax(self.decoder(inputs_embeds=x).float(), dim=-1)  # the untuned LLM
        logp = F.log_softmax(self.decoder(inputs_embeds=x).float(), dim=-1)
        return F.kl_div(logp, ref, log_target=True, reduction="batchmean") / x.shape[1]  # per token

    def _lm_loss(self, seqs: list[torch.Tensor], labels: list[torch.Tensor],
                 weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Cross-entropy over the labelled positions: their mean, or with per-position ``weights`` their
        weighted mean."""
        t = max(s.shape[0] for s in seqs)
        # few distinct shapes: oneDNN builds (and caches) kernels per shape; never past the decoder's positions
        t = min(-(-t // 16) * 16, self.decoder.cfg.max_seq_len)
        x = torch.zeros(len(seqs), t, seqs[0].shape[-1], dtype=seqs[0].dtype)
        y = torch.full((len(seqs), t), IGNORE, dtype=torch.long)
        w = torch.zeros(len(seqs), t) if weights is not None else None
        for i, (s, lab) in enumerate(zip(seqs, labels)):  # right padding: causal attention never sees it
            x[i, : s.shape[0]] = s
            y[i, : lab.shape[0]] = lab
            if w is not None:
                w[i, : lab.shape[0]] = weights[i]
        h = self.decoder.hidden_states(inputs_embeds=x)  # [B, T, D]
        keep = y != IGNORE
        logits = self.decoder.lm_head(h[keep])  # [n_targets, V]: only where a loss is taken
        if w is None:
            return F.cross_entropy(logits.float(), y[keep])
        ce = F.cross_entropy(logits.float(), y[keep], reduction="none")
        return (ce * w[keep]).sum() / w[keep].sum()

    def step(self) -> dict[str, float]:
        f = self._lr_factor()
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss_vlm = self.vlm_loss(self.batch_indices(self.step_n))
            loss = loss_vlm
            out = {"loss_vlm": loss_vlm.item()}
            if self.cfg.trains_decoder and self.text is not None and self.cfg.text_batch > 0:
                loss_text = self.text_loss()
                loss = loss + loss_text
                out["loss_text"] = loss_text.item()
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()
        self.step_n += 1
        out["lr_factor"] = f
        return out

    def _autocast(self):
        import contextlib

        if self.autocast_dtype == "bf16":
            return torch.autocast(self.decoder.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- the loop, checkpoints --------------------------------------------------------------
    def train(self, out_dir: Path, *, resume: bool = True, progress: bool = True) -> list[dict[str, float]]:
        out_dir = Path(out_dir)
        state_dir = out_dir / "resume"
        if resume and (state_dir / "trainer.json").is_file():
            self._restore(state_dir)
        bar = tqdm(total=self.cfg.steps, initial=self.step_n, desc=f"{self.cfg.stage}", unit="step",
                   disable=not progress)
        ema = None
        while self.step_n < self.cfg.steps:
            rec = self.step()
            rec["step"] = self.step_n
            self.history.append(rec)
            ema = rec["loss_vlm"] if ema is None else 0.9 * ema + 0.1 * rec["loss_vlm"]
            bar.set_postfix(loss=f"{ema:.3f}", **({"text": f"{rec['loss_text']:.2f}"} if "loss_text" in rec else {}))
            bar.update(1)
            if self.step_n % self.cfg.save_every == 0 or self.step_n == self.cfg.steps:
                self._save_resume(state_dir)
        bar.close()
        return self.history

    def _save_resume(self, state_dir: Path) -> None:
        from safetensors.torch import save_file

        tmp = state_dir.with_name(state_dir.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.trainable_state().items()}, str(tmp / "trainable.safetensors"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": self.step_n, "text_used": self.text_used,
                                                      "train_config": asdict(self.cfg), "history": self.history}))
        if state_dir.exists():
            import shutil

            shutil.rmtree(state_dir)
        tmp.rename(state_dir)

    def _restore(self, state_dir: Path) -> None:
        meta = json.loads((state_dir / "trainer.json").read_text())
        saved = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["train_config"].items()})
        if replace(saved, steps=self.cfg.steps, save_every=self.cfg.save_every) != self.cfg:
            raise CheckpointError(f"{state_dir}: resume state was made with a different training config; "
                                  "remove it or use another output folder")
        self.load_trainable(load_safetensors(state_dir / "trainable.safetensors"))
        self.optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))
        self.step_n, self.history = int(meta["step"]), list(meta["history"])
        self.text_used = int(meta.get("text_used", 0))
        if self.text_used and self.text is None:
            raise CheckpointError(f"{state_dir}: the run being resumed mixed in text batches; "
                                  "pass the same text source")
        for _ in range(self.text_used):  # the text stream is an iterator: replay it to where the run stopped
            next(self.text)

    # -- export -----------------------------------------------------------------------------
    def export(self, path: Path, *, overwrite: bool = True, half: bool = True,
               write_extra: Callable[[Path], None] | None = None) -> Path:
        """An edgevlm checkpoint: the model config (with its LoRA section) + the trained tensors.
        Frozen parts keep pointing at their WeightsRefs. ``half`` stores the trained tensors in fp16 (a
        few MB); frozen tensors no WeightsRef supplies are stored as they are.
        ``write_extra(folder)``: files the checkpoint needs beside its weights (the tokenizer of a model
        whose config names none), written before the folder is put in place. The Q-Former tokenizer of a
        tower that reads the question is written to ``qformer_tokenizer/`` when ``write_extra`` did not:
        the loaded checkpoint needs it to feed the runtime's questions to the Q-Former."""
        state = self.trainable_state()
        if half:
            state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}
        # Frozen tensors keep their dtype: the checkpoint rebuilds exactly the encoders and decoder training ran.
        state.update(self.frozen_state())
        # a grounding head reads this connector's tokens: one trained before them would not fit the new ones
        cfg = replace(self.model_cfg, lora=self.lora_cfg, weights=None, grounding_head=None)
        meta = {"stage": self.cfg.stage, "steps": str(self.step_n), "train_config": json.dumps(asdict(self.cfg))}
        q_tok = self.instruction_tokenizer

        def extra(folder: Path) -> None:
            if write_extra is not None:
                write_extra(folder)
            if q_tok is not None and not (folder / QFORMER_TOKENIZER_DIR).exists():
                q_tok.save(folder / QFORMER_TOKENIZER_DIR)

        return save_checkpoint(path, cfg, state, metadata=meta, overwrite=overwrite, write_extra=extra)


def warmup_cosine(step: int, warmup: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine to zero at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _resolve_autocast(mode: str, device: torch.device) -> str:
    """``TrainConfig.autocast`` on this machine: ``"bf16"`` or ``"none"`` (``"auto"``: bf16 only in hardware)."""
    from edgevlm.perf.limits import native_bf16

    if mode == "auto":
        return "bf16" if native_bf16(device) else "none"
    return mode


def _has_connector(state: dict[str, torch.Tensor] | None) -> bool:
    return bool(state) and any(k.startswith("tower.connector.") for k in state)


def _has_lora(state: dict[str, torch.Tensor] | None) -> bool:
    return bool(state) and any(k.endswith(LORA_SUFFIXES) for k in state)


__all__ = ["TrainConfig", "Example", "make_example", "encode_images", "cached_features", "VLMTrainer", "IGNORE",
           "warmup_cosine"]
