"""End-to-end latency breakdown per backend and precision: the same suite as ``edgevlm bench`` (the
code is edgevlm/latency.py, so an installed edgevlm can run it without this checkout), kept here beside
the other bench scripts. Arguments are ``edgevlm bench``'s; see docs/bench.md.

    python bench/e2e.py                       # CPU suite -> bench/results/e2e.csv + e2e.png
    python bench/e2e.py --device cuda --out bench/results/e2e_gpu.csv --plot bench/results/e2e_gpu.png
"""

import sys

from edgevlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
