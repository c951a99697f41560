"""Fixtures of the decode model's tests."""

import pytest


@pytest.fixture(scope="module")
def built() -> None:
    """The kernels must build here (the test machines have a compiler): a failure must not hide as a skip."""
    from nomoat import kernels

    assert kernels.available(), "nomoat's kernels did not build: see the log for the compiler error"
