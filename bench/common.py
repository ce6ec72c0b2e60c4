"""Shared by the bench scripts: the machine's measured limits and the provenance columns of a row.

The measurements live in :mod:`edgevlm.limits` (``edgevlm bench`` uses them too); this module keeps the
names the scripts import. The scripts run as ``python bench/<name>.py``, so Python puts this folder on
``sys.path`` and they import this module as ``common`` (each also inserts its own folder, for runs
from elsewhere).
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgevlm.limits import (busy_cpus, count_flops, cpu_model, matmul_peak, module_version, ort_fp32_peak,
                            read_bandwidth)
from edgevlm.limits import git_commit as _git_commit

ROOT = Path(__file__).resolve().parents[1]


def fp32_peak(device: str | torch.device = "cpu") -> float:
    """GFLOP/s of an fp32 matmul on ``device`` (see :func:`edgevlm.limits.matmul_peak`)."""
    return matmul_peak(device, torch.float32)


def git_commit(dirty: bool = True) -> str:
    """Short HEAD hash of this checkout (``+dirty`` when tracked files differ from it, if ``dirty``)."""
    return _git_commit(ROOT, dirty)


__all__ = ["read_bandwidth", "fp32_peak", "ort_fp32_peak", "busy_cpus", "count_flops", "git_commit", "cpu_model",
           "module_version", "ROOT"]
