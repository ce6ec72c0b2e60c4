"""The ``edgevlm`` command line: ``run``, ``info``, ``demo``, ``export``, ``train ...``, ``eval``.

Subcommands are small functions registered in :data:`COMMANDS`; each takes parsed arguments and
returns an exit code. Errors that edgevlm raises on purpose print one line and exit with 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources


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
             ("prefill", "prefill+1st token"), ("decode_per_token", "decode/token"), ("total", "total")]
    return " | ".join(f"{label} {t[k]:.1f} ms" for k, label in names if k in t)


def _load(args):
    import edgevlm

    return edgevlm.load(args.model, device=args.device, dtype=args.dtype, preprocess_backend=args.preprocess,
                        max_context=args.max_context, quant=args.quant, kv_cache=args.kv_cache,
                        **vision_kwargs(args))


def vision_kwargs(args) -> dict:
    return {"vision_backend": args.vision_backend, "vision_export": args.vision_export,
            "vision_precision": args.vision_precision, "keep_ratio": args.keep_ratio, "keep_mode": args.keep_mode}


def add_vision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vision-backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"],
                   help="run the vision tower eagerly (torch, default) or as an exported graph")
    p.add_argument("--vision-export", default=None,
                   help="export folder from `edgevlm export` (default: export into ~/.cache/edgevlm on first use)")
    p.add_argument("--vision-precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="precision of the export made on first use when --vision-export is not given")
    p.add_argument("--keep-ratio", type=float, default=1.0,
                   help="token dropping: share of the fused grid's cells the ViTs see (SPHINX-fusion towers; "
                        "default 1.0 = all)")
    p.add_argument("--keep-mode", default="uniform", choices=["uniform", "random"],
                   help="which cells token dropping keeps: evenly spread (default) or FLIP's random subset")


# ---- run -------------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> int:
    pipe = _load(args)
    images = args.image or None
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=args.seed, raw=args.raw, system=args.system, stop=tuple(args.stop))
    if args.json:
        out = pipe.generate(images, args.prompt, **kw)
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "timings_ms": out.timings,
                          "prompt_tokens": out.prompt_tokens, "visual_tokens": out.visual_tokens,
                          "stop_reason": out.stop_reason, "model": pipe.name}, indent=2))
        return 0
    for piece in pipe.stream(images, args.prompt, **kw):
        print(piece, end="", flush=True)
    print()
    print(f"[{_timings_line(pipe.last_output.timings)}]", file=sys.stderr)
    return 0


# ---- info ------------------------------------------------------------------------------------

def _preset_summary(name: str) -> dict:
    """Sizes of a preset from its config alone (meta device): no weights are read or allocated."""
    import torch

    from edgevlm.presets import get_preset
    from edgevlm.runtime.decoder import LlamaDecoder
    from edgevlm.runtime.pipeline import backends
    from edgevlm.runtime.tower import VisionTowerModel

    cfg = get_preset(name)
    with torch.device("meta"):
        tower, dec = VisionTowerModel(cfg.tower), LlamaDecoder(cfg.decoder)
    enc = [{"name": e.name, "kind": e.kind, "image_size": e.image_size, "tokens": e.tokens, "width": e.width,
            "params": sum(p.numel() for p in tower.encoders[e.name].parameters()),
            "weights": f"{e.weights.format}:{e.weights.path}" if e.weights else "random"} for e in cfg.tower.encoders]
    n_dec = sum(p.numel() for p in dec.parameters())
    return {"name": name, "preset": True,
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
    from edgevlm.presets import PRESETS

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
    d = info["decoder"]
    size = d.get("weights_bytes", d.get("fp32_bytes", 0))
    print(f"  decoder {d['layers']} layers x {d['hidden']}  {d['params'] / 1e6:.1f}M params  {_fmt_bytes(size)}"
          f"  weights: {d['weights']}")
    if "quantization" in d:
        print(f"  quantization: {d['quantization']}")
    if "kv_cache" in info:
        print(f"  KV cache: {info['kv_cache']['max_context']} positions, {info['kv_cache']['dtype']}, "
              f"{_fmt_bytes(info['kv_cache']['bytes'])}")
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


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default model end to end: a text question, bundled scenes, a digit, a real photo."""
    import torch

    import edgevlm
    from edgevlm.runtime.image_io import load_image

    if args.threads:
        torch.set_num_threads(args.threads)
    print("edgevlm demo — model 'demo': DINOv2-S + EfficientNet-Lite0 -> SPHINX-style fusion -> SmolLM2-135M-Instruct")
    pipe = edgevlm.load("demo", preprocess_backend=args.preprocess, quant=args.quant, **vision_kwargs(args))
    vision = pipe.info()["vision"]
    print(f"  decoder:   {pipe.sources['decoder']}; quantization: {pipe.info()['decoder']['quantization']}")
    for e in vision["encoders"]:
        print(f"  encoder:   {e['name']} <- {e['weights']}")
    trained = vision["connector"]["weights"] == "checkpoint"
    print(f"  connector: {pipe.sources.get('trained', 'random (not trained)') if trained else 'random (not trained)'}")
    if "vision_backend" in pipe.sources:
        print(f"  vision:    {pipe.sources['vision_backend']}")

    question = "What is the capital of France?"
    out = pipe.generate(None, question, max_new_tokens=48)
    print(f"\n[text] {question}\n  {out.text}\n  [{_timings_line(out.timings)}]")

    pipe.generate(_asset("scene_a.png"), "Warm-up.", max_new_tokens=1)  # first call pays for thread pools
    current, n_ok, n_checked = None, 0, 0
    for name, q, expected in DEMO_QUESTIONS:
        img = load_image(_asset(name))
        if name != current:
            kind = "real photo" if name.endswith(".jpg") else "bundled example"
            print(f"\n[{name}] {img.shape[1]}x{img.shape[0]} {kind}")
            current = name
        out = pipe.generate(img, q, max_new_tokens=80)
        verdict = _check_answer(out.text, expected, *img.shape[:2]) if trained else ""
        n_checked, n_ok = n_checked + (expected is not None), n_ok + ("✓" in verdict)
        print(f"  Q: {q}\n  A: {out.text}{verdict}")
        print(f"     [{_timings_line(out.timings)}]")
    if trained:
        print(f"\n{n_ok}/{n_checked} checked answers right. The demo model learnt from generated table-top scenes "
              "and digits only (held-out accuracy: README, 'Training the demo'); a real photo is outside what it "
              "was taught, and its boxes are not yet usable.")
    else:
        print("\nnote: the projector weights are random (no trained demo checkpoint is installed), so the "
              "answers about images are not meaningful.")
    return 0


QUANT_HELP = ("decoder weights: auto (a GGUF file keeps its own Q8_0/Q4_0/Q4_1 blocks), none (float), int8 "
              "(per channel), int4 (group 32), int4-g64, int4-g128, int8-g32 (default: auto)")

COMMANDS = {"run": cmd_run, "info": cmd_info, "demo": cmd_demo}


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights dtype")
    p.add_argument("--preprocess", default="auto", choices=["auto", "cpp", "reference"],
                   help="image preprocessing backend (default: auto = C++ when built)")
    p.add_argument("--max-context", type=int, default=2048, help="KV cache positions (default: 2048)")
    p.add_argument("--quant", default="auto", help=QUANT_HELP)
    p.add_argument("--kv-cache", default="float", choices=["float", "int8"],
                   help="KV cache storage: float (the weights' dtype) or int8 (a quarter of the memory)")
    add_vision_args(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm", description="Edge-optimised runtime for multimodal LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer a prompt about zero or more images")
    run.add_argument("prompt", help="the question or instruction")
    run.add_argument("--image", "-i", action="append", default=[], help="image file (repeat for several)")
    run.add_argument("--model", "-m", default="demo",
                     help="preset name, edgevlm checkpoint folder, transformers folder or .gguf file (default: demo)")
    run.add_argument("--max-new-tokens", type=int, default=128)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    run.add_argument("--system", default=None, help="system message")
    run.add_argument("--raw", action="store_true", help="send the prompt verbatim, without the chat template")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _model_args(run)

    info = sub.add_parser("info", help="model components, parameter counts, memory, active backends")
    info.add_argument("model", nargs="?", default="demo",
                      help="preset name, edgevlm checkpoint folder, transformers folder or .gguf file (default: demo)")
    info.add_argument("--load", action="store_true", help="load a preset's weights instead of sizing it from its config")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    _model_args(info)

    demo = sub.add_parser("demo", help="run the embedded demo model on bundled real photos and a text question")
    demo.add_argument("--preprocess", default="auto", choices=["auto", "cpp", "reference"],
                      help="image preprocessing backend (default: auto = C++ when built)")
    demo.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    demo.add_argument("--quant", default="auto", help=QUANT_HELP)
    add_vision_args(demo)

    from edgevlm.export.cli import add_parser as add_export
    from edgevlm.train.cli import add_parsers  # `train ...` and `eval`

    add_export(sub)
    add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from edgevlm.errors import EdgeVLMError

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
