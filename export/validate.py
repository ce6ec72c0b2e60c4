"""Exported graph vs eager PyTorch on the same real images, with a typed error when they differ.

fp32 graphs must match everywhere: the largest error may be at most 1e-4 of the largest magnitude in the
eager output (``rel_max = max|out - ref| / max|ref|``). The bound is relative because the rounding of
two fp32 implementations scales with the values (a tower whose tokens reach 100 rounds 100x coarser than
one whose tokens reach 1) and with the CPU's kernels; 1e-4 is ~840 fp32 ulps, far above what a correct
graph shows (~1e-6) and far below a wrong op, constant or TF32 matmul (>= 1e-3). Reduced precisions are
judged by the relative RMS error over the whole output (``||out - ref|| / ||ref||``) and the lowest
per-token cosine similarity, and the numbers go into the manifest as the accuracy delta.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from edgevlm.errors import ExportValidationError

# precision -> (metric, bound)
TOLERANCES: dict[str, tuple[str, float]] = {
    "fp32": ("rel_max", 1e-4),
    "fp16": ("rel_rms", 2e-2),
    "int8": ("rel_rms", 0.1),
}


def compare(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    diff = out - ref
    cos = (out * ref).sum(-1) / np.maximum(np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1), 1e-30)
    return {"max_abs": float(np.abs(diff).max()),
            "rel_max": float(np.abs(diff).max() / max(np.abs(ref).max(), 1e-30)),
            "rel_rms": float(np.sqrt((diff ** 2).sum() / max((ref ** 2).sum(), 1e-30))),
            "min_cosine": float(cos.min())}


@dataclass(frozen=True)
class Feed:
    """One validation batch: the views, and what else the graph takes as keyword arguments that both the
    runner and the eager model read: ``text`` (an InstructBLIP instruction ``(ids [N, L], mask [N, L])``),
    ``masks`` and ``order`` (anyres token masks and a regrouping's gather, as the preprocessor makes them)."""

    views: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


def validate(run: Callable[..., torch.Tensor], model: torch.nn.Module,
             batches: list[dict[str, torch.Tensor] | Feed], precision: str, *,
             output: str, what: str) -> dict:
    """Run ``run`` and ``model`` on every batch of views (a views dict, or a :class:`Feed` whose ``extra``
    both get as keyword arguments); raise :class:`ExportValidationError` naming ``output`` and the error
    when the precision's bound is exceeded, else return the worst numbers. With an instruction the result
    also lists each batch's instruction length (``instruction_tokens``)."""
    metric, bound = TOLERANCES[precision]
    worst: dict[str, float] = {"max_abs": 0.0, "rel_max": 0.0, "rel_rms": 0.0, "min_cosine": 1.0}
    batch_views, batch_tokens = [], []
    model = model.float().eval()
    for batch in batches:
        feed = batch if isinstance(batch, Feed) else Feed(batch)
        with torch.inference_mode():
            fp32 = {k: v.float() for k, v in feed.views.items()}
            ref = model(fp32, **feed.extra).numpy()
        got = run(feed.views, **feed.extra).detach().to("cpu", torch.float32).numpy()
        if feed.extra.get("text") is not None:
            batch_tokens.append(int(feed.extra["text"][0].shape[1]))
        if got.shape != ref.shape:
            raise ExportValidationError(f"{what}: output {output!r} has shape {list(got.shape)}, eager "
                                        f"{list(ref.shape)}", output=output)
        if not np.isfinite(got).all():
            raise ExportValidationError(f"{what}: output {output!r} has non-finite values", output=output)
        c = compare(got, ref)
        worst = {k: (min if k == "min_cosine" else max)(worst[k], c[k]) for k in worst}
        batch_views.append(int(ref.shape[0]))
    if worst[metric] > bound:
        raise ExportValidationError(
            f"{what}: output {output!r} differs from eager PyTorch: {metric} {worst[metric]:.3g} > {bound:g} "
            f"(max_abs {worst['max_abs']:.3g}, rel_max {worst['rel_max']:.3g}, rel_rms {worst['rel_rms']:.3g}, "
            f"min cosine {worst['min_cosine']:.5f})",
            output=output, error=worst[metric], tolerance=bound)
    return {**worst, "metric": metric, "bound": bound, "views": sum(batch_views), "batches": len(batches),
            "batch_views": batch_views, **({"instruction_tokens": batch_tokens} if batch_tokens else {})}


__all__ = ["validate", "compare", "Feed", "TOLERANCES"]
