"""The vision tower: every encoder, then the connector; and the public API around it.

Two layers:

* :class:`VisionTowerModel` is a plain ``nn.Module`` from views to visual embeddings. It is the
  single source of truth for the math, and what export traces.
* :class:`VisionTower` (what :func:`load_vision_tower` returns) adds preprocessing, device/dtype
  handling and timings::

      tower = load_vision_tower("demo")
      emb = tower(images)                     # [n_images, visual_tokens, llm_width]
      emb = tower.from_pixels(pixel_values)   # already-preprocessed views [n_views, 3, H, W]
      emb = tower(images, instruction="What is in the picture?")  # InstructBLIP: the Q-Former reads it

All views of all images go through each encoder in one batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.config import ModelConfig, QFormerConnectorConfig, TowerConfig
from edgevlm.errors import CheckpointError, ConfigError, ShapeError
from edgevlm.options import torch_dtype

from .connectors import build_connector
from .connectors.anyres import AnyresPacker
from .connectors.strip_regroup import apply_order, regroup_inputs
from .embed_cache import EmbeddingCache, image_digest, instruction_digest
from .token_keep import MODES as KEEP_MODES
from .token_keep import KeepPlan, cells_to_patches, keep_count, keep_plan, select_cells
from .vision import build_encoder

TOWER_PREFIX = "tower."


def takes_instruction(config: TowerConfig) -> bool:
    """Whether the tower's connector reads the prompt too (an InstructBLIP Q-Former, ``qformer.text`` set)."""
    c = config.connector
    return isinstance(c, QFormerConnectorConfig) and c.qformer.text is not None


Instruction = tuple[torch.Tensor, torch.Tensor | None]  # (ids [n_views, L] int, mask [n_views, L] bool)


class VisionTowerModel(nn.Module):
    """Encoders + connector. ``forward(views) -> [n_views, tokens_per_view, out_width]``; then
    :meth:`per_image` makes one sequence per image (``pack``: LLaVA-NeXT's packing of anyres views)."""

    def __init__(self, config: TowerConfig):
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleDict({e.name: build_encoder(e) for e in config.encoders})
        self.connector = build_connector(config.connector, config)
        self.pack = AnyresPacker(config.pack, config) if config.pack is not None else None

    def encode(self, views: dict[str, torch.Tensor], cells: torch.Tensor | None = None,
               order: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Run each encoder once over all views: [N, 3, R_e, R_e] -> tokens [N, T, C] or maps [N, C, h, w].

        A tower with ``config.regroup`` (xGen-MM's anyres strips) needs ``order {encoder: [N, T]}`` from
        :func:`~edgevlm.runtime.connectors.strip_regroup.regroup_inputs`: the tokens are then regrouped
        with it (:func:`~edgevlm.runtime.connectors.strip_regroup.apply_order`) before they are returned.

        With kept ``cells [N, K]`` of the tower's keep grid (:meth:`keep_plan`) the ViTs the connector
        takes in any number see only the patches under those cells (see :meth:`forward`), their class
        token kept: ``[N, cls + K*r*r, C]``; CNNs and a SPHINX Q-Former's encoder see whole views.
        """
        dropping = self.kept_patch_ids(cells) if cells is not None else {}
        feats = {}
        n = None
        for e in self.config.encoders:
            if e.name not in views:
                raise ShapeError(f"no views for encoder {e.name!r}; got views for {sorted(views)}")
            x = views[e.name]
            if x.dim() != 4 or x.shape[1] != 3:
                raise ShapeError(f"views for encoder {e.name!r} must be [N, 3, H, W], got {list(x.shape)}")
            if n is not None and not torch.jit.is_tracing() and x.shape[0] != n:
                raise ShapeError(f"encoder {e.name!r} got {x.shape[0]} views, the others {n}")
            n = x.shape[0]
            if e.name in dropping:
                feats[e.name] = self.encoders[e.name](x, keep_ids=dropping[e.name])
            else:
                feats[e.name] = self.encoders[e.name](x)
        if self.config.regroup is not None:
            if order is None or set(order) != set(feats):
                raise ShapeError(f"this tower regroups its any-resolution tiles before the connector (xGen-MM "
                                 f"strips): encode needs order for {sorted(feats)} (regroup_inputs(config, "
                                 f"views_per_image, image_sizes)), got {None if order is None else sorted(order)}")
            # A group may take tokens from several tiles (a strip), so kept tokens go back to their places
            # first (zeros where dropped; kept_masks hides those) and the regrouping gathers whole views.
            feats = {k: apply_order(v if k not in dropping else _scatter_kept(v, dropping[k], self.config.encoder(k)),
                                    order[k]) for k, v in feats.items()}
        return feats

    def keep_plan(self) -> KeepPlan:
        """Where token dropping acts (the keep grid, the ViTs run on kept patches); a ConfigError naming
        why for towers it cannot apply to (:func:`edgevlm.runtime.token_keep.keep_plan`)."""
        return keep_plan(self.config)

    def kept_patch_ids(self, cells: torch.Tensor) -> dict[str, torch.Tensor]:
        """Kept cells ``[N, K]`` -> the patch ids ``[N, K*r*r]`` each dropping ViT keeps
        (r = its grid / the keep grid)."""
        plan = self.keep_plan()
        return {n: cells_to_patches(cells, plan.grid, self.config.encoder(n).grid[0]) for n in plan.vits}

    def kept_masks(self, masks: dict[str, torch.Tensor] | None, cells: torch.Tensor,
                   order: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
        """Padding masks ``[N, T]`` of the dropping ViTs cut to their kept tokens ``[N, cls + K*r*r]``, as
        :meth:`encode` cuts the tokens (anyres tiles' padding stays masked under token dropping).

        A regrouping tower (``order`` given) keeps every place instead, as :meth:`encode` does: its groups'
        masks ``[N, T]`` then also hide the dropped tokens, found where the regrouping moved them."""
        if order is not None:
            out = dict(masks or {})
            for name, ids in self.kept_patch_ids(cells).items():
                t = self.config.encoder(name).tokens
                kept = torch.zeros(ids.shape[0], t, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)
                moved = apply_order(kept.unsqueeze(-1), order[name].to(ids.device)).squeeze(-1)
                out[name] = moved if name not in out else out[name].to(moved.device) & moved
            return out
        if masks is None:
            return None
        out = dict(masks)
        for name, ids in self.kept_patch_ids(cells).items():
            if name in masks:
                m, g = masks[name], int(self.config.encoder(name).global_token)
                out[name] = torch.cat([m[:, :g], m[:, g:].gather(1, ids.to(m.device))], dim=1)
        return out

    @property
    def takes_instruction(self) -> bool:
        return takes_instruction(self.config)

    def forward(self, views: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
                cells: torch.Tensor | None = None, text: Instruction | None = None,
                order: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """-> ``[n_views, tokens_per_view, out_width]``. With kept ``cells [n_views, K]`` of the keep grid
        (token dropping, :meth:`keep_plan`): a SPHINX fusion gives ``[n_views, tokens_per_view - g*g + K,
        out_width]``, a token-wise projector (LLaVA) ``[n_views, cls + K, out_width]``, a Q-Former or
        resampler still ``[n_views, tokens_per_view, out_width]`` from fewer image keys.

        ``text = (ids [n_views, L] integer, mask [n_views, L] bool or None)``: the instruction, one row per
        view, for a tower whose Q-Former reads it (:attr:`takes_instruction`); without it such a tower
        runs the Q-Former's query path alone.

        ``order``: for a tower with ``config.regroup`` (xGen-MM anyres), the token regrouping that
        :meth:`encode` applies; ``masks`` are then the groups' masks from the same
        :func:`~edgevlm.runtime.connectors.strip_regroup.regroup_inputs`."""
        if self.config.regroup is not None or order is not None:
            if text is not None:
                raise ConfigError("a tower that regroups its tiles takes no instruction")
            if cells is None:
                return self.connector(self.encode(views, order=order), masks)
            # token dropping: the ViT ran on kept patches only; the groups attend to their kept, unpadded tokens
            return self.connector(self.encode(views, cells, order=order), self.kept_masks(masks, cells, order))
        if text is not None:
            if not self.takes_instruction:
                raise ConfigError(f"this tower's connector ({self.config.connector.kind!r}) takes no instruction; "
                                  "only a Q-Former with QFormerConfig.text (InstructBLIP) reads one")
            if not isinstance(text, (tuple, list)) or len(text) != 2:
                got = f"{len(text)} items" if isinstance(text, (tuple, list)) else type(text).__name__
                raise ShapeError(f"text must be a pair (ids [n_views, L], mask [n_views, L] or None), got {got}")
            # the instruction's tokens meet the image only as cross-attention keys: any number of them
            if cells is None:
                return self.connector(self.encode(views), masks, text=(text[0], text[1]))
            return self.connector(self.encode(views, cells), self.kept_masks(masks, cells), cells=cells,
                                  text=(text[0], text[1]))
        if cells is None:
            return self.connector(self.encode(views), masks)
        return self.connector(self.encode(views, cells), self.kept_masks(masks, cells), cells=cells)

    def forward_rows(self, views: dict[str, torch.Tensor], rows: dict[str, list], states: dict[str, list],
                     masks: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, list]]:
        """Temporal reuse (:mod:`edgevlm.runtime.temporal`): as :meth:`forward`, but each ViT named in
        ``rows`` computes only ``rows[name][i]`` of view i and takes its other tokens from
        ``states[name][i]`` (:meth:`~edgevlm.runtime.vision.vit.ViT.forward_rows`; None and None: the
        view whole, its state recorded). The other encoders and the connector run whole.
        -> (``[n_views, tokens_per_view, out_width]``, the ViTs' states)."""
        feats, out_states = {}, {}
        for e in self.config.encoders:
            if e.name not in views:
                raise ShapeError(f"no views for encoder {e.name!r}; got views for {sorted(views)}")
            if e.name in rows:
                feats[e.name], out_states[e.name] = self.encoders[e.name].forward_rows(
                    views[e.name], rows[e.name], states[e.name])
            else:
                feats[e.name] = self.encoders[e.name](views[e.name])
        return self.connector(feats, masks), out_states

    def per_image(self, per_view: torch.Tensor, views_per_image: list[int],
                  image_sizes: list[tuple[int, int]] | None = None,
                  cells: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``[n_views, tpv, D]`` -> one ``[tokens_i, D]`` per image: its views one after the other, or,
        with ``config.pack``, packed from its original ``image_sizes[i] = (h, w)``; with token dropping's
        kept ``cells [n_views, K]`` the packing leaves the dropped places out. Not part of
        :meth:`forward`, hence not of an exported graph: it runs in torch on whichever backend's per-view
        output, since how it packs depends on each image's size."""
        if self.pack is None:
            return group_by_image(per_view, views_per_image)
        if image_sizes is None or len(image_sizes) != len(views_per_image):
            raise ShapeError(f"packing any-resolution views needs each image's original (h, w): got "
                             f"{None if image_sizes is None else len(image_sizes)} sizes for {len(views_per_image)} images")
        if sum(views_per_image) != per_view.shape[0]:
            raise ShapeError(f"{per_view.shape[0]} views but views_per_image sums to {sum(views_per_image)}")
        views = torch.split(per_view, views_per_image)
        if cells is None:
            return [self.pack(v, size) for v, size in zip(views, image_sizes)]
        (ids,) = self.kept_patch_ids(cells).values()  # a packing tower has one encoder that drops
        return [self.pack(v, size, kept=k) for v, size, k in zip(views, image_sizes, torch.split(ids, views_per_image))]


def _scatter_kept(tokens: torch.Tensor, ids: torch.Tensor, enc) -> torch.Tensor:
    """A ViT's kept tokens ``[N, K, C]`` (no class token: regrouping towers have none) back at their patch
    ids ``[N, K]`` in a zero ``[N, T, C]``."""
    if enc.global_token:
        raise ShapeError(f"encoder {enc.name!r} has a class token; a regrouping tower's encoder has none")
    n, k, c = tokens.shape
    full = tokens.new_zeros(n, enc.tokens, c)
    return full.scatter(1, ids.to(tokens.device).unsqueeze(-1).expand(n, k, c), tokens)


def group_by_image(per_view: torch.Tensor, views_per_image: list[int]) -> list[torch.Tensor]:
    """[n_views, tpv, D] -> one [views_i * tpv, D] tensor per image (views in order, image-major)."""
    if sum(views_per_image) != per_view.shape[0]:
        raise ShapeError(f"{per_view.shape[0]} views but views_per_image sums to {sum(views_per_image)}")
    return [chunk.reshape(-1, per_view.shape[-1]) for chunk in torch.split(per_view, views_per_image)]


@dataclass
class WeightsReport:
    """Where each component's weights came from: 'checkpoint', a WeightsRef description, or 'random'."""

    sources: dict[str, str] = field(default_factory=dict)

    @property
    def random(self) -> list[str]:
        return [k for k, v in self.sources.items() if v == "random"]


class VisionTower:
    """Preprocessing + :class:`VisionTowerModel` on a device, with per-stage timings."""

    def __init__(self, model: VisionTowerModel, *, device: torch.device, dtype: torch.dtype,
                 preprocess_backend: str = "auto", threads: int | None = None,
                 max_image_pixels: int | None = None, weights: WeightsReport | None = None,
                 embedding_cache_bytes: int = 64 << 20, runner=None, backend: str = "torch",
                 keep_ratio: float = 1.0, keep_mode: str = "uniform", keep_seed: int = 0, keep_scorer=None,
                 instruction_tokenizer=None):
        """``runner(views, masks) -> [n_views, tokens, width]`` runs encoders + connector instead of
        ``model`` (an exported graph's runner, :func:`edgevlm.export.open_export`), named by
        ``backend``. ``keep_*``: token dropping, as :meth:`set_token_keep` takes it.
        ``instruction_tokenizer``: a :class:`~edgevlm.runtime.qformer_tokenizer.QFormerTokenizer` for
        towers whose Q-Former reads the prompt (InstructBLIP), so that instructions may be given as text."""
        from .image_io import DEFAULT_MAX_PIXELS
        from .preprocess import Preprocessor

        self.model = model.eval()
        self.device = device
        self.dtype = dtype
        self.preprocessor = Preprocessor(model.config, backend=preprocess_backend, threads=threads)
        self.max_image_pixels = max_image_pixels or DEFAULT_MAX_PIXELS
        self.weights = weights or WeightsReport()
        self.last_timings: dict[str, float] = {}
        # Same picture again (a follow-up question) -> same embedding without running the tower;
        # embedding_cache_bytes=0 turns it off, hashing included.
        self.embedding_cache = EmbeddingCache(embedding_cache_bytes)
        # What runs encoders + connector: the eager model, or an exported graph's runner with the same call.
        self.runner = self.model if runner is None else runner
        self.backend = backend if runner is not None else "torch"
        self.instruction_tokenizer = instruction_tokenizer
        self.keep_ratio, self.keep_mode, self.keep_seed, self.keep_scorer = 1.0, "uniform", 0, None
        if keep_ratio != 1.0 or keep_mode != "uniform" or keep_scorer is not None:
            self.set_token_keep(keep_ratio, keep_mode, keep_seed, keep_scorer)

    def set_token_keep(self, keep_ratio: float = 1.0, mode: str = "uniform", seed: int = 0,
                       scorer=None) -> None:
        """Keep ``keep_ratio`` of the keep grid's cells per view (token dropping; 1.0 = off).

        The keep grid (:meth:`VisionTowerModel.keep_plan`) is a SPHINX tower's fused ``g x g`` grid, or a
        single-ViT tower's own patch grid. Every ViT the connector takes in any number then runs only
        on the patches under the kept cells (its class token kept): a SPHINX fusion gives the decoder
        ``1 + K`` grid positions per view instead of ``1 + g*g``, LLaVA's projector ``K`` patch tokens
        instead of ``g*g`` (LLaVA-NeXT's packing leaves the dropped places out of its rows), a Q-Former or
        resampler its usual count from fewer image keys (xGen-MM's strips mask the dropped ones). Refused
        (ConfigError, saying why) where it cannot apply: a projector over a CNN, a connector that needs a
        fixed token count.
        ``mode``: ``"uniform"`` (evenly spread, the same for every image), ``"random"`` (FLIP's, seeded
        by ``seed``: the same subset on every call) or ``"score"``: ``scorer(views)`` returns
        ``[n_views, g*g]`` scores on the keep grid (a saliency or detector heat map pooled to it) and
        the top cells are kept. See :func:`edgevlm.runtime.token_keep.select_cells`.
        """
        if mode not in KEEP_MODES:
            raise ConfigError(f"keep mode must be one of {', '.join(KEEP_MODES)}, got {mode!r}")
        if (mode == "score") != (scorer is not None):
            raise ConfigError("keep mode 'score' takes a scorer(views) -> [n_views, g*g], and only it does")
        keep_count(1, keep_ratio)  # validates the ratio
        if keep_ratio < 1.0:
            self.model.keep_plan()  # refuses towers token dropping cannot apply to, saying why
            if self.backend != "torch":
                raise ConfigError(f"token dropping runs on the torch backend only (this tower runs {self.backend})")
        self.keep_ratio, self.keep_mode, self.keep_seed = float(keep_ratio), mode, int(seed)
        self.keep_scorer = scorer
        self.embedding_cache.clear()  # cached embeddings were made with the previous setting

    def kept_cells(self, views: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The keep-grid cells token dropping keeps for ``views`` (``[n_views, K]``), None when it is off."""
        if self.keep_ratio >= 1.0:
            return None
        n = next(iter(views.values())).shape[0]
        gen = torch.Generator().manual_seed(self.keep_seed) if self.keep_mode == "random" else None
        scores = self.keep_scorer(views) if self.keep_scorer is not None else None
        return select_cells(n, self.model.keep_plan().grid, self.keep_ratio, self.keep_mode, generator=gen,
                            scores=scores, device=self.device)

    @property
    def config(self) -> TowerConfig:
        return self.model.config

    @property
    def takes_instruction(self) -> bool:
        """Whether the Q-Former reads the prompt (InstructBLIP): then pass ``instruction=`` to get the
        embeddings the model was trained with; without one it runs its query path alone."""
        return takes_instruction(self.config)

    # ---- instructions (InstructBLIP) ----------------------------------------------------------
    def tokenize_instruction(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Instruction text(s) -> ``(ids int64 [N, L], mask bool [N, L])`` with the Q-Former's own tokenizer,
        as ``InstructBlipProcessor`` gives ``qformer_input_ids`` / ``qformer_attention_mask``."""
        return self._instruction_tokenizer()(texts)

    def _instruction_tokenizer(self):
        if self.instruction_tokenizer is None:
            raise ConfigError("this tower has no Q-Former tokenizer to read instruction text (a transformers "
                              "InstructBLIP folder keeps it in qformer_tokenizer/); set tower.instruction_tokenizer = "
                              "QFormerTokenizer.from_folder(path) or pass token ids per image")
        return self.instruction_tokenizer

    def _instruction_rows(self, instruction, n_images: int) -> list[list[int]] | None:
        """``None``, one str for every image, or one str / id list per image -> Q-Former ids per image."""
        if instruction is None:
            return None
        if not self.takes_instruction:
            raise ConfigError(f"this tower's connector ({self.config.connector.kind!r}) takes no instruction; "
                              "only a Q-Former with QFormerConfig.text (InstructBLIP) reads one")
        if isinstance(instruction, str):
            instruction = [instruction] * n_images
        if not isinstance(instruction, Sequence) or len(instruction) != n_images:
            got = (f"{len(instruction)} instructions" if isinstance(instruction, Sequence)
                   else type(instruction).__name__)
            raise ShapeError(f"instruction: expected one str for all images or one per image ({n_images}), got {got}")
        rows = []
        for item in instruction:
            if isinstance(item, str):
                rows.append(self._instruction_tokenizer().encode(item))
                continue
            ids = item.tolist() if isinstance(item, torch.Tensor) and item.ndim == 1 else item
            if not isinstance(ids, Sequence) or \
                    not all(isinstance(i, Integral) and not isinstance(i, bool) for i in ids):
                raise ShapeError(f"instruction: each item must be a str or a 1-D list of token ids, got "
                                 f"{type(item).__name__}")
            rows.append([int(i) for i in ids])
        return rows

    def _instruction_for_views(self, rows: list[list[int]], views_per_image: list[int]) -> Instruction:
        """Per-image id lists -> ``(ids [n_views, L], mask [n_views, L])``: each view reads its image's instruction."""
        from .qformer_tokenizer import pad_ids

        per_view = [r for r, v in zip(rows, views_per_image, strict=True) for _ in range(v)]
        return pad_ids(per_view, self.config.connector.qformer.text.pad_id)

    # ---- images -> embeddings -------------------------------------------------------------
    def _run(self, images, instruction=None) -> list[torch.Tensor]:
        from .image_io import load_images

        t0 = time.perf_counter()
        arrays = load_images(images, max_pixels=self.max_image_pixels)
        rows = self._instruction_rows(instruction, len(arrays))
        cache = self.embedding_cache
        # The key is the image's content, and the instruction's ids when the Q-Former reads one.
        keys = [instruction_digest(image_digest(a), None if rows is None else rows[i])
                for i, a in enumerate(arrays)] if cache.enabled else []
        out = [cache.get(k) for k in keys] if keys else [None] * len(arrays)
        todo = [i for i, e in enumerate(out) if e is None]
        t1 = t2 = t3 = time.perf_counter()
        if todo:
            pre = self.preprocessor([arrays[i] for i in todo])
            text = None if rows is None else self._instruction_for_views([rows[i] for i in todo], pre.views_per_image)
            t2 = time.perf_counter()
            per_view, cells = self._forward(pre.views, pre.token_masks, text, order=pre.token_order)
            per_image = self._per_image(per_view, pre.views_per_image, pre.image_sizes, cells)
            t3 = time.perf_counter()
            for i, emb in zip(todo, per_image):
                out[i] = emb
                if keys:
                    cache.put(keys[i], emb)
        self.last_timings = {"decode_ms": (t1 - t0) * 1e3, "preprocess_ms": (t2 - t1) * 1e3,
                             "vision_ms": (t3 - t2) * 1e3, "cached_images": len(arrays) - len(todo)}
        return out

    @torch.inference_mode()
    def _forward(self, views: dict[str, torch.Tensor], masks=None, text: Instruction | None = None,
                 order: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> ``(per-view embeddings, kept cells or None)``: packing needs to know which tokens were kept."""
        views = {k: v.to(self.device, self.dtype, non_blocking=True) for k, v in views.items()}
        if masks is not None:
            masks = {k: v.to(self.device) for k, v in masks.items()}
        cells = self.kept_cells(views)
        if order is not None:  # tiles regrouped before the connector (xGen-MM anyres): the gather is an input
            order = {k: v.to(self.device) for k, v in order.items()}
            if cells is None:  # an exported graph takes the order and the groups' masks as inputs
                out = self.runner(views, masks, order=order)
            else:  # (token dropping is torch-only)
                out = self.model(views, masks, cells=cells, order=order)
        elif text is not None:
            if self.runner is not self.model:  # an exported InstructBLIP graph takes it as qformer_input_ids/_mask
                out = self.runner(views, masks, text=text)  # (token dropping is torch-only: cells is None here)
            else:
                text = (text[0].to(self.device), None if text[1] is None else text[1].to(self.device))
                out = self.model(views, masks, cells=cells, text=text)
        elif cells is None:
            out = self.runner(views, masks)
        else:
            out = self.model(views, masks, cells=cells)
        if out.device != self.device or out.dtype != self.dtype:  # an engine's output lives where it runs
            out = out.to(self.device, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out, cells

    @torch.inference_mode()
    def _per_image(self, per_view: torch.Tensor, views_per_image: list[int],
                   image_sizes: list[tuple[int, int]] | None, cells: torch.Tensor | None = None) -> list[torch.Tensor]:
        return self.model.per_image(per_view, views_per_image, image_sizes, cells)

    def __call__(self, images, instruction=None) -> torch.Tensor:
        """Paths / PIL images / HWC uint8 arrays (one or a list) -> [n_images, visual_tokens, out_width].

        With ``anyres`` views, images with different tile counts cannot share one tensor: use
        :meth:`embed_each` for those. ``instruction`` (towers that :attr:`takes_instruction` only): one
        str for every image, or one str or list of Q-Former token ids per image.
        """
        per_image = self._run(images, instruction)
        lengths = {t.shape[0] for t in per_image}
        if len(lengths) > 1:
            raise ShapeError(f"images produced different token counts {sorted(lengths)} (any-resolution views); "
                             "use tower.embed_each(images) for a list of [tokens_i, width] tensors")
        return torch.stack(per_image)

    def embed_each(self, images, instruction=None) -> list[torch.Tensor]:
        """Like ``__call__`` but returns one ``[tokens_i, width]`` tensor per image."""
        return self._run(images, instruction)

    def from_pixels(self, pixel_values: torch.Tensor | dict[str, torch.Tensor],
                    views_per_image: list[int] | None = None, instruction=None,
                    image_sizes: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Already-preprocessed views -> [n_images, visual_tokens, out_width].

        ``pixel_values`` is either a dict ``{encoder_name: [n_views, 3, R_e, R_e]}`` or one tensor
        ``[n_views, 3, H, W]`` normalised for the tower's first encoder; other encoders then get it
        re-normalised with their own mean/std and bicubically resized to their resolution, the way
        SPHINX derives its DINOv2 and ConvNeXt inputs inside the model. ``views_per_image`` defaults
        to the view recipe's fixed count. ``instruction``: as for ``__call__``, per image. Towers that
        pack their views (``config.pack``, LLaVA-NeXT) or regroup their tiles (``config.regroup``, xGen-MM)
        also need each image's original ``image_sizes[i] = (h, w)``; images whose sequences differ in length cannot be stacked (pass
        them one at a time).
        """
        if isinstance(pixel_values, dict):
            views = pixel_values
        else:
            views = self._derive_views(pixel_values)
        n_views = next(iter(views.values())).shape[0]
        if views_per_image is None:
            if not self.config.views.fixed_views:
                raise ShapeError("any-resolution towers need views_per_image for from_pixels")
            v = self.config.views_per_image
            if n_views % v:
                raise ShapeError(f"{n_views} views is not a multiple of {v} views per image")
            views_per_image = [v] * (n_views // v)
        rows = self._instruction_rows(instruction, len(views_per_image))
        text = None if rows is None else self._instruction_for_views(rows, views_per_image)
        order = masks = None
        if self.config.regroup is not None:  # xGen-MM anyres: the groups and their masks from each image's size
            order, masks = regroup_inputs(self.config, views_per_image, image_sizes)
        per_view, cells = self._forward(views, masks, text=text, order=order)
        per_image = self._per_image(per_view, views_per_image, image_sizes, cells)
        lengths = sorted({t.shape[0] for t in per_image})
        if len(lengths) > 1:
            raise ShapeError(f"images produced different token counts {lengths}; pass them one at a time")
        return torch.stack(per_image)

    def _derive_views(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ShapeError(f"pixel_values must be [n_views, 3, H, W], got {list(x.shape)}")
        first = self.config.encoders[0]
        out = {}
        for e in self.config.encoders:
            y = x
            if (e.mean, e.std) != (first.mean, first.std):
                fm = torch.tensor(first.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                fs = torch.tensor(first.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                em = torch.tensor(e.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                es = torch.tensor(e.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                y = (y * fs + fm - em) / es
            if tuple(y.shape[-2:]) != (e.image_size, e.image_size):
                y = F.interpolate(y, size=(e.image_size, e.image_size), mode="bicubic", align_corners=False)
            out[e.name] = y
        return out

    # ---- introspection --------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        c = self.config
        return {
            "encoders": [{"name": e.name, "kind": e.kind, "image_size": e.image_size, "tokens": e.tokens,
                          "width": e.width, "params": _count(self.model.encoders[e.name]),
                          "weights": self.weights.sources.get(e.name, "?")} for e in c.encoders],
            "connector": {"kind": c.connector.kind, "params": _count(self.model.connector),
                          "weights": self.weights.sources.get("connector", "?")},
            "views": {"kind": c.views.kind, "views_per_image": c.views_per_image},
            "visual_tokens_per_image": c.visual_tokens_per_image,
            "out_width": c.out_width,
            "preprocess_backend": self.preprocessor.backend,
            "backend": self.backend,
            "token_keep": {"ratio": self.keep_ratio, "mode": self.keep_mode},
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---- building and loading ----------------------------------------------------------------

def build_tower_model(config: TowerConfig, state: dict[str, torch.Tensor] | None = None, *,
                      allow_random: bool, seed: int = 0) -> tuple[VisionTowerModel, WeightsReport]:
    """Build the module, fill it from encoders' WeightsRefs then ``state`` (tower-relative keys).

    Parameters that neither source covers stay randomly initialised only when ``allow_random``;
    otherwise that is a :class:`CheckpointError` listing them. Random init is seeded so that two
    loads of a preset give identical towers.
    """
    from .readers import read_encoder_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTowerModel(config)
    report = WeightsReport()
    covered: set[str] = set()
    refs: dict[str, str] = {}
    for e in config.encoders:
        if e.weights is not None:
            enc_state = read_encoder_weights(e.weights, e)
            _load_strict(model.encoders[e.name], enc_state, f"encoder {e.name!r} ({e.weights.format})")
            covered.update(f"encoders.{e.name}.{k}" for k in enc_state)
            refs[e.name] = f"{e.weights.format}:{e.weights.path}"
    state = state or {}
    if state:
        own = model.state_dict()
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise CheckpointError(f"checkpoint has {len(unexpected)} tensors this tower does not, e.g. {unexpected[:4]}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise CheckpointError(f"tensor {k!r}: checkpoint shape {list(v.shape)}, model expects {list(own[k].shape)}")
        model.load_state_dict(state, strict=False)
        covered.update(state)
    all_keys = list(model.state_dict())
    missing = [k for k in all_keys if k not in covered]
    parts = [(e.name, f"encoders.{e.name}.") for e in config.encoders] + [("connector", "connector.")]
    if config.pack is not None:
        parts.append(("pack", "pack."))
    for part, prefix in parts:
        keys = [k for k in all_keys if k.startswith(prefix)]
        if keys and all(k in state for k in keys):
            report.sources[part] = "checkpoint"
        elif part in refs:
            report.sources[part] = refs[part]
        elif not keys:
            report.sources[part] = "none"
        else:
            report.sources[part] = "random" if not any(k in covered for k in keys) else "partial"
    if missing and not allow_random:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tower tensors, e.g. {missing[:4]}")
    return model, report


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what}: weights do not fit the module: {e}") from None


# transformers model_type -> "module:function" returning (TowerConfig, tower state dict)
TRANSFORMERS_TOWERS: dict[str, str] = {
    "llava": "edgevlm.runtime.readers.hf_models:read_llava_tower",
    "llava_next": "edgevlm.runtime.readers.hf_models:read_llava_next_tower",
    "blip-2": "edgevlm.runtime.readers.hf_models:read_blip2_tower",
    "instructblip": "edgevlm.runtime.readers.hf_models:read_instructblip_tower",
    "xgenmm": "edgevlm.runtime.readers.xgenmm:read_xgenmm_tower",  # BLIP-3: SigLIP -> perceiver resampler
}


# Other checkpoint containers with a vision tower: ModelSource.kind -> "module:function" returning
# (TowerConfig, tower state dict) for the source's path.
CONTAINER_TOWERS: dict[str, str] = {
    "sphinx": "edgevlm.runtime.readers.sphinx_pth:read_sphinx_tower",
    "minigpt4": "edgevlm.runtime.readers.minigpt4:read_minigpt4_tower",
}


def resolve_tower_source(source: Any) -> tuple[TowerConfig, dict[str, torch.Tensor], bool]:
    """-> (tower config, tower-relative state dict, whether random init is acceptable). ``source`` is a
    TowerConfig or anything :func:`~.source.resolve_source` takes that has a vision tower."""
    import importlib

    from .checkpoint import load_checkpoint
    from .source import resolve_source

    if isinstance(source, TowerConfig):
        return source, {}, True
    src = resolve_source(source)
    if src.kind == "config":
        if src.config.tower is None:
            raise ConfigError(f"model config {src.config.name!r} is text-only (no tower)")
        return src.config.tower, _tower_state(src.config, {}), True
    if src.kind == "checkpoint":
        cfg, state = load_checkpoint(src.path)
        if cfg.tower is None:
            raise CheckpointError(f"{src.path}: this checkpoint is a text-only model (its config has no tower)")
        return cfg.tower, _tower_state(cfg, state), False
    if src.kind == "transformers":
        if src.model_type not in TRANSFORMERS_TOWERS:
            raise CheckpointError(f"{src.path}: transformers model_type {src.model_type!r} has no vision-tower "
                                  f"reader; supported: {sorted(TRANSFORMERS_TOWERS)}")
        module, fn = TRANSFORMERS_TOWERS[src.model_type].split(":")
        cfg, state = getattr(importlib.import_module(module), fn)(src.path)
        return cfg, state, False
    if src.kind in CONTAINER_TOWERS:
        module, fn = CONTAINER_TOWERS[src.kind].split(":")
        cfg, state = getattr(importlib.import_module(module), fn)(src.path)
        return cfg, state, False
    raise CheckpointError(f"{src.path}: a .gguf file holds a decoder and its tokenizer, no vision tower")


def _tower_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tower-relative tensors of a model: its trained weights shipped beside the config (``cfg.weights``,
    e.g. the demo's connector), overridden by the checkpoint's own, as the full loader merges them."""
    from .readers import resolve_weights_path
    from .readers.safetensors_io import load_safetensors

    if cfg.weights is not None:
        state = {**load_safetensors(resolve_weights_path(cfg.weights)), **state}
    return {k[len(TOWER_PREFIX):]: v for k, v in state.items() if k.startswith(TOWER_PREFIX)}


def load_vision_tower(source: Any, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                      preprocess_backend: str = "auto", threads: int | None = None,
                      max_image_pixels: int | None = None, seed: int = 0) -> VisionTower:
    """Load a vision tower from a preset name, an edgevlm checkpoint folder, a transformers LLaVA /
    LLaVA-NeXT / BLIP-2 / InstructBLIP folder, or a config object.

    Presets build real encoders where their config names real weights (``demo``) and random weights
    elsewhere; ``tower.weights.sources`` says which is which. Checkpoints must cover every tensor.
    An InstructBLIP folder's Q-Former tokenizer (``qformer_tokenizer/``) becomes
    ``tower.instruction_tokenizer``.
    """
    from .source import resolve_source

    src = source if isinstance(source, TowerConfig) else resolve_source(source)
    config, state, allow_random = resolve_tower_source(src)
    model, report = build_tower_model(config, state, allow_random=allow_random, seed=seed)
    dev = torch.device(device)
    dt = torch_dtype(dtype)
    model = model.to(dev, dt)
    return VisionTower(model, device=dev, dtype=dt, preprocess_backend=preprocess_backend, threads=threads,
                       max_image_pixels=max_image_pixels, weights=report,
                       instruction_tokenizer=instruction_tokenizer_for(src, config))


def instruction_tokenizer_for(src: Any, config: TowerConfig):
    """The Q-Former tokenizer for a tower that :func:`takes_instruction`, read from a transformers folder
    or edgevlm checkpoint source (``<folder>/qformer_tokenizer``, truncating to the Q-Former's positions); ``None`` for other
    towers and sources, or when the folder has none."""
    from .qformer_tokenizer import load_qformer_tokenizer

    kind = getattr(src, "kind", None)
    if not takes_instruction(config) or kind not in ("transformers", "checkpoint") or src.path is None:
        return None
    text = config.connector.qformer.text
    if kind == "checkpoint":  # only its qformer_tokenizer/: the folder's own tokenizer.json is the decoder's
        from .qformer_tokenizer import QFORMER_TOKENIZER_DIR

        folder = src.path / QFORMER_TOKENIZER_DIR
        return load_qformer_tokenizer(folder, max_length=text.max_positions) if folder.is_dir() else None
    return load_qformer_tokenizer(src.path, max_length=text.max_positions)


__all__ = ["VisionTowerModel", "VisionTower", "WeightsReport", "build_tower_model", "load_vision_tower",
           "resolve_tower_source", "group_by_image", "TRANSFORMERS_TOWERS", "CONTAINER_TOWERS", "takes_instruction",
           "instruction_tokenizer_for", "Instruction"]
