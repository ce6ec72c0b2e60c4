"""``edgevlm plan [MODEL ...] --device orin-nano``: expected TTFT, decode speed and memory on a Jetson."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from edgevlm.errors import ConfigError

DEFAULT_MODELS = ("demo", "llava-1.5", "blip2", "xgen-mm", "sphinx-tiny", "sphinx", "sphinx-1k")


def _model_config(spec: str):
    """A preset name, an edgevlm checkpoint folder (its edgevlm.json) or a ModelConfig JSON file."""
    from edgevlm.config import ModelConfig
    from edgevlm.presets import PRESETS, get_preset

    if spec in PRESETS:
        return get_preset(spec)
    path = Path(spec)
    if path.is_dir():
        from edgevlm.runtime.checkpoint import is_checkpoint_dir, load_checkpoint_config

        if is_checkpoint_dir(path):
            return load_checkpoint_config(path)
    elif path.is_file() and path.suffix == ".json":
        return ModelConfig.from_json(path.read_text())
    raise ConfigError(f"plan needs a preset ({', '.join(PRESETS)}), an edgevlm checkpoint folder or a ModelConfig "
                      f".json file; got {spec!r} (other formats: `edgevlm convert` them first)")


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ConfigError(f"--{what} takes a comma-separated subset of {', '.join(allowed)}; got {text!r}")
    return names


def cmd_plan(args: argparse.Namespace) -> int:
    from .devices import DEVICES, get_device
    from .plan import DECODER_PRECISIONS, Overheads, Utilisation, count_work, markdown, plan

    devices = list(DEVICES.values()) if args.device == "all" else [get_device(args.device)]
    precisions = _names(args.decoder, DECODER_PRECISIONS, "decoder")
    use = Utilisation(bandwidth=args.bandwidth_use, compute=args.compute_use)
    over = Overheads(system_gib=args.system_gib, runtime_gib=args.runtime_gib)
    models = args.models or DEFAULT_MODELS
    works = [count_work(_model_config(m), m, text_tokens=args.text_tokens) for m in models]
    plans = {d.name: [plan(w, d, p, args.tower, kv_cache=args.kv_cache, context=args.context,
                           new_tokens=args.new_tokens, utilisation=use, overheads=over)
                      for w in works for p in precisions] for d in devices}
    if args.json:
        print(json.dumps([{**asdict(p), "decode_tok_s": p.decode_tok_s} for ps in plans.values() for p in ps],
                         indent=2))
        return 0
    for d in devices:
        print(markdown(plans[d.name], d))
        print()
    print(f"Expected = the roofline bound (in brackets) at {use.bandwidth:.0%} of the bandwidth and {use.compute:.0%} "
          f"of the tensor peak; tower {args.tower}, activations fp16, KV cache {args.kv_cache} for {args.context} "
          f"positions, one image + {args.text_tokens} text tokens, decode timed at the prompt + "
          f"{args.new_tokens // 2}. "
          f"Total = weights + KV + activations + TensorRT workspace + {over.system_gib:g} GiB system + "
          f"{over.runtime_gib:g} GiB CUDA runtime (both assumed). A plan, not a measurement: edgevlm has not run "
          "on a Jetson (docs/jetson.md).")
    return 0


def add_parser(sub) -> None:
    from .devices import DEVICES
    from .plan import DECODER_PRECISIONS, TOWER_PRECISIONS

    p = sub.add_parser(
        "plan", help="expected TTFT, decode speed and memory of a model on a Jetson, from its counted work",
        description="Count one request's work on each model's config (tower and prefill FLOPs, bytes a decode "
        "step reads, the fp16 activation peak; no weights are read) and set it against a Jetson's published "
        "bandwidth and GPU tensor-core peak: the roofline bound per stage, the figure expected at a stated "
        "utilisation, and the memory plan (weights + KV cache + activations + TensorRT workspace + system and "
        "CUDA runtime) against the module's shared memory. See docs/jetson.md.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="presets, edgevlm checkpoint folders or ModelConfig "
                   f".json files (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--device", default="orin-nano", choices=[*DEVICES, "all"],
                   help="Jetson module (default: orin-nano)")
    p.add_argument("--decoder", default="fp16,int8,int4",
                   help=f"decoder weight precisions, comma-separated, of {', '.join(DECODER_PRECISIONS)} "
                   "(default: fp16,int8,int4; int4 = group 32)")
    p.add_argument("--tower", default="fp16", choices=TOWER_PRECISIONS, help="tower precision (default: fp16)")
    p.add_argument("--kv-cache", default="fp16", choices=["fp16", "int8"], help="KV cache storage (default: fp16)")
    p.add_argument("--context", type=int, default=2048, help="positions the KV cache holds (default: 2048)")
    p.add_argument("--text-tokens", type=int, default=32, help="prompt tokens besides the image's (default: 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="answer length; decode is timed half way (default: 32)")
    p.add_argument("--bandwidth-use", type=float, default=0.75,
                   help="share of the bandwidth a decode step reaches (default: 0.75)")
    p.add_argument("--compute-use", type=float, default=0.4,
                   help="share of the tensor peak the tower and prefill reach (default: 0.4)")
    p.add_argument("--system-gib", type=float, default=1.0, help="memory the OS keeps, GiB (default: 1.0, assumed)")
    p.add_argument("--runtime-gib", type=float, default=1.0,
                   help="memory of the CUDA context and libraries, GiB (default: 1.0, assumed)")
    p.add_argument("--json", action="store_true", help="print every plan as JSON")
    p.set_defaults(func=cmd_plan)


__all__ = ["add_parser", "cmd_plan"]
