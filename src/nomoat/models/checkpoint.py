"""Checkpoint IO in Hugging Face format: `config.json` plus safetensors (single file or sharded with an index).

`load_model(folder, dtype, device)` builds the trainable `Transformer` (what `nomoat.load` returns; a `.gguf` file
or `ollama:NAME[:TAG]` is read through `models.gguf`) and `save_model` writes one back (atomically, in the family's
own tensor layout); `load_config`, `iter_safetensors` and `checkpoint_summary` read without building. Loading is
memory-mapped and converts straight into the target dtype, releasing mapped pages as it goes, so peak memory stays
near the model's size in that dtype. Hugging Face weights only ever come from safetensors: pickle checkpoints are
refused unless converted with `convert_pickle_checkpoint` (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import platform
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from nomoat.config.model import ModelConfig
from nomoat.kernels import hugepages
from nomoat.models.families import config_from_hf, fuse_for_save, split_fused
from nomoat.models.load_plan import IntQuantizer, LinearQuantizer, check_memory, estimate_bytes, quantizer_for
from nomoat.models.quantize import QuantizedLinear, weight_bytes
from nomoat.models.safetensors_check import check_complete
from nomoat.models.transformer import Transformer
from nomoat.util.files import ordinary_modes
from nomoat.util.hub import local_path

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_FILE = "model.safetensors.index.json"
# Keys some checkpoints carry that are recomputed, not loaded (old Llama exports saved the rotary table).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A model folder that cannot be loaded: missing files, pickle weights, or tensors that do not fit."""


# ---- reading ------------------------------------------------------------------------------------------------------


def gguf_source(path: str | os.PathLike) -> Path | None:
    """The GGUF file a model argument names (a `.gguf` file, or `ollama:NAME[:TAG]` from Ollama's store), else None."""
    from nomoat.models.gguf import is_gguf
    from nomoat.util import ollama

    if ollama.is_ollama(path):
        return ollama.resolve(str(path)).gguf
    p = Path(path).expanduser()
    if is_gguf(p):
        return p
    if p.suffix == ".gguf":
        raise CheckpointError(f"{p}: no such GGUF file" if not p.exists() else f"{p}: not a GGUF file (bad magic)")
    return None


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read `config.json` from a model folder (or the equivalent of a GGUF file's metadata)."""
    path = local_path(path)  # `demo` and Hub ids (ORG/NAME[@REV]) name folders too
    gguf_file = gguf_source(path)
    if gguf_file is not None:
        from nomoat.models.gguf import open_gguf, reader_hf_config

        return reader_hf_config(open_gguf(gguf_file), gguf_file)
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder; expected a Hugging Face model folder with config.json")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{folder}: no config.json, so this is not a Hugging Face model folder "
            "(expected config.json, model.safetensors or model.safetensors.index.json, tokenizer.json)"
        )
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}:{e.lineno}: invalid JSON: {e.msg}") from e


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read a model folder's `config.json` as a `ModelConfig` (raises for unsupported families)."""
    return config_from_hf(read_hf_config(path))


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files holding a model's weights, refusing pickle checkpoints with a way out."""
    path = local_path(path)
    folder = Path(path)
    index = folder / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shards that are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: weights are pickle files ({', '.join(pickles)}); nomoat only loads safetensors, because "
            "unpickling can run arbitrary code. If you trust this folder, convert it once with "
            f"`nomoat convert {folder} --trust-pickle` (loads tensors with torch.load(weights_only=True))."
        )
    raise CheckpointError(f"{folder}: no model.safetensors or {INDEX_FILE} found")


def _read_header(f: Any, file: Path) -> tuple[dict[str, Any], int]:
    raw = f.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{file}: truncated safetensors file")
    (n,) = struct.unpack("<Q", raw)
    size = os.fstat(f.fileno()).st_size
    if n > size - 8:
        raise CheckpointError(f"{file}: corrupt safetensors header (length {n} beyond file size {size})")
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsReader:
    """Zero-copy views of the tensors of a safetensors file through a memory map, with page release.

    Use as a context manager. `release(view)` drops the resident pages behind a view once its data was copied, so
    reading a whole file never holds more than a chunk of it in memory. Views are invalid after `release` (their
    bytes read again from disk) and after the reader closes.
    """

    def __init__(self, file: str | os.PathLike) -> None:
        self.file = Path(file)
        self._f = open(self.file, "rb")  # noqa: SIM115 - closed in close()
        self.header, self.base = _read_header(self._f, self.file)
        self.size = os.fstat(self._f.fileno()).st_size
        try:
            check_complete(self.file, self.header, self.base, self.size)  # a download cut short says so
        except Exception:
            self._f.close()
            raise
        # ACCESS_COPY: a private, writable mapping (torch wants writable buffers; nothing is ever written).
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_COPY) if self.size > self.base else None
        self._addr = torch.frombuffer(self._mm, dtype=torch.uint8, count=1).data_ptr() if self._mm else 0

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the file (views still alive keep the map open until they are collected)."""
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None
        self._f.close()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(name, view)` in file order."""
        for name, info in sorted(self.header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{self.file}: tensor {name} has unsupported dtype {info['dtype']}")
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            start, end = info["data_offsets"]
            count = math.prod(info["shape"])
            if end - start != count * dtype.itemsize or self.base + end > self.size:
                raise CheckpointError(f"{self.file}: tensor {name} has inconsistent offsets")
            if count == 0:
                yield name, torch.empty(info["shape"], dtype=dtype)
                continue
            view = torch.frombuffer(self._mm, dtype=dtype, count=count, offset=self.base + start)
            yield name, view.view(info["shape"])

    def release(self, view: torch.Tensor) -> None:
        """Drop the resident pages behind a contiguous view (whole pages inside it only)."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED") or view.numel() == 0:
            return
        start = view.data_ptr() - self._addr
        end = start + view.numel() * view.element_size()
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, (end // page) * page
        if 0 <= lo < hi <= self.size:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def iter_safetensors(file: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, view)` for every tensor of a safetensors file; each view is valid until the next item."""
    with SafetensorsReader(file) as reader:
        for name, view in reader.items():
            yield name, view
            reader.release(view)


# Copy at most this many bytes of a tensor before releasing the file pages behind them.
COPY_CHUNK_BYTES = 16 * 2**20


def _copy_chunked(dest: torch.Tensor, src: torch.Tensor, reader: SafetensorsReader) -> None:
    """`dest.copy_(src)` (with dtype conversion) in row chunks, releasing each chunk's file pages after it."""
    if src.dim() == 0 or src.numel() * src.element_size() <= COPY_CHUNK_BYTES:
        dest.copy_(src)
        reader.release(src)
        return
    row_bytes = max(1, src[0].numel() * src.element_size())
    step = max(1, COPY_CHUNK_BYTES // row_bytes)
    for i in range(0, src.shape[0], step):
        dest[i : i + step].copy_(src[i : i + step])
        reader.release(src[i : i + step])


def resolve_device(device: Any = "auto") -> torch.device:
    """`"auto"` means CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bf16(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """Whether bf16 weights with fp32 accumulation run well on this CPU (decided at run time).

    x86-64: AVX-512-BF16 or AMX-BF16 (native bf16 dot products), or at least AVX2 (bf16 widens to fp32 with a shift,
    so a memory-bound matrix-vector product reads half the bytes of fp32). aarch64: the `bf16` feature.
    `NOMOAT_CPU_BF16=0` (or 1) overrides the detection.
    """
    forced = os.environ.get("NOMOAT_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    from nomoat.kernels.build import cpu_flags

    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64"):
        return bool(flags & {"avx512_bf16", "amx_bf16", "avx2"})
    if machine in ("aarch64", "arm64"):
        return "bf16" in flags
    return False


def saved_dtype(hf: dict[str, Any] | None) -> str:
    """The dtype name a `config.json` says its weights were saved in (`float32` when it does not say)."""
    saved = str((hf or {}).get("torch_dtype") or (hf or {}).get("dtype") or "float32")
    return saved.removeprefix("torch.")


def resolve_dtype(dtype: Any, device: torch.device, hf: dict[str, Any] | None = None) -> torch.dtype:
    """The dtype a model loads in; `"auto"` keeps a half-precision checkpoint in half precision where it is fast.

    `"auto"` on CPU: bf16 when the checkpoint is bf16 or fp16 and the CPU handles bf16 well (`cpu_has_fast_bf16`),
    else fp32 (an fp32 checkpoint stays fp32). On CUDA: the checkpoint's half dtype, else bf16.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        saved = saved_dtype(hf)
        if device.type == "cpu":
            half = DTYPE_NAMES.get(saved) in (torch.bfloat16, torch.float16)
            return torch.bfloat16 if half and cpu_has_fast_bf16() else torch.float32
        return DTYPE_NAMES.get(saved, torch.bfloat16) if saved != "float32" else torch.bfloat16
    if str(dtype) in DTYPE_NAMES:
        return DTYPE_NAMES[str(dtype)]
    raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")


def _install(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def _quantize_in_place(model: Transformer, quantizer: LinearQuantizer, names: list[str], dev: torch.device) -> None:
    """Replace already loaded linear layers (a tied head, a GGUF model's layers) by their quantized form."""
    for name in names:
        linear = model.get_submodule(name)
        w = linear.weight.detach()
        q = quantizer.for_layer(name)
        layer = q.quantize(w if w.device.type == "cpu" else w.cpu(), linear.bias is not None, w.dtype, None)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        _install(model, name, layer.to(dev))
        del linear, w
        hugepages.release_freed_memory()


# ---- loading ------------------------------------------------------------------------------------------------------


def load_model(
    path: str | os.PathLike,
    dtype: Any = "auto",
    device: Any = "auto",
    quantize: str | LinearQuantizer | None = None,
    context: int | None = None,
    check: bool = True,
) -> Transformer:
    """Load a Hugging Face-format model folder (or a GGUF file) into nomoat's decoder, one tensor at a time.

    Each tensor goes from the memory-mapped file straight into its final form: a parameter in `dtype`, or with
    `quantize` a quantized layer built piece by piece; no full-precision copy of the model exists at any point.

    Args:
        path: Folder with `config.json` and `model.safetensors` (or a sharded index), a `.gguf` file,
            `ollama:NAME[:TAG]`, `demo` or a Hub id `ORG/NAME[@REV]` in the Hugging Face cache.
        dtype: `"auto"` (see `resolve_dtype`), a `torch.dtype` or a name such as `"bfloat16"`.
        device: `"auto"`, `"cpu"`, `"cuda"`, ...
        quantize: None, `"int8"`, `"int4"` (every linear layer, the head included, as `quantize_model`: under
            int4 the head is int8, `nomoat.models.quantize.layer_mode`) or a
            `LinearQuantizer` (e.g. `nomoat.lora.nf4.NF4Quantizer`, or an `IntQuantizer` without the head).
        context: Positions of KV cache the caller will allocate, counted in the memory check (None: not counted).
        check: Check the memory needed against what is free first (`nomoat.util.memory`).

    Returns:
        The model in eval mode, weights in `dtype` on `device`.

    Raises:
        CheckpointError: missing files, pickle weights, missing or misshapen tensors.
        UnsupportedModelError: the family or one of its features is not supported.
        InsufficientMemoryError: the model would not fit in the free memory (see `check`).
    """
    path = local_path(path)
    quantizer = quantizer_for(quantize)
    dev = resolve_device(device)
    gguf_file = gguf_source(path)
    if gguf_file is not None:
        from nomoat.models.gguf import load_gguf_model

        # Q4_0 / Q4_1 blocks are kept (4-bit kernels) for int4, Q8_0 ones (nomoat's int8 format) for int8, and both by
        # default on the CPU unless a dtype is asked.
        default = quantizer is None and dtype in (None, "auto") and dev.type == "cpu"
        mode = quantizer.mode if isinstance(quantizer, IntQuantizer) else None
        model = load_gguf_model(gguf_file, resolve_dtype(dtype, dev, {"torch_dtype": "bfloat16"}), dev,
                                default or mode == "int4", default or mode == "int8")  # fmt: skip
        if quantizer is not None:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and quantizer.wants(n)]
            _quantize_in_place(model, quantizer, names, dev)
        return model
    hf = read_hf_config(path)
    cfg = config_from_hf(hf)
    dt = resolve_dtype(dtype, dev, hf)
    shapes = tensor_shapes(path)
    if check and dev.type == "cpu":
        check_memory(Path(path).name, shapes, cfg, dt, quantizer, context)
    model = _fill(path, cfg, dt, dev, quantizer)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        if quantizer is not None and quantizer.wants("lm_head"):
            _quantize_in_place(model, quantizer, ["lm_head"], dev)
    model.reset_rope(dev)
    for p in model.parameters():
        p.requires_grad_(True)  # like any nn.Module; training code freezes what it does not train
    if isinstance(quantizer, IntQuantizer):
        model.quantization = _quantization_info(model, quantizer, estimate_bytes(shapes, dt, None, False))
    hugepages.release_freed_memory()  # temporaries freed while loading go back to the system, whatever malloc keeps
    return model.eval()


def _quantization_info(model: Transformer, q: IntQuantizer, before: int) -> dict[str, Any]:
    """What `quantize_model` records in `model.quantization`, for a model quantized while loading."""
    layers = {n: m.mode for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    return {"mode": q.mode, "group_size": q.group_size if q.mode == "int4" else None,
            "include_lm_head": q.include_lm_head, "bytes_before": before, "bytes_after": weight_bytes(model),
            "layers": layers}  # fmt: skip


def _fill(
    path: str | os.PathLike, cfg: ModelConfig, dt: torch.dtype, dev: torch.device, quantizer: LinearQuantizer | None
) -> Transformer:
    """Build the model on the meta device and fill it tensor by tensor from the safetensors files."""
    with torch.device("meta"):
        model = Transformer(cfg)
    # Parameters stay on the meta device until their tensor is read: each is allocated right before it is filled,
    # so memory grows with the data actually loaded (to_empty() would fault in allocator slack up front).
    params = dict(model.named_parameters(remove_duplicate=False))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = set(params) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    loaded: set[str] = set()
    for file in weight_files(path):
        with SafetensorsReader(file) as reader, torch.no_grad():
            for raw_name, raw in reader.items():
                if raw_name.endswith(IGNORED_SUFFIXES):
                    continue
                for name, tensor in split_fused(raw_name, raw, cfg):
                    if name == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue  # tied: some exports still save a copy of the embeddings
                    if name not in params:
                        raise CheckpointError(f"{file}: unexpected tensor {raw_name} for a {cfg.family} model")
                    if tuple(params[name].shape) != tuple(tensor.shape):
                        raise CheckpointError(
                            f"{file}: tensor {raw_name} has shape {tuple(tensor.shape)}, "
                            f"config.json implies {tuple(params[name].shape)}"
                        )
                    module_name, _, leaf = name.rpartition(".")
                    module = model.get_submodule(module_name)
                    if leaf == "weight" and module_name in linears and quantizer and quantizer.wants(module_name):
                        q = quantizer.for_layer(module_name)  # int4: the output head is int8
                        layer = q.quantize(tensor, module.bias is not None, dt, reader.release)
                        if module.bias is not None and not module.bias.is_meta:
                            layer.bias = module.bias
                        _install(model, module_name, layer.to(dev) if dev.type != "cpu" else layer)
                        hugepages.release_freed_memory()  # the quantizer's freed temporaries: not kept by malloc
                    else:
                        # CPU weights of 2 MiB and more start in transparent huge pages (fewer TLB misses when
                        # decoding streams them; no in-place collapse needed later)
                        dest = (hugepages.empty(tuple(tensor.shape), dt) if dev.type == "cpu"
                                else torch.empty(tensor.shape, dtype=dt, device=dev))  # fmt: skip
                        _copy_chunked(dest, tensor, reader)
                        module._parameters[leaf] = nn.Parameter(dest, requires_grad=False)
                    loaded.add(name)
                reader.release(raw)
    missing = sorted(expected - loaded)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing[:5])}{more}")
    return model


# ---- writing ------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_model(model: Transformer, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Save a model as a Hugging Face folder that `transformers` (and nomoat) load.

    Writes `config.json` (the original one, with `torch_dtype` updated) and `model.safetensors`, or shards plus
    `model.safetensors.index.json` when the weights exceed `max_shard_bytes`. Phi-3 projections are fused back into
    `qkv_proj` / `gate_up_proj`; tied output heads are not duplicated. The folder appears atomically: it is written
    under a temporary name beside `path` and renamed into place.
    """
    cfg = model.config
    packed = {"QuantizedLinear", "PackedLinear", "PackedEmbedding"}
    inference_only = sorted({type(m).__name__ for m in model.modules()} & packed)
    if inference_only:
        raise CheckpointError(
            f"this model has inference-only layers ({', '.join(inference_only)}: quantized or packed for generation) "
            "and cannot be saved in Hugging Face format; save the model before quantizing or packing it"
        )
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    state = fuse_for_save(state, cfg)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        shards = _plan_shards(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map: dict[str, str] = {}
            for i, names in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({n: state[n] for n in names}, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(names, fname))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
        hf = dict(cfg.hf_config)
        hf["torch_dtype"] = _dtype_name(model.dtype)
        hf.pop("dtype", None)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        ordinary_modes(tmp)  # mkdtemp made it 0700: a model folder is for other users and tools to read too
        if dest.exists():
            _carry_side_files(dest, tmp)
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _carry_side_files(old: Path, new: Path) -> None:
    """Keep tokenizer and other non-weight files of a folder being overwritten."""
    for f in old.iterdir():
        weights = f.suffix == ".safetensors" or f.name in (INDEX_FILE, "config.json") or f.suffix in PICKLE_SUFFIXES
        if f.is_file() and not weights and not (new / f.name).exists():
            shutil.copy2(f, new / f.name)


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def convert_pickle_checkpoint(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Convert a folder's pickle weights (`pytorch_model.bin` or shards) to `model.safetensors`.

    Only for folders the user trusts: tensors are read with `torch.load(weights_only=True)`, which refuses
    arbitrary objects, but pickle remains a larger attack surface than safetensors.

    Args:
        path: The model folder with `*.bin` / `*.pt` weights.
        out: Where to write the converted folder; default: in place (pickle files are left untouched).

    Returns:
        The folder that now holds `model.safetensors`.
    """
    folder = Path(path)
    dest = Path(out) if out else folder
    files = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not files:
        raise CheckpointError(f"{folder}: no pickle weights (*.bin, *.pt) to convert")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(part, dict):
            raise CheckpointError(f"{f}: expected a dict of tensors, found {type(part).__name__}")
        state.update({k: v.contiguous() for k, v in part.items() if isinstance(v, torch.Tensor)})
    dest.mkdir(parents=True, exist_ok=True)
    if dest != folder:
        for f in folder.iterdir():
            if f.is_file() and f.suffix not in PICKLE_SUFFIXES and not f.name.endswith(".index.json"):
                shutil.copy2(f, dest / f.name)
    # Tied weights share storage in a pickle; safetensors refuses shared tensors, so store copies.
    seen: set[int] = set()
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            state[k] = v.clone()
        seen.add(ptr)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def tensor_shapes(path: str | os.PathLike) -> list[tuple[str, list[int]]]:
    """`(name, shape)` of every weight tensor of a model folder, from the safetensors headers only (fast)."""
    out = []
    for file in weight_files(path):
        with open(file, "rb") as f:
            header, _ = _read_header(f, file)
        out += [(n, info["shape"]) for n, info in header.items() if not n.endswith(IGNORED_SUFFIXES)]
    return out


def checkpoint_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Parameter count, stored dtypes and bytes of a model folder (or GGUF file), read from headers only (fast)."""
    path = local_path(path)
    gguf_file = gguf_source(path)
    if gguf_file is not None:
        from nomoat.models.gguf import gguf_summary

        return gguf_summary(gguf_file)
    params = 0
    nbytes = 0
    dtypes: dict[str, int] = {}
    for file in weight_files(path):
        with open(file, "rb") as f:
            header, _ = _read_header(f, file)
        for name, info in header.items():
            if name.endswith(IGNORED_SUFFIXES):
                continue
            n = math.prod(info["shape"])
            params += n
            nbytes += info["data_offsets"][1] - info["data_offsets"][0]
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + n
    return {"parameters": params, "bytes": nbytes, "dtypes": dtypes}
