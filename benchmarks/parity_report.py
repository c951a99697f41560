"""Largest logit difference between nomoat and transformers, per family and dtype, on the test suite's tiny models.

Uses the tiny random models of `tests/hf_models.py` (each family's special features switched on) and the padded
batch of the parity tests. Prints one JSON object as its last line.

    python benchmarks/parity_report.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nomoat.models.checkpoint import load_model  # noqa: E402

from hf_models import ALL, load_hf, make_hf_model, padded_batch  # noqa: E402


def main() -> None:
    results = []
    ids, mask = padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = mask.bool()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ALL:
            path = Path(tmp) / name
            make_hf_model(name, path)
            row = {"model": name}
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                hf = load_hf(path, dtype=dtype)
                ours = load_model(path, dtype=dtype, device="cpu")
                with torch.no_grad():
                    ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()[keep]
                    got = ours(ids, attention_mask=mask).float()[keep]
                row[f"max_abs_diff_{str(dtype)[6:]}"] = float((got - ref).abs().max())
            row["max_abs_logit"] = float(ref.abs().max())
            results.append(row)
            print(f"{name:15s} " + "  ".join(f"{k[13:]} {v:.3g}" for k, v in row.items() if k.startswith("max_abs_d")),
                  file=sys.stderr)
    worst = max(r["max_abs_diff_float32"] for r in results)
    print(json.dumps({"benchmark": "parity", "machine": "cpu", "results": results,
                      "ratios": {"worst_fp32_logit_diff_vs_transformers": worst}}))


if __name__ == "__main__":
    main()
