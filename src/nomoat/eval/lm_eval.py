"""lm-evaluation-harness on nomoat's engine: an lm-eval model (`NomoatLM`), and `run_tasks` for local task files.

`run_tasks` runs tasks given as local YAML files (lm-eval's task format, with their own data files), offline.

`NomoatLM` scores with the engine's decode model (prompt token logprobs, the adapter selection applied) and
generates with the engine (continuous batching over the requests). Contexts are tokenized as lm-eval's `hf` backend
does (the tokenizer's own special tokens added, as its `encode` does by default; trailing spaces moved to the
continuation), so scores compare one to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nomoat.generate.engine import AdapterSelection, Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.generate.scoring import prompt_logprobs
from nomoat.util.errors import UsageError

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the extra is not installed: run_tasks says how to get it
    TemplateLM = object  # type: ignore[assignment,misc]

INSTALL_HINT = "pip install lm-eval"


class NomoatLM(TemplateLM):  # type: ignore[misc,valid-type]
    """An lm-eval language model over a nomoat `Engine` (and an adapter selection).

    Args:
        engine: The engine (its tokenizer encodes contexts).
        adapter: The adapter selection every request uses (empty: the base model).
        max_gen_tokens: Default generation length of `generate_until` requests.
    """

    def __init__(self, engine: Engine, adapter: AdapterSelection = (), max_gen_tokens: int = 256) -> None:
        super().__init__()
        self.engine = engine
        self.adapter = tuple(adapter)
        self.max_gen_tokens = max_gen_tokens
        self.tok = engine.tokenizer

    @property
    def eot_token_id(self) -> int:  # noqa: D102
        eos = self.tok.eos_token_ids
        return eos[0] if eos else 0

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:  # noqa: D102
        return self.tok.encode(string, add_special_tokens=True if add_special_tokens is None else add_special_tokens)

    def _loglikelihood_tokens(self, requests: Sequence[Any], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:  # fmt: skip
        out = []
        for _, context, continuation in requests:
            ids = (list(context) + list(continuation))[-self.engine.max_seq_len:]
            lps = prompt_logprobs(self.engine, ids, self.adapter, top=1)[-len(continuation):]
            total = sum(lp.logprob for lp in lps if lp is not None)
            greedy = all(lp is not None and lp.top and lp.top[0][0] == lp.token_id for lp in lps)
            out.append((total, greedy))
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:  # noqa: D102
        out = []
        for req in requests:
            ids = [self.eot_token_id, *self.tok_encode(req.args[0])]
            if len(ids) > self.engine.max_seq_len:
                raise ValueError(f"a document of {len(ids)} tokens is longer than the engine's rows "
                                 f"({self.engine.max_seq_len}); rolling windows are not implemented")  # fmt: skip
            out.append(sum(lp.logprob for lp in prompt_logprobs(self.engine, ids, self.adapter)[1:]))
        return out

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:  # noqa: D102
        handles = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_tokens))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-(self.engine.max_seq_len - max_new - 1):]
            params = SamplingParams(temperature=temperature, max_new_tokens=max_new, stop=until)
            handles.append(self.engine.submit(ids, params, adapter=self.adapter))
        return [h.result().text for h in handles]


def run_tasks(engine: Engine, task_files: Sequence[str | Path], adapter: AdapterSelection = (),
              limit: int | None = None, num_fewshot: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Run lm-eval tasks defined in local YAML files against the engine; returns lm-eval's results dict.

    Raises:
        UsageError: lm-eval is not installed, or a task file does not exist.
    """
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError("lm-eval is not installed", INSTALL_HINT) from None
    paths = [Path(f) for f in task_files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"no such task file: {missing[0]}", "give lm-eval task YAML files")
    import yaml

    names = [yaml.safe_load(p.read_text(encoding="utf-8"))["task"] for p in paths]
    manager = TaskManager(include_path=sorted({str(p.parent) for p in paths}), include_defaults=False)
    lm = NomoatLM(engine, adapter)
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                   log_samples=True)  # fmt: skip
