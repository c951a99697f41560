"""`nomoat demo` on another model: no claims about the embedded one, names in its commands, base models without a
chat template asked and taught in plain text (no ChatML tokens), never a traceback."""

from __future__ import annotations

import io
import json
import shutil

from rich.console import Console

from nomoat.demo import MODEL_DIR
from nomoat.demo.run import DemoSettings, run_demo

TINY = DemoSettings(offices=1, steps=2, batch_size=2)


def _run(tmp_path, model):
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    result = run_demo(model_dir=model, console=console, progress=False, settings=TINY, work_dir=tmp_path / "work")
    return result, out.getvalue()


def test_demo_on_a_base_model_without_chat_template(tmp_path, monkeypatch):
    monkeypatch.setenv("NOMOAT_HOME", str(tmp_path / "home"))
    base = tmp_path / "my-base"
    shutil.copytree(MODEL_DIR, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    result, text = _run(tmp_path, base)
    assert "embedded model" not in text and "trained from scratch" not in text
    assert f"{base}: llama" in text and "has no chat template (a base model)" in text
    assert f"nomoat chat {base} --adapter demo-handbook" in text
    assert (result.adapter_dir / "chat_template.jinja").is_file()  # taught in the layout it is asked in


def test_demo_names_the_embedded_model_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("NOMOAT_HOME", str(tmp_path / "home"))
    _, text = _run(tmp_path, None)
    assert "nomoat chat demo --adapter demo-handbook" in text and "nomoat serve demo --adapter" in text
    assert str(MODEL_DIR) not in text
    assert "trained from scratch" in text
