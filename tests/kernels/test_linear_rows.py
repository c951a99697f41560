"""`linear_bf16_rows`: a bf16 weight read in its own (N, K) layout against its plain PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from nomoat import kernels
from nomoat.kernels import reference


@pytest.fixture(scope="module")
def built() -> None:
    assert kernels.available(), "nomoat's kernels did not build: see the log for the compiler error"


@pytest.mark.parametrize(("n", "k"), [(141, 83), (64, 64), (200, 2048), (130, 67), (9, 5)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17])
def test_linear_bf16_rows_matches_reference(built, n, k, rows):
    """Weight rows in sweeps of 8/4/2/1, activation rows in blocks of 4 and 8, K tails shorter than a vector."""
    g = torch.Generator().manual_seed(n * 100 + k + rows)
    w = torch.randn(n, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    for b in (bias, None):
        got = kernels.linear_bf16_rows(x, w, b)
        want = reference.linear_bf16_rows(x, w, b)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [31, 32, 33, 47, 95, 96])
def test_linear_bf16_rows_pair_steps_and_tails(built, k):
    """Steps of 2W values (even/odd halves of 32-bit lanes) with every kind of tail, over units and sweeps that
    read the next rows ahead (129 rows: two full units and one row)."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(129, k, generator=g).bfloat16()
    for rows in (1, 2, 4, 6):
        x = torch.randn(rows, k, generator=g)
        want = (x.double() @ w.double().T).float()
        torch.testing.assert_close(kernels.linear_bf16_rows(x, w), want, rtol=1e-5, atol=1e-5)


def test_linear_bf16_rows_reads_a_strided_batch(built):
    """Rows of a wider tensor (row stride above K) give the rows' own products."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(70, 48, generator=g).bfloat16()
    x = torch.randn(5, 96, generator=g)[:, :48]
    torch.testing.assert_close(kernels.linear_bf16_rows(x, w), x @ w.float().T, rtol=1e-5, atol=1e-4)


def test_linear_bf16_rows_rejects_bad_weights(built):
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError):
        kernels.linear_bf16_rows(x, torch.randn(4, 8))  # fp32
    with pytest.raises(RuntimeError):
        kernels.linear_bf16_rows(x, torch.randn(4, 6).bfloat16())  # K differs
