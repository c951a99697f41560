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


@pytest.fixture(params=[0, 1, 2], ids=["exact", "int8dot", "int16dot"])
def int8_mode(request):
    """Each int8 kernel mode this build has in turn (the process's setting restored after): 2 rounds the activations
    to 16-bit codes per block of 32 and takes integer dot products (AVX-512-VNNI builds, where it is the default), 1
    to int8; 0 keeps them fp32 (the only mode without VNNI or the kernels)."""
    from nomoat import kernels

    was = kernels.int8_dot()
    if kernels.int8_dot(request.param) != request.param:
        kernels.int8_dot(was)
        pytest.skip("no integer int8 dot products here (no AVX-512-VNNI build)")
    yield request.param
    kernels.int8_dot(was)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
