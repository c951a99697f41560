"""The kernels' build: run-time variant choice, every csrc/ file compiling for aarch64, each compiled op against its
plain-PyTorch reference, and the ops' fake implementations (what torch.compile traces)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nomoat import kernels
from nomoat.kernels import build, reference

CROSS = "aarch64-linux-gnu-g++"


@pytest.fixture(scope="module")
def built() -> None:
    assert kernels.available(), "nomoat's kernels did not build: see the log for the compiler error"


def test_variants_follow_the_cpu_and_torch():
    avx512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx2", "fma", "f16c", "bmi2"})
    v = build.pick_variant("x86_64", avx512 | {"avx512_bf16", "avx512_vnni"}, "AVX512")
    assert v.isa == "avx512" and v.name == "avx512_bf16_vnni" and "-march=x86-64-v4" in v.flags
    assert "-mavx512bf16" in v.flags and "-mavx512vnni" in v.flags
    assert build.pick_variant("x86_64", avx512, "AVX2").isa == "avx2"  # torch (ATEN_CPU_CAPABILITY) caps it
    assert build.pick_variant("x86_64", avx512, "AVX512", forced="avx2").name == "avx2"
    avx2 = frozenset({"avx2", "fma", "f16c", "bmi2"})
    assert build.pick_variant("x86_64", avx2, "AVX2").flags[0] == "-march=x86-64-v3"
    assert build.pick_variant("x86_64", frozenset({"sse4_2"}), "DEFAULT").isa == "sse"
    assert build.pick_variant("aarch64", frozenset({"asimd", "fp"}), "DEFAULT").isa == "neon"
    assert build.pick_variant("riscv64", frozenset(), "DEFAULT").flags == ()


def test_loaded_build_is_this_cpus(built):
    assert kernels.isa() == build.current_variant().isa


def test_every_source_compiles_for_aarch64():
    """An ARM user must never meet a build error: every csrc/ file passes an aarch64 compiler (syntax and types,
    against torch's headers; no Python headers are needed by the sources)."""
    if shutil.which(CROSS) is None:
        pytest.skip(f"{CROSS} is not installed (Debian: apt-get install g++-aarch64-linux-gnu; scripts/test does)")
    include = Path(torch.__file__).parent / "include"
    sources = sorted(build.CSRC.glob("*.cpp"))
    assert {s.name for s in sources} == set(build.SOURCES)
    for src in sources:
        cmd = [CROSS, "-std=c++20", "-fsyntax-only", "-fopenmp", "-march=armv8-a", "-Werror=return-type",
               f"-I{include}", f"-I{include / 'torch/csrc/api/include'}", str(src)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{src.name} does not compile for aarch64:\n{result.stderr[-3000:]}"


def test_sources_do_not_need_python_headers():
    for src in build.CSRC.iterdir():
        text = src.read_text()
        assert "Python.h" not in text and "pybind11" not in text and "torch/extension.h" not in text, src.name


def _rand(*shape, g):
    return torch.randn(*shape, generator=g)


def test_linear_ops_match_references_at_any_row_count(built):
    g = torch.Generator().manual_seed(0)
    w, b = _rand(130, 77, g=g), _rand(130, g=g)
    q = torch.randint(-127, 128, (130, 77), generator=g, dtype=torch.int8)
    d = (torch.rand(130, 3, generator=g) + 0.1).half()
    p32, (p8, scale) = kernels.pack_fp32(w), kernels.pack_int8(q, d)
    for m in (1, 5, 8, 9, 17, 40):
        x = _rand(m, 77, g=g)
        torch.testing.assert_close(kernels.linear_fp32(x, p32, 130, b), reference.linear_fp32(x, p32, 130, b),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        got, want = kernels.linear_int8(x, p8, scale, 130, b), reference.linear_int8(x, p8, scale, 130, b)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6
        torch.testing.assert_close(reference.linear_fp32(x, p32, 130, b), F.linear(x, w, b))  # the oracle itself
    assert torch.equal(kernels.unpack(p32, 130), w) and torch.equal(kernels.unpack(p8, 130), q)
    assert torch.equal(kernels.unpack_int8(p8, scale, 130)[1], d)
    want = q.float() * d.float().repeat_interleave(32, dim=1)[:, :77]  # the int8 oracle itself, by plain torch
    torch.testing.assert_close(reference.linear_int8(x, p8, scale, 130, b), F.linear(x, want, b))


def test_training_ops_match_references(built):
    g = torch.Generator().manual_seed(1)
    gate, up, grad = _rand(7, 131, g=g) * 3, _rand(7, 131, g=g), _rand(7, 131, g=g)
    torch.testing.assert_close(kernels.swiglu_forward(gate, up), reference.swiglu_forward(gate, up))
    g1, g2, p1, p2 = grad.clone(), grad.clone(), torch.empty_like(gate), torch.empty_like(gate)
    got = kernels.swiglu_backward(gate, up, g1, p1)
    want = reference.swiglu_backward(gate, up, g2, p2)
    torch.testing.assert_close(got[1], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)
    x = _rand(2, 3, 5, 16, g=g)
    ang = _rand(2, 5, 6, g=g)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    for back in (False, True):
        got, want = kernels.rope(x, cos, sin, back), reference.rope(x, cos, sin, back)
        torch.testing.assert_close(got, want)
        assert got.stride() == want.stride()
    logits, targets = _rand(9, 1001, g=g) * 5, torch.randint(0, 1001, (9,), generator=g)
    l1, l2 = logits.clone(), logits.clone()
    torch.testing.assert_close(kernels.softmax_xent_(l1, targets), reference.softmax_xent_(l2, targets))
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(reference.softmax_xent_(logits.clone(), targets),
                               F.cross_entropy(logits, targets, reduction="none"))  # fmt: skip


def test_fake_implementations_pass_opcheck(built):
    """Schema and fake tensors of every op (what torch.compile and export trace with)."""
    g = torch.Generator().manual_seed(2)
    w = _rand(70, 40, g=g)
    x = _rand(3, 40, g=g)
    q = torch.randint(-127, 128, (70, 40), generator=g, dtype=torch.int8)
    gate, up = _rand(4, 33, g=g), _rand(4, 33, g=g)
    B, H, nkv, hd, S = 2, 4, 2, 16, 12
    cases = [
        (torch.ops.nomoat.linear_f32.default, (x, kernels.pack_fp32(w), None, 70)),
        (torch.ops.nomoat.linear_i8.default,
         (x, *kernels.pack_int8(q, torch.rand(70, 2, generator=g).half()), _rand(70, g=g), 70)),
        (torch.ops.nomoat.swiglu_forward.default, (gate, up)),
        (torch.ops.nomoat.swiglu_backward.default, (gate, up, _rand(4, 33, g=g), torch.empty(4, 33))),
        (torch.ops.nomoat.rope.default, (_rand(1, 2, 3, 8, g=g), _rand(1, 3, 8, g=g), _rand(1, 3, 8, g=g), False)),
        (torch.ops.nomoat.softmax_xent_.default, (_rand(3, 50, g=g), torch.tensor([1, 0, 49]))),
        (torch.ops.nomoat.decode_attention.default,
         (_rand(B, 1, H, hd, g=g), _rand(B, 1, nkv, hd, g=g), _rand(B, 1, nkv, hd, g=g), _rand(B, 1, hd, g=g),
          _rand(B, 1, hd, g=g), torch.zeros(3, nkv, S, hd), torch.zeros(3, nkv, S, hd), 1,
          torch.tensor([[3], [7]]), 8, 0, 0.25)),
    ]  # fmt: skip
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_ops_trace_under_torch_compile(built):
    """A compiled function calling an op gives the eager result without graph breaks (the fake implementation)."""
    g = torch.Generator().manual_seed(3)
    w = _rand(64, 32, g=g)
    panels = kernels.pack_fp32(w)

    def f(x):
        return torch.relu(torch.ops.nomoat.linear_f32(x * 2, panels, None, 64))

    x = _rand(2, 32, g=g)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), torch.relu(F.linear(x * 2, w)), rtol=1e-5, atol=1e-5)



def test_a_killed_build_does_not_block_later_processes(built, tmp_path):
    """torch's build lock file, left by a build killed midway, must not make the next process wait forever."""
    from torch.utils import cpp_extension

    variant = build.current_variant()
    name = f"nomoat_kernels_{variant.name}_{build._sources_hash(variant)}"
    stale = Path(cpp_extension._get_build_directory(name, False)) / "lock"
    stale.touch()  # what a build killed during compilation leaves behind
    try:
        out = subprocess.run([sys.executable, "-c", "from nomoat.kernels import build; print(build.load())"],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        stale.unlink(missing_ok=True)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


def test_the_build_is_named_by_its_sources(monkeypatch, tmp_path):
    """Two checkouts (or versions) with different kernel sources must not share one cached build."""
    variant = build.current_variant()
    before = build._sources_hash(variant)
    for path in build.CSRC.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(build, "CSRC", tmp_path)
    assert build._sources_hash(variant) == before
    (tmp_path / "vec.h").write_text((tmp_path / "vec.h").read_text() + "\n// changed\n")
    assert build._sources_hash(variant) != before


def test_a_second_install_of_the_same_sources_reuses_the_build(built, tmp_path):
    """Another checkout (or virtualenv) of the same sources loads the cached build as it is: nothing recompiles."""
    from torch.utils import cpp_extension

    variant = build.current_variant()
    name = f"nomoat_kernels_{variant.name}_{build._sources_hash(variant)}"
    folder = Path(cpp_extension._get_build_directory(name, False))
    files = ("build.ninja", f"{name}.so")
    before = {f: (folder / f).stat().st_mtime_ns for f in files}
    shutil.copytree(Path(build.__file__).parents[2] / "nomoat", tmp_path / "src" / "nomoat")
    code = "from nomoat.kernels import build; print(build.load(), build.CSRC)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "src")})  # fmt: skip
    assert out.returncode == 0 and out.stdout.split() == ["True", str(tmp_path / "src/nomoat/kernels/csrc")], out
    assert "compiling" not in out.stderr, out.stderr[-2000:]
    assert {f: (folder / f).stat().st_mtime_ns for f in files} == before


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
