"""Decoding's own form of a model: `prepare(model, config) -> DecodeModel`, which the engine owns.

`prepare` is the only place that packs, quantizes and fuses weights for decoding; adapter banks attach to the decode
model's layers.

`panel_linear.py` holds a layer's weights in the kernels' panel layout; `stack.py` builds the one-call decode stack;
`decode_model.py` runs prefill and decode steps; `prepare.py` makes the decode model from the user's.

The decode path, from `nomoat.load` to a token on the wire (who owns what):

    nomoat.load(folder) -> Transformer           the user's: plain modules, HF names (training, export, LoRA see it)
        | pack_model / quantize_model            optional, in place, for a model loaded only to generate: its
        |                                        linear layers then hold their weights once (panels / int8 codes)
    Engine(model, tok, ...)                      generate/engine.py: scheduler, KV cache, sampling, stop strings
        | prepare(model, DecodeConfig)           here: the twin's layers in decode form (PanelLinear sharing a
        v                                        PackedLinear's panels), embeddings and norms shared
    DecodeModel  (engine.decode)                 owned by the engine; AdapterBank(decode.net) wraps the twin's
        |   prefill: twin layers, SDPA           layers, never the user's; plan = StackPlan over the twin's panels
        |   decode:  StackPlan.run (one C++ call for all layers and rows; torch.ops.nomoat / torch.classes.nomoat)
        v            or the twin's layer loop (torch attention) where the stack does not apply
    logits (B, V) -> each row's logits_hook -> sample -> detokenize -> Delta -> serve (SSE) / chat / generate
"""

from nomoat.inference.decode_model import DecodeModel
from nomoat.inference.panel_linear import PanelLinear
from nomoat.inference.prepare import DecodeConfig, decode_layer, prepare

__all__ = ["DecodeConfig", "DecodeModel", "PanelLinear", "decode_layer", "prepare"]
