"""`lru.ByteLRU`, the store under both prefix caches: the byte bound, the eviction order and the
counters."""
import threading

import numpy as np
import pytest

from qwen3_tts_jax.lru import ByteLRU


def kib(n):
    return {"a": np.zeros(n * 256, np.float32), "n": 3}      # n KiB (plain ints count 0)


def test_least_recently_used_goes_first_and_the_bound_holds():
    c = ByteLRU(3 * 1024)
    for k in (b"x", b"y", b"z"):
        c.store(k, kib(1))
    assert (len(c), c.bytes) == (3, 3 * 1024)
    assert c.lookup(b"x") is not None                   # x now the most recent: y goes next
    c.store(b"w", kib(1))
    assert c.lookup(b"y") is None and c.lookup(b"x") is not None
    c.store(b"v", kib(2))                               # two go: z, then w
    assert [k for k in (b"x", b"z", b"w", b"v") if c.lookup(k) is not None] == [b"x", b"v"]
    assert (len(c), c.bytes, c.evictions) == (2, 3 * 1024, 3)
    assert c.counters("p") == {"p_hits": 4, "p_misses": 3, "p_evictions": 3, "p_entries": 2,
                               "p_bytes": 3 * 1024}


def test_what_does_not_fit_is_never_stored_and_a_key_is_stored_once():
    c = ByteLRU(1024)
    c.store(b"big", kib(2))
    assert (len(c), c.bytes, c.evictions) == (0, 0, 0) and c.lookup(b"big") is None
    first, second = kib(1), kib(1)
    c.store(b"k", first)
    c.store(b"k", second)                               # another thread's copy: the first stays
    assert c.lookup(b"k") is first and c.bytes == 1024
    c.clear()
    assert (len(c), c.bytes) == (0, 0)
    assert not ByteLRU(0).enabled and ByteLRU(1).enabled
    with pytest.raises(ValueError, match="max_bytes"):
        ByteLRU(-1)


def test_threads_keep_the_bytes_true():
    c = ByteLRU(10 * 1024)

    def work(t):
        for i in range(200):
            c.store(bytes([t, i % 30]), kib(1))
            c.lookup(bytes([t, (i * 7) % 30]))
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.bytes == 1024 * len(c) <= 10 * 1024
    assert c.hits + c.misses == 800


def test_has_room_for_one_more_as_large_as_the_largest():
    c = ByteLRU(3 * 1024)
    assert c.has_room()                                  # nothing stored yet
    c.store(b"x", kib(1))
    assert c.has_room() and c.largest == 1024
    c.store(b"y", kib(2))                                # full: 3 KiB, the largest 2
    assert not c.has_room() and c.evictions == 0
    assert ByteLRU(0).has_room()                         # disabled: nothing is ever evicted
