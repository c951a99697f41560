import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (hf_models.py, ...)


@pytest.fixture(scope="session", autouse=True)
def _kernels_built():
    """Compile the kernels once, before any test: a server a test starts must not spend its startup timeout on it."""
    from nomoat import kernels

    kernels.available()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
