"""Which attention runs a given call on a CUDA GPU: the fused Triton kernel or PyTorch SDPA, as
measured, shape by shape.

``bench/gpu_attention.py`` times both on each tower attention shape, eagerly and inside a CUDA graph,
and writes the winners as a table (``--table``). The table shipped here, ``attention_table.json``, is
that run's: one entry per measured (dtype, head dim, key sources, key mask, query and key counts),
each with the faster backend eagerly and in a graph and the times behind it.

A call takes the entry of its own dtype, head dim, number of key sources (the resampler reads two) and
masking whose query and key counts are nearest (in log scale), and the column for whether a graph is
being captured (``torch.cuda.is_current_stream_capturing``). A call no entry matches, a head dim that
was not measured say, runs SDPA: the kernel is kept only where a measurement says it wins.

The table was measured on one GPU (``measured_on``); another GPU's balance may differ. Rebuild it
there with ``python bench/gpu_attention.py --table kernels/attention_table.json``, or point
``EDGEVLM_ATTENTION_TABLE`` at a table file. ``EDGEVLM_KERNELS=torch`` still forces the references
everywhere, and ``EDGEVLM_KERNELS=triton`` the kernel wherever it runs (to time it end to end).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from edgevlm.errors import ConfigError

TABLE = Path(__file__).with_name("attention_table.json")
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
BACKENDS = ("triton", "sdpa")


@dataclass(frozen=True)
class Entry:
    """One measured shape and its winners."""

    case: str
    dtype: str
    head_dim: int
    sources: int  # key sources: 1, or 2 for the resampler's media + latents
    masked: bool
    lq: int
    keys: int  # all keys, both sources
    eager: str
    graph: str
    kernel_ms: float | None  # None: not timed (--no-graph, say)
    sdpa_ms: float | None
    kernel_graph_ms: float | None
    sdpa_graph_ms: float | None

    def __post_init__(self) -> None:
        for mode in ("eager", "graph"):
            if getattr(self, mode) not in BACKENDS:
                raise ConfigError(f"attention table entry {self.case!r}: {mode} must be one of {BACKENDS}, "
                                  f"got {getattr(self, mode)!r}")


@dataclass(frozen=True)
class AttentionTable:
    """The measured winners of one GPU (:func:`table_from_rows` builds it, :meth:`choose` reads it)."""

    measured_on: str
    source: str
    entries: tuple[Entry, ...]

    @classmethod
    def from_dict(cls, data: dict) -> "AttentionTable":
        try:
            return cls(str(data["measured_on"]), str(data.get("source", "")),
                       tuple(Entry(**e) for e in data["entries"]))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"attention table: not a table written by bench/gpu_attention.py ({e})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AttentionTable":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"attention table {path}: cannot read it ({e})") from None

    def to_dict(self) -> dict:
        return {"measured_on": self.measured_on, "source": self.source,
                "entries": [dict(e.__dict__) for e in self.entries]}

    def lookup(self, dtype: str, head_dim: int, sources: int, masked: bool, lq: int, keys: int) -> Entry | None:
        """The measured entry nearest to this call, or None when none shares its dtype, head dim, key
        sources and masking."""
        same = [e for e in self.entries if (e.dtype, e.head_dim, e.sources, e.masked) == (dtype, head_dim, sources,
                                                                                           masked)]
        if not same:
            return None
        return min(same, key=lambda e: abs(math.log(e.lq / lq)) + abs(math.log(e.keys / keys)))

    def choose(self, dtype: str, head_dim: int, sources: int, masked: bool, lq: int, keys: int,
               captured: bool) -> str:
        """``"triton"`` or ``"sdpa"`` for this call; SDPA where nothing was measured."""
        e = self.lookup(dtype, head_dim, sources, masked, lq, keys)
        if e is None:
            return "sdpa"
        return e.graph if captured else e.eager


def table_from_rows(rows: list[dict], *, source: str) -> AttentionTable:
    """The table of a ``bench/gpu_attention.py`` run: its CSV rows (one device), correct ones only.
    A mode whose times are missing (``--no-graph``) keeps SDPA."""
    devices = {r["device"] for r in rows}
    if len(devices) != 1:
        raise ConfigError(f"an attention table comes from one GPU's rows; got {sorted(devices) or 'none'}")

    def ms(r: dict, key: str) -> float | None:
        try:
            value = float(r.get(key) or "nan")
        except ValueError:
            return None
        return None if math.isnan(value) else value

    def winner(kernel: float | None, sdpa: float | None) -> str:
        return "triton" if kernel is not None and sdpa is not None and kernel < sdpa else "sdpa"

    entries = []
    for r in rows:
        if str(r.get("correct")) != "True":
            continue  # a kernel that failed its check never wins
        k, s, kg, sg = ms(r, "kernel_ms"), ms(r, "sdpa_ms"), ms(r, "kernel_graph_ms"), ms(r, "sdpa_graph_ms")
        keys2 = int(r.get("keys2") or 0)
        entries.append(Entry(case=r["case"], dtype=r["dtype"], head_dim=int(r["head_dim"]), sources=2 if keys2 else 1,
                             masked=str(r["masked"]) == "True", lq=int(r["lq"]), keys=int(r["keys"]) + keys2,
                             eager=winner(k, s), graph=winner(kg, sg),
                             kernel_ms=k, sdpa_ms=s, kernel_graph_ms=kg, sdpa_graph_ms=sg))
    return AttentionTable(measured_on=devices.pop(), source=source, entries=tuple(entries))


@functools.lru_cache(maxsize=None)
def shipped_table() -> AttentionTable:
    """The table this process dispatches by: ``$EDGEVLM_ATTENTION_TABLE`` or the shipped one."""
    return AttentionTable.load(os.environ.get("EDGEVLM_ATTENTION_TABLE") or TABLE)


def use_kernel(q: torch.Tensor, k: torch.Tensor, k2: torch.Tensor | None, key_mask: torch.Tensor | None) -> bool:
    """Whether this CUDA call should take the fused kernel (see the module docstring)."""
    forced = os.environ.get("EDGEVLM_KERNELS", "").lower()
    if forced == "triton":
        return True
    dtype = DTYPES.get(q.dtype)
    if dtype is None:
        return False
    keys = k.shape[2] + (k2.shape[2] if k2 is not None else 0)
    captured = q.is_cuda and torch.cuda.is_current_stream_capturing()  # CPU-only torch builds cannot ask
    return _choice(dtype, q.shape[3], 2 if k2 is not None else 1, key_mask is not None, q.shape[2], keys,
                   captured) == "triton"


@functools.lru_cache(maxsize=4096)
def _choice(*call) -> str:
    # every ViT block of a tower asks the same question: look the table up once per shape, not per call
    return shipped_table().choose(*call)


__all__ = ["AttentionTable", "Entry", "table_from_rows", "shipped_table", "use_kernel", "TABLE"]
