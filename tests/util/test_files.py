"""nomoat.util.files: atomic writes leave the old or the new file, never half; hashing and JSON reading."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from nomoat.util.errors import InputError, NomoatError
from nomoat.util.files import (
    atomic_dir,
    atomic_path,
    atomic_write_json,
    fsync_tree,
    read_json,
    read_jsonl,
    replace_dir,
    sha256_file,
)


def test_atomic_write_json_bytes_and_no_leftovers(tmp_path):
    out = tmp_path / "sub" / "r.json"
    atomic_write_json(out, {"b": "é", "a": [1, 2]}, ensure_ascii=False)
    assert out.read_bytes() == (json.dumps({"b": "é", "a": [1, 2]}, indent=2, ensure_ascii=False) + "\n").encode()
    assert os.listdir(out.parent) == ["r.json"]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.gguf"]


def test_atomic_path_gives_the_permissions_open_would(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"x")
        (tmp_path / "b.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.bin").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o644


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "adapter"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("interrupted")
    assert sorted(os.listdir(dest)) == ["a.txt"] and os.listdir(tmp_path) == ["adapter"]
    with atomic_dir(dest) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(os.listdir(dest)) == ["c.txt"] and os.listdir(tmp_path) == ["adapter"]


def test_replace_dir_onto_an_existing_folder(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "x").write_text("new")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "x").write_text("old")
    replace_dir(tmp_path / "new", tmp_path / "dest")
    assert (tmp_path / "dest" / "x").read_text() == "new" and os.listdir(tmp_path) == ["dest"]


@pytest.mark.skipif(os.name == "nt", reason="Windows needs write access to flush a file")
def test_fsync_tree_opens_files_read_only(tmp_path, monkeypatch):
    """shutil.copytree keeps a read-only source's mode: flushing the copy must not need write access."""
    import builtins

    from nomoat.util import files

    modes = []

    def spy(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        modes.append(mode)
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", spy, raising=False)
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"w")
    f.chmod(0o444)
    fsync_tree(tmp_path)
    with atomic_path(tmp_path / "x") as tmp:
        tmp.write_bytes(b"x")
    assert modes == ["rb", "rb"]


def test_sha256_file_reads_in_chunks(tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=4096) == hashlib.sha256(data).hexdigest()


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text('{\n  "a": 1,\n}')
    with pytest.raises(InputError, match=r"c\.json:3: invalid JSON"):
        read_json(bad, error=InputError)
    bad.write_text("[1]")
    with pytest.raises(NomoatError, match="expected a JSON object, found list"):
        read_json(bad)
    with pytest.raises(NomoatError, match="cannot read JSON"):
        read_json(tmp_path / "missing.json")
    assert read_json(tmp_path / "missing.json", missing_ok=True) == {}


def test_read_jsonl_skips_blank_lines(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(tmp_path / "m.jsonl") == [{"a": 1}, {"a": 2}]
