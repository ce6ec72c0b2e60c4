"""Attention dispatch by measurement (kernels/attention_dispatch.py): the shipped table is what the
recorded GPU run measured, each call takes its nearest measured shape, and unmeasured shapes run SDPA.

The table's numbers come from bench/results/gpu_attention.csv (one H200 run); nothing here times
anything. On a GPU, scripts/gpu_check.sh rebuilds the table from a fresh run."""

import csv
import json
from pathlib import Path

import pytest
import torch

from edgevlm.errors import ConfigError
from edgevlm.kernels import attention_dispatch as ad

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "bench" / "results" / "gpu_attention.csv"


def _latest_run() -> list[dict]:
    with open(CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    latest = max(r["timestamp"] for r in rows)
    return [r for r in rows if r["timestamp"] == latest]


def test_shipped_table_is_the_recorded_runs_winners():
    shipped = ad.AttentionTable.load(ad.TABLE)
    rebuilt = ad.table_from_rows(_latest_run(), source="")
    assert shipped.measured_on == rebuilt.measured_on
    assert shipped.entries == rebuilt.entries
    for e in shipped.entries:  # each winner is the faster of the two recorded times
        assert (e.eager == "triton") == (e.kernel_ms < e.sdpa_ms)
        assert (e.graph == "triton") == (e.kernel_graph_ms < e.sdpa_graph_ms)


@pytest.mark.parametrize("call, want", [
    # (dtype, head dim, key sources, masked, queries, keys, in a graph): DINOv2-S self-attention
    (("fp16", 64, 1, False, 257, 257, False), "sdpa"),
    (("fp16", 64, 1, False, 257, 257, True), "triton"),
    # a shape between the measured ones takes the nearest (DINOv2 at keep 0.75: 193 tokens)
    (("bf16", 64, 1, False, 193, 193, True), "triton"),
    (("fp32", 64, 1, False, 257, 257, True), "sdpa"),  # fp32: IEEE dots lose everywhere but the Q-Former
    (("fp32", 64, 1, True, 32, 257, True), "triton"),
    (("fp16", 96, 2, True, 128, 857, False), "triton"),  # the resampler without torch.cat, eagerly
    (("fp16", 96, 2, True, 128, 857, True), "sdpa"),
    (("fp16", 72, 1, False, 729, 729, True), "sdpa"),  # SigLIP's head dim 72 pads to 128 in the kernel
    (("fp16", 80, 1, False, 257, 257, True), "sdpa"),  # never measured: SDPA
    (("fp16", 64, 2, False, 64, 320, False), "sdpa"),  # no unmasked two-source entry: SDPA
])
def test_calls_take_their_nearest_measured_shape(call, want):
    assert ad.AttentionTable.load(ad.TABLE).choose(*call) == want


def _row(**kw) -> dict:
    row = dict(device="GPU X", case="c", dtype="fp16", head_dim="64", keys2="0", masked="False", lq="10",
               keys="10", kernel_ms="1.0", sdpa_ms="2.0", kernel_graph_ms="3.0", sdpa_graph_ms="1.0", correct="True")
    return {**row, **{k: str(v) for k, v in kw.items()}}


def test_table_from_rows_picks_winners_and_drops_failed_kernels():
    t = ad.table_from_rows([_row(), _row(case="bad", correct="False", kernel_ms="0.1"),
                            _row(case="nograph", kernel_graph_ms="", sdpa_graph_ms="", keys2=5)], source="s")
    assert [e.case for e in t.entries] == ["c", "nograph"]
    c, nograph = t.entries
    assert (c.eager, c.graph) == ("triton", "sdpa")
    assert nograph.graph == "sdpa" and nograph.sources == 2 and nograph.keys == 15  # no graph times: SDPA
    with pytest.raises(ConfigError, match="one GPU"):
        ad.table_from_rows([_row(), _row(device="GPU Y")], source="s")
    # round trip through JSON
    assert ad.AttentionTable.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_bench_writes_the_table_without_a_gpu(tmp_path, capsys):
    import importlib.util

    import sys

    spec = importlib.util.spec_from_file_location("gpu_attention_bench", ROOT / "bench" / "gpu_attention.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    out = tmp_path / "table.json"
    assert bench.main(["--table-from", str(CSV), "--table", str(out)]) == 0
    assert ad.AttentionTable.load(out).entries == ad.AttentionTable.load(ad.TABLE).entries
    assert "the kernel wins 16 of 39 shapes" in capsys.readouterr().out


def test_use_kernel_reads_the_table_and_the_override(monkeypatch, tmp_path):
    q = torch.zeros(8, 6, 257, 64, dtype=torch.float16)
    assert ad.use_kernel(q, q, None, None) is False  # eager (not capturing): SDPA measured faster
    r = torch.zeros(8, 16, 128, 96, dtype=torch.float16)
    media, latents = torch.zeros(8, 16, 729, 96, dtype=torch.float16), r
    assert ad.use_kernel(r, media, latents, torch.ones(8, 729, dtype=torch.bool)) is True
    monkeypatch.setenv("EDGEVLM_KERNELS", "triton")
    assert ad.use_kernel(q, q, None, None) is True
    monkeypatch.delenv("EDGEVLM_KERNELS")
    bad = tmp_path / "t.json"
    bad.write_text('{"entries": []}')
    monkeypatch.setenv("EDGEVLM_ATTENTION_TABLE", str(bad))
    ad.shipped_table.cache_clear()
    ad._choice.cache_clear()
    try:
        with pytest.raises(ConfigError, match="not a table"):
            ad.use_kernel(q, q, None, None)
    finally:
        monkeypatch.delenv("EDGEVLM_ATTENTION_TABLE")
        ad.shipped_table.cache_clear()
        ad._choice.cache_clear()
