"""A chat session over the engine and its terminal front end (`nomoat chat`).

`ChatSession` keeps the history and system prompt and renders each turn with the model's chat template (the engine's
prefix cache spares earlier turns); `run_terminal_chat` drives any `ChatBackend` (this one, or
`nomoat.generate.remote.RemoteChatSession`) with `/reset`, `/system` and `/exit`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Protocol, TextIO

from nomoat.generate.engine import Completion, Delta, Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.lora.selection import AdapterSelection
from nomoat.models.transformer import Transformer
from nomoat.tokenizer import Tokenizer
from nomoat.util.errors import NomoatError

HELP = "Commands: /reset  forget the conversation · /system TEXT  set the system prompt · /exit  quit"


class ChatTurnError(NomoatError, RuntimeError):
    """One turn failed (a server refused it, say): the terminal reports it and the conversation goes on."""


class ChatBackend(Protocol):
    """What the terminal chat needs from a conversation: `ChatSession` (local) or `RemoteChatSession` (a server)."""

    system: str | None

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""

    def set_system(self, text: str | None) -> None:
        """Set (or clear, with None or "") the system prompt."""

    def send(self, text: str) -> Iterator[Delta | Completion]:
        """Add a user message and stream the answer: `Delta`s, then one `Completion`."""


class ChatHistory:
    """A conversation's system prompt and turns, shared by the local and the remote chat sessions."""

    system: str | None
    messages: list[dict[str, str]]

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = []

    def set_system(self, text: str | None) -> None:
        """Set (or clear, with None or "") the system prompt."""
        self.system = text or None

    def conversation(self) -> list[dict[str, str]]:
        """The messages sent to the template: system prompt (if any) then the history."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages


class ChatSession(ChatHistory):
    """A conversation with one model: each turn renders the whole history with the model's chat template.

    The engine's prefix cache keeps earlier turns' keys and values, so a new turn only computes its new tokens.

    Args:
        model: The model.
        tokenizer: Its tokenizer, with a chat template.
        params: Sampling parameters for every answer.
        system: Optional system prompt.
        engine: An engine to reuse (default: a one-row engine with prefix caching).
        adapter: The adapters every answer runs with, loaded in the engine's bank (default: the base model).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        params: SamplingParams,
        system: str | None = None,
        engine: Engine | None = None,
        adapter: AdapterSelection | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.adapter = AdapterSelection.of(adapter)
        self.params = params
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.engine = engine or Engine(model, tokenizer, max_running=1)

    def send(self, text: str) -> Iterator[Delta | Completion]:
        """Add a user message and stream the answer; the answer joins the history when it completes."""
        self.messages.append({"role": "user", "content": text})
        prompt = self.tokenizer.apply_chat_template(self.conversation(), add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        for event in self.engine.stream(ids, self.params, adapter=self.adapter):
            if isinstance(event, Completion):
                self.messages.append({"role": "assistant", "content": event.text})
            yield event


def read_message(read: Callable[[str], str]) -> str | None:
    """Read one message: a line; a line ending in a backslash continues; a `\"\"\"` line opens a block.

    Returns:
        The message, or None at end of input.
    """
    try:
        line = read("you> ")
    except EOFError:
        return None
    if line.strip() == '"""':
        lines = []
        while True:
            try:
                nxt = read("... ")
            except EOFError:
                break
            if nxt.strip() == '"""':
                break
            lines.append(nxt)
        return "\n".join(lines)
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(read("... "))
        except EOFError:
            break
    return "\n".join(lines)


def run_terminal_chat(session: ChatBackend, read: Callable[[str], str] = input, out: TextIO | None = None) -> None:
    """The interactive loop of `nomoat chat`, over a local model or a server.

    Args:
        session: The conversation: a local `ChatSession` or a `nomoat.generate.remote.RemoteChatSession`.
        read: Reads one line after printing a prompt (`input` by default; raises EOFError at the end).
        out: Where answers go (default: stdout).
    """
    out = out or sys.stdout
    out.write(f"{HELP}\n")
    if session.system:
        out.write(f"(system prompt: {session.system})\n")
    while True:
        message = read_message(read)
        if message is None:
            out.write("\n")
            return
        stripped = message.strip()
        if not stripped:
            continue
        if stripped in ("/exit", "/quit"):
            return
        if stripped == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
            continue
        if stripped.startswith("/system"):
            session.set_system(stripped[len("/system") :].strip())
            out.write(f"(system prompt {'set' if session.system else 'cleared'})\n")
            continue
        if stripped.startswith("/"):
            out.write(f"(unknown command {stripped.split()[0]}) {HELP}\n")
            continue
        out.write("bot> ")
        try:
            for event in session.send(message):
                if isinstance(event, Delta):
                    out.write(event.text)
                    out.flush()
                else:
                    rate = f"{event.decode_tokens_per_s:.1f} tok/s" if event.decode_tokens_per_s else "-"
                    out.write(f"\n[{event.completion_tokens} tokens · {rate} · {event.finish_reason}]\n")
        except ChatTurnError as e:
            out.write(f"\n(error: {e})\n")
