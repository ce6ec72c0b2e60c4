"""The quantised matmul alone, against PyTorch's in the same run, at the decoders' real shapes.

    python -P bench/qgemm.py                        # SmolLM2-135M and TinyLlama-1.1B projections, 16 and 128 tokens
    python -P bench/qgemm.py --tokens 32,512 --threads 2 --out bench/results/qgemm.csv

For each projection of a decoder layer (q/k/v fused, o, gate/up fused, down) and each prompt length
(the prefill's matmuls; one-token decode is timed end to end in ``bench/decode.py``, against the read
bandwidth: one matrix called in a loop would sit in the cache and flatter it):

* ``edgevlm int8`` on every kernel set this CPU runs (``edgevlm._C.qgemm_kernel_sets()``: avx512-vnni,
  avx-vnni, avx512vl-vnni256, neon-i8mm, neon-dotprod, portable), per-channel weights, int8 activations per 32;
* ``edgevlm int4`` (group 32, GGUF Q4_1's layout) on the automatic set;
* ``torch int8-dynamic``: ``torch.ao`` dynamic quantisation (fbgemm; int8 weights per tensor, int8
  activations per tensor), what transformers' int8-dynamic rows in ``bench/decode.py`` run;
* ``torch fp32`` and, where bf16 is native (AVX512-BF16 / AMX), ``torch bf16``: ``F.linear``.

Beside each figure, its physical limit, the peak of the instruction doing the work, measured in the
same run: the kernel set's integer dot product alone (``_C.qgemm_peak_gops``: vpdpbusd, sdot) for
edgevlm and fbgemm (which runs vpdpbusd where the CPU has VNNI), torch's fp32 / bf16 matmul peak for the
float rows. Times are the median of ``--repeat`` calls after warm-up, every variant of a shape
measured back to back. Rows (device, versions, commit, CPU model and flags, threads, shape, variant,
ms, GOP/s, bound, fraction) are appended to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgevlm import _C
from edgevlm.perf.limits import cpu_flags, cpu_model, git_commit, matmul_peak, native_bf16
from edgevlm.perf.results import append_rows
from edgevlm.runtime import quant as Q

# (model, projection, in, out) of one layer: q|k|v and gate|up are one matrix each, as edgevlm packs them.
SHAPES = {
    "smollm2-135m": [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576)],
    "tinyllama-1.1b": [("qkv", 2048, 2560), ("o", 2048, 2048), ("gate_up", 2048, 11264), ("down", 5632, 2048)],
}
FIELDS = ["timestamp", "commit", "cpu_model", "cpu_flags", "threads", "torch", "model", "proj", "k", "n", "tokens",
          "variant", "kernel_set", "ms", "gops", "peak_gops", "fraction_of_peak", "weight_mb"]


def timed(fn, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after two warm-up calls."""
    fn(), fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def variants(w: torch.Tensor, x: torch.Tensor, sets: list[str]) -> list[tuple[str, str, object, int]]:
    """(variant, kernel set, callable, weight bytes) for one weight [N, K] and input [M, K]."""
    n, k = w.shape
    out = []
    p8, p4 = Q.quantize_int8(w), Q.quantize_int4(w, 32)
    lin8, lin4 = Q.QuantLinear(p8), Q.QuantLinear(p4)
    bytes8 = p8.qweight.numel() + p8.scales.numel() * 4
    bytes4 = p4.qweight.numel() + (p4.scales.numel() + p4.zeros.numel()) * 2
    for s in sets:
        out.append(("edgevlm int8", s, lambda s=s: (_C.qgemm_use(s), lin8(x)), bytes8))
    out.append(("edgevlm int4 g32", sets[0], lambda: (_C.qgemm_use(sets[0]), lin4(x)), bytes4))
    try:
        from torch.ao.quantization import quantize_dynamic

        lin = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
        lin[0].weight.data.copy_(w)
        dyn = quantize_dynamic(lin, {torch.nn.Linear}, dtype=torch.qint8)
        out.append(("torch int8-dynamic", "fbgemm", lambda: dyn(x), n * k + 4))
    except Exception as e:  # a torch build without fbgemm
        print(f"  torch int8-dynamic: skipped ({type(e).__name__}: {e})")
    out.append(("torch fp32", "", lambda: F.linear(x, w), n * k * 4))
    if native_bf16("cpu"):
        wb, xb = w.bfloat16(), x.bfloat16()
        out.append(("torch bf16", "", lambda: F.linear(xb, wb), n * k * 2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--tokens", default="16,128", help="comma list of prompt lengths, each >= 2 (default 16,128)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every variant (default 2)")
    ap.add_argument("--repeat", type=int, default=20, help="timed calls per variant, the median is kept (default 20)")
    ap.add_argument("--out", default="bench/results/qgemm.csv")
    args = ap.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    if any(t < 2 for t in tokens):
        ap.error("--tokens: prompt lengths of 2 or more (one-token decode is bench/decode.py's)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sets = [s for s in _C.qgemm_kernel_sets()]
    auto = _C.qgemm_kernels()

    def measure_peaks() -> dict:
        out = {}
        for s in sets:
            _C.qgemm_use(s)
            out[s] = _C.qgemm_peak_gops(args.threads)
        _C.qgemm_use(auto)
        out["fp32"] = matmul_peak("cpu")
        out["bf16"] = matmul_peak("cpu", torch.bfloat16) if native_bf16("cpu") else 0.0
        return out

    # Measured before and after the rows, the higher kept: a peak taken while another tenant held the
    # cores would make every row look closer to it than it is.
    peaks = measure_peaks()
    common = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
              "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "threads": args.threads, "torch": torch.__version__}
    print(f"qgemm bench: {common['cpu_model']} ({common['cpu_flags']}), {args.threads} threads, commit {common['commit']}")
    rows = []
    try:
        for model in args.models.split(","):
            for proj, k, n in SHAPES[model]:
                w = torch.randn(n, k) * 0.02
                for m in tokens:
                    x = torch.randn(m, k)
                    with torch.inference_mode():
                        for variant, kset, fn, wbytes in variants(w, x, sets):
                            sec = timed(fn, args.repeat)
                            gops = 2 * m * k * n / sec / 1e9
                            rows.append({**common, "model": model, "proj": proj, "k": k, "n": n, "tokens": m,
                                         "variant": variant, "kernel_set": kset, "ms": f"{sec * 1e3:.4f}",
                                         "gops": f"{gops:.1f}", "weight_mb": f"{wbytes / 1e6:.2f}"})
                            print(f"  {model:<15} {proj:<8} M={m:<4} {variant:<19} {kset:<17} {sec * 1e3:9.4f} ms "
                                  f"{gops:7.1f} GOP/s", flush=True)
    finally:
        _C.qgemm_use(auto)
    peaks = {k: max(v, peaks[k]) for k, v in measure_peaks().items()}
    peaks["fbgemm"] = peaks[sets[0]]  # the same integer instructions (vpdpbusd where the CPU has VNNI)
    print("  peaks (best of before and after): " + ", ".join(f"{s} {g:.0f}" for s, g in peaks.items() if g) + " GOP/s")
    for r in rows:
        v = r["variant"]
        peak = peaks.get(r["kernel_set"]) if v.startswith(("edgevlm", "torch int8")) else peaks["bf16" if "bf16" in v else "fp32"]
        if peak:
            r.update(peak_gops=f"{peak:.0f}", fraction_of_peak=f"{float(r['gops']) / peak:.3f}")
    width = max(len(r["variant"]) + len(r["kernel_set"]) for r in rows) + 1
    for r in rows:
        print(f"  {r['model']:<15} {r['proj']:<8} M={r['tokens']:<4} {r['variant'] + ' ' + r['kernel_set']:<{width}} "
              f"{float(r['ms']):9.4f} ms {r['gops']:>7} GOP/s  {r.get('fraction_of_peak', '-'):>5} of "
              f"{r.get('peak_gops', '-')}")
    append_rows(Path(args.out), rows, FIELDS)
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
