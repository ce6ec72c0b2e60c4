"""Shared by the bench scripts: the machine's measured limits and the provenance columns of a row.

The scripts run as ``python bench/<name>.py``, so Python puts this folder on ``sys.path`` and they
import this module as ``common`` (each also inserts its own folder, for runs from elsewhere).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# ---- the machine's limits ------------------------------------------------------------------------

def read_bandwidth(nbytes: int) -> float:
    """GB/s of a float32 sum over a buffer of ``nbytes`` (at least 8 MB), best of 11 passes: the highest
    rate seen makes the tightest bound."""
    buf = torch.ones(max(nbytes, 8 << 20) // 4)
    best = float("inf")
    for _ in range(11):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


def fp32_peak(device: str | torch.device = "cpu") -> float:
    """GFLOP/s of an fp32 matmul, best of 5, on ``torch.get_num_threads()`` threads: [512, 2048] x
    [2048, 2048] on the CPU; on a CUDA device [8192, 8192] x [8192, 8192] with TF32 off (so it is a
    true fp32 peak), timed with a synchronize around each run after one warm-up."""
    device = torch.device(device)
    if device.type != "cuda":
        a, b = torch.randn(512, 2048), torch.randn(2048, 2048)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        return 2 * 512 * 2048 * 2048 / best / 1e9
    n = 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a @ b
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            a @ b
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n ** 3 / best / 1e9


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
    sess.run(None, feed)
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        sess.run(None, feed)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


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


# ---- provenance ----------------------------------------------------------------------------------

def git_commit(dirty: bool = True) -> str:
    """Short HEAD hash of this checkout (``+dirty`` when tracked files differ from it, if ``dirty``)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        if dirty and git("status", "--porcelain", "-uno"):
            commit += "+dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def module_version(name: str) -> str:
    """``name.__version__``, or ``""`` when it cannot be imported (any error: a broken GPU package
    raises more than ImportError)."""
    try:
        return str(__import__(name).__version__)
    except Exception:
        return ""


__all__ = ["read_bandwidth", "fp32_peak", "ort_fp32_peak", "busy_cpus", "git_commit", "cpu_model", "module_version",
           "ROOT"]
