"""Weight mixing of two checkpoints, θ = β·θa + (1 − β)·θb (SPHINX, architecture.md §1.7).

SPHINX blends a model pre-trained on real captions (θa) with its continuation tuned on synthetic
captions (θb) and starts instruction tuning from the blend. It is an offline, element-wise operation
on two checkpoints of the *same* architecture, so everything that would make the blend meaningless
is an error rather than a warning: different configs, different key sets, different shapes or
dtypes, differing integer buffers, β outside [0, 1].

Float tensors are blended in (at least) fp32 and cast back, so bf16/fp16 checkpoints do not lose the
blend to rounding in the multiply. β = 1 and β = 0 return exact copies of a and b (not a float
expression that could turn ``0 * inf`` into NaN or flip the sign of a zero).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.runtime.checkpoint import load_checkpoint, save_checkpoint


def check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or math.isnan(beta) or not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta must be a number in [0, 1] (weight of checkpoint a), got {beta!r}")
    return float(beta)


def _check_keys(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: tuple[str, str]) -> None:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        parts = [f"{len(keys)} key(s) only in {name}, e.g. {keys[:3]}" for keys, name in ((only_a, names[0]),
                                                                                         (only_b, names[1])) if keys]
        raise CheckpointError("cannot mix: key sets differ: " + "; ".join(parts))


def _mix_one(key: str, ta: torch.Tensor, tb: torch.Tensor, beta: float, names: tuple[str, str]) -> torch.Tensor:
    if ta.shape != tb.shape:
        raise CheckpointError(f"cannot mix {key!r}: shape {tuple(ta.shape)} in {names[0]} vs "
                              f"{tuple(tb.shape)} in {names[1]}")
    if ta.dtype != tb.dtype:
        raise CheckpointError(f"cannot mix {key!r}: dtype {ta.dtype} in {names[0]} vs {tb.dtype} in {names[1]}")
    if not ta.is_floating_point():
        # counters and flags (BatchNorm's num_batches_tracked, bool masks) have no meaningful blend
        if ta.dtype.is_complex or not torch.equal(ta, tb):
            raise CheckpointError(f"cannot mix {key!r}: {ta.dtype} tensors must be equal in both checkpoints "
                                  f"(integer/bool tensors are copied, not blended)")
        return ta.clone()
    if beta == 1.0:
        return ta.clone()
    if beta == 0.0:
        return tb.clone()
    acc = torch.promote_types(ta.dtype, torch.float32)  # fp64 stays fp64
    return (beta * ta.to(acc) + (1.0 - beta) * tb.to(acc)).to(ta.dtype)


def mix_state_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], beta: float, *,
                    names: tuple[str, str] = ("a", "b"), progress: bool = False) -> dict[str, torch.Tensor]:
    """``{k: β·a[k] + (1 − β)·b[k]}`` over identical key sets; ``names`` label the two sides in errors."""
    beta = check_beta(beta)
    _check_keys(a, b, names)
    return {k: _mix_one(k, a[k], b[k], beta, names)
            for k in tqdm(sorted(a), desc=f"mix beta={beta:g}", unit="tensor", disable=not progress)}


def first_difference(x: Any, y: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """First differing field of two ``to_dict()`` trees as ``(dotted.path, x_value, y_value)``, or None."""
    if isinstance(x, dict) and isinstance(y, dict):
        for k in list(x) + [k for k in y if k not in x]:
            sub = f"{path}.{k}" if path else str(k)
            if k not in x or k not in y:
                return sub, x.get(k, "<absent>"), y.get(k, "<absent>")
            d = first_difference(x[k], y[k], sub)
            if d is not None:
                return d
        return None
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        for i, (u, v) in enumerate(zip(x, y)):
            d = first_difference(u, v, f"{path}[{i}]")
            if d is not None:
                return d
        return None
    return None if x == y else (path or "<root>", x, y)


def mix_checkpoints(dir_a: str | os.PathLike, dir_b: str | os.PathLike, beta: float, out_dir: str | os.PathLike, *,
                    overwrite: bool = False, progress: bool = True) -> Path:
    """Blend two edgevlm checkpoint folders into ``out_dir`` (config of ``a``; β and sources recorded in
    the safetensors metadata as ``mix_beta``, ``mix_a``, ``mix_b``). Written atomically by
    :func:`~edgevlm.runtime.checkpoint.save_checkpoint` (temporary sibling folder, then rename)."""
    beta = check_beta(beta)  # before any I/O: a typo in β should not cost a checkpoint read
    dir_a, dir_b, out_dir = Path(dir_a), Path(dir_b), Path(out_dir)
    if out_dir.resolve() in (dir_a.resolve(), dir_b.resolve()):
        raise CheckpointError(f"output {out_dir} would overwrite an input checkpoint; choose another folder")
    cfg_a, state_a = load_checkpoint(dir_a)
    cfg_b, state_b = load_checkpoint(dir_b)
    diff = first_difference(cfg_a.to_dict(), cfg_b.to_dict())
    if diff is not None:
        field, va, vb = diff
        raise CheckpointError(f"cannot mix: configs differ at {field!r}: {va!r} in {dir_a} vs {vb!r} in {dir_b}")
    mixed = mix_state_dicts(state_a, state_b, beta, names=(str(dir_a), str(dir_b)), progress=progress)
    meta = {"mix_beta": repr(beta), "mix_a": str(dir_a.resolve()), "mix_b": str(dir_b.resolve())}
    return save_checkpoint(out_dir, cfg_a, mixed, metadata=meta, overwrite=overwrite)


def _beta(text: str) -> float:
    try:
        return check_beta(float(text))
    except (ValueError, ConfigError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm train mix",
                                description="Blend two edgevlm checkpoints: theta = beta * A + (1 - beta) * B.")
    p.add_argument("a", help="checkpoint folder A (its config is written to the output)")
    p.add_argument("b", help="checkpoint folder B (same config, keys and shapes as A)")
    # required: SPHINX's beta is a paper value, not something to default silently
    p.add_argument("--beta", type=_beta, required=True, help="weight of A in [0, 1]; 1 = A, 0 = B")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry; edgevlm's own errors propagate so ``edgevlm``'s dispatcher prints them and exits 2."""
    args = build_parser().parse_args(argv)
    out = mix_checkpoints(args.a, args.b, args.beta, args.out, overwrite=args.overwrite,
                          progress=not args.no_progress)
    print(f"wrote {out} (beta={args.beta:g})")
    return 0


__all__ = ["check_beta", "mix_state_dicts", "first_difference", "mix_checkpoints", "build_parser", "main"]
