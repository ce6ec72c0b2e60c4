"""``edgevlm export SOURCE --to onnx|tensorrt|triton-repo --precision fp32|fp16|int8 --out DIR``.

``triton-repo`` is written by :mod:`edgevlm.serving` (a layer above this one), whose handler the
command line passes in as ``args.triton_repo``."""

from __future__ import annotations

import argparse
import json

from .contract import PRECISIONS, TARGETS


def cmd_export(args: argparse.Namespace) -> int:
    from .api import export_tower

    args.source = args.model or args.source or "demo"
    if args.to == "triton-repo":
        handler = getattr(args, "triton_repo", None)
        if handler is None:
            from edgevlm.errors import ConfigError

            raise ConfigError("--to triton-repo is written by edgevlm.serving: run it as `edgevlm export ... --to "
                              "triton-repo`")
        return handler(args)
    m = export_tower(args.source, out=args.out, to=args.to, precision=args.precision, max_images=args.max_images,
                     calib_dir=args.calib_dir, calib_images=args.calib_images, opset=args.opset,
                     overwrite=args.force, workspace_mb=args.workspace_mb, dla_core=args.dla_core,
                     progress=not args.json)
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
        return 0
    c = m.contract
    print(f"exported {args.source} -> {args.out} ({m.target}, {m.precision})")
    for t in c.inputs:
        print(f"  input   {t.name:<22} {list(t.shape)}")
    for t in c.outputs:
        print(f"  output  {t.name:<22} {list(t.shape)}")
    p = c.profile
    per_image = " or ".join(map(str, c.view_counts))  # anyres: one count per grid size
    print(f"  views   {per_image} per image; profile min/opt/max {p.min_views}/{p.opt_views}/{p.max_views} views")
    if c.instruction is not None:  # InstructBLIP: the Q-Former reads the instruction, a second dynamic axis
        t = c.instruction
        print(f"  instr   Q-Former instruction, profile min/opt/max {t.min_tokens}/{t.opt_tokens}/{t.max_tokens} tokens")
    for role, f in m.files.items():
        print(f"  file    {f['path']:<22} {f['bytes'] / 2**20:.1f} MB  ({role})")
    final = "tensorrt" if m.target == "tensorrt" else m.precision
    for key in dict.fromkeys(("fp32", final)):  # the fp32 graph is always checked first
        v = m.validation[key]
        label = f"TensorRT {m.precision}" if key == "tensorrt" else f"ORT {key}"
        rel_max = v.get("rel_max", float("nan"))  # manifests written before rel_max existed lack it
        print(f"  check   {label} vs eager on real images: max_abs {v['max_abs']:.2e}, rel_max {rel_max:.2e}, "
              f"rel_rms {v['rel_rms']:.2e}, min cosine {v['min_cosine']:.5f} ({v['metric']} <= {v['bound']:g})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="vision tower + projector -> ONNX graph or TensorRT engine, validated",
                       description="Export the vision tower and projector (every encoder, the fusion, Q-Former or "
                       "resampler) as one graph with a dynamic number of views, validate it against eager "
                       "PyTorch on real images, and write it with a manifest.json to --out.")
    p.add_argument("source", nargs="?", default=None, metavar="MODEL",
                   help="preset name, edgevlm checkpoint folder or transformers LLaVA / LLaVA-NeXT / BLIP-2 / "
                   "InstructBLIP folder (default: demo)")
    p.add_argument("--model", "-m", default=None, help="same as MODEL")
    p.add_argument("--to", default="onnx", choices=TARGETS + ("triton-repo",),
                   help="onnx (ONNX Runtime), tensorrt (needs a GPU), or triton-repo: a Triton Inference Server "
                   "model repository (the tower as an onnxruntime model, the decoder loop as a Python-backend "
                   "model, a `pipeline` model wiring them; see docs/serving.md)")
    p.add_argument("--tower-backend", default="onnxruntime", choices=["onnxruntime", "tensorrt", "python"],
                   help="triton-repo: the tower model's Triton backend; tensorrt builds an engine here (GPU) for a "
                   "tensorrt_plan model; python runs the ONNX graph with ONNX Runtime inside Triton's Python "
                   "backend, for servers without the onnxruntime backend")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32; fp16; int8 = static quantization calibrated on real images (default: fp32)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--force", action="store_true", help="replace --out if it already holds files")
    p.add_argument("--max-images", type=int, default=4,
                   help="largest number of images per call in TensorRT's profile (default: 4)")
    p.add_argument("--calib-dir", default=None, help="folder of your own images to calibrate int8 on (used first)")
    p.add_argument("--calib-images", type=int, default=24, help="images to calibrate int8 on (default: 24)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--workspace-mb", type=int, default=None, help="TensorRT builder workspace limit (Jetson: 512-2048)")
    p.add_argument("--dla-core", type=int, default=None, help="TensorRT: build for this DLA core, GPU fallback on")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON (and no progress bar)")
    p.set_defaults(func=cmd_export)


__all__ = ["add_parser", "cmd_export"]
