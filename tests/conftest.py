import os

import pytest
import torch
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
