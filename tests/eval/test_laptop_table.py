"""benchmarks/laptop_table.py: the shapes behind docs/laptop.md are the published models', and measured cells parse."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import laptop_table  # noqa: E402

# Parameter counts of the published checkpoints (their model cards / safetensors headers).
PUBLISHED = {"1b": 1_235_814_400, "3b": 3_212_749_824, "8b": 8_030_261_248}


@pytest.mark.parametrize("shape", sorted(PUBLISHED))
def test_tensor_shapes_add_up_to_the_published_parameter_count(shape: str) -> None:
    cfg = laptop_table.config(laptop_table.SHAPES[shape])
    assert sum(math.prod(s) for _, s in laptop_table.tensor_shapes(cfg)) == PUBLISHED[shape]


def test_smaller_formats_need_less_and_totals_add_up() -> None:
    rows = {(r["shape"], r["format"]): r for r in laptop_table.inference_rows()}
    for shape in PUBLISHED:
        sizes = [rows[(shape, f)]["weights_gb"] for f in ("fp32", "bf16", "int8", "int4")]
        assert sizes == sorted(sizes, reverse=True)
        assert rows[(shape, "bf16")]["weights_gb"] == pytest.approx(PUBLISHED[shape] * 2 / 1e9)
    for r in laptop_table.train_rows():
        parts = r["base_gb"] + r["adapter_and_optimizer_gb"] + r["activations_gb"] + laptop_table.RUNTIME_GB
        assert r["total_gb"] == pytest.approx(parts)


def test_measured_cells_come_from_a_bench_sizes_json(tmp_path: Path) -> None:
    layers = laptop_table.SHAPES["1b"]["layers"]
    out = {"benchmark": "sizes", "results": [
        {"shape": "1b", "layers": layers, "part": "load", "results": [
            {"mode": "int8", "rss_base": 500_000_000, "rss_growth_peak": 1_500_000_000}]},
        {"shape": "3b", "layers": 2, "part": "load", "results": [  # a cut model is not the real size: ignored
            {"mode": "int8", "rss_base": 1, "rss_growth_peak": 1}]},
        {"shape": "1b", "layers": layers, "part": "qlora",
         "engines": {"nomoat": {"peak_rss": 2_500_000_000}}}]}  # fmt: skip
    path = tmp_path / "sizes.json"
    path.write_text("log line\n" + json.dumps(out) + "\n")
    cells = laptop_table.measured_cells(path)
    assert cells == {("1b", "load_int8"): pytest.approx(2.0), ("1b", "qlora"): pytest.approx(2.5)}
    text = laptop_table.render(cells)
    assert "| Llama-3.2-1B | int8 |" in text and "| 2.0 |" in text and "| 2.5 |" in text


def test_write_replaces_only_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "laptop.md"
    doc.write_text(f"intro\n{laptop_table.BEGIN}\nold\n{laptop_table.END}\noutro\n")
    laptop_table.write_between_markers(doc, "new\n")
    assert doc.read_text() == f"intro\n{laptop_table.BEGIN}\nnew\n{laptop_table.END}\noutro\n"


def test_quality_table_from_a_bench_quality_json(tmp_path: Path) -> None:
    data = {"text": "alice_ch1_2.txt", "text_tokens": 2048, "window": 512, "stride": 256, "machine": "x86_64",
            "results": [{"model": "nomoat_fp32", "perplexity": 10.0, "ppl_increase": None},
                        {"model": "nomoat_int4", "perplexity": 10.5, "ppl_increase": 0.05, "kld": 0.02,
                         "top1_agreement": 0.9}],
            "ratios": {"int4_ppl_increase_vs_q4_0": 0.8}}  # fmt: skip
    text = laptop_table.render_quality(data)
    assert "| nomoat int4 | 10.5000 | +5.00% | 0.02000 | 90.0% |" in text
    assert "| nomoat fp32 | 10.0000 | - | - | - |" in text and "`int4_ppl_increase_vs_q4_0`: 0.8" in text
    doc = tmp_path / "laptop.md"
    doc.write_text(f"a\n{laptop_table.QUALITY_BEGIN}\nold\n{laptop_table.QUALITY_END}\nb\n")
    laptop_table.write_between_markers(doc, text, laptop_table.QUALITY_BEGIN, laptop_table.QUALITY_END)
    assert doc.read_text() == f"a\n{laptop_table.QUALITY_BEGIN}\n{text}{laptop_table.QUALITY_END}\nb\n"
    assert laptop_table.render_quality({"skipped": "no model"}) == "Not measured: no model\n"
