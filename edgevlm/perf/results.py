"""Result rows for ``bench/results/*.csv``: appended, never rewritten out of shape.

A column that a newer script adds widens the table (older rows get an empty cell) instead of shifting
values under the wrong header; the file is replaced atomically, so an interrupted run loses nothing.
"""

from __future__ import annotations

import csv
from pathlib import Path


def append_rows(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """Append ``rows`` to the CSV at ``path``; ``columns`` orders a new file's header (default: the
    first row's keys), and columns the file lacks are added at its end."""
    path = Path(path)
    wanted = list(columns or []) + [k for r in rows for k in r if k not in (columns or [])]
    wanted = list(dict.fromkeys(wanted))
    old, header = [], wanted
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old = list(reader)
            have = list(reader.fieldnames or [])
            header = have + [c for c in wanted if c not in have]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, restval="")
        w.writeheader()
        w.writerows([*old, *rows])
    tmp.replace(path)


__all__ = ["append_rows"]
