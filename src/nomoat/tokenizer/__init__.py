"""Tokenizers and chat templates for Hugging Face model folders, equal to transformers' `AutoTokenizer`.

`Tokenizer.from_dir(folder)` encodes and decodes through `tokenizers` (core.py); `apply_chat_template` renders with
the same sandboxed Jinja environment and post-processing as transformers (chat_template.py). Only `tokenizers` and
`jinja2` are needed: transformers is a test oracle, never a dependency.
"""

from nomoat.tokenizer.chat_template import ChatTemplateError
from nomoat.tokenizer.core import SPECIAL_TOKEN_NAMES, IncrementalDetokenizer, Tokenizer, TokenizerNotFoundError

__all__ = ["SPECIAL_TOKEN_NAMES", "ChatTemplateError", "IncrementalDetokenizer", "Tokenizer", "TokenizerNotFoundError"]
