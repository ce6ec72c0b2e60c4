"""Keep the checkout off sys.path in an editable install: run by scripts/setup.sh with the venv's python.

scikit-build-core's editable install writes a .pth file that imports its redirecting finder and then
lists "package search directories" for sys.path: for each entry of ``wheel.packages`` the source folder
stripped by the depth of its key. For this flat layout that is the repository root (from
``edgevlm = "edgevlm"``) and its parent (from ``edgevlm/runtime = "runtime"``). Appended to every
interpreter's sys.path in the venv, they make ``kernels/``, ``runtime/``, ``export/`` and ``train/``
importable as top-level packages wherever no installed package of that name wins, and
``importlib.util.find_spec("kernels")`` answers with this checkout. The finder maps every edgevlm module
by itself, so those lines are not needed; this drops the ones that point at the checkout or above it.
tests/test_import_hygiene.py checks the result in a fresh interpreter.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _at_or_above_root(line: str) -> bool:
    p = Path(line.strip())
    return p.is_absolute() and (p.resolve() == ROOT or p.resolve() in ROOT.parents)


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    pths = sorted(site.glob("_editable_skbc_edgevlm*.pth"))
    if not pths:
        print(f"unshadow_editable: no editable edgevlm .pth in {site} (not an editable install): nothing to do")
        return 0
    for pth in pths:
        lines = pth.read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith("import ") or not ln.strip() or not _at_or_above_root(ln)]
        dropped = len(lines) - len(keep)
        if dropped:
            tmp = pth.with_suffix(".pth.tmp")
            tmp.write_text("\n".join(keep) + "\n")
            tmp.replace(pth)  # atomic: an interpreter starting meanwhile reads the old or the new file
        print(f"unshadow_editable: {pth.name}: dropped {dropped} sys.path line(s) pointing at the checkout or above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
