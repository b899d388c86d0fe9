"""KV prefix cache: a cloned voice's request-independent prompt prefix prefilled once and reused.

An ICL clone's prompt starts with positions that do not depend on the text to speak
(`prompts.Prompt.prefix_len`: role, codec prefix with the language id and the x-vector, and the
first len(reference transcript) ICL rows). Their KV is computed once (`generate.prefix_kv`: batch
1, positions 0..P-1) and kept on the device; a later request with the same prefix writes it into
its rows' cache slots and prefills only the rest (`generate.prefill` / `insert` with a
`generate.Prefix`). The reference frames after the transcript's length are not in the prefix:
the official layout sums the request's text into them (streaming mode) or puts them after it
(non-streaming mode), so they are prefilled per request.

Entries are keyed by the prefix's content (its text and codec ids, the x-vector's position and
bytes), its bucket, the weights' dtype and the static `Options`: no voice registry is needed and
a different voice, language, reference or transcript can never be served another one's KV. One
cache belongs to one model's weights on one device (`Qwen3TTS.prefix_cache`). The cache is an LRU
bounded in bytes (`max_bytes`; 0 disables it), with hit, miss and eviction counters.
"""
from __future__ import annotations

import hashlib

import jax.numpy as jnp
import numpy as np

from . import generate as gen, layers
from .buckets import ladder
from .lru import ByteLRU
from .prompts import Prompt

DEFAULT_MAX_BYTES = 256 * 2 ** 20   # about 28 voices of 5 s at 0.6B/1.7B in float32 (~9 MiB each)


def prefix_bucket(n: int) -> int:
    """The slots a stored prefix of n positions gets (few compiled `prefix_kv` shapes):
    `buckets.ladder`."""
    return ladder(n)


class PrefixCache(ByteLRU):
    """An LRU of prompt-prefix KV (`generate.prefix_kv`), a `ByteLRU` bounded by `max_bytes` (0:
    disabled, nothing stored, every lookup computes nothing and returns None). Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        super().__init__(max_bytes)

    def stats(self) -> dict:
        """Counters for an engine's stats (flat keys, summable over devices)."""
        return self.counters("prefix_cache")

    @staticmethod
    def key(prompt: Prompt, dtype, options) -> bytes:
        """The content key of a prompt's prefix (`prompt.prefix_len` positions)."""
        P = prompt.prefix_len
        h = hashlib.blake2b(digest_size=20)
        h.update(np.asarray([P, prefix_bucket(P)], np.int64).tobytes())
        h.update(np.ascontiguousarray(prompt.text_L[:P], np.int32).tobytes())
        h.update(np.ascontiguousarray(prompt.codec_LxG[:P], np.int32).tobytes())
        at = prompt.extra_pos if (prompt.extra is not None and 0 <= prompt.extra_pos < P) \
            else gen.NONE
        h.update(np.asarray([at], np.int64).tobytes())
        if at != gen.NONE:
            h.update(np.ascontiguousarray(prompt.extra, np.float32).tobytes())
        h.update(str(np.dtype(dtype)).encode())
        h.update(repr(options).encode())
        return h.digest()

    def get(self, params, cfg, prompt: Prompt, options) -> list | None:
        """The stored prefix KV of `prompt` (per layer, `prefix_bucket(prompt.prefix_len)`
        slots, the first prefix_len of them real), computed and stored on a miss; None where
        the prompt has no prefix or the cache is disabled."""
        P = prompt.prefix_len
        if P <= 0 or not self.enabled:
            return None
        dtype = params["talker"]["codec_embedding"].dtype
        k = self.key(prompt, dtype, options)
        caches = self.lookup(k)
        if caches is None:
            caches = self._compute(params, cfg, prompt, options)
            self.store(k, caches)              # unless larger than max_bytes: used once
        return caches

    @staticmethod
    def _compute(params, cfg, prompt: Prompt, options) -> list:
        P = prompt.prefix_len
        Pb = prefix_bucket(P)
        G = cfg.talker.num_code_groups
        text = np.full((1, Pb), gen.NONE, np.int32)
        codec = np.full((1, Pb, G), gen.NONE, np.int32)
        text[0, :P] = prompt.text_L[:P]
        codec[0, :P] = prompt.codec_LxG[:P]
        extra = np.zeros((1, cfg.talker.hidden_size), np.float32)
        extra_pos = np.full((1,), gen.NONE, np.int32)
        if prompt.extra is not None and 0 <= prompt.extra_pos < P:
            extra[0], extra_pos[0] = prompt.extra, prompt.extra_pos
        return gen.prefix_kv(params, cfg, jnp.asarray(text), jnp.asarray(codec),
                             jnp.asarray(extra), jnp.asarray(extra_pos), options=options)


def batch_prefix(entries: list, lengths: list[int], slots: int | None = None
                 ) -> gen.Prefix | None:
    """The `generate.Prefix` of a batch's rows: `entries[b]` a stored prefix KV (`PrefixCache.get`)
    or None (the row has none: length 0), `lengths[b]` its real positions. None where no row has
    one. Rows are padded to `slots` (at least the longest stored prefix's; None: that), e.g. the
    prompt bucket, so that the prefill's program does not depend on the voice."""
    if all(e is None for e in entries):
        return None
    like = next(e for e in entries if e is not None)
    slot_axis = 1 if isinstance(like[0], layers.KVCache) else 3
    Pb = max(e[0].k.shape[slot_axis] for e in entries if e is not None)
    Pb = max(Pb, slots or 0)
    length = jnp.asarray([n if e is not None else 0 for e, n in zip(entries, lengths)], jnp.int32)
    if like[0].k.shape[slot_axis] == Pb and (len(entries) == 1
                                              or all(e is like for e in entries)):
        caches = like if len(entries) == 1 else [
            type(c)(*(jnp.concatenate([a] * len(entries)) for a in c)) for c in like]
        return gen.Prefix(caches, length)

    def fit(a):
        if a.shape[slot_axis] == Pb:
            return a
        widths = [(0, 0)] * a.ndim
        widths[slot_axis] = (0, Pb - a.shape[slot_axis])
        return jnp.pad(a, widths)

    caches = []
    for i, c in enumerate(like):
        zero = type(c)(*(jnp.zeros(a.shape[:slot_axis] + (Pb,) + a.shape[slot_axis + 1:],
                                   a.dtype) for a in c))
        rows = [zero if e is None else e[i] for e in entries]
        caches.append(type(c)(*(jnp.concatenate([fit(getattr(r, f)) for r in rows])
                                for f in c._fields)))
    return gen.Prefix(caches, length)
