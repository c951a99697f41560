"""`model_card(adapter_dir, repo)`: the README.md an adapter carries to the Hub, written from its `nomoat.json`.

The card states what a reader needs to trust and reuse the adapter: the base model and its content hash, the data
files and their hashes, the method and its configuration, the metrics of the run, and the commands that use it. The
YAML header holds the Hub's own fields (`library_name: peft`, `base_model` when the base is a Hub id, tags).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from nomoat.util.files import read_json

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _base_name(config: dict[str, Any], prov: dict[str, Any]) -> str:
    base = config.get("base_model_name_or_path") or (prov.get("base_model") or {}).get("path") or "unknown"
    return str(base).split("@")[0] if HUB_ID.fullmatch(str(base).split("@")[0]) else str(base)


def _lines_data(prov: dict[str, Any]) -> list[str]:
    files = prov.get("data") or []
    if not files:
        return ["Not recorded (an adapter made outside nomoat's training, or imported)."]
    out = [f"Format: `{prov.get('data_format', 'unknown')}`.", "", "| file | sha256 | records |", "|---|---|---|"]
    out += [f"| `{Path(str(f.get('path'))).name}` | `{f.get('sha256')}` | {f.get('records')} |" for f in files]
    return out


def _lines_metrics(prov: dict[str, Any]) -> list[str]:
    metrics = prov.get("metrics") or {}
    if not metrics:
        return ["Not recorded."]
    return ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in metrics.items() if v is not None]


def model_card(adapter_dir: str | Path, repo: str) -> str:
    """The Markdown model card (with its YAML header) of an adapter folder, for the Hub repository `repo`."""
    folder = Path(adapter_dir)
    config = read_json(folder / "adapter_config.json")
    prov_file = folder / "nomoat.json"
    prov = read_json(prov_file) if prov_file.is_file() else {}
    base = _base_name(config, prov)
    base_info = prov.get("base_model") or {}
    method = "DoRA" if config.get("use_dora") else "LoRA"
    training = dict(prov.get("training") or {})
    recipe = training.get("recipe") or training.get("method") or ("SFT" if training else "unknown")
    targets = config.get("target_modules")
    header = ["---", "library_name: peft", "tags:", "- nomoat", f"- {method.lower()}"]
    if HUB_ID.fullmatch(base):
        header.append(f"base_model: {base}")
    header.append("---")
    name = repo.split("/")[-1]
    body = [
        f"# {name}", "",
        f"A {method} adapter (rank {config.get('r')}, alpha {config.get('lora_alpha')}, on "
        f"{', '.join(targets) if isinstance(targets, list) else targets}) for `{base}`, trained with nomoat.", "",
        "## Base model", "",
        f"- name or path: `{base_info.get('path', base)}`",
        f"- family: {base_info.get('family', 'unknown')}",
        f"- content sha256 (safetensors and config.json): `{base_info.get('sha256', 'not recorded')}`", "",
        "## Data", "", *_lines_data(prov), "",
        "## Method", "", f"{method}, recipe {recipe}.", "",
        "```json", json.dumps(training, indent=2, sort_keys=True, default=str), "```", "",
        "## Metrics", "", *_lines_metrics(prov), "",
        "## Use", "", "```bash", f"nomoat pull {repo}          # into the adapter registry as {name}",
        f"nomoat chat {base} --adapter {name}", "```", "",
        "With peft: `PeftModel.from_pretrained(base_model, " + json.dumps(repo) + ")`.", "",
    ]  # fmt: skip
    return "\n".join(header + body)
