"""`pack_model` on a model whose output head is tied to the embedding: one set of panels serves both, at decode too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nomoat import kernels
from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.inference import prepare
from nomoat.models import packed as packed_module
from nomoat.models.checkpoint import CheckpointError, load_model, save_model
from nomoat.models.packed import PackedEmbedding, PackedLinear, pack_model
from nomoat.tokenizer import Tokenizer

from hf_models import make_hf_model, save_word_tokenizer

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="panels need the compiled kernels")


def _storages(module: nn.Module) -> dict[int, int]:
    """data pointer -> bytes of every storage a module's parameters and buffers use."""
    tensors = [*module.parameters(), *(b for b in module.buffers() if b is not None)]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


@needs_kernels
def test_tied_head_reads_the_embedding_panels(tmp_path: Path) -> None:
    make_hf_model("qwen2", tmp_path)  # tied head
    save_word_tokenizer(tmp_path)
    plain = load_model(tmp_path, "float32", "cpu")
    table = plain.model.embed_tokens.weight.detach().clone()
    model = load_model(tmp_path, "float32", "cpu")
    assert pack_model(model) == sum(type(m) is nn.Linear for m in plain.modules())
    emb, head = model.model.embed_tokens, model.lm_head
    assert type(emb) is PackedEmbedding and type(head) is PackedLinear
    assert head.panels.data_ptr() == emb.panels.data_ptr()  # one matrix
    assert torch.equal(emb.matrix(), table) and torch.equal(head.weight(), table)
    ids = torch.randint(0, table.shape[0], (3, 7), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = table.shape[0] - 1
    assert torch.equal(emb(ids), F.embedding(ids, table))
    assert model.dtype == torch.float32 and model.device.type == "cpu"

    dm = prepare(model)
    assert dm.net.model.embed_tokens is emb
    assert dm.net.lm_head.panels.data_ptr() == emb.panels.data_ptr()  # the decode head reads the same panels
    assert set(_storages(dm.net)) <= set(_storages(model))  # the decode model holds no weight of its own

    prompt = torch.randint(3, 500, (8,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    tok = Tokenizer.from_dir(tmp_path)
    ours = Engine(model, tok).generate(prompt, params)
    ref = Engine(plain, tok).generate(prompt, params)
    assert ours.token_ids == ref.token_ids
    with pytest.raises(CheckpointError, match="PackedEmbedding"):
        save_model(model, tmp_path / "out")


@needs_kernels
def test_packed_model_holds_each_weight_once(tmp_path: Path) -> None:
    """Packed weights take the fp32 bytes of the model (plus panel padding to 64 output rows), tied or not."""
    for family in ("qwen2", "llama3"):
        make_hf_model(family, tmp_path / family)
        model = load_model(tmp_path / family, "float32", "cpu")
        want = sum(-(-p.shape[0] // 64) * 64 * p[0].numel() * 4 if p.dim() == 2 else p.numel() * 4
                   for p in {id(p): p for p in model.parameters()}.values())  # fmt: skip
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        pack_model(model)
        assert (type(model.model.embed_tokens) is PackedEmbedding) == tied, family
        held = sum(_storages(model).values()) - sum(b.untyped_storage().nbytes() for n, b in model.named_buffers()
                                                    if "inv_freq" in n)  # fmt: skip
        assert held == want - (0 if tied else _embedding_padding(model)), family


def _embedding_padding(model: nn.Module) -> int:
    """Bytes `want` counted as panel padding for an untied embedding, which stays an (vocab, hidden) matrix."""
    w = model.model.embed_tokens.weight
    return (-(-w.shape[0] // 64) * 64 - w.shape[0]) * w.shape[1] * 4


def test_without_the_kernels_the_tied_pair_stays_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_hf_model("qwen2", tmp_path)
    model = load_model(tmp_path, "float32", "cpu")
    emb = model.model.embed_tokens.weight
    monkeypatch.setattr(packed_module.kernels, "available", lambda: False)
    if packed_module.packing_available():
        pack_model(model)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is emb is model.model.embed_tokens.weight
