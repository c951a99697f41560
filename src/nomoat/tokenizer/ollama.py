"""Ollama's Go chat templates converted to the Jinja that `Tokenizer.apply_chat_template` renders.

`go_template_to_jinja` handles the common forms (`.System`, `.Prompt`, `if/else/end`, `range .Messages`); anything
else raises, and the caller keeps the GGUF's own `tokenizer.chat_template`.
"""

from __future__ import annotations

import re

# ---- Go templates -> Jinja ----------------------------------------------------------------------------------------

_VARS = {".System": "system", ".Prompt": "prompt", ".Response": "''", ".Content": "m.content", ".Role": "m.role",
         "$.System": "system"}  # fmt: skip
_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}", re.S)


def _expr(go: str) -> str:
    go = go.strip()
    if go in _VARS:
        return _VARS[go]
    if go.startswith("eq "):
        a, b = go[3:].split(None, 1)
        return f"{_expr(a)} == {b}"
    if go.startswith("and ") or go.startswith("or "):
        op, *args = go.split()
        return f" {op} ".join(_expr(a) for a in args)
    if go.startswith("not "):
        return f"not {_expr(go[4:])}"
    if go.startswith('"') or go.startswith("'"):
        return go
    raise ValueError(f"Go template expression {go!r}")


def go_template_to_jinja(template: str) -> str:
    """Convert an Ollama Go chat template to a Jinja chat template over `messages`.

    Handles `{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}`, `{{ if ... }}/{{ else }}/{{ end }}` with `eq`,
    `and`, `or`, `not`, and `{{ range .Messages }}` with `.Role` / `.Content`. Templates without a range over
    messages render each user turn (with the system prompt once) as Ollama does.

    Raises:
        ValueError: a construct outside those forms (the caller then keeps the GGUF's own template).
    """
    out, pos, stack = [], 0, []
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(0).startswith("{{-"):
            text = text.rstrip()
        out.append(text.replace("{", "{{ '{' }}") if "{" in text else text)
        pos = m.end()
        if m.group(0).endswith("-}}"):
            while pos < len(template) and template[pos].isspace():
                pos += 1
        action = m.group(1)
        if action.startswith("if "):
            out.append(f"{{% if {_expr(action[3:])} %}}")
            stack.append("if")
        elif action.startswith("else if "):
            out.append(f"{{% elif {_expr(action[8:])} %}}")
        elif action == "else":
            out.append("{% else %}")
        elif action == "end":
            out.append("{% endfor %}" if stack.pop() == "range" else "{% endif %}")
        elif action in (".Messages", "range .Messages") or action.startswith("range $"):
            if not action.startswith("range"):
                raise ValueError(action)
            out.append("{% for m in messages %}")
            stack.append("range")
        elif action.startswith("/*"):
            continue
        else:
            out.append(f"{{{{ {_expr(action)} }}}}")
    out.append(template[pos:])
    out.append("{{ '' }}")  # Jinja drops a template's final newline; Go keeps it
    if stack:
        raise ValueError("unbalanced Go template")
    body = "".join(out)
    if "{% for m in messages %}" in body:
        head = "{% set system = messages[0].content if messages and messages[0].role == 'system' else '' %}"
        return head + body
    # A per-turn template: Ollama renders it once per user message, with the system prompt on the first one.
    return (
        "{% set ns = namespace(system=(messages[0].content if messages and messages[0].role == 'system' else '')) %}"
        "{% for m in messages %}{% if m.role == 'user' %}{% set system = ns.system %}{% set prompt = m.content %}"
        + body
        + "{% set ns.system = '' %}{% elif m.role == 'assistant' %}{{ m.content }}{% endif %}{% endfor %}"
    )
