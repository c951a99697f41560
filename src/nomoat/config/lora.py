"""LoRA adapter configuration: the knobs of a low-rank adapter, in the vocabulary of PEFT's `LoraConfig`.

Plain data: it serializes to a dict (and so to YAML or JSON) and validates itself on construction, so a bad value
fails where it was written, with a message naming the run file's key (`lora.r`) and `nomoat train`'s flag (`--rank`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Every linear layer of an attention block and a gated MLP, under Hugging Face's names.
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_LINEAR = "all-linear"
INITS = ("default", "gaussian")
# field -> `nomoat train`'s flag for it (error messages name the run file's key `lora.NAME` and the flag).
FLAGS = {
    "r": "--rank", "alpha": "--alpha", "dropout": "--dropout", "target_modules": "--target", "use_rslora": "--rslora",
    "use_dora": "--dora", "modules_to_save": "--train-module",
}  # fmt: skip


def _bad(name: str, problem: str) -> ValueError:
    """The error for a bad value of field `name`, worded with the names a user writes."""
    flag = f" ({FLAGS[name]} on the command line)" if name in FLAGS else ""
    return ValueError(f"lora.{name} {problem}{flag}")


@dataclass
class LoRAConfig:
    """A LoRA (or DoRA) adapter: which layers get one, its rank, and its scaling.

    Attributes:
        r: Rank of the update `B @ A` (a positive integer).
        alpha: The update is scaled by `alpha / r` (or `alpha / sqrt(r)` with `use_rslora`).
        dropout: Dropout probability on the adapter's input during training, in [0, 1).
        target_modules: Names of the linear layers that get an adapter, matched against the end of each module's full
            name (`"q_proj"` matches `model.layers.0.self_attn.q_proj`), as PEFT does; or the string `"all-linear"`
            for every linear layer except the output head. Default: all attention and MLP projections.
        use_rslora: Rank-stabilised scaling `alpha / sqrt(r)`.
        use_dora: Weight-decomposed LoRA (DoRA): a learned magnitude per output channel.
        modules_to_save: Modules trained in full and saved with the adapter (e.g. `["embed_tokens", "lm_head"]`).
        bias: Only `"none"` (biases stay frozen), as in PEFT's default.
        init: `"default"` (A Kaiming-uniform, B zero: PEFT's `init_lora_weights=True`) or `"gaussian"`
            (A normal with std `1/r`, B zero).
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(ALL_PROJECTIONS))
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    bias: str = "none"
    init: str = "default"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise _bad("r", f"must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise _bad("alpha", f"must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise _bad("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise _bad("target_modules", "is empty: name at least one layer, or use 'all-linear'")
        else:
            self.target_modules = list(self.target_modules)
            if ALL_LINEAR in self.target_modules:  # `--target all-linear` on the command line gives a list
                if len(self.target_modules) > 1:
                    raise _bad("target_modules", f"'{ALL_LINEAR}' already selects every linear layer: give it alone, "
                               f"got {self.target_modules!r}")  # fmt: skip
                self.target_modules = ALL_LINEAR
            elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise _bad("target_modules", "must be a non-empty list of layer names or 'all-linear', "
                           f"got {self.target_modules!r}")  # fmt: skip
        self.modules_to_save = list(self.modules_to_save or [])
        if not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise _bad("modules_to_save", f"must be a list of module names, got {self.modules_to_save!r}")
        if self.bias != "none":
            raise _bad("bias", f"must be 'none' (biases stay frozen), got {self.bias!r}")
        if self.init not in INITS:
            raise _bad("init", f"must be one of {', '.join(INITS)}, got {self.init!r}")
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, f"must be true or false, got {getattr(self, name)!r}")

    @property
    def scaling(self) -> float:
        """The factor applied to `B @ A x`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-serializable data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        """Build a config from `to_dict` output.

        Raises:
            ValueError: an unknown key (a typo would otherwise be silently ignored) or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown lora keys: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return cls(**data)
