"""The adapter registry: names, atomic import/export/remove, the `nomoat adapters` CLI, and `--adapter NAME`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
from typer.testing import CliRunner

from nomoat.cli import app
from nomoat.lora import AdapterError, LoRAConfig, inject_lora, lora_parameters, save_adapter
from nomoat.lora.registry import AdapterNotFoundError, Registry, validate_name
from nomoat.models.checkpoint import load_model

from hf_models import make_hf_model, save_word_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PROVENANCE = {
    "base_model": {"path": "/models/tiny", "sha256": "ab" * 32, "family": "llama"},
    "data": [{"path": "/data/chat.jsonl", "sha256": "cd" * 32, "records": 24}],
    "training": {"seq_len": 128, "batch_size": 2, "lr": 0.001, "max_steps": 8, "seed": 42},
    "metrics": {"steps": 8, "final_loss": 1.2345, "val_loss": None},
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny model, a nomoat-made adapter (in a run-style folder) and a peft-made adapter."""
    root = tmp_path_factory.mktemp("registry")
    model_dir = root / "model"
    hf = make_hf_model("llama3", model_dir)
    save_word_tokenizer(model_dir)

    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    cfg = LoRAConfig(r=4, alpha=8)
    inject_lora(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ours = save_adapter(model, root / "runs" / "my-run" / "adapter", cfg, str(model_dir), provenance=PROVENANCE)

    pcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, pcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    theirs = root / "peft-made"
    pm.save_pretrained(theirs)
    assert (theirs / "adapter_model.safetensors").is_file() and not (theirs / "nomoat.json").exists()
    return model_dir, ours, theirs


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("NOMOAT_HOME", str(home))
    return home


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_import_list_show_export_rm_round_trip(made, home, tmp_path):
    _, ours, theirs = made
    reg = Registry()
    assert reg.adapters_dir == home / "adapters" and reg.models_dir == home / "models"
    assert reg.list() == []
    assert reg.import_adapter(ours) == home / "adapters" / "my-run"  # runs/NAME/adapter -> NAME
    reg.import_adapter(theirs, name="from-peft")
    infos = {i.name: i for i in reg.list()}
    assert sorted(infos) == ["from-peft", "my-run"]
    mine, peft_made = infos["my-run"], infos["from-peft"]
    assert (mine.r, mine.alpha, mine.dora, mine.final_loss, mine.base_model) == (4, 8, False, 1.2345, "/models/tiny")
    assert mine.size_bytes == sum(len(b) for b in _files(ours).values()) and mine.created and mine.error is None
    assert (peft_made.r, peft_made.alpha, peft_made.final_loss) == (2, 4, None)

    shown = reg.show("my-run")
    assert shown["provenance"]["data"][0]["sha256"] == "cd" * 32 and shown["adapter_config"]["r"] == 4
    assert reg.show("from-peft")["provenance"]["imported_from"] == str(theirs.resolve())

    out = reg.export("my-run", tmp_path / "out-ours")
    assert _files(out) == _files(ours)  # byte-identical
    out = reg.export("from-peft", tmp_path / "out-peft")
    exported = _files(out)
    assert {k: v for k, v in exported.items() if k != "nomoat.json"} == _files(theirs)
    with pytest.raises(FileExistsError, match="not empty"):
        reg.export("my-run", tmp_path / "out-peft")
    reg.export("my-run", tmp_path / "out-peft", overwrite=True)
    assert _files(tmp_path / "out-peft") == _files(ours)
    (tmp_path / "empty").mkdir()
    reg.export("my-run", tmp_path / "empty")  # an existing empty folder is fine

    with pytest.raises(FileExistsError, match="already in the registry"):
        reg.import_adapter(theirs, name="my-run")
    reg.import_adapter(theirs, name="my-run", overwrite=True)
    assert reg.show("my-run")["adapter_config"]["r"] == 2

    reg.remove("my-run")
    assert [i.name for i in reg.list()] == ["from-peft"]
    with pytest.raises(AdapterNotFoundError, match="did you mean 'from-peft'") as err:
        reg.path("from-pef")
    assert isinstance(err.value, KeyError) and "known adapters: from-peft" in str(err.value)
    assert not any(p.name.startswith(".") for p in reg.adapters_dir.iterdir())  # no temp left behind


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", ".hidden", "-x", "", "x" * 65, "a b", ".", "..", "a\x00b"])
def test_bad_names_are_refused(bad, home, made):
    with pytest.raises(ValueError, match="allowed: 1-64 characters"):
        validate_name(bad)
    with pytest.raises(ValueError, match="allowed"):
        Registry().import_adapter(made[1], name=bad)
    assert not (home / "x").exists() and not (home / "adapters" / "b").exists()


@pytest.mark.parametrize("good", ["my-adapter_v1.2", "a", "x" * 64, "0day", "_private"])
def test_good_names(good):
    assert validate_name(good) == good


def test_import_refuses_what_is_not_a_peft_lora_folder(home, tmp_path, made):
    reg = Registry()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        reg.import_adapter(empty, name="e")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((made[1] / "adapter_config.json").read_bytes())
    (pickled / "adapter_model.bin").write_bytes(b"not really")
    with pytest.raises(AdapterError, match="pickle"):
        reg.import_adapter(pickled, name="p")
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["q_proj"]}))
    with pytest.raises(AdapterError, match="LoRA"):
        reg.import_adapter(ia3, name="i")
    with pytest.raises(AdapterError, match="not a folder"):
        reg.import_adapter(tmp_path / "missing", name="m")
    assert reg.list() == []


def test_failed_import_leaves_nothing_visible(home, made, monkeypatch):
    import shutil

    real = shutil.copytree
    copied = []

    def broken(src, dst, **kwargs):
        def copy_fn(s, d):
            if copied:
                raise OSError("disk full (simulated)")
            copied.append(s)
            return shutil.copy2(s, d)

        return real(src, dst, copy_function=copy_fn, **kwargs)

    monkeypatch.setattr(shutil, "copytree", broken)
    reg = Registry()
    with pytest.raises(OSError, match="disk full"):
        reg.import_adapter(made[1], name="half")
    assert copied  # the copy really started
    assert reg.list() == [] and not (reg.adapters_dir / "half").exists()
    assert list(reg.adapters_dir.iterdir()) == []  # the temp folder was removed on the way out


CRASH = """
import os, shutil, signal, sys
from nomoat.lora.registry import Registry

real, n = shutil.copytree, []
def copy_fn(s, d):
    if n:
        os.kill(os.getpid(), signal.SIGKILL)  # a crash halfway through the copy: no cleanup runs
    n.append(s)
    return shutil.copy2(s, d)
shutil.copytree = lambda src, dst, **kw: real(src, dst, copy_function=copy_fn, **kw)
Registry().import_adapter(sys.argv[1], name="crashed")
"""


def test_crash_mid_import_is_invisible_and_cleaned_later(home, made):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(CRASH), str(made[1])], env=env, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == -signal.SIGKILL, r.stderr
    reg = Registry()
    leftovers = [p for p in reg.adapters_dir.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-") and any(leftovers[0].iterdir())
    assert reg.list() == [] and not (reg.adapters_dir / "crashed").exists()
    with pytest.raises(AdapterNotFoundError):
        reg.path("crashed")
    reg.import_adapter(made[2], name="next")  # the next write removes the stale temp folder
    assert [p.name for p in reg.adapters_dir.iterdir()] == ["next"]


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def test_cli_adapters_commands(home, made, tmp_path):
    _, ours, theirs = made
    r = _cli("adapters", "list")
    assert r.exit_code == 0 and "no adapters" in r.output
    r = _cli("adapters", "import", str(ours))
    assert r.exit_code == 0 and "'my-run'" in r.output
    r = _cli("adapters", "import", str(theirs), "--name", "peft-one")
    assert r.exit_code == 0, r.output
    r = _cli("adapters", "list", "--json")
    assert r.exit_code == 0
    listed = json.loads(r.output)
    assert [a["name"] for a in listed] == ["my-run", "peft-one"] and listed[0]["final_loss"] == 1.2345
    r = _cli("adapters", "list")
    assert r.exit_code == 0 and "my-run" in r.output and "peft-one" in r.output and "1.234" in r.output

    r = _cli("adapters", "show", "my-run")
    assert r.exit_code == 0
    for piece in ("ab" * 32, "/data/chat.jsonl", "cd" * 32, "lr=0.001", "final_loss=1.234", "r=4", "alpha=8"):
        assert piece in r.output, (piece, r.output)
    r = _cli("adapters", "show", "peft-one", "--json")
    assert r.exit_code == 0
    shown = json.loads(r.output)
    assert shown["adapter_config"]["r"] == 2 and shown["provenance"]["imported_from"] == str(theirs.resolve())

    r = _cli("adapters", "export", "my-run", str(tmp_path / "out"))
    assert r.exit_code == 0 and _files(tmp_path / "out") == _files(ours)
    r = _cli("adapters", "export", "my-run", str(tmp_path / "out"))
    assert r.exit_code == 2 and "not empty" in r.output and "--force" in r.output
    assert _cli("adapters", "export", "my-run", str(tmp_path / "out"), "--force").exit_code == 0

    r = _cli("adapters", "rm", "my-run")  # no terminal, no --yes: refused
    assert r.exit_code == 2 and "--yes" in r.output and (home / "adapters" / "my-run").is_dir()
    r = _cli("adapters", "rm", "my-run", "--yes")
    assert r.exit_code == 0 and not (home / "adapters" / "my-run").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["adapters", "show", "nope"], "no adapter named 'nope'"),
        (["adapters", "show", "peft-on"], "did you mean 'peft-one'"),
        (["adapters", "rm", "nope", "--yes"], "no adapter named 'nope'"),
        (["adapters", "show", "../etc"], "allowed"),
        (["adapters", "import", "/nonexistent-folder", "--name", "x"], "not a folder"),
        (["adapters", "import", "{theirs}", "--name", "a/b"], "allowed"),
        (["adapters", "import", "{theirs}", "--name", "peft-one"], "--force"),
        (["adapters", "export", "nope", "{tmp}"], "no adapter named 'nope'"),
    ],
)  # fmt: skip
def test_cli_errors_exit_2_without_traceback(home, made, tmp_path, args, expected):
    Registry().import_adapter(made[2], name="peft-one")
    args = [a.format(theirs=made[2], tmp=tmp_path / "x") for a in args]
    r = _cli(*args)
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and expected in r.output, r.output


def test_cli_help_texts():
    r = _cli("adapters", "--help")
    assert r.exit_code == 0
    for command in ("list", "show", "rm", "import", "export"):
        assert command in r.output
        sub = _cli("adapters", command, "--help")
        assert sub.exit_code == 0 and len(sub.output) > 100


def test_generate_resolves_a_registry_name(home, made):
    model_dir, ours, _ = made
    Registry().import_adapter(ours, name="tuned")

    def generate(*extra: str) -> list[int]:
        r = _cli("generate", str(model_dir), "-p", "w3 w17 w42 w4", "--max-tokens", "8", "--json", "--temperature",
                 "0", *extra)  # fmt: skip
        assert r.exit_code == 0, r.output
        return json.loads(r.output.strip().splitlines()[-1])["token_ids"]

    by_folder = generate("--adapter", str(ours))
    assert generate("--adapter", "tuned") == by_folder
    assert generate("--adapter", "tuned:0.5") == generate("--adapter", f"{ours}:0.5")
    assert by_folder != generate()  # the adapter changes the output
    r = _cli("generate", str(model_dir), "-p", "w3", "--adapter", "tunde")
    assert r.exit_code == 2 and "not found" in r.output and "did you mean 'tuned'" in r.output
