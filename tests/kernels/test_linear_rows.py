"""`linear_bf16_rows`: a bf16 weight read in its own (N, K) layout against its plain PyTorch reference, in each mode
the build has: exact fp32 activations (every build) and hardware bf16 dot products (AVX-512-BF16 builds), whose
reference is the same product of the activations rounded to bf16."""

from __future__ import annotations

import pytest
import torch

from nomoat import kernels
from nomoat.kernels import build, reference


@pytest.fixture(scope="module")
def built() -> None:
    assert kernels.available(), "nomoat's kernels did not build: see the log for the compiler error"


def _modes() -> list[int]:
    """The modes this machine's build runs: 0 always, 1 where it has hardware bf16 dot products."""
    was = torch.ops.nomoat.bf16_dot(-1)
    has = torch.ops.nomoat.bf16_dot(1) == 1
    torch.ops.nomoat.bf16_dot(was)
    return [0, 1] if has else [0]


@pytest.fixture(params=[0, 1], ids=["fp32", "bf16dot"])
def mode(built, request):
    """Each mode this build has in turn (the process's setting restored after): 1 rounds the activations to bf16."""
    if request.param not in _modes():
        pytest.skip("this build has no hardware bf16 dot products (AVX-512-BF16)")
    was = torch.ops.nomoat.bf16_dot(-1)
    assert torch.ops.nomoat.bf16_dot(request.param) == request.param
    yield request.param
    torch.ops.nomoat.bf16_dot(was)


def _x(x: torch.Tensor, mode: int) -> torch.Tensor:
    """The activations the mode multiplies: as they are, or rounded to bf16 (to nearest even)."""
    return x.bfloat16().float() if mode else x


def test_modes_and_their_default(built):
    """The dot-product mode exists exactly where the build has AVX-512-BF16, and is the default there."""
    has = "bf16" in build.current_variant().name
    assert _modes() == ([0, 1] if has else [0])
    assert torch.ops.nomoat.bf16_dot(-1) == int(has)  # NOMOAT_BF16_DOT unset in the tests


@pytest.mark.parametrize(("n", "k"), [(141, 83), (64, 64), (200, 2048), (130, 67), (9, 5)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17])
def test_linear_bf16_rows_matches_reference(mode, n, k, rows):
    """Weight rows in sweeps of 8/4/2/1, activation rows in blocks of 4 and 8, K tails shorter than a vector."""
    g = torch.Generator().manual_seed(n * 100 + k + rows)
    w = torch.randn(n, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g)
    for b in (bias, None):
        got = kernels.linear_bf16_rows(x, w, b)
        want = reference.linear_bf16_rows(_x(x, mode), w, b)
        assert got.shape == (rows, n) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [31, 32, 33, 47, 95, 96])
def test_linear_bf16_rows_pair_steps_and_tails(mode, k):
    """Steps of 2W values (even/odd halves of 32-bit lanes) with every kind of tail, over units and sweeps that
    read the next rows ahead (129 rows: two full units and one row)."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(129, k, generator=g).bfloat16()
    for rows in (1, 2, 4, 6):
        x = torch.randn(rows, k, generator=g)
        want = (_x(x, mode).double() @ w.double().T).float()
        torch.testing.assert_close(kernels.linear_bf16_rows(x, w), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [4096, 4097, 4133, 8192])
def test_linear_bf16_rows_long_rows(mode, k):
    """One activation row reads weight rows of up to 4096 values one at a time, longer ones in sweeps (with tails);
    more rows as ever (against the double product: fp32 sums of 4,000-8,000 terms)."""
    g = torch.Generator().manual_seed(k)
    w = torch.randn(75, k, generator=g).bfloat16()
    for rows in (1, 2, 5):
        x = torch.randn(rows, k, generator=g)
        want = (_x(x, mode).double() @ w.double().T).float()
        torch.testing.assert_close(kernels.linear_bf16_rows(x, w), want, rtol=1e-5, atol=3e-4)


def test_linear_bf16_rows_reads_a_strided_batch(mode):
    """Rows of a wider tensor (row stride above K) give the rows' own products."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(70, 48, generator=g).bfloat16()
    x = torch.randn(5, 96, generator=g)[:, :48]
    torch.testing.assert_close(kernels.linear_bf16_rows(x, w), _x(x, mode) @ w.float().T, rtol=1e-5, atol=1e-4)


def test_linear_bf16_rows_rejects_bad_weights(built):
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError):
        kernels.linear_bf16_rows(x, torch.randn(4, 8))  # fp32
    with pytest.raises(RuntimeError):
        kernels.linear_bf16_rows(x, torch.randn(4, 6).bfloat16())  # K differs
