"""`nomoat deploy vllm`: the `vllm serve` command for registry adapters, checked against vLLM's own parser (where
vLLM is importable) and against `peft` (the adapter format vLLM reads); the refusals and their alternatives."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat

import peft
import pytest
import torch
from typer.testing import CliRunner

from nomoat.cli import app
from nomoat.export.vllm import VLLMUnsupportedError, vllm_rank
from nomoat.lora import LoRAConfig, inject_lora, save_adapter
from nomoat.lora.registry import HOME_ENV, Registry
from nomoat.models.checkpoint import load_model

from hf_models import load_hf, make_hf_model, save_word_tokenizer


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny base and adapters of ranks 4 and 24, a DoRA one and one that trains lm_head, in a registry."""
    root = tmp_path_factory.mktemp("deploy")
    base = root / "base"
    make_hf_model("llama3", base)
    save_word_tokenizer(base)
    reg = Registry(root / "home")
    for name, cfg in {"small": LoRAConfig(r=4, alpha=8), "wide": LoRAConfig(r=24, alpha=24),
                      "dora": LoRAConfig(r=4, use_dora=True),
                      "head": LoRAConfig(r=4, modules_to_save=["lm_head"])}.items():  # fmt: skip
        model = load_model(base, dtype=torch.float32)
        inject_lora(model, cfg)
        with torch.no_grad():  # non-zero B, so the adapter changes the output
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        reg.import_adapter(save_adapter(model, root / name, cfg, base_model_name_or_path=str(base)), name=name)
    return root, base, reg


@pytest.fixture
def cli(made, monkeypatch):
    root, _, _ = made
    monkeypatch.setenv(HOME_ENV, str(root / "home"))
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["deploy", "vllm", *map(str, args)])


def _command(script: str) -> list[str]:
    """The argv of the script's command (comments dropped, continuations joined)."""
    body = " ".join(line.rstrip("\\").strip() for line in script.splitlines() if not line.startswith("#"))
    return shlex.split(body)


def test_ranks_round_up_to_those_vllm_allows():
    assert [vllm_rank(r) for r in (1, 8, 9, 24, 300, 320, 321, 512)] == [8, 8, 16, 32, 320, 320, 512, 512]
    with pytest.raises(VLLMUnsupportedError, match="above vLLM's largest"):
        vllm_rank(513)


def test_command_lists_registry_adapters(made, cli):
    root, base, reg = made
    result = cli(base, "small", "chat=wide")
    assert result.exit_code == 0, result.output
    argv = _command(result.output)
    assert argv[:3] == ["vllm", "serve", str(base.resolve())]
    i = argv.index("--lora-modules")
    assert argv[i + 1 : i + 3] == [f"small={reg.path('small').resolve()}", f"chat={reg.path('wide').resolve()}"]
    assert "--enable-lora" in argv
    assert argv[argv.index("--max-lora-rank") + 1] == "32"  # rank 24 rounded up
    assert argv[argv.index("--max-loras") + 1] == "2"


def test_listed_adapters_load_in_peft(made, cli):
    _, base, _ = made
    argv = _command(cli(base, "small", "wide").output)
    i = argv.index("--lora-modules")
    modules = dict(m.split("=", 1) for m in argv[i + 1 : argv.index("--max-lora-rank")])
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    plain = load_hf(base)(ids).logits
    for path in modules.values():
        model = peft.PeftModel.from_pretrained(load_hf(base), path)
        out = model(ids).logits
        assert out.shape == plain.shape and not torch.allclose(out, plain)  # the adapter loaded and acts


def test_vllm_parser_accepts_the_command(made, cli):
    try:
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    except Exception as e:  # noqa: BLE001 - any import failure means vLLM is not usable here
        pytest.skip(f"vLLM is not importable here ({type(e).__name__}: {e}); its parser is checked where it is")
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    _, base, _ = made
    argv = _command(cli(base, "small", "wide").output)
    parser = make_arg_parser(FlexibleArgumentParser())
    if not any(a.dest == "model_tag" for a in parser._actions):
        parser.add_argument("model_tag")
    ns = parser.parse_args(argv[2:])
    assert ns.enable_lora and ns.max_lora_rank == 32 and ns.max_loras == 2
    assert [m.name for m in ns.lora_modules] == ["small", "wide"]


@pytest.mark.parametrize(("spec", "reason", "alternative", "refused"), [
    ("dora", "DoRA", "nomoat export", "dora"),
    ("head", "fully trained modules (lm_head", "nomoat export", "head"),
    ("half=wide:0.5", "weight 0.5", "nomoat merge", "wide"),
    ("both=wide+head", "a stack of 2 adapters", "nomoat merge", "wide"),
])  # fmt: skip
def test_refusals_say_why_and_what_instead(made, cli, spec, reason, alternative, refused):
    _, base, reg = made
    result = cli(base, "small", spec)
    assert result.exit_code == 2
    assert "vLLM cannot serve" in result.output and reason in result.output and alternative in result.output
    hint = result.output.split("hint:")[1].replace("\n", "")
    assert str(reg.path(refused)) in hint and str(reg.path("small")) not in hint  # merge only what was refused


def test_rank_above_vllm_limit_is_refused(made, cli, tmp_path):
    _, base, reg = made
    big = tmp_path / "big"
    shutil.copytree(reg.path("small"), big)
    cfg = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**cfg, "r": 1024}))
    result = cli(base, big)
    assert result.exit_code == 2 and "rank 1024" in result.output and "--method svd" in result.output


def test_out_writes_an_executable_script(made, cli, tmp_path):
    _, base, _ = made
    old = os.umask(0o022)
    try:
        result = cli(base, "small", "--out", tmp_path / "serve.sh")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    script = (tmp_path / "serve.sh").read_text()
    assert script.startswith("#!/bin/sh") and _command(script) == _command(cli(base, "small").output)
    assert stat.S_IMODE((tmp_path / "serve.sh").stat().st_mode) == 0o755
