"""`kernels.lora_rows_` (many adapters over the rows of one matrix) against an einsum oracle, compiled and reference."""

from __future__ import annotations

import pytest
import torch

from nomoat import kernels
from nomoat.kernels import reference


def _case(n: int, d_in: int, d_out: int, groups: int, r: int, entries: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    a = torch.randn(groups, r, d_in, generator=g)
    bt = torch.randn(groups, r, d_out, generator=g)
    which = torch.randint(0, groups, (entries,), generator=g).sort().values
    rows = torch.randint(0, n, (entries,), generator=g)  # repeats: a row under a stack of adapters
    coef = torch.randn(entries, generator=g)
    y = torch.randn(n, d_out, generator=g)
    return y, x, a, bt, rows, which, coef


def _oracle(y, x, a, bt, rows, which, coef):  # noqa: ANN001, ANN202
    t = torch.einsum("ei,eri->er", x[rows].double(), a[which].double()) * coef[:, None].double()
    return y.double().index_add(0, rows, torch.einsum("er,ero->eo", t, bt[which].double()))


SHAPES = [
    (1, 576, 192, 1, 16, 1),  # one decode row
    (7, 37, 101, 3, 5, 9),  # widths that are no multiple of a vector, ranks below one
    (64, 96, 200, 8, 16, 64),
    (300, 576, 1536, 16, 16, 310),  # prefill-sized: the parallel passes
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["compiled", "reference"])
def test_lora_rows_matches_oracle(shape, impl):
    args = _case(*shape, seed=sum(shape))
    expected = _oracle(*args)
    y = args[0].clone()
    if impl == "compiled":
        if not kernels.available():
            pytest.skip("the compiled kernels are not built here")
        out = kernels.lora_rows_(y, *args[1:])
        assert out is y
    else:
        reference.lora_rows_(y, *args[1:])
    # fp32 sums of up to in * r products: errors scale with the largest value
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_lora_rows_leaves_unlisted_rows_and_strided_inputs():
    """Rows no entry names keep their values; `x` and `y` may be row-strided views (a column slice)."""
    y, x, a, bt, rows, which, coef = _case(6, 40, 70, 2, 4, 3, seed=1)
    rows = torch.tensor([0, 2, 2])
    wide_x = torch.randn(6, 50)
    wide_x[:, :40] = x
    wide_y = torch.randn(6, 90)
    wide_y[:, :70] = y
    expected = _oracle(y, x, a, bt, rows, which, coef)
    before = wide_y.clone()
    kernels.lora_rows_(wide_y[:, :70], wide_x[:, :40], a, bt, rows, which, coef)
    torch.testing.assert_close(wide_y[:, :70].double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(wide_y[:, 70:], before[:, 70:])
    assert torch.equal(wide_y[[1, 3, 4, 5]], before[[1, 3, 4, 5]])


def test_lora_rows_fake_traces_under_compile():
    """The fake implementation lets `torch.compile` trace a function that calls the op."""
    if not kernels.available():
        pytest.skip("the compiled kernels are not built here")
    args = _case(5, 16, 24, 2, 4, 5, seed=2)

    def fn(y, x, a, bt, rows, which, coef):  # noqa: ANN001, ANN202
        torch.ops.nomoat.lora_rows_(y, x, a, bt, rows, which, coef)
        return y * 2

    expected = _oracle(*args) * 2
    out = torch.compile(fn, backend="eager", fullgraph=True)(args[0].clone(), *args[1:])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_lora_rows_bf16_factors(shape):
    """bf16 factors: equal to the fp32 oracle over the bf16-rounded factors (widened exactly, fp32 sums)."""
    if not kernels.available():
        pytest.skip("the compiled kernels are not built here")
    y, x, a, bt, rows, which, coef = _case(*shape, seed=sum(shape) + 1)
    a16, bt16 = a.to(torch.bfloat16), bt.to(torch.bfloat16)
    expected = _oracle(y, x, a16.float(), bt16.float(), rows, which, coef)
    out = y.clone()
    kernels.lora_rows_(out, x, a16, bt16, rows, which, coef)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_the_reference_takes_bf16_factors():
    """The plain-torch reference (the fallback without a compiler) widens bf16 factors as the kernel does."""
    y, x, a, bt, rows, which, coef = _case(*SHAPES[0], seed=7)
    a16, bt16 = a.to(torch.bfloat16), bt.to(torch.bfloat16)
    expected = _oracle(y, x, a16.float(), bt16.float(), rows, which, coef)
    out = y.clone()
    reference.lora_rows_(out, x, a16, bt16, rows, which, coef)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
