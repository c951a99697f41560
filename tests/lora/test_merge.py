"""`nomoat merge` / `nomoat.lora.combine`: combined adapters equal peft's `add_weighted_adapter`, load in peft and
nomoat with equal logits, carry their provenance, and the CLI writes them (or a merged model) or fails cleanly."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from nomoat.cli import app
from nomoat.lora.combine import (
    METHODS,
    CombineError,
    Parent,
    _module_sort_key,
    combine,
    combine_adapters,
)
from nomoat.lora.peft_format import load_adapter
from nomoat.lora.registry import Registry
from nomoat.models.checkpoint import load_model

from hf_models import VOCAB, hf_config, load_hf, make_hf_model, save_word_tokenizer

IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (r, alpha, targets, extra LoraConfig fields). a and b share a rank but not their targets (union and
# "module only in some parents" are exercised); c has another rank (cat, svd); d is rsLoRA.
SPECS = {
    "a": (4, 8, ALL, {}),
    "b": (4, 16, ["q_proj", "v_proj", "down_proj"], {}),
    "c": (2, 4, ["q_proj", "v_proj"], {}),
    "d": (4, 8, ["q_proj", "o_proj"], {"use_rslora": True}),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one thread avoids OpenMP's spin-waiting on a shared 2-core machine (10x faster SVDs here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _peft_adapter(model_dir: Path, out: Path, spec: tuple, seed: int) -> Path:
    r, alpha, targets, extra = spec
    pm = peft.get_peft_model(load_hf(model_dir), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                 task_type="CAUSAL_LM", **extra))  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:  # random non-zero A and B
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An 11-layer tiny Llama (so that layer 10 sorts after layer 2) with four peft-made adapters."""
    root = tmp_path_factory.mktemp("merge")
    model_dir = root / "llama"
    torch.manual_seed(0)
    cfg = hf_config("llama3", num_hidden_layers=11, hidden_size=32, intermediate_size=64)
    transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").save_pretrained(model_dir)
    save_word_tokenizer(model_dir)
    ads = {k: _peft_adapter(model_dir, root / k, spec, seed=i + 1) for i, (k, spec) in enumerate(SPECS.items())}
    return model_dir, ads


def _peft_merged(model_dir: Path, folders: list[Path], weights: list[float], method: str, seed: int = 0, **kw):
    """peft's reference: the parents loaded as p0, p1, ..., combined into `merged` right after manual_seed(seed)."""
    pm = peft.PeftModel.from_pretrained(load_hf(model_dir), folders[0], adapter_name="p0")
    for i, f in enumerate(folders[1:], 1):
        pm.load_adapter(f, adapter_name=f"p{i}")
    names = [f"p{i}" for i in range(len(folders))]
    torch.manual_seed(seed)
    pm.add_weighted_adapter(names, weights, "merged", combination_type=method, **kw)
    pm.set_adapter("merged")
    return pm.eval()


def _peft_factors(pm, name: str = "merged") -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """module -> (A, B, delta) of peft's adapter `name` (delta with its scaling)."""
    out = {}
    for module, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and name in mod.lora_A:
            a, b = mod.lora_A[name].weight.detach(), mod.lora_B[name].weight.detach()
            out[module] = (a, b, mod.get_delta_weight(name).detach())
    return out


@pytest.fixture(scope="module")
def peft_abc(made):
    """One peft model with adapters a, b and c loaded under those names (each case adds and deletes its merge)."""
    model_dir, ads = made
    pm = peft.PeftModel.from_pretrained(load_hf(model_dir), ads["a"], adapter_name="a")
    pm.load_adapter(ads["b"], adapter_name="b")
    pm.load_adapter(ads["c"], adapter_name="c")
    return pm


def _ours(tensors: dict[str, torch.Tensor], scaling: float = 1.0) -> dict[str, tuple]:
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[module] = (a, b, (b @ a) * scaling)
    return out


CASES = [  # (method, parents, weights, options)
    ("linear", "ab", [1.0, -0.7], {}),
    ("ties", "ab", [1.0, 0.6], {"density": 0.5}),
    ("dare_linear", "ab", [0.8, 0.6], {"density": 0.6}),
    ("dare_ties", "ab", [1.0, -0.5], {"density": 0.4}),
    ("magnitude_prune", "ab", [1.0, 0.6], {"density": 0.3}),
    ("cat", "abc", [1.0, 0.5, -0.3], {}),
    ("svd", "abc", [1.0, 0.5, -0.3], {"rank": 3}),
    ("ties_svd", "abc", [1.0, 0.5, 0.3], {"density": 0.5}),
    ("dare_ties_svd", "abc", [1.0, 0.5, 0.3], {"density": 0.5}),
    ("dare_linear_svd", "ab", [1.0, 0.5], {"density": 0.5, "rank": 2}),
    ("magnitude_prune_svd", "ab", [1.0, 0.5], {"density": 0.5}),
]
MAX_DIFF: dict[str, float] = {}


@pytest.mark.parametrize("method,names,weights,opts", CASES, ids=[c[0] for c in CASES])
def test_combined_deltas_equal_peft(made, peft_abc, method, names, weights, opts):
    _, ads = made
    folders = [ads[n] for n in names]
    seed = 1234 if method.startswith("dare") else None
    ours = combine_adapters([Parent(f, w) for f, w in zip(folders, weights)], method, seed=seed, **opts)
    torch.manual_seed(seed or 0)
    peft_abc.add_weighted_adapter(list(names), weights, method, combination_type=method,
                                  density=opts.get("density"), svd_rank=opts.get("rank"))  # fmt: skip
    ref = _peft_factors(peft_abc, method)
    peft_abc.delete_adapter(method)
    got = _ours(ours.tensors)
    assert set(got) == set(ref) and len(got) == 11 * 7  # union of targets: every projection of every layer
    diff = 0.0
    for module, (a, b, delta) in got.items():
        ra, rb, rdelta = ref[module]
        torch.testing.assert_close(delta, rdelta, atol=1e-5, rtol=1e-4)
        diff = max(diff, (delta - rdelta).abs().max().item())
        if not method.endswith("svd"):  # SVD factors are defined up to sign; the others must match factor by factor
            torch.testing.assert_close((a, b), (ra, rb), atol=0, rtol=0)
    MAX_DIFF[method] = diff
    assert ours.config["r"] == ours.config["lora_alpha"] == next(iter(ref.values()))[0].shape[0]


def test_dare_depends_on_the_seed_and_only_on_it(made):
    _, ads = made
    parents = [Parent(ads["a"], 1.0), Parent(ads["b"], 0.5)]
    one = combine_adapters(parents, "dare_ties", density=0.5, seed=7).tensors
    again = combine_adapters(parents, "dare_ties", density=0.5, seed=7).tensors
    other = combine_adapters(parents, "dare_ties", density=0.5, seed=8).tensors
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)
    state = torch.get_rng_state()
    combine_adapters(parents, "dare_linear", density=0.5, seed=7)
    assert torch.equal(state, torch.get_rng_state())  # a private generator: the global one is untouched


def test_dare_on_phi3_follows_its_module_order(tmp_path):
    """Phi-3 defines o_proj before qkv_proj: the masks must still be drawn in peft's order."""
    model_dir = tmp_path / "phi3"
    make_hf_model("phi3", model_dir)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    folders = [_peft_adapter(model_dir, tmp_path / n, (4, 8, targets, {}), seed=s) for n, s in (("x", 1), ("y", 2))]
    ours = combine_adapters([(folders[0], 1.0), (folders[1], 0.7)], "dare_ties", density=0.5, seed=3)
    ref = _peft_factors(_peft_merged(model_dir, folders, [1.0, 0.7], "dare_ties", seed=3, density=0.5))
    got = _ours(ours.tensors)
    assert set(got) == set(ref)
    for module, (a, b, _) in got.items():
        torch.testing.assert_close((a, b), ref[module][:2], atol=0, rtol=0)


def test_module_order_is_hf_definition_order():
    names = ["model.layers.10.mlp.down_proj", "model.layers.2.self_attn.qkv_proj", "model.layers.2.mlp.gate_proj",
             "model.layers.2.self_attn.o_proj", "model.layers.2.self_attn.q_proj", "lm_head",
             "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]  # fmt: skip
    assert sorted(names, key=_module_sort_key) == [
        "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.o_proj", "model.layers.2.self_attn.qkv_proj",
        "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj",
        "model.layers.10.mlp.down_proj", "lm_head",
    ]  # fmt: skip


def test_rslora_parents_keep_peft_factors_with_scaling_one(made):
    """peft copies use_rslora into the new config (scaling r/sqrt(r)); nomoat writes the same factors with scaling 1,
    so its delta is the factors' product, the update the methods compute."""
    model_dir, ads = made
    folders = [ads["a"], ads["d"]]
    ours = combine_adapters([(folders[0], 1.0), (folders[1], 0.5)], "linear")
    pm = _peft_merged(model_dir, folders, [1.0, 0.5], "linear")
    assert ours.config["use_rslora"] is False and ours.config["lora_alpha"] == ours.config["r"] == 4
    ref = _peft_factors(pm)
    for module, (a, b, delta) in _ours(ours.tensors).items():
        ra, rb, _ = ref[module]
        torch.testing.assert_close(delta, rb @ ra, atol=0, rtol=0)
        torch.testing.assert_close((a, b), (ra, rb), atol=0, rtol=0)


def _nomoat_logits(model_dir: Path, adapter: Path) -> torch.Tensor:
    model = load_model(model_dir, dtype=torch.float32, device="cpu").eval()
    load_adapter(model, adapter)
    with torch.no_grad():
        return model(IDS)


@pytest.mark.parametrize("method,opts", [("ties", {"density": 0.5}), ("cat", {})])
def test_written_adapter_loads_in_peft_and_nomoat(made, tmp_path, method, opts):
    model_dir, ads = made
    folders = [ads["a"], ads["b"]]
    out = combine([(folders[0], 1.0), (folders[1], 0.5)], tmp_path / "merged", method, **opts)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "nomoat.json"]
    with torch.no_grad():
        theirs = _peft_merged(model_dir, folders, [1.0, 0.5], method, density=opts.get("density"))(IDS).logits
        loaded = peft.PeftModel.from_pretrained(load_hf(model_dir), out).eval()(IDS).logits
        base = load_hf(model_dir)(IDS).logits
    torch.testing.assert_close(loaded, theirs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(_nomoat_logits(model_dir, out), theirs, atol=2e-5, rtol=1e-5)
    assert (loaded - base).abs().max() > 1e-3  # the adapter does something


def test_regex_targets_combine_with_lists(made, tmp_path):
    """A regex-targeted parent (peft refuses to mix it with list targets) gives an exact regex of the adapted modules;
    cat with weights 1 equals peft running both parents at once, and nomoat loads it with the same logits."""
    model_dir, ads = made
    regex = _peft_adapter(model_dir, tmp_path / "re", (4, 8, r"model\.layers\.[0-2]\.mlp\.up_proj", {}), seed=11)
    out = combine([(ads["b"], 1.0), (regex, 1.0)], tmp_path / "m", "cat")
    target = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(target, str) and "model\\.layers\\.2\\.mlp\\.up_proj" in target
    pm = peft.PeftModel.from_pretrained(load_hf(model_dir), ads["b"], adapter_name="p0")
    pm.load_adapter(regex, adapter_name="p1")
    pm.base_model.set_adapter(["p0", "p1"])
    with torch.no_grad():
        both = pm.eval()(IDS).logits
        loaded = peft.PeftModel.from_pretrained(load_hf(model_dir), out).eval()(IDS).logits
    torch.testing.assert_close(loaded, both, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(_nomoat_logits(model_dir, out), both, atol=2e-5, rtol=1e-5)


def test_provenance_lists_parents(made, tmp_path):
    _, ads = made
    out = combine([Parent(ads["a"], 1.0, "alpha"), Parent(ads["b"], -0.5)], tmp_path / "m", "ties", density=0.7)
    prov = json.loads((out / "nomoat.json").read_text())
    assert prov["method"] == prov["effective_method"] == "ties" and prov["weights"] == [1.0, -0.5]
    assert prov["density"] == 0.7 and prov["rank"] == 4 and prov["seed"] is None and prov["majority_sign"] == "total"
    assert prov["nomoat_version"] and prov["created_utc"] and prov["source"] == "nomoat merge"
    assert [p["name"] for p in prov["parents"]] == ["alpha", "b"]
    for p, f in zip(prov["parents"], [ads["a"], ads["b"]]):
        assert p["path"] == str(f.resolve())
        assert p["weights_sha256"] == hashlib.sha256((f / "adapter_model.safetensors").read_bytes()).hexdigest()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(ALL) and config["base_model_name_or_path"] == str(made[0])


def test_idempotent_cases(made, tmp_path):
    """Which combinations give back their input exactly: linear (and any method: peft makes one parent linear) of one
    adapter with weight 1 keeps its delta; redoing that on the result (scaling 1) is the identity on the tensors;
    ties/dare_ties at density 1 of an adapter with itself is that adapter; svd at full rank equals cat."""
    _, ads = made
    a = ads["a"]
    ref = _ours(load_file(a / "adapter_model.safetensors"), scaling=8 / 4)
    once = combine([(a, 1.0)], tmp_path / "once", "linear")
    for module, (_, _, delta) in _ours(load_file(once / "adapter_model.safetensors")).items():
        torch.testing.assert_close(delta, ref[module][2], atol=1e-6, rtol=1e-5)
    assert "acts as 'linear'" in combine_adapters([(once, 1.0)], "svd").warnings[0]
    twice = combine([(once, 1.0)], tmp_path / "twice", "svd")  # one parent: linear
    first, second = load_file(once / "adapter_model.safetensors"), load_file(twice / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    for method in ("ties", "dare_ties"):
        self_mix = combine_adapters([(a, 1.0), (a, 1.0)], method, density=1.0)
        for module, (_, _, delta) in _ours(self_mix.tensors).items():
            torch.testing.assert_close(delta, ref[module][2], atol=1e-6, rtol=1e-5)
    parents = [(ads["a"], 1.0), (ads["c"], -0.5)]
    cat = _ours(combine_adapters(parents, "cat").tensors)
    full = _ours(combine_adapters(parents, "svd", rank=6).tensors)
    for module in cat:
        torch.testing.assert_close(full[module][2], cat[module][2], atol=1e-5, rtol=1e-4)


def _with_base_hash(src: Path, dest: Path, sha: str) -> Path:
    shutil.copytree(src, dest)
    (dest / "nomoat.json").write_text(json.dumps({"base_model": {"path": "/models/x", "sha256": sha}}))
    return dest


def test_api_errors(made, tmp_path):
    _, ads = made
    a, b, c = ads["a"], ads["b"], ads["c"]
    cases = [
        (dict(parents=[(a, 1), (c, 1)], method="linear"), "same rank (a r=4, c r=2)"),
        (dict(parents=[(a, 1), (b, 1)], method="ties"), "needs a density"),
        (dict(parents=[(a, 1), (b, 1)], method="ties", density=1.5), "density must be in (0, 1]"),
        (dict(parents=[(a, 1), (b, 1)], method="dare_ties", density=0.0), "density must be in (0, 1]"),
        (dict(parents=[(a, 1), (b, 1)], method="linear", density=0.5), "density has no effect"),
        (dict(parents=[(a, 1), (b, 1)], method="linear", rank=2), "rank has no effect"),
        (dict(parents=[(a, 1), (b, 1)], method="ties", density=0.5, seed=1), "seed has no effect"),
        (dict(parents=[(a, 1), (b, 1)], method="svd", rank=40), "rank 40 is larger than"),
        (dict(parents=[(a, 1), (b, 1)], method="tie"), "did you mean 'ties'?"),
        (dict(parents=[(a, 1), (b, float("nan"))], method="cat"), "must be finite"),
        (dict(parents=[], method="cat"), "no adapters"),
    ]
    for kwargs, message in cases:
        with pytest.raises(CombineError) as e:
            combine_adapters(**kwargs)
        assert message in str(e.value), (kwargs, str(e.value))
    x = _with_base_hash(a, tmp_path / "x", "ab" * 32)
    y = _with_base_hash(b, tmp_path / "y", "cd" * 32)
    with pytest.raises(CombineError, match="different base models"):
        combine_adapters([(x, 1), (y, 1)], "cat")
    assert combine_adapters([(x, 1), (y, 1)], "cat", allow_different_bases=True).tensors
    z = _with_base_hash(b, tmp_path / "z", "ab" * 32)
    assert not combine_adapters([(x, 1), (z, 1)], "cat").warnings  # same hash: the base names do not matter
    renamed = shutil.copytree(b, tmp_path / "renamed")
    config = json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other"}))
    warnings = combine_adapters([(a, 1), (renamed, 1)], "cat").warnings  # names differ, no hashes: warn only
    assert len(warnings) == 1 and "names its base" in warnings[0] and "'org/other'" in warnings[0]
    assert set(METHODS) >= {"linear", "svd", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune"}


def test_different_architectures_are_refused(made, tmp_path):
    _, ads = made
    other = tmp_path / "wide"
    cfg = hf_config("llama3", num_hidden_layers=11, hidden_size=64, intermediate_size=64)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    wide = _peft_adapter(other, tmp_path / "wide-adapter", SPECS["a"], seed=9)
    with pytest.raises(CombineError, match="different base models"):
        combine_adapters([(ads["a"], 1), (wide, 1)], "cat")


def test_dora_and_modules_to_save_are_refused(made, tmp_path):
    model_dir, ads = made
    dora = _peft_adapter(model_dir, tmp_path / "dora", (4, 8, ["q_proj"], {"use_dora": True}), seed=5)
    with pytest.raises(CombineError, match="DoRA"):
        combine_adapters([(ads["a"], 1), (dora, 1)], "cat")
    head = _peft_adapter(model_dir, tmp_path / "head", (4, 8, ["q_proj"], {"modules_to_save": ["lm_head"]}), seed=6)
    with pytest.raises(CombineError, match="modules_to_save"):
        combine_adapters([(ads["a"], 1), (head, 1)], "cat")


# ---- CLI ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("NOMOAT_HOME", str(home))
    return home


def _run(args: list[str]):
    return CliRunner().invoke(app, ["merge", *map(str, args)])


def test_cli_registry_names_weights_and_out(made, home, tmp_path):
    model_dir, ads = made
    reg = Registry()
    reg.import_adapter(ads["a"], name="math")
    reg.import_adapter(ads["b"], name="chat")
    ok = _run(["math", "chat", "--method", "ties", "--density", "0.5", "-w", "1.0,0.5", "--name", "mixed"])
    assert ok.exit_code == 0, ok.output
    assert "mixed" in reg.names() and "'mixed'" in ok.output
    prov = reg.show("mixed")["provenance"]
    assert [p["name"] for p in prov["parents"]] == ["math", "chat"] and prov["weights"] == [1.0, 0.5]
    assert prov["name"] == "mixed" and prov["method"] == "ties"
    shown = CliRunner().invoke(app, ["adapters", "show", "mixed"])
    assert shown.exit_code == 0 and "math (w 1.0), chat (w 0.5) by ties (density=0.5" in shown.output, shown.output
    api = combine_adapters([(ads["a"], 1.0), (ads["b"], 0.5)], "ties", density=0.5).tensors
    saved = load_file(reg.path("mixed") / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], api[k]) for k in api)
    repeated = _run(["math", "chat", "--method", "ties", "--density", "0.5", "-w", "1", "-w", "0.5", "--name",
                     "mixed"])  # fmt: skip
    assert repeated.exit_code == 2 and "already in the registry" in repeated.output
    forced = _run(["math:1", f"{ads['b']}:0.5", "--method", "ties", "--density", "0.5", "--name", "mixed", "--force"])
    assert forced.exit_code == 0, forced.output
    again = load_file(reg.path("mixed") / "adapter_model.safetensors")
    assert all(torch.equal(again[k], api[k]) for k in api)
    folder = _run(["math", "chat", "--out", tmp_path / "folder"])  # default method: cat
    assert folder.exit_code == 0, folder.output
    assert json.loads((tmp_path / "folder" / "adapter_config.json").read_text())["r"] == 8
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".folder.tmp")]  # atomic write cleaned up


def test_cli_into_base_equals_base_plus_merged_adapter(made, tmp_path, home):
    model_dir, ads = made
    args = [ads["a"], ads["b"], "--method", "dare_ties", "--density", "0.5", "--seed", "3", "-w", "1,0.5"]
    res = _run([*args, "--into-base", model_dir, "--out", tmp_path / "model", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "model" / "tokenizer.json").is_file()
    with torch.no_grad():
        got = load_hf(tmp_path / "model")(IDS).logits
        ref = _peft_merged(model_dir, [ads["a"], ads["b"]], [1.0, 0.5], "dare_ties", seed=3, density=0.5)(IDS).logits
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)


def test_cli_errors_exit_2_without_traceback(made, home, tmp_path):
    _, ads = made
    a, b, c = str(ads["a"]), str(ads["b"]), str(ads["c"])
    x = _with_base_hash(ads["a"], tmp_path / "x", "ab" * 32)
    y = _with_base_hash(ads["b"], tmp_path / "y", "cd" * 32)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    cases = [
        ([a, b, "--method", "tie", "--name", "n"], "unknown merge method 'tie'; did you mean 'ties'?"),
        ([a, c, "--method", "linear", "--name", "n"], "same rank"),
        ([a, b, "--method", "ties", "--density", "2", "--name", "n"], "density must be in (0, 1]"),
        ([a, b, "--method", "ties", "--name", "n"], "needs a density"),
        ([a, b, "-w", "1,2,3", "--name", "n"], "2 adapters but 3 weights"),
        ([a, b, "-w", "1,x", "--name", "n"], "'x' is not a number"),
        ([f"{a}:2", b, "-w", "1,2", "--name", "n"], "not both"),
        ([a, "no-such", "--name", "n"], "adapter 'no-such' not found"),
        ([a, b], "--name NEW"),
        ([a, b, "--name", "../evil"], "adapter name '../evil'"),
        ([a, b, "--into-base", tmp_path], "--out DIR"),
        ([a, b, "--out", tmp_path / "full"], "not empty"),
        ([x, y, "--name", "n"], "different base models"),
    ]
    for args, message in cases:
        res = _run(args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)
        assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), (args, res.output)
    assert Registry().names() == []
    ok = _run([x, y, "--name", "n", "--allow-different-bases"])
    assert ok.exit_code == 0, ok.output


def test_cli_help_and_report_of_max_differences():
    res = CliRunner().invoke(app, ["merge", "--help"])
    assert res.exit_code == 0 and "--into-base" in res.output and "dare_ties" in res.output
    print("max |delta - peft delta| per method:", json.dumps(MAX_DIFF))
