"""Run files and options: errors name the keys and flags a user writes; `fsdp` is a field like any other."""

from __future__ import annotations

import re

import pytest
import yaml

from nomoat.config.train import ConfigError, TrainConfig, load_train_config
from nomoat.train.loop import LoopSettings


@pytest.mark.parametrize(
    ("lora", "names"),
    [
        ({"r": 0}, ("lora.r", "--rank")),
        ({"alpha": -1}, ("lora.alpha", "--alpha")),
        ({"dropout": 1.5}, ("lora.dropout", "--dropout")),
        ({"target_modules": []}, ("lora.target_modules", "--target")),
        ({"use_dora": "yes"}, ("lora.use_dora", "--dora")),
        ({"modules_to_save": [""]}, ("lora.modules_to_save", "--train-module")),
    ],
)
def test_lora_errors_name_the_run_file_key_and_the_flag(tmp_path, lora, names):
    key, flag = names
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": "m", "data": ["d.jsonl"], "lora": lora}))
    with pytest.raises(ConfigError) as err:
        load_train_config(run)
    assert str(err.value).startswith(f"{run}: {key} ") and str(err.value).endswith(f"({flag} on the command line)")
    assert "LoRAConfig" not in str(err.value)
    with pytest.raises(ConfigError, match="^" + re.escape(f"options: {key} ")):
        load_train_config(None, lora=lora)


def test_unknown_lora_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown lora keys: rank \(known: .*\br\b"):
        load_train_config(None, lora={"rank": 8})


def test_fsdp_is_a_field_read_by_the_loop(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": "m", "data": ["d.jsonl"], "fsdp": True}))
    cfg = load_train_config(run)
    assert cfg.fsdp is True and LoopSettings.of(cfg).fsdp is True
    assert TrainConfig.from_dict(cfg.to_dict()).fsdp is True  # round-trips through a run file's data
    assert load_train_config(None, model="m").fsdp is False
    assert load_train_config(run, fsdp=None).fsdp is True  # an option not given leaves the file's value
    with pytest.raises(ConfigError, match="fsdp must be true or false"):
        load_train_config(None, fsdp="2")
