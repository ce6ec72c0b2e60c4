"""The ``edgevlm`` command line: ``run``, ``chat``, ``export``, ``bench``, ``train ...``, ``eval``,
``demo``, ``info``, ``convert``, ``plan``.

Subcommands are small functions registered in :data:`COMMANDS`; each takes parsed arguments and
returns an exit code. The flags mean the same everywhere: ``--model/-m`` picks the model (a preset,
a checkpoint folder, a transformers folder or a ``.gguf`` file), ``--device``, ``--threads``, the
vision-backend flags, and ``--json`` prints machine-readable output on stdout (progress bars, which go
to stderr, are then off). Errors that edgevlm raises on purpose print one line and exit with 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources

from .cli_args import QUANT_HELP, add_model_args, add_vision_args, set_threads, vision_kwargs


def _asset(name: str) -> str:
    return str(resources.files("edgevlm") / "assets" / name)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def _timings_line(t: dict[str, float]) -> str:
    names = [("decode_image", "image decode"), ("preprocess", "preprocess"), ("vision", "vision tower"),
             ("prefill", "prefill+1st token"), ("ttft", "first token"), ("decode_per_token", "decode/token"),
             ("total", "total")]
    return " | ".join(f"{label} {t[k]:.1f} ms" for k, label in names if k in t)


def _load(args):
    import edgevlm

    set_threads(args)
    return edgevlm.load(args.model, device=args.device, dtype=args.dtype, preprocess_backend=args.preprocess,
                        max_context=args.max_context, quant=args.quant, kv_cache=args.kv_cache,
                        decode_graphs=args.decode_graphs, progress=not getattr(args, "json", False),
                        **vision_kwargs(args))


def _output_dict(out, pipe) -> dict:
    return {"text": out.text, "token_ids": out.token_ids, "timings_ms": out.timings,
            "prompt_tokens": out.prompt_tokens, "cached_tokens": out.cached_tokens,
            "visual_tokens": out.visual_tokens, "stop_reason": out.stop_reason, "model": pipe.name}


# ---- run -------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    pipe = _load(args)
    images = args.image or None
    kw = dict(_sampling(args), raw=args.raw, system=args.system)
    if args.json:
        print(json.dumps(_output_dict(pipe.generate(images, args.prompt, **kw), pipe), indent=2))
        return 0
    stream = pipe.stream(images, args.prompt, **kw)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    print(f"[{_timings_line(stream.output.timings)}]", file=sys.stderr)
    return 0


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))


# ---- chat ------------------------------------------------------------------------------------

CHAT_HELP = """commands: /image PATH  talk about another image (starts a new conversation)
          /reset       forget the conversation (the image stays)
          /history     show the conversation so far
          /quit        leave (or Ctrl-D)
          Ctrl-C       stop the answer being written"""


def cmd_chat(args: argparse.Namespace) -> int:
    """A multi-turn conversation about one image (or none) on stdin/stdout. Each turn reuses the KV
    cache of the previous ones, so only the new question is prefilled. Ctrl-C stops the answer being
    written (it stays in the history as far as it got); Ctrl-C or Ctrl-D at the prompt leaves."""
    from .errors import EdgeVLMError
    from edgevlm.runtime.image_io import load_image

    pipe = _load(args)
    interactive = sys.stdin.isatty() and not args.json
    # decoded once: a bad file fails here, not at the first question
    session = pipe.session(load_image(args.image) if args.image else None, system=args.system)
    if interactive:
        print(f"edgevlm chat — {pipe.name}" + (f", image {args.image}" if args.image else ", no image"))
        print(CHAT_HELP)
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/reset":
                session.reset()
            elif cmd == "/image" and arg.strip():
                try:
                    session = pipe.session(load_image(arg.strip()), system=args.system)
                except EdgeVLMError as e:  # keep talking about the previous image
                    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            elif cmd == "/history":
                print(json.dumps(session.messages, indent=2 if interactive else None, ensure_ascii=False))
            else:
                print(CHAT_HELP, file=sys.stderr)
            continue
        try:
            if args.json:
                out = session.ask(line, **_sampling(args))
                print(json.dumps({"turn": len(session.outputs), "question": line, **_output_dict(out, pipe)}),
                      flush=True)
                continue
            print("model> " if interactive else "", end="", flush=True)
            turns = len(session.outputs)
            try:
                for piece in session.stream(line, **_sampling(args)):
                    print(piece, end="", flush=True)
            except KeyboardInterrupt:
                print(" [stopped]", end="")
            print()
            if len(session.outputs) == turns:  # stopped before the first token: nothing to report
                continue
            out = session.outputs[-1]
            reused = f", {out.cached_tokens} of {out.prompt_tokens} prompt positions reused" if out.cached_tokens else ""
            print(f"[{_timings_line(out.timings)}{reused}]", file=sys.stderr)
        except EdgeVLMError as e:  # an overlong conversation, say: report it and keep chatting
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 0


# ---- info ------------------------------------------------------------------------------------

def _preset_summary(name: str) -> dict:
    """Sizes of a preset from its config alone (meta device): no weights are read or allocated."""
    import torch

    from .presets import get_preset
    from edgevlm.runtime.decoder import Decoder
    from edgevlm.runtime.pipeline import backends
    from edgevlm.runtime.tower import VisionTowerModel

    cfg = get_preset(name)
    with torch.device("meta"):
        tower, dec = VisionTowerModel(cfg.tower), Decoder(cfg.decoder)
    enc = [{"name": e.name, "kind": e.kind, "image_size": e.image_size, "tokens": e.tokens, "width": e.width,
            "params": sum(p.numel() for p in tower.encoders[e.name].parameters()),
            "weights": f"{e.weights.format}:{e.weights.path}" if e.weights else "random"} for e in cfg.tower.encoders]
    n_dec = sum(p.numel() for p in dec.parameters())
    head = None
    if cfg.grounding_head is not None:
        from edgevlm.runtime.grounding_head import GroundingHead

        with torch.device("meta"):
            n_head = sum(p.numel() for p in GroundingHead(cfg.grounding_head).parameters())
        head = {"params": n_head, "trigger": cfg.grounding_head.trigger, "grid": cfg.grounding_head.grid,
                "answers": list(cfg.grounding_head.answers)}
    return {"name": name, "preset": True, "grounding_head": head,
            "vision": {"encoders": enc, "connector": {"kind": cfg.tower.connector.kind,
                                                        "params": sum(p.numel() for p in tower.connector.parameters())},
                       "views_per_image": cfg.tower.views_per_image,
                       "visual_tokens_per_image": cfg.visual_tokens_per_image},
            "decoder": {"layers": cfg.decoder.layers, "hidden": cfg.decoder.hidden, "params": n_dec,
                        "fp32_bytes": 4 * n_dec,
                        "weights": (f"{cfg.decoder_weights.format}:{cfg.decoder_weights.path}"
                                    if cfg.decoder_weights else "random")},
            "backends": backends()}


def cmd_info(args: argparse.Namespace) -> int:
    from .presets import PRESETS

    args.model = args.model or args.model_positional or "demo"
    if args.model in PRESETS and not args.load:
        info = _preset_summary(args.model)
    else:
        info = _load(args).info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"model: {info['name']}" + ("  (preset; sizes from its config, --load to load it)" if info.get("preset") else ""))
    v = info.get("vision")
    if v:
        for e in v["encoders"]:
            print(f"  encoder {e['name']:<9} {e['kind']:<12} {e['image_size']}px  {e['tokens']} tokens x {e['width']}  "
                  f"{e['params'] / 1e6:8.1f}M params  weights: {e['weights']}")
        c = v["connector"]
        print(f"  connector {c['kind']:<19} {c['params'] / 1e6:8.2f}M params  weights: {c.get('weights', 'random')}")
        print(f"  visual tokens per image: {v['visual_tokens_per_image']} "
              f"({v.get('views_per_image', v.get('views', {}).get('views_per_image'))} views)")
        if "preprocess_backend" in v:
            print(f"  preprocessing: {v['preprocess_backend']}; tower runs on: {v['backend']}")
    if info.get("grounding_head"):
        g = info["grounding_head"]
        print(f"  grounding head: {g['params'] / 1e6:.2f}M params on the {g['grid']}x{g['grid']} grid; writes the "
              f"boxes after {g['trigger']!r}" + (f"; weighs in on {len(g['answers'])} short answers "
                                                 f"({', '.join(g['answers'][:4])}, ...)" if g.get("answers") else ""))
    d = info["decoder"]
    size = d.get("weights_bytes", d.get("fp32_bytes", 0))
    print(f"  decoder {d['layers']} layers x {d['hidden']}  {d['params'] / 1e6:.1f}M params  {_fmt_bytes(size)}"
          f"  weights: {d['weights']}")
    if "quantization" in d:
        print(f"  quantization: {d['quantization']}")
    if "kv_cache" in info:
        print(f"  KV cache: {info['kv_cache']['max_context']} positions, {info['kv_cache']['dtype']}, "
              f"{_fmt_bytes(info['kv_cache']['bytes'])}")
        g = info.get("decode_graphs")
        if g:
            how = (f"CUDA graphs, {g['captured']} captured in {g['capture_ms']} ms" if g["graphs"]
                   else "static steps, uncaptured")
            print(f"  decode: {how}; context buckets {', '.join(map(str, g['buckets']))}")
        f = info.get("fused_decode")
        if f and f["used"]:  # runtime/quant/fused_decode.py
            print(f"  decode: fused C++ step, all layers per call ({f['threads']} threads, {f['qgemm_kernels']} "
                  f"matmuls, {f['math_kernels']} attention)")
        k = info.get("cpu_kernels")
        if k:
            print(f"  CPU: quantised matmuls {k['qgemm']} (this CPU runs {', '.join(k['qgemm_sets'])}); native bf16: "
                  f"{'yes' if k['native_bf16'] else 'no'}" + (f"; tower {v['dtype']}" if v and "dtype" in v else ""))
        print(f"  tokenizer: {info['tokenizer']['vocab']} tokens ({info['tokenizer']['source']}); "
              f"chat: {info['chat']['format']} ({info['chat']['template']} template), images {info['chat']['image_placement']}")
    print("  backends: " + ", ".join(f"{k} {val}" for k, val in info["backends"].items()))
    return 0


# ---- demo ------------------------------------------------------------------------------------

# Bundled examples (held-out renders from edgevlm.train.data, and a real photo) with the answers the
# generator knows to be true; boxes are pixel edges (x1, y1, x2, y2) in the original image.
DEMO_QUESTIONS = [
    ("scene_a.png", "Describe the image briefly.", "A blue circle, a yellow triangle and a green triangle on a table."),
    ("scene_a.png", "How many triangles are there?", "2"),
    ("scene_a.png", "What color is the circle?", "blue"),
    ("scene_a.png", "Where is the yellow triangle? Answer with a bounding box.", (148, 179, 212, 243)),
    ("scene_b.png", "How many objects are on the table?", "3"),
    ("scene_b.png", "What shape is the blue object?", "square"),
    ("scene_b.png", "Where is the green triangle? Answer with a bounding box.", (122, 76, 187, 141)),
    ("digit.png", "What digit is shown?", "9"),
    ("chelsea.jpg", "Describe the image briefly.", None),
]


def _check_answer(text: str, expected, h: int, w: int) -> str:
    from edgevlm.runtime.boxes import box_from_pixels, box_to_pixels, iou, parse_boxes

    if expected is None:
        return ""
    if isinstance(expected, tuple):
        boxes = parse_boxes(text)
        if not boxes:
            return "  (no box parsed)"
        px = tuple(round(v) for v in box_to_pixels(boxes[0], h, w))
        overlap = iou(boxes[0], box_from_pixels(*expected, h, w))
        return f"  -> pixels {px}, IoU {overlap:.2f} with the true box {'✓' if overlap >= 0.5 else '✗'}"
    ok = text.strip().rstrip(".").lower() == str(expected).rstrip(".").lower()
    return "  ✓" if ok else f"  ✗ (expected: {expected})"


def imagenet_top(pipe, image, k: int = 3) -> list[tuple[str, float]]:
    """Top-``k`` ImageNet-1k labels with probabilities from the first eager tower encoder that keeps a
    1,000-class classifier (the demo's EfficientNet-Lite0), on the view the tower itself makes of
    ``image``; ``[]`` when no encoder has one (another model, or a tower run as an exported graph)."""
    import torch

    model = getattr(pipe.tower, "model", None)
    for name, enc in (model.encoders.items() if model is not None else ()):
        head = getattr(enc, "classifier", None)
        if head is None or head.out_features != 1000:
            continue
        labels = (resources.files("edgevlm") / "assets" / "imagenet_labels.txt").read_text().splitlines()
        with torch.inference_mode():
            view = pipe.tower.preprocessor([image]).views[name][:1]  # the global view, [1, 3, H, W]
            probs = enc.classify(view.to(head.weight.device, head.weight.dtype)).float().softmax(-1)[0]
        p, idx = probs.topk(k)
        return [(labels[int(i)], round(float(v), 4)) for v, i in zip(p, idx)]
    return []


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default model end to end: a text question, bundled scenes, a digit, a real photo."""
    import edgevlm
    from edgevlm.runtime.image_io import load_image

    set_threads(args)
    say = (lambda *a, **k: None) if args.json else print
    say("edgevlm demo — model 'demo': DINOv2-S + EfficientNet-Lite0 -> SPHINX-style fusion -> SmolLM2-135M-Instruct")
    pipe = edgevlm.load("demo", preprocess_backend=args.preprocess, quant=args.quant, progress=not args.json,
                        **vision_kwargs(args))
    vision = pipe.info()["vision"]
    say(f"  decoder:   {pipe.sources['decoder']}; quantization: {pipe.info()['decoder']['quantization']}")
    for e in vision["encoders"]:
        say(f"  encoder:   {e['name']} <- {e['weights']}")
    trained = vision["connector"]["weights"] == "checkpoint"
    say(f"  connector: {pipe.sources.get('trained', 'random (not trained)') if trained else 'random (not trained)'}")
    if "vision_backend" in pipe.sources:
        say(f"  vision:    {pipe.sources['vision_backend']}")

    question = "What is the capital of France?"
    out = pipe.generate(None, question, max_new_tokens=48)
    say(f"\n[text] {question}\n  {out.text}\n  [{_timings_line(out.timings)}]")
    records = [{"image": None, "question": question, "answer": out.text, "timings_ms": out.timings}]

    pipe.generate(_asset("scene_a.png"), "Warm-up.", max_new_tokens=1)  # first call pays for thread pools
    current, n_ok, n_checked = None, 0, 0
    for name, q, expected in DEMO_QUESTIONS:
        img = load_image(_asset(name))
        if name != current:
            kind = "real photo" if name.endswith(".jpg") else "bundled example"
            say(f"\n[{name}] {img.shape[1]}x{img.shape[0]} {kind}")
            current = name
        out = pipe.generate(img, q, max_new_tokens=80)
        verdict = _check_answer(out.text, expected, *img.shape[:2]) if trained else ""
        n_checked, n_ok = n_checked + (expected is not None), n_ok + ("✓" in verdict)
        say(f"  Q: {q}\n  A: {out.text}{verdict}")
        say(f"     [{_timings_line(out.timings)}]")
        record = {"image": name, "question": q, "answer": out.text, "timings_ms": out.timings,
                  "expected": list(expected) if isinstance(expected, tuple) else expected,
                  "correct": ("✓" in verdict) if trained and expected is not None else None}
        if expected is None:  # the real photo: say what the answer is worth, and what a real classifier sees
            top = imagenet_top(pipe, img)
            record["imagenet_top"] = top
            say("  note: this model was trained only on generated table-top scenes and digits, so what it says "
                "about a photo is not evidence of what is in it.")
            if top:
                say("        The tower's own EfficientNet-Lite0 ImageNet head on the same view: "
                    + ", ".join(f"{label} {100 * p:.0f} %" for label, p in top) + ".")
        records.append(record)
    if args.json:
        print(json.dumps({"model": "demo", "trained": trained, "sources": pipe.sources, "checked": n_checked,
                          "correct": n_ok, "answers": records}, indent=2))
    elif trained:
        print(f"\n{n_ok}/{n_checked} checked answers right. The demo model learnt from generated table-top scenes "
              "and digits only (held-out accuracy: docs/training.md); a real photo is outside what it "
              "was taught. A grounding head beside the LLM reads the visual tokens: it writes the boxes once "
              "the LLM opens a box answer, and weighs in on the first word of a colour, shape, count or digit "
              "answer.")
    else:
        print("\nnote: the projector weights are random (no trained demo checkpoint is installed), so the "
              "answers about images are not meaningful.")
    return 0


# ---- bench -----------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    """End-to-end latency breakdowns per backend and precision -> rows in a CSV and a PNG plot."""
    import platform
    from datetime import datetime, timezone

    import torch

    import edgevlm
    from .perf.latency import BenchRun, default_suite, run_suite
    from .perf.limits import device_name, git_commit, module_version
    from .perf.plot import draw_breakdown
    from .perf.results import append_rows

    set_threads(args)
    _check_bench_args(args)
    suite = default_suite(args.model, args.device, random_weights=args.random_weights, peer=not args.no_peer)
    if args.only:
        suite = [c for c in suite if any(o.lower() in c.label.lower() for o in args.only)]
    if args.list or not suite:
        for c in suite:
            print(c.label)
        if not suite:
            print(f"edgevlm bench: no configuration matches --only {' '.join(args.only)}", file=sys.stderr)
        return 0 if suite else 2
    run = BenchRun(image=args.image or _asset("scene_a.png"), prompt=args.prompt, new_tokens=args.new_tokens,
                   repeat=args.repeat, warmup=args.warmup, threads=args.threads)
    rows = run_suite(suite, run, progress=not args.json)
    stamp = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
             "device_name": device_name(args.device), "machine": platform.machine(), "cpus": os.cpu_count(),
             "edgevlm": edgevlm.__version__, "torch": torch.__version__,
             **{m: module_version(m) for m in ("onnxruntime", "triton", "tensorrt", "transformers")}}
    rows = [{**stamp, **r} for r in rows]
    if args.out:
        append_rows(args.out, rows)
    if args.plot:
        title = (f"edgevlm bench: {args.model} on {stamp['device_name']}, {run.new_tokens} new tokens, "
                 f"median of {run.repeat} (commit {stamp['commit']})")
        draw_breakdown(rows, args.plot, title)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _print_bench(rows)
    for what, path in (("rows", args.out), ("plot", args.plot)):
        if path:
            print(f"{what}: {path}")
    return 0


def _check_bench_args(args) -> None:
    """Refuse what would make every configuration fail, before minutes of child processes."""
    import torch

    from .errors import BackendUnavailableError, ConfigError
    from .presets import PRESETS
    from edgevlm.runtime.image_io import load_image

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU")
    if args.random_weights and args.model not in PRESETS:
        raise ConfigError(f"--random-weights takes a preset ({', '.join(PRESETS)}), not {args.model!r}")
    if args.image:
        load_image(args.image)  # a typed error now rather than one per configuration


def _print_bench(rows: list[dict]) -> None:
    def ms(r, k):
        v = r.get(f"{k}_ms", "")
        return f"{float(v):8.1f}" if v not in ("", None) else "       -"

    print(f"{'configuration':<38} {'ttft':>8} {'tower':>8} {'proj':>8} {'prefill':>8} {'decode/tok':>11} "
          f"{'bound':>6} {'peak RSS':>9}")
    for r in rows:
        if str(r.get("note", "")).startswith("failed"):
            print(f"{r['label']:<38} {r['note']}")
            continue
        print(f"{r['label']:<38} {ms(r, 'ttft')} {ms(r, 'tower')} {ms(r, 'projector')} {ms(r, 'prefill')} "
              f"{float(r['decode_token_ms']):8.2f} ms {float(r['decode_bound_ms']):6.2f} "
              f"{float(r['rss_peak_mb']) / 1024:7.2f} GB")
    print("times in ms (median); bound = a decode step's bytes at this machine's measured read bandwidth")


# ---- convert ---------------------------------------------------------------------------------

def cmd_convert(args: argparse.Namespace) -> int:
    """Any loadable source -> an edgevlm checkpoint folder (edgevlm.json, model.safetensors, tokenizer)."""
    from edgevlm.runtime.convert import convert

    set_threads(args)
    out = convert(args.source, args.out, dtype=args.dtype, force=args.force, progress=not args.json)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    size = sum((out / f).stat().st_size for f in files)
    if args.json:
        print(json.dumps({"out": str(out), "files": files, "bytes": size}, indent=2))
    else:
        print(f"wrote {out} ({_fmt_bytes(size)}: {', '.join(files)})")
    return 0


COMMANDS = {"run": cmd_run, "chat": cmd_chat, "info": cmd_info, "demo": cmd_demo, "bench": cmd_bench,
            "convert": cmd_convert}


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    p.add_argument("--system", default=None, help="system message")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm", description="Edge-optimised runtime for multimodal LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer a prompt about zero or more images")
    run.add_argument("prompt", help="the question or instruction")
    run.add_argument("--image", "-i", action="append", default=[], help="image file (repeat for several)")
    _sampling_args(run)
    run.add_argument("--raw", action="store_true", help="send the prompt verbatim, without the chat template")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_model_args(run)

    chat = sub.add_parser("chat", help="multi-turn conversation about an image (keeps its KV cache between turns)",
                          description="Read questions from stdin, one per line, and stream the answers. Each turn "
                          "prefills only its new tokens. " + CHAT_HELP.replace("\n          ", "; "))
    chat.add_argument("--image", "-i", default=None, help="the image to talk about (default: none; /image PATH later)")
    _sampling_args(chat)
    chat.add_argument("--json", action="store_true", help="print one JSON object per turn (JSON lines), no streaming")
    add_model_args(chat)

    from edgevlm.export.cli import add_parser as add_export
    from edgevlm.train.cli import add_parsers  # `train ...` and `eval`

    add_export(sub)
    bench = sub.add_parser("bench", help="end-to-end latency breakdown per backend and precision -> CSV + PNG",
                           description="Run each configuration of the suite (eager / ONNX Runtime / TensorRT tower, "
                           "float / int8 / int4 decoder, token dropping, transformers peer) in a fresh process; "
                           "time image decode, preprocess, tower, projector, prefill, time to first token and "
                           "per-token decode; record peak memory and this machine's bounds. Appends rows to --out "
                           "and draws --plot.")
    bench.add_argument("--model", "-m", default="demo", help="preset to time (default: demo)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    bench.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--only", action="append", default=[], metavar="TEXT",
                       help="run only configurations whose label contains TEXT (repeatable; --list shows labels)")
    bench.add_argument("--list", action="store_true", help="print the suite's configurations and exit")
    bench.add_argument("--image", default=None, help="image to run on (default: the bundled scene_a.png)")
    bench.add_argument("--prompt", default="Describe the image briefly.")
    bench.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per run (default: 32)")
    bench.add_argument("--repeat", type=int, default=5, help="timed runs per configuration; medians (default: 5)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    bench.add_argument("--random-weights", action="store_true",
                       help="same shapes, random values: for machines without the weight packages (times only)")
    bench.add_argument("--no-peer", action="store_true", help="leave out the transformers decoder peer")
    bench.add_argument("--out", default="bench/results/e2e.csv", help="append rows to this CSV ('' = none)")
    bench.add_argument("--plot", default="bench/results/e2e.png", help="draw the breakdown to this PNG ('' = none)")
    bench.add_argument("--json", action="store_true", help="print the rows as JSON (and no progress bar)")

    add_parsers(sub)  # train ..., eval

    from .perf.plan_cli import add_parser as add_plan

    add_plan(sub)

    from .serving.cli import add_parser as add_serve, cmd_export_triton_repo

    add_serve(sub)
    sub.choices["export"].set_defaults(triton_repo=cmd_export_triton_repo)  # export --to triton-repo

    demo = sub.add_parser("demo", help="run the embedded demo model on bundled real photos and a text question")
    demo.add_argument("--preprocess", default="auto", choices=["auto", "cpp", "reference"],
                      help="image preprocessing backend (default: auto = C++ when built)")
    demo.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    demo.add_argument("--quant", default="auto", help=QUANT_HELP)
    demo.add_argument("--json", action="store_true", help="print every question, answer and timing as one JSON object")
    add_vision_args(demo)

    info = sub.add_parser("info", help="model components, parameter counts, memory, active backends")
    info.add_argument("model_positional", nargs="?", default=None, metavar="MODEL", help="same as --model")
    info.add_argument("--load", action="store_true", help="load a preset's weights instead of sizing it from its config")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_model_args(info)
    info.set_defaults(model=None)

    convert = sub.add_parser(
        "convert", help="write any loadable model as an edgevlm checkpoint folder",
        description="Read SRC as `edgevlm run --model SRC --quant none` would (float weights, LoRA merged, GGUF "
        "blocks dequantised) and write an edgevlm checkpoint folder: edgevlm.json (the whole model config), "
        "model.safetensors (decoder.* and tower.* tensors), tokenizer.json + tokenizer_config.json (tokenizer "
        "and chat template) and, for InstructBLIP, qformer_tokenizer/. The folder is read back and compared "
        "with the source before it is put in place. It is written to a hidden folder beside --out and renamed: "
        "a run that fails leaves nothing behind, and --out is never half-written (a killed run may leave "
        "the hidden .OUT.convert-* folder).")
    convert.add_argument("source", metavar="SRC", help="anything --model loads: preset name, edgevlm checkpoint "
                         "folder, transformers folder, LLaMA2-Accessory SPHINX folder, .gguf file, ...")
    convert.add_argument("--out", "-o", required=True, help="the checkpoint folder to write (must not exist or be "
                         "empty, unless --force)")
    convert.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                         help="dtype of the written float weights (default: float32)")
    convert.add_argument("--force", action="store_true", help="replace a non-empty --out (after the new folder "
                         "is complete)")
    convert.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    convert.add_argument("--json", action="store_true", help="print the written files as JSON (and no progress bar)")

    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import EdgeVLMError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "delegate", False):  # `train mix|qformer|flip` parse their own options
        args.rest = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return (getattr(args, "func", None) or COMMANDS[args.command])(args)
    except EdgeVLMError as e:
        print(f"edgevlm {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
