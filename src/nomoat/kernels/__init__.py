"""nomoat's compiled CPU kernels as torch operators (`torch.ops.nomoat.*`), each with a plain-PyTorch reference.

What it owns: the C++ sources (`csrc/`: vector helpers, panel GEMV templates, one file per op family, one registration
file), their build for this CPU (`build.py`: run-time CPU feature detection, `torch.utils.cpp_extension.load`), the
ops' Python face (`ops.py`: the compiled op, or its reference where the build is impossible), the references
(`reference.py`), the panel weight layout (`layout.py`) and huge-page tensors (`hugepages.py`). It knows nothing of
models: `models` and `inference` call it. `NOMOAT_KERNELS=0` turns the compiled kernels off.
"""

from nomoat.kernels.layout import (
    I8_BLOCK,
    MAX_ROWS,
    PANEL,
    Q4_BLOCK,
    dequantize_int8,
    dequantize_q4,
    pack_bf16,
    pack_fp32,
    pack_int8,
    pack_q4,
    unpack,
    unpack_bf16,
    unpack_int8,
    unpack_q4,
)
from nomoat.kernels.ops import (
    available,
    decode_attention,
    int8_dot,
    isa,
    linear_bf16,
    linear_bf16_rows,
    linear_fp32,
    linear_int8,
    linear_q4,
    lora_rows_,
    rope,
    softmax_xent_,
    stack_plan,
    swiglu_backward,
    swiglu_forward,
)

__all__ = [
    "I8_BLOCK",
    "MAX_ROWS",
    "PANEL",
    "Q4_BLOCK",
    "available",
    "decode_attention",
    "dequantize_int8",
    "dequantize_q4",
    "int8_dot",
    "isa",
    "linear_bf16",
    "linear_bf16_rows",
    "linear_fp32",
    "linear_int8",
    "linear_q4",
    "lora_rows_",
    "pack_bf16",
    "pack_fp32",
    "pack_int8",
    "pack_q4",
    "rope",
    "softmax_xent_",
    "stack_plan",
    "swiglu_backward",
    "swiglu_forward",
    "unpack",
    "unpack_bf16",
    "unpack_int8",
    "unpack_q4",
]
