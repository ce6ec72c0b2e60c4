"""Preprocessing latency: C++ fast path vs the PIL reference, side by side, on one 1920x1080 frame.

Configs: (a) ``sphinx-1k-2enc``: sphinx-1k's 5 views (global + 2x2 crops at 224) for two encoders with
different normalisations (CLIP, ImageNet); (b) the full ``sphinx-1k`` tower (4 encoders, ConvNeXt at
256); (c) ``demo`` (DINOv2 at 224 + EfficientNet at 256, one padded view). Each row: median and p90
ms per frame, the ratio to the C++ path, and the physical bound beside it: (frame bytes read + view
bytes written) / memory bandwidth measured here with a large NumPy copy on ``--threads`` threads.
``pil-naive`` is the usual recipe (materialise the padded square, PIL-resize per encoder, normalise in
torch) for scale. ``cpp-avx2``/``cpp-sse2`` rerun the C++ path with lower kernel sets.

    python bench/preprocess.py --repeat 100 --threads 2 --out bench/results/preprocess.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

import edgevlm
from edgevlm import get_preset
from edgevlm.config import SphinxFusionConfig, TowerConfig
from edgevlm.perf.limits import cpu_model, git_commit
from edgevlm.presets import clip_vit_l14, dinov2
from edgevlm.runtime.preprocess import Preprocessor
from edgevlm.runtime.views import pad_to_square

FIELDS = ["timestamp", "cpu", "simd", "threads", "loadavg", "python", "numpy", "pillow", "torch", "edgevlm", "git",
          "config", "backend", "frame", "views", "median_ms", "p90_ms", "ratio_vs_cpp", "mbytes", "bandwidth_gbs",
          "bound_ms", "x_bound"]


def full_hd_frame() -> np.ndarray:
    """1920x1080 mosaic of real photos (scikit-image), PIL-bicubic resized: astronaut | coffee / chelsea."""
    import skimage.data

    a = Image.fromarray(skimage.data.astronaut()).resize((1080, 1080), Image.BICUBIC)
    c = Image.fromarray(skimage.data.coffee()).resize((840, 560), Image.BICUBIC)
    k = Image.fromarray(skimage.data.chelsea()).resize((840, 520), Image.BICUBIC)
    frame = Image.new("RGB", (1920, 1080))
    frame.paste(a, (0, 0))
    frame.paste(c, (1080, 0))
    frame.paste(k, (1080, 560))
    return np.asarray(frame).copy()


def towers() -> dict[str, TowerConfig]:
    s1k = get_preset("sphinx-1k").tower
    clip, dino = clip_vit_l14(final_norm=True), dinov2("dinov2", "g")  # CLIP and ImageNet normalisation
    two = TowerConfig(encoders=(clip, dino), views=s1k.views,
                      connector=SphinxFusionConfig(encoders=("clip", "dinov2"), in_widths=(clip.width, dino.width),
                                                   out_width=s1k.out_width))
    return {"sphinx-1k-2enc": two, "sphinx-1k": s1k, "demo": get_preset("demo").tower}


def naive(tower: TowerConfig, frame: np.ndarray) -> dict[str, torch.Tensor]:
    """Materialised padded square, one PIL pipeline per encoder, torch normalisation."""
    h, w = frame.shape[:2]
    g = pad_to_square(h, w)
    sq = Image.new("RGB", (g.side, g.side), tower.views.pad_rgb)
    sq.paste(Image.fromarray(frame), (g.left, g.top))
    n = tower.views.crop_grid
    out = {}
    for e in tower.encoders:
        R = e.image_size
        canvas = sq.resize((n * R, n * R) if n else (R, R), Image.BICUBIC)
        views = [canvas.resize((R, R), Image.BICUBIC)] if n else [canvas]
        views += [canvas.crop((x, y, x + R, y + R)) for y in range(0, n * R, R) for x in range(0, n * R, R)]
        t = torch.from_numpy(np.stack([np.asarray(v) for v in views])).permute(0, 3, 1, 2).float() / 255
        out[e.name] = (t - torch.tensor(e.mean).view(1, 3, 1, 1)) / torch.tensor(e.std).view(1, 3, 1, 1)
    return out


def bandwidth_gbs(threads: int, mbytes: int = 256, reps: int = 5) -> float:
    """Read + write GB/s of a large copy split over `threads` threads (np.copyto releases the GIL)."""
    n = mbytes * (1 << 20) // 4
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    parts = np.array_split(np.arange(n), threads)
    bounds = [(p[0], p[-1] + 1) for p in parts]

    def copy(lo, hi):
        np.copyto(dst[lo:hi], src[lo:hi])

    best = float("inf")
    for _ in range(reps):
        ts = [threading.Thread(target=copy, args=b) for b in bounds]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best / 1e9


def timed(fn, repeat: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def p90(xs: list[float]) -> float:
    return float(np.percentile(xs, 90))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=100, help="timed frames per backend (reference: a third)")
    ap.add_argument("--threads", type=int, default=2, help="C++ worker threads (and bandwidth-test threads)")
    ap.add_argument("--out", default="bench/results/preprocess.csv")
    ap.add_argument("--configs", nargs="*", default=None, help="subset of: sphinx-1k-2enc sphinx-1k demo")
    ap.add_argument("--simd-sweep", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the C++ path with its AVX2 and SSE2 kernel sets (what CPUs without AVX-512 "
                         "run; the SSE2 set is the 4-wide code aarch64 builds)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    frame = full_hd_frame()
    bw = bandwidth_gbs(args.threads)
    from edgevlm import _C

    common = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
        "simd": _C.simd_level(), "threads": args.threads, "python": platform.python_version(),
        "numpy": np.__version__, "pillow": PIL.__version__, "torch": torch.__version__,
        "edgevlm": edgevlm.__version__, "git": git_commit(), "frame": "1920x1080", "bandwidth_gbs": f"{bw:.1f}",
    }
    rows = []
    selected = towers()
    for name in args.configs or list(selected):
        tower = selected[name]
        cpp = Preprocessor(tower, backend="cpp", threads=args.threads)
        ref = Preprocessor(tower, backend="reference")
        n_views = cpp.views_per_image([frame])[0]
        out = {e.name: torch.empty(n_views, 3, e.image_size, e.image_size) for e in tower.encoders}
        written = sum(t.numel() * 4 for t in out.values())
        mbytes = (frame.nbytes + written) / 1e6
        bound = mbytes / 1e3 / bw * 1e3  # ms
        # one check that the timed paths agree before timing them
        a, b = cpp([frame]).views, ref([frame]).views
        worst = max(((a[e.name] - b[e.name]).abs() * torch.tensor(e.std).view(1, 3, 1, 1) * 255).max().item()
                    for e in tower.encoders)
        runs = {"cpp": timed(lambda: cpp([frame], out=out), args.repeat)}
        if args.simd_sweep:
            best = _C.simd_level()
            for level in ("avx2", "sse2"):
                name_ = _C.set_simd(level)
                if name_ != best:
                    runs[f"cpp-{level}"] = timed(lambda: cpp([frame], out=out), args.repeat)
            _C.set_simd("")
        runs["reference"] = timed(lambda: ref([frame], out=out), max(5, args.repeat // 3))
        if tower.views.kind == "pad_square":
            runs["pil-naive"] = timed(lambda: naive(tower, frame), max(5, args.repeat // 5))
        base = statistics.median(runs["cpp"])
        for backend, ts in runs.items():
            med = statistics.median(ts)
            rows.append({**common, "config": name, "backend": backend, "views": n_views,
                         "loadavg": f"{os.getloadavg()[0]:.2f}", "median_ms": f"{med:.3f}", "p90_ms": f"{p90(ts):.3f}",
                         "ratio_vs_cpp": f"{med / base:.2f}", "mbytes": f"{mbytes:.2f}", "bound_ms": f"{bound:.3f}",
                         "x_bound": f"{med / bound:.1f}"})
        print(f"# {name}: C++ vs reference max |diff| = {worst:.2f} levels (8-bit)", file=sys.stderr)

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    new = not out_path.exists() or out_path.stat().st_size == 0
    with out_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)

    print(f"{common['cpu']} | {common['simd']} | threads={args.threads} | copy bandwidth {bw:.1f} GB/s | "
          f"load avg {os.getloadavg()[0]:.2f} | git {common['git']}")
    hdr = f"{'config':<16}{'backend':<11}{'views':>6}{'median ms':>11}{'p90 ms':>9}{'x cpp':>8}{'MB':>7}{'bound ms':>10}{'x bound':>9}"
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['config']:<16}{r['backend']:<11}{r['views']:>6}{r['median_ms']:>11}{r['p90_ms']:>9}"
              f"{r['ratio_vs_cpp']:>8}{r['mbytes']:>7}{r['bound_ms']:>10}{r['x_bound']:>9}")
    print(f"rows appended to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
