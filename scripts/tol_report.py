"""The test suite's tightest numeric margins, per kernel path.

Run the suite with ``EDGEVLM_TOL_REPORT=FILE.jsonl`` (every tolerance helper in tests/edgevlm_testkit.py
appends its error and bound there), once per CPU or kernel path, then:

    python -P scripts/tol_report.py native.jsonl avx2.jsonl [--top 25]

prints, for the checks closest to their bounds, the error/bound ratio under each file side by side, and
each file's number of checks and worst ratio. A ratio near 1 is a bound about to fail somewhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(path: Path) -> dict[tuple[str, str], float]:
    worst: dict[tuple[str, str], float] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, ratio = (row["test"], row["what"]), float(row["ratio"])
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{path}:{n}: not a tolerance-report line ({e})") from None
        worst[key] = max(worst.get(key, 0.0), ratio)
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="JSONL files written with EDGEVLM_TOL_REPORT")
    ap.add_argument("--top", type=int, default=25, help="how many of the tightest checks to list (default 25)")
    args = ap.parse_args(argv)
    for p in args.reports:
        if not p.is_file():
            ap.error(f"{p}: no such file")
    runs = [_load(p) for p in args.reports]
    keys = sorted(set().union(*runs), key=lambda k: -max(r.get(k, 0.0) for r in runs))
    names = [p.stem[:10] for p in args.reports]
    print("  ".join(f"{n:>10}" for n in names) + "  check")
    for k in keys[: args.top]:
        cells = "  ".join(f"{r[k]:10.3f}" if k in r else f"{'-':>10}" for r in runs)
        print(f"{cells}  {k[0]} :: {k[1]}")
    print()
    for p, r in zip(args.reports, runs):
        print(f"{p}: {len(r)} checks, worst ratio {max(r.values(), default=0.0):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
