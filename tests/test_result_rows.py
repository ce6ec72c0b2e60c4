"""Result rows written by ``edgevlm train demo --csv`` / ``edgevlm eval --csv``: every row names where and
with what it was made, and a file written before a column was added keeps its rows aligned."""

from __future__ import annotations

import csv

from edgevlm.train.cli import _append_row


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rows_carry_provenance_and_accumulate(tmp_path):
    path = tmp_path / "sub" / "rows.csv"
    _append_row(path, {"metric": 0.5})
    _append_row(path, {"metric": 0.75})
    rows = _read(path)
    assert [r["metric"] for r in rows] == ["0.5", "0.75"]
    for key in ("timestamp", "commit", "machine", "cpus", "threads", "torch"):
        assert rows[0][key], key


def test_new_column_widens_old_file_without_shifting(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("timestamp,commit,metric\n2026-01-01,abc,0.1\n")
    _append_row(path, {"metric": 0.2, "extra": "x"})
    rows = _read(path)
    assert rows[0] == {**{k: "" for k in rows[0]}, "timestamp": "2026-01-01", "commit": "abc", "metric": "0.1"}
    assert rows[1]["metric"] == "0.2" and rows[1]["extra"] == "x"
    assert not (tmp_path / "rows.csv.tmp").exists()


def test_bench_rows_keep_the_header_order_and_widen(tmp_path):
    from edgevlm.perf.results import append_rows

    path = tmp_path / "bench.csv"
    append_rows(path, [{"b": 2, "a": 1}], ["a", "b"])  # the header follows `columns`, not the dict
    append_rows(path, [{"a": 3, "b": 4, "c": 5}], ["a", "b"])
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["a", "b", "c"]
        assert list(reader) == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": "5"}]
