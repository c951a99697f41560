"""llama.cpp's own Hugging Face -> GGUF converter (`convert_hf_to_gguf.py`), for the benchmarks' llama.cpp peer.

The converter is not on PyPI as a command; it ships inside the llama-cpp-python source distribution (its vendored
llama.cpp tree). `fetch()` downloads the sdist of the installed llama-cpp-python version from PyPI (a package
registry) once and extracts the converter, its `conversion/` package and its own `gguf-py` into
`benchmarks/.llama.cpp/<version>/`; `convert()` runs it on a model folder. It needs `sentencepiece` (in the
`bench` extra) for the SentencePiece vocabulary that `write_sentencepiece_tokenizer` gives random models: llama.cpp's
converter refuses BPE tokenizers whose pre-tokenizer it does not know, as a small trained one.

`make_gguf()` is what the benchmarks call: the converter where it runs, else nomoat's own exporter (said in the
result), so a machine without `sentencepiece` or PyPI still measures the peer, on a file that says who wrote it.

    python benchmarks/llamacpp_converter.py   # fetch, print the converter's path
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent / ".llama.cpp"
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def installed_version() -> str | None:
    """The installed llama-cpp-python version, or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


def fetch(version: str | None = None) -> Path:
    """The converter script of llama-cpp-python `version` (default: the installed one), downloaded once.

    Raises:
        RuntimeError: llama-cpp-python is not installed, or PyPI cannot be reached (with what to do).
    """
    version = version or installed_version()
    if version is None:
        raise RuntimeError("llama-cpp-python is not installed (pip install -e .[bench])")
    dest = ROOT / version
    script = dest / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    try:
        index = urllib.request.Request(
            "https://pypi.org/simple/llama-cpp-python/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
        )  # PEP 691
        with urllib.request.urlopen(index, timeout=60) as r:
            name = f"llama_cpp_python-{version}.tar.gz"
            urls = [f["url"] for f in json.load(r)["files"] if f["filename"] == name]
        if not urls:
            raise RuntimeError(f"PyPI has no source distribution of llama-cpp-python {version}")
        with urllib.request.urlopen(urls[0], timeout=600) as r:
            data = r.read()
    except OSError as e:
        raise RuntimeError(f"cannot download llama-cpp-python {version}'s sources from PyPI ({e}); "
                           f"extract vendor/llama.cpp/{{{','.join(_MEMBERS)}}} into {dest} by hand") from e  # fmt: skip
    tmp = dest.with_name(dest.name + ".part")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            parts = m.name.split("/vendor/llama.cpp/", 1)
            if len(parts) == 2 and parts[1].startswith(_MEMBERS) and (m.isfile() or m.isdir()):
                m.name = parts[1]
                tar.extract(m, tmp, filter="data")
    if not (tmp / "convert_hf_to_gguf.py").is_file():
        raise RuntimeError(f"llama-cpp-python {version}'s sources hold no vendor/llama.cpp/convert_hf_to_gguf.py")
    tmp.rename(dest)
    return script


def write_sentencepiece_tokenizer(folder: Path) -> None:
    """A small SentencePiece BPE model as `folder/tokenizer.model` (ids 0-2: `<unk>` `<s>` `</s>`), for llama.cpp."""
    import sentencepiece as spm

    text = ["The quick brown fox jumps over the lazy dog.", "def f(x):", "    return x * 2", "0123456789"] * 50
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=100,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)  # fmt: skip
    (folder / "tokenizer.model").write_bytes(buf.getvalue())


def convert(folder: Path, out: Path, outtype: str) -> Path:
    """Run llama.cpp's converter on `folder` (outtype f32, f16 or q8_0), writing `out`; returns `out`."""
    script = fetch()
    if not (folder / "tokenizer.model").is_file():
        write_sentencepiece_tokenizer(folder)
    cmd = [sys.executable, str(script), str(folder), "--outtype", outtype, "--outfile", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {folder}:\n{done.stderr[-3000:]}")
    return out


def save_tokenizer(path: Path) -> None:
    """A small byte-level BPE (GPT-2 pre-tokenizer, `<unk>` `<s>` `</s>` as ids 0-2) as `path/tokenizer.json`.

    Only nomoat's GGUF exporter reads it (`make_gguf`'s fallback: a GGUF needs a vocabulary; the exporter pads it to
    the model's rows).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    text = ["The quick brown fox jumps over the lazy dog. " * 4, "def f(x):\n    return x * 2\n", "0123456789"]
    tok.train_from_iterator(text * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "bos_token": "<s>", "eos_token": "</s>"}))  # fmt: skip


def make_gguf(folder: Path, out: Path, outtype: str) -> str:
    """Write `folder` as GGUF with llama.cpp's own converter; where it cannot run, with nomoat's exporter (said).

    Returns which tool wrote the file (and why not llama.cpp's converter, when not).
    """
    try:
        convert(folder, out, outtype)
        return f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {installed_version()} sources)"
    except (RuntimeError, ImportError) as e:
        from nomoat.export.gguf import export_gguf

        print(f"warning: llama.cpp's converter unavailable, GGUF written by nomoat's exporter: {e}", file=sys.stderr)
        if not (folder / "tokenizer.json").is_file():
            save_tokenizer(folder)
        export_gguf(folder, [], out, outtype=outtype)
        return f"nomoat.export.gguf.export_gguf (llama.cpp's converter unavailable: {str(e).splitlines()[0]})"


if __name__ == "__main__":
    print(fetch())
