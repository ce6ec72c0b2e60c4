"""End-to-end latency of a Pipeline, stage by stage, per backend and precision (``edgevlm bench``).

Every configuration runs in a fresh Python process (``python -m edgevlm.perf.latency CONFIG``), so the
peak memory reported for it is its own and no configuration warms another's caches. Per config:

    decode_image   image file -> RGB array
    preprocess     views: resize, pad to square, normalise
    tower          the vision encoders, eager; for an exported graph encoders + projector together
    projector      the connector (SPHINX fusion, Q-Former, resampler, MLP); blank when inside ``tower``
    prefill        the prompt's forward pass + sampling the first token
    ttft           ``Pipeline.generate``'s call to its first token (all of the above + tokenisation)
    decode_token   one more token, at the prompt's length + half the answer
    memory         peak RSS of the process (loading included), RSS after the runs, CUDA peak allocated

Times are medians of ``repeat`` runs after ``warmup``; the image stages are timed one by one with the
device synchronised around each, ``prefill`` and ``ttft`` come from ``Pipeline.generate`` itself (its
embedding cache and prefix reuse are off, so every run does all the work), and ``decode_token`` from
``new_tokens`` steps that ignore end-of-sequence, so every config decodes the same positions, through the
step the Pipeline decodes with (its CUDA graphs, or its fused CPU step: ``Pipeline.fused_decode``).

Beside each figure is its physical bound on this machine: tower and prefill FLOPs at the matmul peak
measured here, a decode step's bytes (weights as stored + KV cache) at the read bandwidth measured
here (:mod:`edgevlm.perf.limits`). A ``transformers`` peer row runs the same decoder weights through
transformers' LlamaForCausalLM on the same prompt length.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from edgevlm.errors import ConfigError

STAGES = ("decode_image", "preprocess", "tower", "projector", "prefill")  # what a TTFT is made of, in order


@dataclass(frozen=True)
class BenchConfig:
    """One configuration of the suite: ``edgevlm.load`` arguments plus a label for tables and plots.
    ``peer="transformers"`` times transformers' decoder on the same weights instead of edgevlm's."""

    label: str
    model: str = "demo"
    device: str = "cpu"
    dtype: str = "float32"
    quant: str = "auto"
    vision_backend: str = "torch"
    vision_precision: str = "fp32"
    keep_ratio: float = 1.0
    kv_cache: str = "float"
    decode_graphs: str = "off"
    random_weights: bool = False
    peer: str = ""

    def __post_init__(self) -> None:
        if self.peer not in ("", "transformers"):
            raise ConfigError(f"bench peer must be '' or 'transformers', got {self.peer!r}")


@dataclass(frozen=True)
class BenchRun:
    """What every configuration of one suite shares."""

    image: str
    prompt: str = "Describe the image briefly."
    new_tokens: int = 32
    repeat: int = 5
    warmup: int = 1
    threads: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("new_tokens", "repeat"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"bench {name} must be an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"bench warmup must be an int >= 0, got {self.warmup!r}")


# ---- the suite -----------------------------------------------------------------------------------

def default_suite(model: str = "demo", device: str = "cpu", *, random_weights: bool = False,
                  peer: bool = True) -> list[BenchConfig]:
    """The backends and precisions worth comparing on ``device``, as far as this install can run them.

    CPU: the eager tower with a float, int8 and int4 decoder (and a GGUF model's own blocks), the
    exported tower on ONNX Runtime in fp32 / fp16 / int8, token dropping at half the cells (SPHINX-fusion
    towers). CUDA: the eager tower and decoder in fp32 / fp16 / bf16, an int4 decoder, fp16 and int4
    decoding through CUDA graphs, ONNX Runtime's CUDA provider and TensorRT when installed. Each with
    the transformers decoder peer when asked."""
    from edgevlm.presets import PRESETS, get_preset

    base = BenchConfig(label="", model=model, device=device, random_weights=random_weights)
    cfg = get_preset(model) if model in PRESETS else None
    gguf = cfg is not None and not random_weights and cfg.decoder_weights is not None \
        and cfg.decoder_weights.format == "gguf"
    fusion = cfg is not None and getattr(cfg.tower.connector, "grid", 0) > 0
    suite: list[BenchConfig] = []

    def add(label: str, **kw) -> None:
        suite.append(replace(base, label=label, **kw))

    def have(module: str) -> bool:
        import importlib.util

        return importlib.util.find_spec(module) is not None

    if torch.device(device).type == "cuda":
        for dtype, short in (("float32", "fp32"), ("float16", "fp16"), ("bfloat16", "bf16")):
            add(f"eager {short} | decoder {short}", dtype=dtype, quant="none")
        add("eager fp16 | decoder int4", dtype="float16", quant="int4")
        add("eager fp16 | decoder fp16, CUDA graphs", dtype="float16", quant="none", decode_graphs="on")
        add("eager fp16 | decoder int4, CUDA graphs", dtype="float16", quant="int4", decode_graphs="on")
        if _ort_providers() & {"CUDAExecutionProvider"}:
            add("ORT-CUDA fp16 | decoder fp16", dtype="float16", quant="none", vision_backend="onnxruntime",
                vision_precision="fp16")
        if have("tensorrt"):
            add("TensorRT fp16 | decoder fp16", dtype="float16", quant="none", vision_backend="tensorrt",
                vision_precision="fp16")
        if fusion:
            add("eager fp16 keep 0.5 | decoder fp16", dtype="float16", quant="none", keep_ratio=0.5)
        if peer and have("transformers"):
            add("transformers decoder fp16 (peer)", dtype="float16", quant="none", peer="transformers")
        return suite
    add("eager fp32 | decoder fp32", quant="none")
    if gguf:
        add("eager fp32 | decoder GGUF blocks", quant="auto")
    add("eager fp32 | decoder int8", quant="int8")
    add("eager fp32 | decoder int4", quant="int4")
    dec = "auto" if gguf else "int4"
    dec_label = "GGUF blocks" if gguf else "int4"
    if have("onnxruntime") and have("onnx"):
        for prec in ("fp32", "fp16", "int8"):
            add(f"ORT {prec} | decoder {dec_label}", quant=dec, vision_backend="onnxruntime", vision_precision=prec)
    if fusion:
        add(f"eager keep 0.5 | decoder {dec_label}", quant=dec, keep_ratio=0.5)
    if peer and have("transformers"):
        add("transformers decoder fp32 (peer)", quant="none", peer="transformers")
    return suite


def _ort_providers() -> set[str]:
    try:
        import onnxruntime
    except ImportError:
        return set()
    return set(onnxruntime.get_available_providers())


def run_suite(configs: list[BenchConfig], run: BenchRun, *, progress: bool = True,
              timeout_s: float = 1800) -> list[dict]:
    """Run each config in its own process; a config that fails gives a row whose ``note`` says why
    (the suite goes on)."""
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(configs, desc="bench", unit="config", disable=not progress)
    for cfg in bar:
        bar.set_postfix_str(cfg.label)
        rows.append(_child(cfg, run, timeout_s))
    return rows


def _child(cfg: BenchConfig, run: BenchRun, timeout_s: float) -> dict:
    payload = json.dumps({"config": asdict(cfg), "run": asdict(run)})
    try:
        # PYTHONSAFEPATH: `-m` would put the working directory first on the child's sys.path; run from a
        # checkout, its kernels/ or runtime/ folder would shadow installed packages of those names.
        r = subprocess.run([sys.executable, "-m", "edgevlm.perf.latency", payload], capture_output=True, text=True,
                           timeout=timeout_s, env={**os.environ, "PYTHONSAFEPATH": "1"})
    except subprocess.TimeoutExpired:
        return {**asdict(cfg), "note": f"failed: no result within {timeout_s:.0f} s"}
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        last = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        return {**asdict(cfg), "note": f"failed: {last[:300]}"}
    return json.loads(line[len("RESULT "):])


# ---- one configuration (in the child process) ------------------------------------------------------

def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _rss_mb() -> tuple[float, float]:
    """(peak RSS, current RSS) of this process in MB (Linux; peak from getrusage elsewhere)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        now = pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        now = float("nan")
    return peak, now


def _load(cfg: BenchConfig):
    import edgevlm
    from edgevlm.presets import get_preset, with_random_weights

    source = cfg.model
    if cfg.random_weights:
        source = with_random_weights(get_preset(cfg.model))
    # Every run must do all of the work: no embedding cache, no KV prefix reuse across runs.
    return edgevlm.load(source, device=cfg.device, dtype=cfg.dtype, quant=cfg.quant, kv_cache=cfg.kv_cache,
                        vision_backend=cfg.vision_backend, vision_precision=cfg.vision_precision,
                        keep_ratio=cfg.keep_ratio, embedding_cache_bytes=0, reuse_prefix=False,
                        decode_graphs=cfg.decode_graphs)


def prefill_flops(dcfg, tokens: int) -> int:
    """FLOPs of a prefill of ``tokens`` positions that computes logits for the last one only: the
    projections, causal attention (half the score matrix) and one row of the LM head."""
    d, kv = dcfg.hidden, dcfg.kv_heads * dcfg.head_dim
    q = dcfg.heads * dcfg.head_dim
    per_token = d * q + 2 * d * kv + q * d + 3 * d * dcfg.intermediate
    attention = 2 * tokens * tokens * q  # QK^T and PV, each 2 * T * T * q / 2 under the causal mask
    return 2 * tokens * per_token * dcfg.layers + attention * dcfg.layers + 2 * d * dcfg.vocab_size


def measure(cfg: BenchConfig, run: BenchRun) -> dict:
    """Time one configuration in this process; -> a result row (see the module docstring)."""
    from edgevlm.kernels.triton_support import kernel_backend
    from .limits import decoder_step_bytes, kv_bytes, matmul_peak, ort_fp32_peak, read_bandwidth
    from edgevlm.runtime.generate import GenerationConfig, generate_tokens
    from edgevlm.runtime.image_io import load_image

    if run.threads:
        torch.set_num_threads(run.threads)
    t0 = time.perf_counter()
    pipe = _load(cfg)
    load_s = time.perf_counter() - t0
    device = torch.device(cfg.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    tower, dec = pipe.tower, pipe.decoder
    if tower is None:
        raise ConfigError(f"edgevlm bench times vision-language models; {cfg.model!r} has no vision tower "
                          "(bench/decode.py times decoders alone)")
    times: dict[str, list[float]] = {k: [] for k in (*STAGES, "ttft", "decode_token")}
    out = None

    def clock(key: str, fn, keep: bool):
        sync()
        t = time.perf_counter()
        result = fn()
        sync()
        if keep:
            times[key].append((time.perf_counter() - t) * 1e3)
        return result

    eager = tower.runner is tower.model
    hf = None
    if cfg.peer:
        from edgevlm.runtime.readers.hf_decoders import to_transformers

        hf = to_transformers(dec).to(device)
    with torch.inference_mode():
        for i in range(run.warmup + run.repeat):
            keep = i >= run.warmup
            arr = clock("decode_image", lambda: load_image(run.image), keep)
            pre = clock("preprocess", lambda: tower.preprocessor([arr]), keep)
            views = {k: v.to(device, tower.dtype) for k, v in pre.views.items()}
            masks = {k: v.to(device) for k, v in pre.token_masks.items()} if pre.token_masks else None
            if eager:
                cells = tower.kept_cells(views)
                feats = clock("tower", lambda: tower.model.encode(views, cells), keep)
                clock("projector", lambda: tower.model.connector(feats, masks) if cells is None
                      else tower.model.connector(feats, tower.model.kept_masks(masks, cells), cells=cells), keep)
            else:
                clock("tower", lambda: tower.runner(views, masks), keep)
            if hf is None:
                out = pipe.generate(arr, run.prompt, max_new_tokens=run.new_tokens)
                if keep:
                    times["prefill"].append(out.timings["prefill"])
                    times["ttft"].append(out.timings["ttft"])
                n_prompt = out.prompt_tokens
            else:
                n_prompt = pipe.generate(arr, run.prompt, max_new_tokens=1).prompt_tokens
            ids = torch.randint(0, dec.cfg.vocab_size, (1, n_prompt), generator=torch.Generator().manual_seed(i))
            if hf is None:
                graphs = pipe.decode_graphs  # captured over the Pipeline's own cache (prefix reuse is off here)
                cache = graphs.cache if graphs is not None else \
                    dec.new_cache(batch=1, max_len=n_prompt + run.new_tokens + 1, kv_int8=cfg.kv_cache == "int8")
                # the step the Pipeline decodes with: its CUDA graphs, or its fused CPU step
                stream = generate_tokens(dec, cache, prompt_ids=ids[0].tolist(),
                                         gen_cfg=GenerationConfig(max_new_tokens=run.new_tokens), graphs=graphs,
                                         fused=pipe.fused_decode if graphs is None else None)
                n = sum(1 for _ in stream)
                if keep:
                    times["decode_token"].append(stream.stats.mean_decode_ms)
            else:
                prefill, step = _time_transformers(hf, ids.to(device), run.new_tokens, sync)
                n = run.new_tokens
                if keep:
                    times["prefill"].append(prefill)
                    times["decode_token"].append(step)

    # ---- bounds: the work, and this machine's limits for it
    views = {k: v.to(device, tower.dtype) for k, v in tower.preprocessor([load_image(run.image)]).views.items()}
    tower_flops = _tower_flops(tower, views)
    kv_elem = 1 if cfg.kv_cache == "int8" else dec.embed_tokens.weight.element_size()
    step_bytes = decoder_step_bytes(dec) + kv_bytes(dec.cfg, n_prompt + n / 2, kv_elem)
    peak = matmul_peak(device, dec.embed_tokens.weight.dtype)
    if device.type == "cpu":
        peak = max(peak, ort_fp32_peak() or 0.0)  # MLAS outruns torch's matmul on some CPUs
    bandwidth = read_bandwidth(step_bytes, device)
    rss_peak, rss_now = _rss_mb()
    med = {k: _median(v) for k, v in times.items()}
    row = {**asdict(cfg),
           "weights": "random (same shapes)" if cfg.random_weights else "real",
           "image": Path(run.image).name, "prompt_tokens": n_prompt,
           "visual_tokens": out.visual_tokens if out is not None else "",
           "new_tokens": n, "repeat": run.repeat, "threads": torch.get_num_threads(),
           **{f"{k}_ms": round(v, 3) for k, v in med.items() if v == v},
           "decode_tok_s": round(1e3 / med["decode_token"], 1) if med["decode_token"] > 0 else "",
           "load_s": round(load_s, 2), "rss_peak_mb": round(rss_peak, 1), "rss_mb": round(rss_now, 1),
           "cuda_peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else "",
           "tower_gflop": round(tower_flops / 1e9, 3), "prefill_gflop": round(prefill_flops(dec.cfg, n_prompt) / 1e9, 3),
           "decode_mb_per_token": round(step_bytes / 1e6, 2),
           "matmul_peak_gflops": round(peak, 1), "bandwidth_gbs": round(bandwidth, 1),
           "tower_bound_ms": round(tower_flops / peak / 1e6, 3),
           "prefill_bound_ms": round(prefill_flops(dec.cfg, n_prompt) / peak / 1e6, 3),
           "decode_bound_ms": round(step_bytes / bandwidth / 1e6, 3),
           "vision_runs_on": tower.backend, "vision_kernels": kernel_backend(), "note": ""}
    if cfg.peer:
        for k in ("decode_image_ms", "preprocess_ms", "tower_ms", "projector_ms", "ttft_ms", "tower_gflop",
                  "tower_bound_ms", "visual_tokens"):
            row.pop(k, None)
        row["note"] = "transformers LlamaForCausalLM on the same weights: prefill + greedy decode, KV cache"
    return row


def _tower_flops(tower, views: dict[str, torch.Tensor]) -> int:
    """FLOPs of the tower on these views, counted on a weightless copy on the meta device: there the
    attention takes its PyTorch path, which torch's FLOP counter sees (a Triton kernel it does not)."""
    from .limits import count_flops
    from edgevlm.runtime.tower import VisionTowerModel

    with torch.device("meta"):
        model = VisionTowerModel(tower.model.config)
    cells = tower.kept_cells(views)
    meta = {k: v.to("meta") for k, v in views.items()}
    return count_flops(lambda: model(meta, None, cells=None if cells is None else cells.to("meta")))


def _time_transformers(model, ids: torch.Tensor, new_tokens: int, sync) -> tuple[float, float]:
    """transformers' prefill (+ first token) and mean per-token decode (ms), greedy, its own KV cache."""
    import inspect

    # transformers 5.2x renames past_key_values to cache; take whichever this version has
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    t = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    prefill = (time.perf_counter() - t) * 1e3
    past, steps = _returned_cache(out), []
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        out = model(input_ids=tok, use_cache=True, **{name: past})
        past, tok = _returned_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
        int(tok)  # waits for the device, as edgevlm's step does
        steps.append((time.perf_counter() - t) * 1e3)
    return prefill, (sum(steps) / len(steps) if steps else float("nan"))


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _main(argv: list[str]) -> int:
    payload = json.loads(argv[0])
    names = {f.name for f in fields(BenchRun)}
    row = measure(BenchConfig(**payload["config"]), BenchRun(**{k: v for k, v in payload["run"].items() if k in names}))
    print("RESULT " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


__all__ = ["BenchConfig", "BenchRun", "default_suite", "run_suite", "measure", "prefill_flops", "STAGES"]
