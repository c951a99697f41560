"""Chat templates rendered as transformers renders them: the same sandboxed Jinja environment, filters and globals.

`render_chat` (used by `Tokenizer.apply_chat_template`) renders a template with transformers'
post-processing (generation tags, `continue_final_message`, reasoning fields); `compile_template` caches compiled
templates. Only `jinja2` is needed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nomoat.util.errors import InputError

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

class ChatTemplateError(InputError, ValueError):
    """Raised for a missing chat template, a template's `raise_exception(...)`, or a template that fails to render."""

# --------------------------------------------------------------------------------------------------- chat rendering
def plain_data(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types, as transformers' `_plain_template_data` does.

    Sandboxed templates must not reach methods of rich objects (arrays, images, ...), so anything unknown becomes an
    inert placeholder such as "<ndarray>"; subclasses of str/int/float (enums, numpy scalars) lose their methods.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if type(value).__module__ == "numpy" and type(value).__name__ != "ndarray" and hasattr(value, "item"):
        return plain_data(value.item())  # numpy scalar: np.bool_(False) must stay falsy
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def render_chat(
    template: str,
    chat: list[Any],
    tools: Any,
    documents: Any,
    add_generation_prompt: bool,
    continue_final_message: bool | str,
    context: dict[str, Any],
) -> str:
    """Render one conversation (transformers' `render_jinja_template` for a single chat)."""
    chat = plain_data(chat)
    for message in chat:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
    # Older names for reasoning are copied to `reasoning_content` (and `thinking`, which gpt-oss templates read).
    reasonings = [next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None) for m in chat]
    chat = [m if r is None else {"thinking": r, **m, "reasoning_content": r} for m, r in zip(chat, reasonings)]
    final_message: Any = None
    if continue_final_message:
        if not chat:
            raise ValueError("continue_final_message is set but the conversation is empty!")
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final_message = chat[-1].get(field)
        if final_message is None:
            raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue!')
        fields = [field]
        if field in _REASONING_FIELDS:  # reasoning is copied under several names: tag every copy
            fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_message]
        if not any(f in template for f in fields):
            raise ValueError(f'continue_final_message is set to "{field}" but this is not an accepted field in '
                             "the chat_template")
        if isinstance(final_message, (list, tuple)):
            for block in reversed(final_message):
                if "text" in block:  # continue the last text block
                    final_message = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ValueError("continue_final_message is set but we could not find any text to continue in the "
                                 "final message!")
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    try:
        rendered = compile_template(template).render(
            messages=chat, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt, **context
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"Chat template failed: {e}") from e
    if continue_final_message:
        if final_message.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
            raise ValueError(
                "continue_final_message is set but the final message does not appear in the chat after applying "
                "the chat template! This can happen if the chat template deletes portions of the final message. "
                f"Final message to continue: {final_message.strip()}\nRendered chat:\n{rendered}"
            )
        loc = rendered.rindex(_CONTINUE_TAG.strip())
        # If the template kept the tag's trailing space it preserves spacing; else trailing spaces were trimmed.
        kept = rendered[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG
        rendered = rendered[:loc] if kept else rendered[:loc].rstrip()
    return rendered


def _raise_exception(message: str) -> None:
    """The `raise_exception` global of chat templates."""
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """The `tojson` filter of transformers: plain `json.dumps` (Jinja's own escapes HTML characters)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    """The `strftime_now` global: the current local time, formatted."""
    return datetime.now().strftime(format)


class _TemplateDict:
    """The `dict` global: a limited stand-in so templates cannot reach the real type through attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        """Same as `dict.fromkeys`."""
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A Jinja `namespace` that refuses underscore-prefixed attributes (no route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Same signature trick as Jinja's Namespace, so that `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) and render its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        """Parse the block into a call that just renders its body."""
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


@lru_cache(maxsize=64)
def compile_template(template: str) -> jinja2.Template:
    """Compile a chat template in transformers' sandboxed environment (cached: templates are re-used a lot)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"Chat template has a syntax error: {e}") from e
