"""The fused attention kernel (kernels/attention.py) on one CUDA GPU (H100/H200): compiled, checked
against an fp64 reference, and timed against PyTorch SDPA, with achieved TFLOP/s beside a measured
matmul peak.

Written on a machine without a GPU and not yet run on one: what has run is ``--help``, the refusals
(no CUDA, TRITON_INTERPRET set), and the checking and timing code on tiny shapes under
TRITON_INTERPRET=1 with the CUDA events and graphs stubbed out. No number here has been measured yet.

Cases are the tower's attention shapes (``--cases``; N = views or images, H heads, Lq queries, T keys,
T2 second-source keys, D head dim): ViT self-attention of DINOv2-S/G, CLIP-L, EVA-g (D 88), SigLIP-so400m
(D 72, 729 tokens) at their full token counts and, for some, with half the patch tokens dropped (keep
0.5); two head-dim cases (96, and 128 at a LLaVA-336-like 577 tokens); the Q-Former's 32 queries ->
257 image tokens with a random ~10 % key padding mask; the perceiver resampler's 128 latents -> 729
SigLIP media tokens (~15 % padded) + the 128 latent keys. Masks always keep the first key. Inputs are
seeded standard normals, made in fp32 on the GPU and rounded to each ``--dtypes`` dtype (fp16, bf16,
fp32), contiguous ``[N, H, L, D]``.

For each case and dtype:

- correctness, as tests/test_attention_kernel.py judges it: the kernel's max |error| against
  ``attention_reference`` on the same inputs in fp64 (on the GPU), beside the error of
  ``attention_reference`` in the dtype itself (PyTorch SDPA: the same-precision baseline); it passes
  when ``err <= 2 * base + 1e-5 * max(1, max|ref|)``;
- ``kernel_ms``: ``triton_attention`` per call, the wrapper included (mask to int8, output allocation,
  launch); ``sdpa_ms``: ``F.scaled_dot_product_attention`` with the bool mask as ``[N, 1, 1, T(+T2)]``
  (no mask where the case has none, so SDPA may pick flash attention), and for the resampler the
  ``torch.cat`` of media and latent keys and values INSIDE the timed region, since that is what the
  kernel avoids (the full mask is built once, outside; ``attention_reference``'s zeroing of key-less
  rows is not timed). ``sdpa_nomask_ms``, for masked cases: the same SDPA without the mask (what the
  padding costs SDPA; flash may run). Each time is the median over ``--iters`` samples, a sample being
  ``--inner`` back-to-back calls between two CUDA events, divided by ``--inner``, after ``--warmup``
  calls. Inputs stay in L2 from call to call, for both sides alike;
- ``*_graph_ms``: the same calls captured in a CUDA graph and replayed (GPU time without the Python and
  launch overhead, which at these sizes can be most of an eager call); ``--no-graph`` skips them;
- achieved TFLOP/s = 4 * N * H * Lq * (T + T2) * D / seconds / 1e12 (QK^T and PV; the padded head dim
  and masked keys are not counted), and its fraction of ``matmul_peak_tflops``: a dense
  ``--peak-size``^3 torch.matmul in the row's dtype (fp32 with TF32 off, as the kernel's fp32 dots are
  IEEE), median of 10 after 3 warm-ups;
- ``sdpa_backend``: the SDPA backend ``torch._fused_sdp_choice`` names for the timed call (private
  API; empty where it fails); ``first_call_s``: wall time of the case's first kernel call (Triton's
  compile, or its cache).

A case that raises (a compile failure such as Triton's OutOfResources, say) is recorded with
``correct=False`` and the error in ``note``, and the others go on. Rows go to ``--out`` (appended after
each case; a column added later widens the file), with timestamp, commit, device, torch and triton
versions. A checkout that was not pip-installed runs too (the script maps kernels/ into ``edgevlm``
as the wheel does). Exit status: 0 when every check passed, 1 when one failed or raised, 2 when the machine
cannot run it (no CUDA, no triton, or TRITON_INTERPRET set: this must time the compiled kernel).

    python bench/gpu_attention.py --out bench/results/gpu_attention.csv    # a few minutes on an H100
    python bench/gpu_attention.py --cases resampler,qformer-cross --dtypes fp16 --iters 100

Columns: timestamp, commit, device, torch, triton, case, dtype, n, heads, lq, keys, keys2, head_dim,
masked, kernel_ms, sdpa_ms, speedup (sdpa_ms / kernel_ms), kernel_tflops, sdpa_tflops,
matmul_peak_tflops, kernel_frac_peak, kernel_max_err, sdpa_max_err, err_ratio (kernel / sdpa),
correct, note, then sdpa_nomask_ms, kernel_graph_ms, sdpa_graph_ms, graph_speedup,
kernel_graph_tflops, sdpa_graph_tflops, kernel_graph_frac_peak, sdpa_frac_peak, sdpa_backend,
first_call_s, iters, inner, seed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgevlm.kernels.attention import attention_reference, triton_attention
from edgevlm.perf.limits import git_commit, module_version
from edgevlm.perf.results import append_rows

ROOT = Path(__file__).resolve().parents[1]

FIELDS = ["timestamp", "commit", "device", "torch", "triton", "case", "dtype", "n", "heads", "lq", "keys", "keys2",
          "head_dim", "masked", "kernel_ms", "sdpa_ms", "speedup", "kernel_tflops", "sdpa_tflops",
          "matmul_peak_tflops", "kernel_frac_peak", "kernel_max_err", "sdpa_max_err", "err_ratio", "correct", "note",
          "sdpa_nomask_ms", "kernel_graph_ms", "sdpa_graph_ms", "graph_speedup", "kernel_graph_tflops",
          "sdpa_graph_tflops", "kernel_graph_frac_peak", "sdpa_frac_peak", "sdpa_backend", "first_call_s", "iters",
          "inner", "seed"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    name: str
    n: int  # views / images
    heads: int
    lq: int  # queries
    t: int  # keys (and values) of the first source
    t2: int  # keys of the second source (the resampler's latents), 0 for none
    d: int  # head dim
    pad: float  # share of the first source's keys masked out at random (0: no mask)
    what: str

    @property
    def flops(self) -> float:
        return 4.0 * self.n * self.heads * self.lq * (self.t + self.t2) * self.d


CASES = [
    Case("dinov2-s", 8, 6, 257, 257, 0, 64, 0.0, "DINOv2-S/14 self-attention, 224 px: 16x16 patches + CLS"),
    Case("dinov2-s-keep0.5", 8, 6, 129, 129, 0, 64, 0.0, "dinov2-s with half the patch tokens dropped"),
    Case("clip-l", 8, 16, 257, 257, 0, 64, 0.0, "CLIP ViT-L/14 self-attention, 224 px"),
    Case("clip-l-keep0.5", 8, 16, 129, 129, 0, 64, 0.0, "clip-l with half the patch tokens dropped"),
    Case("eva-g", 8, 16, 257, 257, 0, 88, 0.0, "EVA ViT-g/14 self-attention (head dim 88, padded to 128)"),
    Case("dinov2-g", 8, 24, 257, 257, 0, 64, 0.0, "DINOv2-g/14 self-attention, 224 px"),
    Case("dinov2-g-keep0.5", 8, 24, 129, 129, 0, 64, 0.0, "dinov2-g with half the patch tokens dropped"),
    Case("siglip-so400m", 8, 16, 729, 729, 0, 72, 0.0, "SigLIP-so400m/14 self-attention, 384 px: 27x27, D 72"),
    Case("d96", 8, 16, 257, 257, 0, 96, 0.0, "self-attention at the resampler's head dim 96"),
    Case("d128", 4, 8, 577, 577, 0, 128, 0.0, "head dim 128 at LLaVA-336's 577 tokens (24x24 + CLS)"),
    Case("d128-keep0.5", 4, 8, 289, 289, 0, 128, 0.0, "d128 with half the patch tokens dropped"),
    Case("qformer-cross", 8, 12, 32, 257, 0, 64, 0.10, "BLIP-2 Q-Former: 32 queries -> 257 image tokens, ~10% padded"),
    Case("resampler", 8, 16, 128, 729, 128, 96, 0.15,
         "BLIP-3 resampler: 128 latents -> 729 SigLIP media (~15% padded) + 128 latent keys"),
]
CASE_BY_NAME = {c.name: c for c in CASES}


# ---- measurement helpers --------------------------------------------------------------------------

def event_ms(fn, iters: int, inner: int) -> float:
    """Median over ``iters`` samples of the milliseconds per call of ``inner`` back-to-back calls of
    ``fn``, between two CUDA events on the current stream."""
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def timed(fn, warmup: int, iters: int, inner: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return event_ms(fn, iters, inner)


def graph_ms(fn, iters: int, inner: int) -> float:
    """Milliseconds per call of ``fn`` (already warmed up, so compiled) captured ``inner`` times in one
    CUDA graph, median over ``iters`` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs advises
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    try:
        return event_ms(graph.replay, iters, 1) / inner
    finally:
        del graph
        torch.cuda.synchronize()


def matmul_peak_tflops(dtype: torch.dtype, size: int) -> float:
    """TFLOP/s of a dense ``size``^3 torch.matmul in ``dtype`` (fp32: TF32 off), median of 10 after 3
    warm-ups."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(size, size, device="cuda", generator=g).to(dtype)
    b = torch.randn(size, size, device="cuda", generator=g).to(dtype)
    out = torch.empty(size, size, device="cuda", dtype=dtype)
    return 2.0 * size ** 3 / (timed(lambda: torch.matmul(a, b, out=out), 3, 10, 1) / 1e3) / 1e12


def sdpa_backend(q, k, v, mask) -> str:
    """The backend SDPA would pick for these arguments (torch's private ``_fused_sdp_choice``), or ''."""
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(int(torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=None))).name.lower()
    except Exception:
        return ""


def dispatch() -> str:
    """What ``edgevlm.kernels.attention.attention`` runs for CUDA tensors here ("triton" / "torch")."""
    from edgevlm.kernels import attention as mod, triton_support

    fn = getattr(triton_support, "kernel_backend", None) or getattr(mod, "attention_backend", None)
    try:
        return fn() if fn else "?"
    except Exception as e:
        return f"? ({type(e).__name__})"


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item()  # NaN anywhere -> NaN, which fails the check below


# ---- one case -------------------------------------------------------------------------------------

def make_inputs(case: Case, dtype: torch.dtype, seed: int, device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(seed)

    def r(length):
        return torch.randn(case.n, case.heads, length, case.d, device=device, generator=g).to(dtype)

    q, k, v = r(case.lq), r(case.t), r(case.t)
    k2, v2 = (r(case.t2), r(case.t2)) if case.t2 else (None, None)
    mask = None
    if case.pad:
        mask = torch.rand(case.n, case.t, device=device, generator=g) >= case.pad
        mask[:, 0] = True  # every query keeps a key (the kernel's all-masked rows have their own test)
    return q, k, v, k2, v2, mask


def fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def case_row(case: Case, dtype_name: str, args, base: dict) -> dict:
    """The columns that say what was run (``correct`` False until a check passes)."""
    return {**base, "case": case.name, "dtype": dtype_name, "n": case.n, "heads": case.heads, "lq": case.lq,
            "keys": case.t, "keys2": case.t2, "head_dim": case.d, "masked": case.pad > 0, "correct": False,
            "iters": args.iters, "inner": args.inner, "seed": args.seed}


def run_case(row: dict, case: Case, dtype_name: str, args, peaks: dict[str, float | None], notes: list[str]) -> None:
    """Fill ``row`` (from :func:`case_row`) in place, so that what was measured before a raise is kept."""
    dtype = DTYPES[dtype_name]
    peak = peaks.get(dtype_name)
    row["matmul_peak_tflops"] = fmt(peak, ".1f")
    q, k, v, k2, v2, mask = make_inputs(case, dtype, args.seed)

    # -- correctness: kernel and same-precision SDPA, each against fp64 ---------------------------
    t0 = time.perf_counter()
    out = triton_attention(q, k, v, k2=k2, v2=v2, key_mask=mask)
    torch.cuda.synchronize()
    row["first_call_s"] = f"{time.perf_counter() - t0:.2f}"
    def d64(x):
        return None if x is None else x.double()

    ref = attention_reference(d64(q), d64(k), d64(v), k2=d64(k2), v2=d64(v2), key_mask=mask)
    lowp = attention_reference(q, k, v, k2=k2, v2=v2, key_mask=mask)
    err, base_err = max_err(out, ref), max_err(lowp, ref)
    # the tests' kernel rule (tests/edgevlm_testkit.assert_kernel_close): twice the same-precision baseline's
    # error plus 32 fp32 ulps of the output's scale, relative so that it means the same at any magnitude
    tol = 2 * base_err + 32 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    correct = bool(err <= tol) and out.shape == q.shape and out.dtype == dtype
    row.update(kernel_max_err=f"{err:.4g}", sdpa_max_err=f"{base_err:.4g}", correct=correct,
               err_ratio=fmt(err / base_err if base_err > 0 else (0.0 if err == 0 else math.inf), ".3f"))
    if not correct:
        notes.append(f"kernel err {err:.3g} > tol {tol:.3g}")
    del out, ref, lowp

    # -- timing -----------------------------------------------------------------------------------
    def kernel():
        return triton_attention(q, k, v, k2=k2, v2=v2, key_mask=mask)

    full_mask = None
    if mask is not None:
        full_mask = mask if k2 is None else torch.cat([mask, mask.new_ones(case.n, case.t2)], dim=1)
        full_mask = full_mask[:, None, None, :]  # [N, 1, 1, T(+T2)], built once, as a model builds it

    def sdpa_with(attn_mask):
        if k2 is None:
            return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        # the resampler: the concatenation that the kernel avoids is part of what SDPA costs
        return lambda: F.scaled_dot_product_attention(q, torch.cat([k, k2], dim=2), torch.cat([v, v2], dim=2),
                                                      attn_mask=attn_mask)

    sdpa = sdpa_with(full_mask)
    k_all = k if k2 is None else torch.cat([k, k2], dim=2)
    row["sdpa_backend"] = sdpa_backend(q, k_all, k_all, full_mask)
    del k_all
    kernel_ms = timed(kernel, args.warmup, args.iters, args.inner)
    sdpa_ms = timed(sdpa, args.warmup, args.iters, args.inner)
    row.update(kernel_ms=f"{kernel_ms:.4f}", sdpa_ms=f"{sdpa_ms:.4f}", speedup=f"{sdpa_ms / kernel_ms:.2f}")
    k_tf, s_tf = case.flops / (kernel_ms / 1e3) / 1e12, case.flops / (sdpa_ms / 1e3) / 1e12
    row.update(kernel_tflops=f"{k_tf:.2f}", sdpa_tflops=f"{s_tf:.2f}")
    if peak:
        row.update(kernel_frac_peak=f"{k_tf / peak:.3f}", sdpa_frac_peak=f"{s_tf / peak:.3f}")
    if full_mask is not None:
        row["sdpa_nomask_ms"] = f"{timed(sdpa_with(None), args.warmup, args.iters, args.inner):.4f}"

    if not args.no_graph:
        try:
            kg, sg = graph_ms(kernel, args.iters, args.inner), graph_ms(sdpa, args.iters, args.inner)
            kg_tf, sg_tf = case.flops / (kg / 1e3) / 1e12, case.flops / (sg / 1e3) / 1e12
            row.update(kernel_graph_ms=f"{kg:.4f}", sdpa_graph_ms=f"{sg:.4f}", graph_speedup=f"{sg / kg:.2f}",
                       kernel_graph_tflops=f"{kg_tf:.2f}", sdpa_graph_tflops=f"{sg_tf:.2f}")
            if peak:
                row["kernel_graph_frac_peak"] = f"{kg_tf / peak:.3f}"
        except Exception as e:  # the eager numbers stand; say why the graph ones are missing
            traceback.print_exc()
            notes.append(f"graph timing failed: {type(e).__name__}: {e}".replace("\n", " ")[:200])


# ---- output ---------------------------------------------------------------------------------------

TABLE = [("case", "case"), ("dtype", "dtype"), ("kernel_ms", "kernel ms"), ("sdpa_ms", "sdpa ms"),
         ("speedup", "x"), ("kernel_tflops", "k TF/s"), ("sdpa_tflops", "s TF/s"), ("kernel_frac_peak", "k/peak"),
         ("kernel_graph_ms", "k graph"), ("sdpa_graph_ms", "s graph"), ("graph_speedup", "x graph"),
         ("kernel_graph_frac_peak", "kg/peak"), ("sdpa_nomask_ms", "s nomask"), ("sdpa_backend", "sdpa"),
         ("kernel_max_err", "k err"), ("sdpa_max_err", "s err"), ("err_ratio", "ratio"), ("correct", "ok"),
         ("note", "note")]


def print_table(rows: list[dict]) -> None:
    widths = [max(len(h), *(len(str(r.get(c, ""))) for r in rows)) for c, h in TABLE]
    print("\n" + "  ".join(h.ljust(w) for (_, h), w in zip(TABLE, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for (c, _), w in zip(TABLE, widths)))


def refusal() -> str | None:
    """Why this machine cannot run the bench, or None."""
    interp = os.environ.get("TRITON_INTERPRET", "")
    if interp not in ("", "0"):
        return (f"bench/gpu_attention.py times the compiled kernel, but TRITON_INTERPRET={interp} is set (the "
                "interpreter, for CPU tests): unset TRITON_INTERPRET, it must NOT be set here. Nothing was measured.")
    if not torch.cuda.is_available():
        return (f"bench/gpu_attention.py needs a CUDA GPU: torch.cuda.is_available() is False (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}). Nothing was measured.")
    try:
        importlib.import_module("triton.language")  # imports triton too
    except Exception as e:
        return (f"bench/gpu_attention.py needs Triton, which does not import here ({type(e).__name__}: {e}); "
                "TRITON_INTERPRET must not be set either. Nothing was measured.").replace("\n", " ")
    return None


def parse_list(text: str, allowed, what: str, p: argparse.ArgumentParser) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        p.error(f"unknown {what} {', '.join(bad) or '(none given)'}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def write_table(rows: list[dict], path: Path, source: str) -> None:
    """The dispatch table of these rows (kernels/attention_dispatch.py), as JSON at ``path``."""
    import json

    from edgevlm.kernels.attention_dispatch import table_from_rows

    table = table_from_rows(rows, source=source)
    doc = table.to_dict()
    lines = [json.dumps(e) for e in doc.pop("entries")]  # one shape per line, so a diff shows what changed
    head = json.dumps(doc)[:-1]
    path.write_text(head + ', "entries": [\n' + ",\n".join(lines) + "\n]}\n")
    wins = [f"{e.case}/{e.dtype}" + ("" if e.eager == "triton" else " (graph only)") for e in table.entries
            if "triton" in (e.eager, e.graph)]
    print(f"dispatch table for {table.measured_on} -> {path}: the kernel wins {len(wins)} of {len(table.entries)} "
          f"shapes: {', '.join(wins) or 'none'}")


def write_table_from_csv(csv_path: Path, path: Path) -> int:
    import csv

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        print(f"{csv_path}: no rows", file=sys.stderr)
        return 2
    latest = max(r["timestamp"] for r in rows)
    run = [r for r in rows if r["timestamp"] == latest]
    write_table(run, path, f"{csv_path.name}: run of {latest}, commit {run[0]['commit']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="cases:\n" + "\n".join(
                                    f"  {c.name:17s} N={c.n} H={c.heads} Lq={c.lq} T={c.t}"
                                    + (f"+{c.t2}" if c.t2 else "") + f" D={c.d}: {c.what}" for c in CASES))
    p.add_argument("--cases", default=",".join(CASE_BY_NAME), help="comma-separated case names (default: all)")
    p.add_argument("--dtypes", default="fp16,bf16,fp32", help="comma-separated, of fp16, bf16, fp32")
    p.add_argument("--iters", type=int, default=50, help="timed samples per measurement (median taken)")
    p.add_argument("--inner", type=int, default=10, help="back-to-back calls per timed sample")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before each eager timing")
    p.add_argument("--no-graph", dest="no_graph", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--no-peak", dest="no_peak", action="store_true", help="skip the matmul peak measurement")
    p.add_argument("--peak-size", dest="peak_size", type=int, default=8192, help="matmul size for the peak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_attention.csv")
    p.add_argument("--table", type=Path, default=None,
                   help="also write the winners as the dispatch table attention() reads "
                   "(kernels/attention_table.json is the shipped one; see kernels/attention_dispatch.py)")
    p.add_argument("--table-from", dest="table_from", type=Path, default=None,
                   help="no GPU needed: write --table from an earlier run's CSV rows (its latest run) and exit")
    args = p.parse_args(argv)
    if args.table_from is not None:
        if args.table is None:
            p.error("--table-from needs --table (where to write it)")
        return write_table_from_csv(args.table_from, args.table)
    cases = [CASE_BY_NAME[c] for c in parse_list(args.cases, list(CASE_BY_NAME), "case", p)]
    dtypes = parse_list(args.dtypes, list(DTYPES), "dtype", p)
    if args.iters < 1 or args.inner < 1 or args.warmup < 0:
        p.error("--iters and --inner must be >= 1, --warmup >= 0")
    why = refusal()
    if why:
        print(why, file=sys.stderr)
        return 2

    torch.set_float32_matmul_precision("highest")  # fp32 peak and fp32 SDPA baseline without TF32
    device = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    base = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "device": device, "torch": torch.__version__, "triton": module_version("triton")}
    print(f"{device} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs), torch {base['torch']} "
          f"(CUDA {torch.version.cuda}), triton {base['triton']}, commit {base['commit']}; "
          f"attention() dispatches CUDA tensors to: {dispatch()}", flush=True)

    peaks: dict[str, float | None] = {}
    for name in dtypes:
        if args.no_peak:
            peaks[name] = None
            continue
        try:
            peaks[name] = matmul_peak_tflops(DTYPES[name], args.peak_size)
            torch.cuda.empty_cache()
            print(f"matmul peak {name}{' (TF32 off)' if name == 'fp32' else ''}: {peaks[name]:.1f} TFLOP/s "
                  f"({args.peak_size}^3, median of 10)", flush=True)
        except Exception as e:
            peaks[name] = None
            print(f"matmul peak {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    rows = []
    for case in cases:
        case_rows = []
        for name in dtypes:
            row, notes = case_row(case, name, args, base), []
            try:
                run_case(row, case, name, args, peaks, notes)
            except Exception as e:  # a compile or launch failure: record it, go on with the rest
                traceback.print_exc()
                row["correct"] = False
                notes.insert(0, f"FAILED {type(e).__name__}: {e}".replace("\n", " ")[:300])
            row["note"] = "; ".join(notes)
            torch.cuda.empty_cache()
            case_rows.append(row)
            print(f"  {case.name:17s} {name}: kernel {row.get('kernel_ms', '-')} ms, sdpa {row.get('sdpa_ms', '-')} ms "
                  f"(x{row.get('speedup', '-')}), graph {row.get('kernel_graph_ms', '-')} / "
                  f"{row.get('sdpa_graph_ms', '-')} ms, err {row.get('kernel_max_err', '-')} vs "
                  f"{row.get('sdpa_max_err', '-')}, correct={row['correct']}"
                  + (f"  [{row['note']}]" if row.get("note") else ""), flush=True)
        append_rows(args.out, case_rows, FIELDS)  # after each case, so a later crash keeps these
        rows += case_rows
    print_table(rows)
    print(f"\nrows appended to {args.out}")
    if args.table is not None:
        write_table(rows, args.table, f"bench/gpu_attention.py run of {base['timestamp']}, commit {base['commit']}")
    failed = [f"{r['case']}/{r['dtype']}" for r in rows if not r["correct"]]
    if failed:
        print(f"FAILED (wrong or raised): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
