"""`ops.argmax_rows` (greedy decoding's token pick) against torch.argmax: first maximum, NaN the largest, any shape."""

from __future__ import annotations

import pytest
import torch

from nomoat.kernels import ops


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert ops.available(), "nomoat's kernels did not build: see the log for the compiler error"


@pytest.mark.parametrize("shape", [(32, 49152), (1, 32000), (3, 17), (5, 1), (4, 2048), (4, 2049), (2, 4097), (7, 15)])
def test_matches_torch_on_random_rows(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(shape[1])
    for _ in range(3):
        x = torch.randn(shape, generator=gen)
        assert torch.equal(torch.ops.nomoat.argmax_rows(x), x.argmax(dim=-1))


def test_ties_go_to_the_first_maximum_across_chunks() -> None:
    x = torch.zeros(4, 9000)
    x[0, [7, 50, 4000]] = 1.0  # ties inside and across chunks
    x[1, [2100, 4100, 8999]] = 3.0  # the max first appears in the second chunk
    x[2, 8999] = 5.0  # in the last, partial chunk
    x[3] = 2.0  # every value equal
    assert torch.ops.nomoat.argmax_rows(x).tolist() == x.argmax(dim=-1).tolist() == [7, 2100, 8999, 0]


def test_nan_and_infinities_as_torch() -> None:
    x = torch.randn(5, 5000)
    x[0, 4999] = float("inf")
    x[1] = float("-inf")  # all -inf: index 0
    x[2, [60, 3000]] = float("nan")  # the first NaN wins over any number
    x[3, 4500] = float("nan")
    x[3, 10] = float("inf")
    x[4, :] = float("-inf")
    x[4, 4321] = -1e30
    ours = torch.ops.nomoat.argmax_rows(x)
    assert ours.tolist() == x.argmax(dim=-1).tolist() == [4999, 0, 60, 4500, 4321]


def test_strided_rows_and_the_dispatching_wrapper() -> None:
    gen = torch.Generator().manual_seed(3)
    view = torch.randn(64, 3000, generator=gen)[::2, 5:2950]  # row stride 6000, unit stride along rows
    assert torch.equal(ops.argmax_rows(view), view.argmax(dim=-1))
    column_major = torch.randn(300, 40, generator=gen).t()  # not unit stride: copied first
    assert torch.equal(ops.argmax_rows(column_major), column_major.argmax(dim=-1))
    bf16 = torch.randn(4, 100, generator=gen).bfloat16()  # not fp32: torch's own argmax
    assert torch.equal(ops.argmax_rows(bf16), bf16.argmax(dim=-1))
    assert ops.argmax_rows(torch.randn(6, 10)).dtype == torch.long
