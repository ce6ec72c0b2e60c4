"""Flags shared by every ``edgevlm`` subcommand that loads a model (``run``, ``chat``, ``demo``, ``eval``,
...), so that ``--model``, ``--device``, ``--threads``, ``--quant`` and the vision flags mean the same
everywhere. :mod:`edgevlm.cli` and :mod:`edgevlm.train.cli` both build on this module; neither imports
the other's helpers.
"""

from __future__ import annotations

import argparse

MODEL_HELP = "preset name, edgevlm checkpoint folder, transformers folder or .gguf file (default: demo)"
QUANT_HELP = ("decoder weights: auto (a GGUF file keeps its own Q8_0/Q4_0/Q4_1 blocks), none (float), int8 "
              "(per channel), int4 (group 32), int4-g64, int4-g128, int8-g32 (default: auto)")


def add_vision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vision-backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"],
                   help="run the vision tower eagerly (torch, default) or as an exported graph")
    p.add_argument("--vision-export", default=None,
                   help="export folder from `edgevlm export` (default: export into ~/.cache/edgevlm on first use)")
    p.add_argument("--vision-precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="precision of the export made on first use when --vision-export is not given")
    p.add_argument("--keep-ratio", type=float, default=1.0,
                   help="token dropping: share of the keep grid's cells the ViTs see (SPHINX's fused grid, or a "
                        "single-ViT tower's patch grid: LLaVA, BLIP-2, InstructBLIP, resampler; default 1.0 = all)")
    p.add_argument("--keep-mode", default="uniform", choices=["uniform", "random"],
                   help="which cells token dropping keeps: evenly spread (default) or FLIP's random subset")


def vision_kwargs(args: argparse.Namespace) -> dict:
    """The ``edgevlm.load`` keyword arguments the vision flags of :func:`add_vision_args` stand for."""
    return {"vision_backend": args.vision_backend, "vision_export": args.vision_export,
            "vision_precision": args.vision_precision, "keep_ratio": args.keep_ratio, "keep_mode": args.keep_mode}


def add_model_args(p: argparse.ArgumentParser, model_flag: bool = True) -> None:
    if model_flag:
        p.add_argument("--model", "-m", default="demo", help=MODEL_HELP)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"],
                   help="weights dtype; auto: the vision tower in bf16 where the CPU/GPU has native bf16 "
                        "(AVX512-BF16, AMX), float32 elsewhere, decoder float32")
    p.add_argument("--preprocess", default="auto", choices=["auto", "cpp", "reference"],
                   help="image preprocessing backend (default: auto = C++ when built)")
    p.add_argument("--max-context", type=int, default=2048, help="KV cache positions (default: 2048)")
    p.add_argument("--quant", default="auto", help=QUANT_HELP)
    p.add_argument("--kv-cache", default="float", choices=["float", "int8"],
                   help="KV cache storage: float (the weights' dtype) or int8 (a quarter of the memory)")
    p.add_argument("--decode-graphs", default="off", choices=["off", "on", "eager"],
                   help="on: decode through CUDA graphs captured at load, one per context bucket (CUDA, float KV "
                   "cache); eager: the same static-shape steps uncaptured; off: the ordinary step (default)")
    add_vision_args(p)


def set_threads(args) -> None:
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)


__all__ = ["MODEL_HELP", "QUANT_HELP", "add_model_args", "add_vision_args", "vision_kwargs", "set_threads"]
