import os
import sys
from pathlib import Path

# `python -m pytest` run from the checkout puts the repository root first on sys.path, where kernels/,
# export/, runtime/ and train/ would shadow installed packages of those names (transformers imports
# Hugging Face's `kernels` at start-up). `make test` runs pytest without it; this undoes it for anyone
# who types the habitual command, before any test module imports transformers.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402
from edgevlm_testkit import HAVE_TRITON  # noqa: E402
from hypothesis import settings

# Property tests explore a fixed, reproducible set of examples: CI on a fresh clone sees exactly what
# developers saw (no example database carried between runs).
settings.register_profile("edgevlm", derandomize=True, database=None)
settings.load_profile("edgevlm")

# Keep the 2-core CI machine responsive and results reproducible.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Triton kernels run on CPU tensors in Triton's interpreter. It must be chosen before triton is first
# imported (its own helpers, tl.sum and the like, are jitted at import time), so it is chosen here,
# before any test module loads. Tests that need the non-interpreted path unset it for themselves.
if HAVE_TRITON and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def interpreter(monkeypatch):
    """Skip unless Triton's interpreter is what runs the kernels in this process."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed: the interpreter tests need its wheel (pip install triton)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import triton.language as tl

    if type(tl.sum).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this file on its own")
