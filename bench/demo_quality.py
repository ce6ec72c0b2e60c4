"""What each runtime variant costs in answers: the demo model's held-out accuracy per variant, side by side.

    python -P bench/demo_quality.py                          # every variant on the held-out split
    python -P bench/demo_quality.py --variants fp32,int4 --split novel

Every variant answers the same questions (``edgevlm.train.data.build_split``, greedy, through the
Pipeline users run) in one run:

* ``fp32``: the float decoder (the GGUF's Q4_1 weights dequantised, LoRA merged) and the eager tower;
  the baseline the others are compared with;
* ``gguf``: the decoder keeps the GGUF file's own blocks (``quant="auto"``);
* ``int8`` / ``int4``: the decoder re-quantised per channel / in groups of 32;
* ``ort-fp32`` / ``ort-fp16`` / ``ort-int8``: the tower + fusion as an ONNX Runtime graph of that precision
  (exported on first use into the cache, int8 calibrated on the bundled images);
* ``keep-0.75`` / ``keep-0.5``: token dropping, the ViT sees that share of the fused grid's cells.
* ``dtype-auto``: ``dtype="auto"``, the tower in bf16 where the CPU has native bf16 (AVX512-BF16 or
  AMX-BF16; elsewhere it is the fp32 run again, which its row's cpu_flags show).

Each accuracy comes with its 95 % Wilson interval. Because the variants answer the same questions, the
figure that says whether a variant *changed* anything is the paired one: its difference from ``fp32``
with Newcombe's paired interval (``edgevlm.train.metrics.paired_difference_interval``), over every
question that has a right answer (colour, shape, count, digit, and grounding where every box is found),
and the share of answers identical to ``fp32``'s, word for word. A difference whose interval holds 0 is
not told from noise by this many questions.

Rows go to ``--out`` (default ``bench/results/demo_quality.csv``): timestamp, commit, cpu and its flags, threads,
versions, split and size, the variant and its load options, each metric with ``_lo`` / ``_hi``,
``diff_vs_fp32`` with its interval, ``same_answer_share`` and the seconds the variant took.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "fp32": {"quant": "none"},
    "gguf": {"quant": "auto"},
    "int8": {"quant": "int8"},
    "int4": {"quant": "int4"},
    "ort-fp32": {"quant": "none", "vision_backend": "onnxruntime", "vision_precision": "fp32"},
    "ort-fp16": {"quant": "none", "vision_backend": "onnxruntime", "vision_precision": "fp16"},
    "ort-int8": {"quant": "none", "vision_backend": "onnxruntime", "vision_precision": "int8"},
    "keep-0.75": {"quant": "none", "keep_ratio": 0.75},
    "keep-0.5": {"quant": "none", "keep_ratio": 0.5},
    # bf16 tower where the CPU has native bf16 (AVX512-BF16 / AMX-BF16); on other CPUs the same as fp32
    "dtype-auto": {"quant": "none", "dtype": "auto"},
}
BASELINE = "fp32"
METRICS = ("qa_accuracy", "count_accuracy", "digit_accuracy", "grounding_iou50")


def _variant_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(VARIANTS)}, got {text!r}")
    return names if BASELINE in names else [BASELINE, *names]  # the paired figures need the baseline


def run_variant(model: str, name: str, samples, max_new_tokens: int) -> tuple[dict, list[dict], float]:
    import edgevlm
    from edgevlm.train.evaluate import evaluate_samples

    t0 = time.perf_counter()
    pipe = edgevlm.load(model, **VARIANTS[name])
    metrics, records = evaluate_samples(pipe, samples, max_new_tokens=max_new_tokens, desc=name)
    return metrics, records, time.perf_counter() - t0


def paired(records: list[dict], base: list[dict]) -> dict:
    """``diff_vs_fp32`` (+ interval) over the questions with a right answer, and the share of answers
    identical to the baseline's."""
    from edgevlm.train.metrics import paired_difference_interval

    pairs = [(r["correct"], b["correct"]) for r, b in zip(records, base) if "correct" in b]
    d, lo, hi = paired_difference_interval(pairs)
    same = sum(r["prediction"].strip() == b["prediction"].strip() for r, b in zip(records, base)) / len(base)
    return {"paired_questions": len(pairs), "diff_vs_fp32": d, "diff_vs_fp32_lo": lo, "diff_vs_fp32_hi": hi,
            "same_answer_share": same}


def _fmt(m: dict, key: str) -> str:
    v = m.get(key)
    if v is None:
        return "n/a"
    return f"{100 * v:.1f} [{100 * m[key + '_lo']:.0f}–{100 * m[key + '_hi']:.0f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="what edgevlm.load takes (default: the shipped demo model)")
    ap.add_argument("--variants", type=_variant_list, default=list(VARIANTS),
                    help=f"comma-separated subset of {', '.join(VARIANTS)} (fp32 is always run: the baseline)")
    ap.add_argument("--split", choices=("heldout", "novel"), default="heldout")
    ap.add_argument("--n-scenes", type=int, default=60)
    ap.add_argument("--n-digits", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "demo_quality.csv"))
    ap.add_argument("--records", default=None, help="write every variant's answers to this JSON file")
    args = ap.parse_args(argv)

    import torch

    import edgevlm
    from edgevlm.perf.limits import cpu_flags, cpu_model, git_commit, module_version
    from edgevlm.perf.results import append_rows
    from edgevlm.train.data import build_split

    torch.set_num_threads(args.threads)
    samples = build_split(args.split, args.n_scenes, args.n_digits, seed=args.seed)
    common = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_commit(Path(__file__).resolve().parent), "cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": args.threads,
              "torch": torch.__version__, "onnxruntime": module_version("onnxruntime"),
              "edgevlm": edgevlm.__version__, "model": args.model, "split": args.split, "n_scenes": args.n_scenes,
              "n_digits": args.n_digits, "seed": args.seed, "questions": len(samples)}
    base_records, rows, all_records = None, [], {}
    for name in args.variants:
        metrics, records, seconds = run_variant(args.model, name, samples, args.max_new_tokens)
        if name == BASELINE:
            base_records = records
        row = {**common, "variant": name, "options": json.dumps(VARIANTS[name], sort_keys=True),
               **{k: metrics.get(k) for m in METRICS for k in (m, f"{m}_lo", f"{m}_hi")},
               **paired(records, base_records), "seconds": round(seconds, 1)}
        rows.append(row)
        all_records[name] = records
        append_rows(args.out, [row])  # each variant as it finishes: a stopped run keeps what it measured
        print(f"{name:<10} QA {_fmt(metrics, 'qa_accuracy')}  count {_fmt(metrics, 'count_accuracy')}  "
              f"digits {_fmt(metrics, 'digit_accuracy')}  boxes {_fmt(metrics, 'grounding_iou50')}  "
              f"vs fp32 {100 * row['diff_vs_fp32']:+.1f} [{100 * row['diff_vs_fp32_lo']:+.1f}, "
              f"{100 * row['diff_vs_fp32_hi']:+.1f}]  same answers {100 * row['same_answer_share']:.0f} %  "
              f"({seconds:.0f} s)", flush=True)
    if args.records:
        Path(args.records).write_text(json.dumps(all_records, indent=1))
    print(f"rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
