"""`ByteLRU`: a thread-safe least-recently-used store bounded by the bytes of what it holds, with
hit, miss and eviction counters. The base of the two caches of a cloned voice's prefix: the
talker's prompt-prefix KV (`prefix_cache.PrefixCache`) and the codec decoder's state after the
reference codes (`codec.streaming.PrefixStates`)."""
from __future__ import annotations

import collections
import threading

import jax


class ByteLRU:
    """Values (pytrees; their size is the sum of their leaves' `nbytes`) under bytes keys, at most
    `max_bytes` in all (0: disabled, `enabled` False: the owner stores nothing). A value larger
    than the bound is never stored; storing one evicts the least recently used until it fits."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self._entries: collections.OrderedDict = collections.OrderedDict()  # key -> (value, bytes)
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0
        self.bytes = 0
        self.largest = 0        # the largest value stored so far (bytes)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def has_room(self) -> bool:
        """Whether a value as large as the largest stored so far would fit without evicting
        (True when disabled: nothing is stored, nothing evicted)."""
        return not self.enabled or self.max_bytes - self.bytes >= self.largest

    def lookup(self, key: bytes):
        """The value stored under `key` (now the most recently used) or None; counts a hit or a
        miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def store(self, key: bytes, value) -> None:
        """Keep `value` under `key` unless it is larger than `max_bytes` or the key is held
        already (another thread stored it first)."""
        size = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(value))
        with self._lock:
            if size > self.max_bytes or key in self._entries:
                return
            self._entries[key] = (value, size)
            self.bytes += size
            self.largest = max(self.largest, size)
            while self.bytes > self.max_bytes:
                _, (_, n) = self._entries.popitem(last=False)
                self.bytes -= n
                self.evictions += 1

    def counters(self, prefix: str) -> dict:
        """The counters as flat stats keys `<prefix>_hits`, ... (summable over devices)."""
        return {f"{prefix}_hits": self.hits, f"{prefix}_misses": self.misses,
                f"{prefix}_evictions": self.evictions, f"{prefix}_entries": len(self),
                f"{prefix}_bytes": self.bytes}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
