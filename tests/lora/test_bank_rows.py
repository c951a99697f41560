"""The adapter bank's three ways of applying row groups (compiled `lora_rows_`, grouped matmuls, the loop) agree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nomoat import kernels
from nomoat.lora import bank as bank_mod


def _bank() -> bank_mod.AdapterBank:
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(24, 40)
    bank = bank_mod.AdapterBank(nn.Sequential(base))
    for name, r, s in (("a", 4, 2.0), ("b", 8, 0.5), ("c", 2, 1.5)):  # ranks differ: the stack is zero-padded
        a, b = torch.randn(r, 24, generator=g), torch.randn(40, r, generator=g)
        bank.tensors[name] = {"0": (a, b.t().contiguous(), s)}
    bank._wrap("0").rebuild()
    return bank


def _expected(bank: bank_mod.AdapterBank, x: torch.Tensor, selections: list) -> torch.Tensor:
    """Each row through the base plus its selection's `weight * scaling * (x A^T) B^T`, one row at a time."""
    layer = bank.model[0]
    out = []
    for row, sel in enumerate(selections):
        y = layer.base(x[row])
        for name, weight in sel:
            a, bt, s = bank.tensors[name]["0"]
            y = y + weight * s * (x[row] @ a.t()) @ bt
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("path", ["rows_kernel", "grouped_mm", "loop"])
def test_bank_paths_agree(path, monkeypatch):
    if path == "rows_kernel" and not kernels.available():
        pytest.skip("the compiled kernels are not built here")
    monkeypatch.setattr(bank_mod, "ROWS_KERNEL", path == "rows_kernel")
    monkeypatch.setattr(bank_mod, "GROUPED_MM", path != "loop")
    bank = _bank()
    selections = [(("a", 1.0),), (("c", 0.7),), (), (("a", 1.0),), (("b", 0.5), ("c", -1.0)), (("c", 0.7),)]
    x = torch.randn(len(selections), 3, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), bank.plan(bank_mod.group_rows(selections, torch.device("cpu"))):
        y = bank.model(x)
    torch.testing.assert_close(y, _expected(bank, x, selections), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), bank.plan([(slice(0, 6), (("b", 1.0),))]):  # one group: the kernel applies it too
        y = bank.model(x)
    torch.testing.assert_close(y, _expected(bank, x, [(("b", 1.0),)] * 6), rtol=1e-5, atol=1e-5)


def test_row_plan_lists_entries_by_adapter():
    """`row_plan`: token rows sorted by adapter, a stacked row once per adapter, coefficients weight * scaling."""
    bank = _bank()
    layout = bank.model[0].layout  # a, b, c
    x = torch.zeros(3, 2, 24)
    with bank.plan([(slice(0, 1), (("c", 2.0),)), (torch.tensor([2]), (("a", 1.0), ("c", 1.0)))]):
        rows, which, coef = bank.row_plan(layout, x)
    assert rows.tolist() == [4, 5, 0, 1, 4, 5]
    assert which.tolist() == [0, 0, 2, 2, 2, 2]
    torch.testing.assert_close(coef, torch.tensor([2.0, 2.0, 3.0, 3.0, 1.5, 1.5]))
