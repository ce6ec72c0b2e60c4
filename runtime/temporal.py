"""Temporal token reuse: between consecutive frames of one camera, re-encode only the cells whose pixels
changed and keep the rest of the previous frame's tokens.

A robot's camera mostly sees the same scene from one frame to the next, yet every embedding cache keys on
an exact hash of the pixels, so each new frame costs a whole tower pass. Here each camera keeps a
:class:`CameraState` (its ViTs' per-layer keys and values, the pixels they saw, its last embedding) and
each new frame is compared with it cell by cell on the tower's keep grid (the grid token dropping uses,
:func:`~edgevlm.runtime.token_keep.keep_plan`: a SPHINX tower's fused grid, a single ViT's patch grid):

    change[cell] = mean |pixel - pixel the cell was last encoded from|, in 8-bit levels (0..255)
    cells over ``threshold``  -> their patches (and the class token) go through every ViT layer again,
                                 attending to all tokens of the view: the kept ones through their
                                 recorded K/V (:meth:`~edgevlm.runtime.vision.vit.ViT.forward_rows`)
    flat cells (pixel std <= ``flat_std``: padding, a blank wall) whose surroundings changed by
    ``context_refresh`` of the grid since they were last encoded
                              -> re-encoded with the changed cells: a flat token's pixels say little, so
                                 a ViT fills it with what it sees around it (DINOv2 keeps global
                                 information in such tokens), and kept, it goes stale as the scene moves
    no cell over it           -> the previous embedding, unchanged: no tower work, and the decoder's
                                 KV prefix over the image stays valid
    the first frame, every ``refresh_every``-th, or more than ``max_changed`` of the cells
                              -> the frame whole (exact; bounds the drift of kept tokens)

CNN encoders and the connector always run whole on a frame that changed: a CNN's receptive field spans
the view, and both are a small share of a ViT tower. Several cameras' frames go through each layer
together, whatever their number of changed cells (:meth:`TemporalTower.encode`).

What reuse costs in accuracy and saves in time, and how the default threshold was chosen, is measured by
``bench/temporal_reuse.py`` (docs/streams.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgevlm.errors import ConfigError, ShapeError

from .token_keep import cells_to_patches
from .vision.vit import ViTState


@dataclass(frozen=True)
class TemporalReuse:
    """``threshold``: a cell is re-encoded when the mean absolute change of its pixels since it was last
    encoded exceeds this many 8-bit levels. ``refresh_every``: every this-many-th frame of a camera is
    encoded whole (1 = always: reuse off). ``max_changed``: above this fraction of changed cells the frame
    is encoded whole (as cheap, and exact). ``flat_std`` and ``context_refresh``: a cell whose pixels' standard
    deviation is at most ``flat_std`` levels is re-encoded once cells amounting to ``context_refresh`` of
    the grid were re-encoded around it since its own last encode (a value above 1 never does).

    The default threshold, 6 levels, is the largest at which the demo's detected boxes from reused
    tokens overlapped those from whole encodes (IoU >= 0.5) in every frame of the moving-object, pan and
    flicker videos of ``bench/temporal_reuse.py`` (8 levels: 0.91 of the moving object's frames), while
    re-encoding 12-22 % of the cells, flat ones included, for a tower 2.4-8.4x faster (docs/streams.md). Sensor noise of 2 levels per pixel averages to
    about 2.3 levels of change per cell between two frames: well below it."""

    threshold: float = 6.0
    refresh_every: int = 30
    max_changed: float = 0.6
    flat_std: float = 3.0
    context_refresh: float = 0.25

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or \
                not 0.0 <= self.threshold <= 255.0:
            raise ConfigError(f"threshold is a pixel change in 8-bit levels, 0..255; got {self.threshold!r}")
        if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int) or self.refresh_every < 1:
            raise ConfigError(f"refresh_every must be an int >= 1 (frames), got {self.refresh_every!r}")
        if isinstance(self.max_changed, bool) or not isinstance(self.max_changed, (int, float)) or \
                not 0.0 < self.max_changed <= 1.0:
            raise ConfigError(f"max_changed is a fraction of cells in (0, 1], got {self.max_changed!r}")
        for name in ("flat_std", "context_refresh"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0.0:
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")


@dataclass(frozen=True)
class ReuseReport:
    """What one frame cost: ``mode`` "full" (encoded whole), "partial" (``encoded`` of ``cells`` cells
    re-encoded) or "reused" (nothing over the threshold: the last embedding as it was); ``reason`` says
    why; ``max_change``: the largest cell change, in 8-bit levels (0 for a camera's first frame)."""

    mode: str
    reason: str
    cells: int
    encoded: int
    max_change: float

    @property
    def fraction(self) -> float:
        return self.encoded / self.cells if self.cells else 0.0


class CameraState:
    """One camera's memory between frames (:class:`TemporalTower`); one per camera, never shared."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything: the next frame is encoded whole."""
        self.ref: dict[str, torch.Tensor] | None = None  # per reusing ViT: the pixels its tokens saw, by cell
        self.vit: dict[str, list[ViTState]] | None = None  # per reusing ViT, per view
        self.embedding: torch.Tensor | None = None  # [visual_tokens, width], the last frame's
        self.flat: torch.Tensor | None = None  # [V, g*g] bool: the cell's pixels were flat when last encoded
        self.context: torch.Tensor | None = None  # [V, g*g]: grid fraction re-encoded around it since its encode
        self.since_full = 0  # frames since the last whole encode
        self.frames = 0

    @property
    def nbytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in (self.ref or {}).values())
        n += sum(s.nbytes for states in (self.vit or {}).values() for s in states)
        return n + (self.embedding.numel() * self.embedding.element_size() if self.embedding is not None else 0)


@dataclass
class _Plan:
    mode: str
    reason: str
    cells: list[torch.Tensor] | None  # per view: the cell ids to encode again (partial)
    change: torch.Tensor | None  # [V, g*g] levels
    context: torch.Tensor | None = None  # [V, g*g]: the cells' context counts after this frame (partial)


class TemporalTower:
    """A :class:`~edgevlm.runtime.tower.VisionTower` that encodes camera frames with temporal reuse.

    ::

        tt = TemporalTower(pipe.tower)                  # TemporalReuse() defaults
        cams = [CameraState(), CameraState()]
        (emb0, r0), (emb1, r1) = tt.encode([frame0, frame1], cams)   # one batched pass
        r1.mode, r1.fraction                             # "partial", 0.11
        pipe.generate(ImageEmbedding(emb0), "...")

    Refused (ConfigError, saying why) for towers it cannot apply to: an exported runner (reuse runs the
    torch tower), any-resolution or regrouped views, a Q-Former that reads the prompt, token dropping
    turned on, or no ViT on the keep grid."""

    def __init__(self, tower, reuse: TemporalReuse | None = None) -> None:
        self.tower = tower
        self.reuse = reuse or TemporalReuse()
        if not isinstance(self.reuse, TemporalReuse):
            raise ConfigError(f"reuse must be a TemporalReuse, got {type(self.reuse).__name__}")
        cfg = tower.config
        why = None
        if tower.runner is not tower.model:
            why = f"the tower runs on {tower.backend}; temporal reuse needs the torch tower (vision_backend='torch')"
        elif not cfg.views.fixed_views or cfg.pack is not None or cfg.regroup is not None:
            why = "its views depend on each image's size (any-resolution tiles)"
        elif tower.takes_instruction:
            why = "its Q-Former reads the prompt while encoding"
        elif tower.keep_ratio < 1.0:
            why = "token dropping is on (set_token_keep(1.0) first)"
        if why is None:
            self.plan = tower.model.keep_plan()  # ConfigError naming why the tower has no keep grid
            if not self.plan.vits:
                why = "no ViT encodes on its keep grid (a CNN needs the whole view)"
        if why is not None:
            raise ConfigError(f"temporal reuse cannot run this tower: {why}")
        self.views_per_image = cfg.views_per_image
        self.last_timings: dict[str, float] = {}

    @property
    def cells_per_view(self) -> int:
        return self.plan.grid * self.plan.grid

    # ---- frames -> embeddings ------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, frames: Sequence, states: Sequence[CameraState]) -> list[tuple[torch.Tensor, ReuseReport]]:
        """One frame per camera (paths, PIL images, HWC uint8 arrays) and that camera's state ->
        ``(embedding [visual_tokens, width], ReuseReport)`` per frame. The frames that need the tower go
        through it together: each layer's projections and MLP run once over every camera's recomputed
        rows. The states are updated; one that a failure leaves half-updated is reset (its next frame is
        encoded whole)."""
        from .image_io import load_images

        frames, states = list(frames), list(states)
        if len(frames) != len(states):
            raise ShapeError(f"{len(frames)} frames but {len(states)} camera states: one state per frame")
        if len({id(s) for s in states}) != len(states):
            raise ConfigError("each frame needs its own camera's state; the same CameraState was passed twice")
        if not all(isinstance(s, CameraState) for s in states):
            raise ConfigError("states must be CameraState objects (one per camera)")
        tower, v = self.tower, self.views_per_image
        t0 = time.perf_counter()
        arrays = load_images(frames, max_pixels=tower.max_image_pixels)
        t1 = time.perf_counter()
        pre = tower.preprocessor(arrays)
        views = {k: x.to(tower.device, tower.dtype) for k, x in pre.views.items()}
        per_cam = [{k: x[i * v:(i + 1) * v] for k, x in views.items()} for i in range(len(frames))]
        cells = [{n: self.cell_pixels(n, pv[n]) for n in self.plan.vits} for pv in per_cam]
        plans = [self._plan(s, c) for s, c in zip(states, cells)]
        t2 = time.perf_counter()
        work = [i for i, p in enumerate(plans) if p.mode != "reused"]
        if work:
            self._run([states[i] for i in work], [per_cam[i] for i in work], [cells[i] for i in work],
                      [plans[i] for i in work], [pre.image_sizes[i] for i in work] if pre.image_sizes else None)
        t3 = time.perf_counter()
        out = []
        for s, p in zip(states, plans):
            s.frames += 1
            s.since_full = 0 if p.mode == "full" else s.since_full + 1
            total = self.cells_per_view * v
            encoded = total if p.mode == "full" else sum(c.numel() for c in p.cells) if p.cells else 0
            top = float(p.change.max()) if p.change is not None else 0.0
            out.append((s.embedding, ReuseReport(p.mode, p.reason, total, encoded, top)))
        self.last_timings = {"decode_ms": (t1 - t0) * 1e3, "preprocess_ms": (t2 - t1) * 1e3,
                             "vision_ms": (t3 - t2) * 1e3, "encoded_frames": len(work)}
        return out

    def _plan(self, state: CameraState, cells: dict[str, torch.Tensor]) -> _Plan:
        r = self.reuse
        if state.embedding is None or state.vit is None:
            return _Plan("full", "first frame", None, None)
        change = self.cell_change(cells, state.ref)  # [V, g*g]
        if state.since_full + 1 >= r.refresh_every:
            return _Plan("full", f"refresh (every {r.refresh_every} frames)", None, change)
        over = change > r.threshold
        n = int(over.sum())
        if n == 0:
            return _Plan("reused", "no cell changed", None, change)
        if n > r.max_changed * over.numel():
            return _Plan("full", f"{n} of {over.numel()} cells changed", None, change)
        context = state.context + over.sum(1, keepdim=True) / over.shape[1]  # [V, g*g]
        stale = state.flat & (context >= r.context_refresh) & ~over
        encode = over | stale
        context = context.masked_fill(encode, 0.0)
        why = f"{n} of {over.numel()} cells changed" + (f" (+{int(stale.sum())} flat cells refreshed)" if stale.any() else "")
        return _Plan("partial", why, [row.nonzero()[:, 0] for row in encode], change, context)

    def cell_pixels(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Views ``[V, 3, H, W]`` of reusing ViT ``name`` -> ``[V, g*g, 3, pixels per cell]``: the pixels its
        patch convolution reads, cell by cell of the keep grid, in 8-bit levels (un-normalised with the
        encoder's std; the mean is left out, as changes and spreads do not need it)."""
        enc, g = self.tower.config.encoder(name), self.plan.grid
        hp, wp = enc.grid[0] * enc.patch_size, enc.grid[1] * enc.patch_size
        std = torch.tensor(enc.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        px = x[..., :hp, :wp].float() * (std * 255.0)
        v = px.shape[0]
        return px.reshape(v, 3, g, hp // g, g, wp // g).permute(0, 2, 4, 1, 3, 5).reshape(v, g * g, 3, -1)

    def cell_change(self, cells: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`cell_pixels` of a frame and of the reference -> ``[V, g*g]``: each cell's mean absolute
        change in 8-bit levels, the largest over the reusing ViTs."""
        return torch.stack([(cells[n] - ref[n]).abs().mean((2, 3)) for n in self.plan.vits]).amax(0)

    def flat_cells(self, cells: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`cell_pixels` of a frame -> ``[V, g*g]`` bool: cells whose pixels' standard deviation (8-bit
        levels, the largest over the channels and the reusing ViTs) is at most ``flat_std``."""
        return torch.stack([cells[n].std(-1).amax(-1) for n in self.plan.vits]).amax(0) <= self.reuse.flat_std

    def _rows(self, name: str, cells: torch.Tensor) -> torch.Tensor:
        """Kept cells [K] -> the token rows of ViT ``name`` to recompute: its class token, then the patches
        under the cells (class-token offset included)."""
        enc = self.tower.config.encoder(name)
        cls = int(enc.class_token)
        patches = cells_to_patches(cells[None], self.plan.grid, enc.grid[0])[0] + cls
        if cls:
            patches = torch.cat([patches.new_zeros(1), patches])
        return patches

    def _run(self, states: list[CameraState], views: list[dict[str, torch.Tensor]],
             cells: list[dict[str, torch.Tensor]], plans: list[_Plan], sizes) -> None:
        v, model = self.views_per_image, self.tower.model
        batch = {k: torch.cat([pv[k] for pv in views]) for k in views[0]}
        rows: dict[str, list] = {n: [] for n in self.plan.vits}
        kept: dict[str, list] = {n: [] for n in self.plan.vits}
        for s, p in zip(states, plans):
            for i in range(v):
                for n in self.plan.vits:
                    if p.mode == "full":
                        rows[n].append(None), kept[n].append(None)
                    else:
                        rows[n].append(self._rows(n, p.cells[i])), kept[n].append(s.vit[n][i])
        try:
            per_view, new = model.forward_rows(batch, rows, kept)
            per_image = model.per_image(per_view, [v] * len(states), sizes)
        except BaseException:
            for s in states:  # forward_rows updates states in place: a failure may leave them mixed
                s.reset()
            raise
        for j, (s, p, c, emb) in enumerate(zip(states, plans, cells, per_image)):
            s.vit = {n: new[n][j * v:(j + 1) * v] for n in self.plan.vits}
            s.embedding = emb
            flat = self.flat_cells(c)
            if p.mode == "full":
                s.ref, s.flat, s.context = c, flat, torch.zeros(flat.shape, device=flat.device)
                continue
            s.context = p.context
            for i in range(v):  # the re-encoded cells' pixels become their reference, and say if they are flat
                s.flat[i, p.cells[i]] = flat[i, p.cells[i]]
                for n in self.plan.vits:
                    s.ref[n][i, p.cells[i]] = c[n][i, p.cells[i]]


__all__ = ["TemporalReuse", "TemporalTower", "CameraState", "ReuseReport"]
