"""`nomoat info` and `nomoat models` print byte sizes with byte units: "BF16 (2.5GB)", never "2.5BB"."""

from __future__ import annotations

import json
import shutil
import struct

from typer.testing import CliRunner

from nomoat.cli import app
from nomoat.cli._common import human
from nomoat.demo import MODEL_DIR

runner = CliRunner()


def test_byte_sizes_use_byte_units():
    assert human(2.5e9, "B") == "2.5GB" and human(10.2e6, "B") == "10.2MB" and human(3e12, "B") == "3.0TB"
    assert human(1.2e9) == "1.2B"  # counts (parameters) keep B for billions


def test_info_of_a_1b_bf16_model_says_gb(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    shutil.copy(MODEL_DIR / "config.json", folder)
    # Headers only: 1.25B bf16 parameters (2.5 GB), without writing the data (info reads headers, never tensors).
    n = 1_250_000_000
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "BF16", "shape": [n],
                                                       "data_offsets": [0, 2 * n]}}).encode()  # fmt: skip
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    result = runner.invoke(app, ["info", str(folder)])
    assert result.exit_code == 0, result.output
    assert "BF16 (2.5GB)" in result.output and "BB" not in result.output
