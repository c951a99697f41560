"""`PrefixCache`: keys and values of prompt prefixes shared by requests, computed once and reused by the engine.

Prompts are cut into blocks of `block` tokens; block i is identified by a hash chained over blocks 0..i (and rooted in
the adapter selection), so two prompts share a cached block exactly when they share every token up to its end. After
a prefill the engine stores the row's full prompt blocks; before the next it copies the longest cached run into the
new row and runs only the rest of the prompt. Blocks are evicted least recently used first within a byte budget.

`fork_row` shares a whole prompt between running rows: the `n` samples of one request are prefilled once, and the
other rows copy that row's keys and values (`find_twin` finds it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from nomoat.models.kv_cache import KVCache


class PrefixCache:
    """A bounded store of per-block keys/values, keyed by chained token hashes.

    Args:
        max_bytes: Budget for stored keys and values.
        block: Tokens per block (prefixes are matched in whole blocks).
    """

    def __init__(self, max_bytes: int, block: int = 16) -> None:
        self.max_bytes = max_bytes
        self.block = block
        # hash -> (parent hash, block tokens, keys, values): the tokens and parent are checked on every hit, so a hash
        # collision can never splice another prompt's keys into a row.
        self.blocks: OrderedDict[int, tuple[int, tuple[int, ...], torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.hits = 0  # prompt tokens served from the cache, for metrics

    @staticmethod
    def _root(namespace: Hashable) -> int:
        """The chain's starting hash: prompts under different namespaces (adapter selections) never share blocks."""
        return hash(("namespace", namespace)) if namespace else 0

    def _hashes(self, prompt: Sequence[int], n_blocks: int, namespace: Hashable = ()) -> list[int]:
        out, h = [], self._root(namespace)
        for i in range(n_blocks):
            h = hash((h, tuple(prompt[i * self.block : (i + 1) * self.block])))
            out.append(h)
        return out

    def restore(self, prompt: Sequence[int], cache: KVCache, row: int, namespace: Hashable = ()) -> int:
        """Copy the longest cached prefix of `prompt` into cache row `row`.

        At least the last prompt token is always left to compute (its logits start the completion).

        Returns:
            How many leading prompt tokens are now in the row.
        """
        usable = (len(prompt) - 1) // self.block
        n, parent = 0, self._root(namespace)
        for i, h in enumerate(self._hashes(prompt, usable, namespace)):
            entry = self.blocks.get(h)
            lo, hi = i * self.block, (i + 1) * self.block
            if entry is None or entry[0] != parent or entry[1] != tuple(prompt[lo:hi]):
                break
            self.blocks.move_to_end(h)
            parent = h
            k, v = entry[2], entry[3]  # (layers, n_kv, block, hd)
            for layer in range(len(cache.k)):
                cache.k[layer][row, :, lo:hi] = k[layer]
                cache.v[layer][row, :, lo:hi] = v[layer]
            n = hi
        self.hits += n
        return n

    def store(self, prompt: Sequence[int], cache: KVCache, row: int, namespace: Hashable = ()) -> None:
        """Remember the full prompt blocks of a freshly prefilled row (under `namespace`, e.g. its adapters)."""
        parent = self._root(namespace)
        for i, h in enumerate(self._hashes(prompt, len(prompt) // self.block, namespace)):
            parent, prev = h, parent
            if h in self.blocks:
                self.blocks.move_to_end(h)
                continue
            lo, hi = i * self.block, (i + 1) * self.block
            k = torch.stack([cache.k[layer][row, :, lo:hi] for layer in range(len(cache.k))])
            v = torch.stack([cache.v[layer][row, :, lo:hi] for layer in range(len(cache.v))])
            size = 2 * k.numel() * k.element_size()
            if size > self.max_bytes:
                return
            while self.bytes + size > self.max_bytes and self.blocks:
                _, (_, _, ok, ov) = self.blocks.popitem(last=False)
                self.bytes -= ok.numel() * ok.element_size() + ov.numel() * ov.element_size()
            self.blocks[h] = (prev, tuple(prompt[lo:hi]), k, v)
            self.bytes += size


def find_twin(req: Any, rows: Sequence[Any], pending: Sequence[Any] = ()) -> int | None:
    """The index in `rows` of the first other request with `req`'s prompt and adapters (None: there is none).

    Requests in `pending` (not prefilled yet) are skipped. Requests are the engine's: anything with `prompt` (token
    ids) and `adapter` (its selection).
    """
    for i, row in enumerate(rows):
        if row is not req and row.prompt == req.prompt and row.adapter == req.adapter and not any(
            row is p for p in pending
        ):
            return i
    return None


def fork_row(cache: KVCache, rows: Sequence[Any], req: Any, pending: Sequence[Any] = ()) -> int:
    """Copy the keys and values of `req`'s prompt, all but its last token, from a prefilled twin row into its own.

    Args:
        cache: The engine's cache; request i of `rows` owns its row i.
        rows: The running requests (`req` among them).
        req: The request to fork.
        pending: Requests whose rows hold no keys and values yet.

    Returns:
        How many leading prompt tokens are now in `req`'s row (0 when no twin is prefilled).
    """
    src = find_twin(req, rows, pending)
    if src is None:
        return 0
    dst, n = rows.index(req), len(req.prompt) - 1
    for layer in range(len(cache.k)):
        cache.k[layer][dst, :, :n] = cache.k[layer][src, :, :n]
        cache.v[layer][dst, :, :n] = cache.v[layer][src, :, :n]
    return n
