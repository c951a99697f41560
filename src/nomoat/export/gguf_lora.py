"""`export_gguf_lora`: a PEFT LoRA adapter as a GGUF adapter file (llama.cpp's `--lora`, Ollama's `ADAPTER`).

The layout is what llama.cpp's `convert_lora_to_gguf.py` writes: `general.type = "adapter"`, `adapter.type = "lora"`,
`adapter.lora.alpha`, and for each adapted base weight `W`, `<W>.lora_a` (A, `r x in`) and `<W>.lora_b` (B,
`out x r`). llama.cpp computes `W x + (alpha / r) * B A x` with `r` from A's shape, so rsLoRA's scaling is written as
the equivalent alpha (`alpha * sqrt(r)`; llama.cpp's own converter gets this wrong), and B of q/k gets the base's row
permutation. DoRA and `modules_to_save` have no llama.cpp equivalent and are refused: export a merged model instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import torch
from safetensors import safe_open

from nomoat.export.gguf import (
    OUTTYPES,
    Progress,
    check_outtype,
    gguf_arch,
    hf_to_gguf_name,
    to_llamacpp_layout,
    write_atomically,
    write_tensors,
)
from nomoat.export.merged import ExportError
from nomoat.lora.peft_format import AdapterError, read_adapter_config, weights_file
from nomoat.models.checkpoint import CheckpointError, load_config
from nomoat.models.families import UnsupportedModelError
from nomoat.util.hub import local_path

# A PEFT LoRA tensor key: base_model.model.<module>.lora_A[.<adapter name>].weight
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def read_lora_pairs(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The adapter's tensors as `{module path: {"A": A, "B": B}}` (module paths as in the base checkpoint).

    Raises:
        ExportError: Tensors llama.cpp adapters cannot hold (DoRA magnitudes, embedding LoRA, full modules), or a
            layer with A but no B.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_file(adapter_dir)), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            match = _LORA_KEY.match(key)
            if match is None:
                raise ExportError(
                    f"{adapter_dir}: tensor {key} is not a LoRA A/B matrix (a DoRA magnitude, an embedding LoRA or a "
                    "fully trained module), which llama.cpp's adapter format cannot hold; export a merged model "
                    "instead (--format gguf --adapter ...)"
                )
            pairs.setdefault(match["module"], {})[match["ab"]] = f.get_tensor(key)
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ExportError(f"{adapter_dir}: {module} has lora_{''.join(ab)} without its pair")
    return pairs


def export_gguf_lora(
    model_dir: str | Path,
    adapter_dir: str | Path,
    out_file: str | Path,
    outtype: str = "f16",
    scale: float = 1.0,
    progress: Progress | None = None,
) -> Path:
    """Write a PEFT LoRA adapter as a GGUF LoRA adapter for llama.cpp (`--lora`) and Ollama (`ADAPTER`).

    Only the base model's `config.json` is read (for the architecture, tensor names and head counts), not its
    weights. Apply the file to a GGUF of the same base model (e.g. one written by `export_gguf` without adapters).

    Args:
        model_dir: The base model folder the adapter was trained on.
        adapter_dir: The PEFT-format adapter folder (`adapter_config.json`, `adapter_model.safetensors`).
        out_file: The `.gguf` file to write (replaced atomically if it exists).
        outtype: `f32`, `f16` or `q8_0` for A and B (q8_0 falls back to f16 for matrices whose rows are not a
            multiple of 32 values, e.g. B with a rank below 32).
        scale: Baked into B (`B * scale`), like the weight of a stacked adapter; llama.cpp's `--lora-scaled` can
            scale it further at run time.
        progress: Called with (bytes written, total bytes) after each tensor.

    Returns:
        The written file.

    Raises:
        ExportError: An unsupported family, an adapter that is not plain LoRA (DoRA, modules_to_save, embedding
            LoRA), a LoRA on a tied output head (llama.cpp has no separate head to adapt), or unreadable files.
    """
    check_outtype(outtype)
    model_dir, adapter_dir = Path(local_path(Path(model_dir).expanduser())), Path(adapter_dir).expanduser()
    try:
        cfg = load_config(model_dir)
        arch = gguf_arch(cfg)
        lora = read_adapter_config(adapter_dir)
        if lora.use_dora:
            raise ExportError(f"{adapter_dir}: a DoRA adapter has no llama.cpp equivalent; export a merged model "
                              "instead (--format gguf --adapter ...)")  # fmt: skip
        pairs = read_lora_pairs(adapter_dir)
    except (CheckpointError, AdapterError, UnsupportedModelError) as e:
        raise ExportError(str(e)) from e
    if cfg.tie_word_embeddings and "lm_head" in pairs:
        raise ExportError(
            f"{adapter_dir}: the adapter has a LoRA on lm_head, but this model's head is tied to the embeddings, so "
            "its GGUF has no output weight to adapt; export a merged model instead"
        )
    tensor_map = gguf.get_tensor_name_map(arch, cfg.num_layers)
    # llama.cpp scales by alpha / r, r read from A: the alpha that reproduces the adapter's own scaling.
    alpha = lora.scaling * lora.r

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(adapter_dir.name)
        writer.add_basename(adapter_dir.name)
        writer.add_file_type(OUTTYPES[outtype][0])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tensors: list[tuple[str, Callable[[], torch.Tensor], Sequence[int]]] = []
        for module, ab in sorted(pairs.items()):
            a, b = ab["A"].float(), ab["B"].float() * scale
            if a.shape[0] != lora.r or b.shape[1] != lora.r:
                raise ExportError(f"{adapter_dir}: {module} has rank {a.shape[0]}, the config says r={lora.r}")
            name = hf_to_gguf_name(f"{module}.weight", tensor_map)
            b = to_llamacpp_layout(f"{module}.weight", b, cfg, arch)
            tensors.append((f"{name}.lora_a", lambda t=a: t, tuple(a.shape)))
            tensors.append((f"{name}.lora_b", lambda t=b: t, tuple(b.shape)))
        write_tensors(writer, tensors, outtype, tmp, progress)

    return write_atomically(out_file, write)
