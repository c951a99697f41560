"""Published folders and files get ordinary modes under the process's umask (0755/0644 under 022, 0700/0600 under
077), whatever the temporary folder or the writer (mkdtemp, safetensors) made, so another user's server can read
an adapter or an exported model."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nomoat.export.merged import export_merged
from nomoat.lora import LoRAConfig, inject_lora, save_adapter
from nomoat.lora.registry import Registry
from nomoat.models.checkpoint import load_model
from nomoat.util.files import atomic_dir, atomic_path, current_umask

from hf_models import make_hf_model, save_word_tokenizer


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def _assert_ordinary(root: Path, mask: int) -> None:
    modes = _modes(root)
    assert len(modes) > 1
    for rel, mode in modes.items():
        want = 0o777 & ~mask if (root / rel).is_dir() else 0o666 & ~mask
        assert mode == want, f"{rel}: {oct(mode)}, expected {oct(want)} under umask {oct(mask)}"


def test_current_umask_reads_without_changing(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_dir_and_path(tmp_path, umask):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "a.json").write_text("{}")
        save_file({"x": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))
        os.chmod(tmp / "a.json", 0o600)
    _assert_ordinary(tmp_path / "out", umask)
    with atomic_path(tmp_path / "one.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    assert stat.S_IMODE((tmp_path / "one.safetensors").stat().st_mode) == 0o666 & ~umask


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "model"
    make_hf_model("llama3", path)
    save_word_tokenizer(path)
    return path


def test_adapter_registry_and_merged_export(base, tmp_path, umask):
    model = load_model(base, dtype=torch.float32)
    cfg = LoRAConfig(r=4, alpha=8)
    inject_lora(model, cfg)
    adapter = save_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path=str(base))
    _assert_ordinary(adapter, umask)
    os.chmod(adapter / "adapter_model.safetensors", 0o600)  # an adapter written by an older version
    reg = Registry(tmp_path / "home")
    _assert_ordinary(reg.import_adapter(adapter, name="a"), umask)
    _assert_ordinary(reg.export("a", tmp_path / "exported"), umask)
    _assert_ordinary(export_merged(base, [(adapter, 1.0)], tmp_path / "merged"), umask)
