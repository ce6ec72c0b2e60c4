"""What the machine can do, measured here, and the work a model asks of it: the physical bounds that
bench figures are reported beside, and the provenance columns of a result row.

A bound is the time the work would take at the measured limit: a decode step cannot beat
``bytes read per token / read bandwidth``; a prefill or a vision tower cannot beat
``FLOPs / matmul peak``. Both limits are measured on this machine (best of several runs, so the
bound is as tight as this machine showed it can be), not taken from a datasheet.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import torch

from edgevlm.cpu_features import SPEED_FLAGS, cpu_flags, cpu_model, native_bf16  # noqa: F401  (re-exported)

# ---- the machine's limits ------------------------------------------------------------------------


def _timed(fn, device: torch.device, runs: int) -> float:
    """Best wall time of ``fn()`` over ``runs`` after one warm-up, synchronising a CUDA device."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    best = float("inf")
    for _ in range(runs):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth(nbytes: int, device: str | torch.device = "cpu") -> float:
    """GB/s of a float32 sum over a buffer of ``nbytes`` (at least 8 MB; on a GPU at least 1 GB so the
    L2 cache does not flatter it), best of 11 passes: the highest rate seen makes the tightest bound.
    On a CPU pass the bytes the measured work reads: a model that fits the last-level cache reads
    faster than DRAM, and its bound should say so."""
    device = torch.device(device)
    floor = (1 << 30) if device.type == "cuda" else (8 << 20)
    buf = torch.ones(max(nbytes, floor) // 4, device=device)
    return buf.numel() * 4 / _timed(buf.sum, device, 11) / 1e9


def matmul_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a matmul in ``dtype``, best of 5: [512, 2048] x [2048, 2048] on a CPU (on
    ``torch.get_num_threads()`` threads); [8192, 8192] x [8192, 8192] on a GPU, with TF32 off for
    float32 so it is a true fp32 peak."""
    device = torch.device(device)
    m, k, n = (8192, 8192, 8192) if device.type == "cuda" else (512, 2048, 2048)
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        best = _timed(lambda: a @ b, device, 5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * m * k * n / best / 1e9


def ort_fp32_peak(threads: int | None = None) -> float | None:
    """GFLOP/s of the same [512, 2048] x [2048, 2048] fp32 matmul as a one-node ONNX graph on ONNX
    Runtime's CPU provider (MLAS), ``threads`` intra-op threads, best of 10 after one warm-up; None
    without onnx / onnxruntime. On some CPUs this is far above torch's matmul (2.3-2.8x on one thread of
    the AMD EPYC this was written on, torch 2.13 CPU wheel), so the higher of the two is the better
    estimate of what the hardware can do."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    m, k, n = 512, 2048, 2048
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {"a": rng.standard_normal((m, k), dtype=np.float32)}
    return 2 * m * k * n / _timed(lambda: sess.run(None, feed), torch.device("cpu"), 10) / 1e9


def busy_cpus(seconds: float = 1.0) -> float:
    """CPUs' worth of work other processes do: (1 - idle share) x CPUs over ``seconds`` of sleep here
    (/proc/stat, Linux), else the 1-minute load average. A bench that wants ``threads`` cores is
    contended when this exceeds ``cpus - threads``."""
    def snapshot() -> tuple[int, int] | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)  # idle + iowait, total

    a = snapshot()
    if a is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(seconds)
    b = snapshot()
    total = b[1] - a[1]
    return (1 - (b[0] - a[0]) / total) * (os.cpu_count() or 1) if total > 0 else 0.0


# ---- the work a model asks for -------------------------------------------------------------------

def count_flops(run) -> int:
    """FLOPs of one eager ``run()`` (2 per multiply-add): matmuls, convolutions and attention. The CPU
    SDPA kernel is not in torch's table, so its formula is added here."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = sdpa
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        run()
    return fc.get_total_flops()


def decoder_step_bytes(decoder) -> int:
    """Bytes one decode step must read from memory: every projection as stored (packed int4/int8
    blocks or float; the LM head is one, tied or not), the norms and one embedding row."""
    from edgevlm.runtime.quant import QuantLinear

    n = 0
    for mod in decoder.modules():
        if isinstance(mod, QuantLinear):
            n += mod.packed.nbytes
        elif hasattr(mod, "weight4"):  # the GPU's Triton int4 layout
            n += mod.weight4.nbytes
        elif isinstance(mod, torch.nn.Linear):
            n += mod.weight.numel() * mod.weight.element_size()
    n += sum(p.numel() * p.element_size() for name, p in decoder.named_parameters() if "norm" in name)
    emb = decoder.embed_tokens.weight
    return n + decoder.cfg.hidden * emb.element_size()


def kv_bytes(cfg, positions: float, element_size: int = 4) -> int:
    """Bytes of keys and values a step reads at ``positions`` cached positions."""
    return int(2 * cfg.layers * cfg.kv_heads * cfg.head_dim * element_size * positions)


# ---- provenance ----------------------------------------------------------------------------------

def git_commit(where: str | os.PathLike | None = None, dirty: bool = True) -> str:
    """Short HEAD hash of the checkout at ``where`` (default: the one edgevlm runs from), with
    ``+dirty`` when tracked files differ from it; ``unknown`` outside a git checkout."""
    where = Path(where) if where else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        if dirty and git("status", "--porcelain", "-uno"):
            commit += "+dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str | torch.device) -> str:
    """``cpu: <model>, N threads`` or the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def module_version(name: str) -> str:
    """``name.__version__``, or ``""`` when it cannot be imported (any error: a broken GPU package
    raises more than ImportError)."""
    try:
        return str(__import__(name).__version__)
    except Exception:
        return ""


__all__ = ["read_bandwidth", "matmul_peak", "ort_fp32_peak", "busy_cpus", "count_flops", "decoder_step_bytes",
           "kv_bytes", "git_commit", "cpu_model", "cpu_flags", "device_name", "module_version"]
