"""The KV of prompt prefixes, so that requests sharing one (a system prompt, a chat history, an evaluation's shared
context) compute it once. Prefixes are whole blocks of tokens, found by a hash chained block by block, and kept
least recently used first out within a capacity in cached positions.

H = KV heads, P = a prefix's positions, Dh = head dim
"""

import collections
import threading
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (keys, values) [1, H, P, Dh]


@dataclass
class _Entry:
    ids: tuple[int, ...]
    kv: KV


class PrefixCache:
    def __init__(self, capacity: int, block: int = 16):
        self.capacity, self.block = capacity, block
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()  # by id, oldest use first
        self._by_prefix: dict[int, tuple[int, int]] = {}  # chained hash -> (entry id, prefix length)
        self._next_id, self.size = 0, 0
        self.asked = self.found = 0  # prompt positions looked up, and found cached
        self._lock = threading.Lock()  # the engine's lanes step in threads of their own

    def lookup(self, ids: list[int]) -> tuple[int, KV]:
        """The longest cached prefix of `ids` that leaves at least its last token to compute: (its length, its
        KV, each layer's [1, H, P, Dh] views); (0, []) when none is cached."""
        with self._lock:
            return self._lookup(ids)

    def insert(self, ids: list[int], kv: KV) -> None:
        """Keep the whole blocks of `ids`, whose KV is `kv` (each layer's [1, H, >= len(ids), Dh], from position 0)."""
        with self._lock:
            self._insert(ids, kv)

    def _lookup(self, ids: list[int]) -> tuple[int, KV]:
        self.asked += len(ids)
        best = None
        for length, key in self._chain(ids[:-1]):
            hit = self._by_prefix.get(key)
            if hit is None:
                break
            entry = self._entries.get(hit[0])
            if entry is None or entry.ids[:length] != tuple(ids[:length]):
                break
            best = (hit[0], length)
        if best is None:
            return 0, []
        entry_id, length = best
        self._entries.move_to_end(entry_id)
        self.found += length
        return length, [(k[:, :, :length], v[:, :, :length]) for k, v in self._entries[entry_id].kv]

    def _insert(self, ids: list[int], kv: KV) -> None:
        length = len(ids) // self.block * self.block
        if not length or length > self.capacity:
            return
        known, owner = self._known(ids[:length])
        if known == length:
            self._entries.move_to_end(owner)
            return
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._entries[entry_id] = _Entry(tuple(ids[:length]),
                                         [(k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in kv])
        self.size += length
        for prefix, key in self._chain(ids[:length]):
            self._by_prefix[key] = (entry_id, prefix)
        while self.size > self.capacity:
            self._evict()

    def _known(self, ids: list[int]) -> tuple[int, int | None]:
        length, owner = 0, None
        for prefix, key in self._chain(ids):
            hit = self._by_prefix.get(key)
            if hit is None or hit[0] not in self._entries:
                break
            length, owner = prefix, hit[0]
        return length, owner

    def _evict(self) -> None:
        entry_id, entry = self._entries.popitem(last=False)
        self.size -= len(entry.ids)
        for _, key in self._chain(list(entry.ids)):
            if self._by_prefix.get(key, (None,))[0] == entry_id:
                del self._by_prefix[key]

    def _chain(self, ids: list[int]):
        """(prefix length, hash) at each whole block of `ids`, the hash chained from the blocks before it."""
        key = 0
        for end in range(self.block, len(ids) + 1, self.block):
            key = hash((key, tuple(ids[end - self.block:end])))
            yield end, key
