"""Images -> normalised view tensors for every encoder of a tower.

``Preprocessor(tower_cfg)(images)`` returns, per encoder ``e`` at its own resolution ``R = e.image_size``,
``views[e.name]``: float32 ``[n_views_total, 3, R, R]``, all views of all images stacked image-major, in
the view order of :mod:`edgevlm.runtime.views` (pad_square: global then row-major crops, n=2: TL, TR,
BL, BR; anyres: base then tiles row-major).

Reference semantics (this defines the numbers; PIL bicubic on uint8, per encoder resolution):

- ``pad_square``: pad to a square with ``pad_rgb``, image centred; n = 0: resize to R x R. n > 0: resize
  the square to an n*R canvas; global view = canvas resized to R x R; then the n*n crops of the canvas.
- ``stretch``: resize to R x R. ``anyres``: base = stretch; the best grid's canvas filled with
  ``anyres_fill`` holds the image resized keeping aspect, centred; tiles row-major.
- then ``(pixel / 255 - mean) / std`` computed as ``pixel * a + b`` with float32 ``a = 1/(255 std)``,
  ``b = -mean/std``, CHW.

Pass order: horizontal first, then vertical, each pass PIL's own (``resize`` changing one axis). That
is what Pillow always did up to version 12 (the models were trained with it); Pillow 13's ``resize``
picks the order from a cost heuristic and, for some shapes (e.g. tall images whose height shrinks),
runs the vertical pass first, which moves some pixels by 1-2 levels. Fixing the order keeps the
reference version-independent and lets the C++ path match it.

Memory stays bounded on the reference path too: the padded square is never built. PIL's resize is
separable (horizontal pass, uint8 rounding, vertical pass), so the horizontal pass runs on the image
rows only (for portrait images on row chunks of at most ~16 MB, padded left/right), and padding rows,
whose horizontal pass is exactly the pad colour, are added to the narrow intermediate before the
vertical pass. Results are bit-identical to ``padded_square.resize(...)``; peak extra memory is
``canvas_w x max(h, w)`` pixels instead of ``max(h, w)^2``.

Backends: ``"cpp"`` (``edgevlm._C``, multithreaded, all three view kinds) reproduces the reference with
PIL's exact fixed-point weights and rounds/clamps where PIL does, accumulating in float32; the padded
square and the canvases are never materialised. Tolerance against the reference, in 8-bit pixel
levels (times 1/std after normalisation): contract max |diff| <= 3/255 and mean <= 0.5/255; measured
max 1/255 and mean < 0.01/255 on real photos and odd sizes (asserted at that level in the tests) --
a few pixels per frame differ by one level where a float sum lands within ~1e-5 of a rounding
boundary. The kernels exist at three vector widths (AVX-512, AVX2+FMA, SSE2; the 4-wide set is what
aarch64/NEON builds) chosen for the CPU at load time; ``EDGEVLM_SIMD=avx2|sse2`` or
``edgevlm._C.set_simd`` can lower the choice. Thread count never changes the numbers.
``"reference"`` is the PIL/NumPy path above. ``"auto"`` takes cpp when the extension imports, else
reference, and says so in ``.backend``/``.backend_reason`` and in every result (plus one
RuntimeWarning per process).
"""

from __future__ import annotations

import importlib
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from edgevlm.config import EncoderConfig, TowerConfig, ViTConfig
from edgevlm.errors import BackendUnavailableError, ConfigError, ImageError, ShapeError
from .image_io import load_image
from .views import anyres_layout, crop_boxes, pad_to_square, select_best_grid, tile_token_mask

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the repository root (needs a C++17 compiler)"
_warned_fallback = False


def _import_ext():
    """Import the C++ extension; tests monkeypatch ``sys.modules['edgevlm._C']`` to simulate its absence."""
    return importlib.import_module("edgevlm._C")


def default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


@dataclass
class PreprocessResult:
    views: dict[str, torch.Tensor]  # encoder name -> float32 [n_views_total, 3, R, R]
    views_per_image: list[int]
    token_masks: dict[str, torch.Tensor] | None  # anyres: bool [n_views_total, encoder tokens], False = padding
    backend: str  # "cpp" or "reference": the one that ran
    ms: float
    backend_reason: str = ""
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # each image's original (h, w)
    # towers with TowerConfig.regroup (xGen-MM anyres): encoder name -> int64 [n_views_total, tokens], the
    # gather that regroups the tiles' tokens (connectors.strip_regroup); token_masks are then the groups' masks
    token_order: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class _Job:
    """One resampling of the frame; mirrors the C++ job tuple (see cpp_ext/preprocess.cpp)."""

    src: tuple[int, int, int, int]  # virtual source SH, SW and the image's top, left on it
    pad: tuple[int, int, int]
    resized: tuple[int, int]  # RH, RW
    canvas: tuple[int, int]  # CH, CW
    at: tuple[int, int]  # oy, ox of the resized image on the canvas
    fill: tuple[int, int, int]
    views: tuple[tuple[int, int, int, int], ...]  # (view_idx, kind 0 crop / 1 global, y0, x0)

    def as_tuple(self) -> tuple:
        return (*self.src, self.pad, *self.resized, *self.canvas, *self.at, self.fill, list(self.views))


@dataclass
class _Plan:
    n_views: int
    jobs: dict[int, list[_Job]]  # resolution -> jobs
    layouts: dict[int, Any] = field(default_factory=dict)  # anyres: resolution -> AnyresLayout
    cpp_jobs: dict[int, list] = field(default_factory=dict)  # the C++ argument tuples, built once

    def __post_init__(self) -> None:
        self.cpp_jobs = {R: [j.as_tuple() for j in jobs] for R, jobs in self.jobs.items()}


class Preprocessor:
    """Turns HWC uint8 frames into every encoder's normalised views (see module docstring).

    ``backend``: ``"auto"`` | ``"cpp"`` | ``"reference"``. ``threads``: C++ worker threads (default: the
    cores this process may use, at most 8); results do not depend on it.
    """

    def __init__(self, tower_cfg: TowerConfig, backend: str = "auto", threads: int | None = None):
        if backend not in ("auto", "cpp", "reference"):
            raise ConfigError(f"backend must be 'auto', 'cpp' or 'reference', got {backend!r}")
        self.tower = tower_cfg
        self.view_cfg = tower_cfg.views
        self.encoders: tuple[EncoderConfig, ...] = tower_cfg.encoders
        self.threads = default_threads() if threads is None else int(threads)
        if not 1 <= self.threads <= 256:
            raise ConfigError(f"threads must be in 1..256, got {threads}")
        groups: dict[int, list[EncoderConfig]] = {}
        for e in self.encoders:  # encoders sharing a resolution share the resampling
            groups.setdefault(e.image_size, []).append(e)
        self.groups = groups
        # anyres picks one grid per image for all encoders, judged at the first encoder's tile size.
        self.grid_base = self.encoders[0].image_size
        self._norm = {e.name: (np.asarray([1.0 / (255.0 * s) for s in e.std], np.float32),
                               np.asarray([-m / s for m, s in zip(e.mean, e.std)], np.float32)) for e in self.encoders}
        self._plans: OrderedDict[tuple[int, int], _Plan] = OrderedDict()
        self._plans_lock = threading.Lock()
        self._ext = None
        global _warned_fallback
        if backend == "reference":
            self.backend, self.backend_reason = "reference", "requested"
            return
        try:
            self._ext = _import_ext()
        except ImportError as e:
            if backend == "cpp":
                raise BackendUnavailableError(f"backend='cpp' needs the C++ extension edgevlm._C, which failed to "
                                              f"import ({e}); {BUILD_HINT}") from e
            self.backend = "reference"
            self.backend_reason = f"edgevlm._C is not importable ({e}); using the slower PIL reference path"
            if not _warned_fallback:
                warnings.warn(f"edgevlm preprocessing: {self.backend_reason}; {BUILD_HINT}", RuntimeWarning, stacklevel=2)
                _warned_fallback = True
            return
        self.backend = "cpp"
        self.backend_reason = "requested" if backend == "cpp" else f"edgevlm._C available ({self._ext.simd_level()})"

    # ---- geometry -----------------------------------------------------------------------------

    def _plan(self, h: int, w: int) -> _Plan:
        key = (h, w)
        with self._plans_lock:  # camera callbacks may share one Preprocessor across threads
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = self._build_plan(h, w)
        with self._plans_lock:
            self._plans[key] = plan
            if len(self._plans) > 64:
                self._plans.popitem(last=False)
        return plan

    def _build_plan(self, h: int, w: int) -> _Plan:
        v = self.view_cfg
        jobs: dict[int, list[_Job]] = {}
        layouts: dict[int, Any] = {}
        pad, fill = tuple(v.pad_rgb), tuple(v.anyres_fill)
        if v.kind == "anyres":
            grid = select_best_grid(h, w, v.anyres_grids, self.grid_base)
        for R in self.groups:
            if v.kind == "pad_square":
                g = pad_to_square(h, w)
                n = v.crop_grid
                C = n * R if n else R
                views = ((0, 1, 0, 0),) + tuple((1 + k, 0, y0, x0) for k, (y0, x0, _, _) in
                                                enumerate(crop_boxes(R, n))) if n else ((0, 0, 0, 0),)
                jobs[R] = [_Job((g.side, g.side, g.top, g.left), pad, (C, C), (C, C), (0, 0), fill, views)]
                n_views = len(views)
            elif v.kind == "stretch":
                jobs[R] = [_Job((h, w, 0, 0), pad, (R, R), (R, R), (0, 0), fill, ((0, 0, 0, 0),))]
                n_views = 1
            else:
                lay = anyres_layout(h, w, grid, R)
                layouts[R] = lay
                tiles = tuple((1 + k, 0, y0, x0) for k, (y0, x0, _, _) in enumerate(lay.tile_boxes()))
                jobs[R] = [_Job((h, w, 0, 0), pad, (R, R), (R, R), (0, 0), fill, ((0, 0, 0, 0),)),
                           _Job((h, w, 0, 0), pad, (lay.resized_h, lay.resized_w), lay.canvas,
                                (lay.top, lay.left), fill, tiles)]
                n_views = 1 + lay.n_tiles
        return _Plan(n_views=n_views, jobs=jobs, layouts=layouts)

    def views_per_image(self, images: Sequence[Any]) -> list[int]:
        """View counts for these images (anyres varies per image), e.g. to size ``out`` buffers."""
        return [self._plan(*_frame(x, i).shape[:2]).n_views for i, x in enumerate(_as_list(images))]

    # ---- running ------------------------------------------------------------------------------

    def __call__(self, images: Any, out: dict[str, Any] | None = None) -> PreprocessResult:
        """``images``: a list of uint8 ``[H, W, 3]`` arrays (anything :func:`load_image` accepts is
        converted through it first). ``out``: optional preallocated float32 CPU buffers per encoder name,
        exactly ``[n_views_total, 3, R, R]`` and contiguous, written in place."""
        t0 = time.perf_counter()
        frames = [_frame(x, i) for i, x in enumerate(_as_list(images))]
        plans = [self._plan(f.shape[0], f.shape[1]) for f in frames]
        counts = [p.n_views for p in plans]
        views, arrays = self._outputs(sum(counts), out)
        offset = 0
        for f, plan in zip(frames, plans):
            if self.backend == "cpp":
                self._run_cpp(f, plan, arrays, offset)
            else:
                self._run_reference(f, plan, arrays, offset)
            offset += plan.n_views
        sizes = [(int(f.shape[0]), int(f.shape[1])) for f in frames]
        order = None
        if self.tower.regroup is not None:  # the groups' masks on the stitched token map, not per tile
            from .connectors.strip_regroup import regroup_inputs

            order, masks = regroup_inputs(self.tower, counts, sizes)
        else:
            masks = self._token_masks(plans) if self.view_cfg.kind == "anyres" else None
        return PreprocessResult(views=views, views_per_image=counts, token_masks=masks, backend=self.backend,
                                ms=(time.perf_counter() - t0) * 1e3, backend_reason=self.backend_reason,
                                image_sizes=sizes, token_order=order)

    def _outputs(self, n: int, out: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        out = out or {}
        unknown = set(out) - {e.name for e in self.encoders}
        if unknown:
            raise ShapeError(f"out has buffers for {sorted(unknown)}, but the encoders are "
                             f"{[e.name for e in self.encoders]}")
        views, arrays = {}, {}
        for e in self.encoders:
            shape = (n, 3, e.image_size, e.image_size)
            t = out.get(e.name)
            if t is None:
                t = torch.empty(shape, dtype=torch.float32)
            elif not isinstance(t, torch.Tensor):
                raise ShapeError(f"out[{e.name!r}] must be a torch.Tensor, got {type(t).__name__}")
            elif tuple(t.shape) != shape or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                raise ShapeError(f"out[{e.name!r}] must be a contiguous float32 CPU tensor of shape {list(shape)}, "
                                 f"got {t.dtype} {t.device} {list(t.shape)} contiguous={t.is_contiguous()}")
            views[e.name] = t
            arrays[e.name] = t.detach().numpy()  # shares memory: the C++ path writes straight into it
        spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes, k) for k, a in arrays.items() if a.nbytes)
        for (_, end, k1), (start, _, k2) in zip(spans, spans[1:]):
            if start < end:  # two encoders writing one buffer would race and mix normalisations
                raise ShapeError(f"out[{k1!r}] and out[{k2!r}] share memory; give each encoder its own buffer")
        return views, arrays

    def _run_cpp(self, frame: np.ndarray, plan: _Plan, arrays: dict[str, np.ndarray], offset: int) -> None:
        groups = []
        for R, encs in self.groups.items():
            targets = [(arrays[e.name], offset, e.mean, e.std) for e in encs]
            groups.append((R, plan.cpp_jobs[R], targets))
        try:
            self._ext.preprocess_views(frame, groups, self.threads)
        except ValueError as e:  # the C++ side validates everything; reaching this is a bug upstream of it
            raise ShapeError(f"edgevlm._C.preprocess_views rejected its arguments: {e}") from e

    def _run_reference(self, frame: np.ndarray, plan: _Plan, arrays: dict[str, np.ndarray], offset: int) -> None:
        pil = Image.fromarray(frame)
        for R, encs in self.groups.items():
            for job in plan.jobs[R]:
                for idx, view in reference_job(pil, job, R):
                    chw = view.transpose(2, 0, 1)
                    for e in encs:
                        a, b = self._norm[e.name]
                        dst = arrays[e.name][offset + idx]
                        np.multiply(chw, a[:, None, None], out=dst, casting="unsafe")
                        dst += b[:, None, None]

    def _token_masks(self, plans: list[_Plan]) -> dict[str, torch.Tensor]:
        masks = {}
        for e in self.encoders:
            patch = e.patch_size if isinstance(e, ViTConfig) else None
            rows = []
            for p in plans:
                tiles = tile_token_mask(p.layouts[e.image_size], e.grid, patch)
                rows.append(np.ones((1, tiles.shape[1]), bool))  # the base view is never padded
                rows.append(tiles)
            m = np.concatenate(rows)
            if e.global_token:  # a class token is always real: masks line up with the encoder's tokens
                m = np.concatenate([np.ones((m.shape[0], 1), bool), m], axis=1)
            masks[e.name] = torch.from_numpy(m)
        return masks


# ---- reference resampling (PIL) -----------------------------------------------------------------

_CHUNK_PIXELS = 4 << 20  # padded rows built per horizontal-pass call (16 MB as PIL's RGBX)


def resize_virtual(img: Image.Image, src: tuple[int, int, int, int], pad: tuple[int, int, int],
                   size: tuple[int, int]) -> Image.Image:
    """PIL bicubic resize of ``img`` placed at ``(top, left)`` on a ``SH x SW`` pad-coloured source to
    ``size = (RH, RW)``, bit-identical to building that source, without building it (module docstring)."""
    SH, SW, top, left = src
    RH, RW = size
    w, h = img.size
    if (SH, SW) == (h, w):  # explicit passes: Pillow >= 13 may run the vertical pass first (see above)
        return img.resize((RW, h), Image.BICUBIC).resize((RW, RH), Image.BICUBIC)
    if SW == w:  # no left/right padding: one horizontal pass over the image rows
        rows = img.resize((RW, h), Image.BICUBIC)
    else:
        rows = Image.new("RGB", (RW, h))
        step = max(1, _CHUNK_PIXELS // SW)
        for y in range(0, h, step):
            band = Image.new("RGB", (SW, min(step, h - y)), pad)
            band.paste(img.crop((0, y, w, y + band.height)), (left, 0))
            rows.paste(band.resize((RW, band.height), Image.BICUBIC), (0, y))
    if SH == h:
        return rows.resize((RW, RH), Image.BICUBIC)
    mid = Image.new("RGB", (RW, SH), pad)  # the horizontal pass of a pure padding row is the pad colour
    mid.paste(rows, (0, top))
    return mid.resize((RW, RH), Image.BICUBIC)


def reference_job(img: Image.Image, job: _Job, R: int) -> list[tuple[int, np.ndarray]]:
    """The uint8 ``[R, R, 3]`` views of one job, as ``(view_idx, array)``."""
    resized = resize_virtual(img, job.src, job.pad, job.resized)
    if job.canvas != job.resized:
        canvas = Image.new("RGB", (job.canvas[1], job.canvas[0]), job.fill)
        canvas.paste(resized, (job.at[1], job.at[0]))
    else:
        canvas = resized
    out = []
    for idx, kind, y0, x0 in job.views:
        v = canvas.resize((R, R), Image.BICUBIC) if kind == 1 else canvas.crop((x0, y0, x0 + R, y0 + R))
        out.append((idx, np.asarray(v)))
    return out


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _frame(x: Any, i: int) -> np.ndarray:
    """uint8 [H, W, 3] arrays pass through (rows may be strided); anything else goes via load_image."""
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 3 and x.shape[2] == 3 and x.size:
        if x.strides[2] != 1 or x.strides[1] != 3 or x.strides[0] < 3 * x.shape[1]:
            x = np.ascontiguousarray(x)
        return x
    try:
        return load_image(x)
    except ImageError as e:
        raise type(e)(f"images[{i}]: {e}") from e


__all__ = ["Preprocessor", "PreprocessResult", "resize_virtual", "reference_job", "default_threads", "BUILD_HINT"]
