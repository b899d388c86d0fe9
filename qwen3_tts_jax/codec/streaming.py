"""`StreamDecoder`: decode codes as they are generated, several streams at once, with the decoder's
state carried on device between calls, so that each call costs only its new frames.

    dec = tok.stream_decoder(batch=2)
    wav_a, wav_b = dec.push([codes_a_0_to_3, codes_b_0_to_8])   # float32 audio of those frames
    wav_a, wav_b = dec.push([codes_a_3_to_15, None])            # None: nothing new for that row
    dec.reset(1)                                                # row 1 starts another stream

The audio of a stream pushed in any pieces is `SpeechTokenizer.decode` of the whole stream (float
rounding): the official decode restarts the decoder every 300 frames after 25 frames of left
context (`chunk_plan`), and so does this, at the same frames, from the same 25 frames. With
chunk_size=None it never restarts: the whole-utterance decode (`decode(..., chunk_size=None)`).

Shapes: a call decodes all rows together as one window of T frames (T the longest row's piece:
exactly 1, 2, 3 or 4 frames, longer ones rounded up to 6, 8, 12, 16, ...: `window_frames`), rows
without new frames keep their state at the cost of padding; a push that crosses a restart in some
row runs a second window for the rest.
"""
from __future__ import annotations

import functools
import hashlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..buckets import ladder
from ..lru import ByteLRU
from . import decoder

EXACT_WINDOWS = 4   # pieces of up to this many frames decode in a window of their own length


def window_frames(n: int) -> int:
    """The window a piece of n frames decodes in: n itself up to EXACT_WINDOWS (the first chunk
    of a stream is short, and its decode is on the time to first audio: a 1-frame chunk costs one
    frame of the codec, not four), then the ladder 6, 8, 12, 16, ... (at most +50 % padding,
    about two programs per doubling)."""
    return n if n <= EXACT_WINDOWS else ladder(n, EXACT_WINDOWS)


def _checked(codes, what: str, cfg) -> np.ndarray:
    """(frames, Q) integer codes in [0, codebook_size) as int32, or ValueError naming the
    problem (a stream has no -1 padding: push only the frames that exist)."""
    Q, N = cfg.num_quantizers, cfg.codebook_size
    a = np.asarray(codes)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what}: codes must be integers, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] != Q:
        raise ValueError(f"{what}: codes must be (frames, {Q}); got shape {a.shape}")
    bad = (a < 0) | (a >= N)
    if bad.any():
        t, q = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what}: codes must be in [0, {N}); got {a[t, q]} at frame {t}, "
                         f"codebook {q}")
    return a.astype(np.int32)


DEFAULT_PREFIX_BYTES = 128 * 2 ** 20   # ~25 voices: a row's state is ~5 MiB at the released sizes


class PrefixStates(ByteLRU):
    """The decoder's state after a stream's prefix (a cloned voice's reference codes), kept per
    prefix so that a stream that starts with the same prefix skips its decode: the state after
    the prefix depends on the prefix alone (every stage is causal), and the prefix's audio is
    cut anyway. This takes the reference's decode off a cloned voice's time to first audio (63
    frames of a 5 s reference against the first chunk's 1-3 frames).

    Keyed by the prefix's codes and the stream's restart plan (chunk_size, left_context); one
    instance belongs to one decoder's weights (`SpeechTokenizer.prefix_states`). A `ByteLRU`
    (`max_bytes`; 0 disables it)."""

    def __init__(self, max_bytes: int = DEFAULT_PREFIX_BYTES):
        super().__init__(max_bytes)

    @staticmethod
    def key(prefix: np.ndarray, chunk_size: int | None, left_context: int) -> bytes:
        h = hashlib.blake2b(digest_size=20)
        h.update(np.asarray([-1 if chunk_size is None else chunk_size, left_context,
                             *prefix.shape], np.int64).tobytes())
        h.update(np.ascontiguousarray(prefix, np.int32).tobytes())
        return h.digest()

    def stats(self) -> dict:
        """Counters for an engine's stats (flat keys, summable over devices)."""
        return self.counters("codec_prefix")


@jax.jit
def _take_rows(state: dict, idx) -> dict:
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), state)


@functools.partial(jax.jit, donate_argnums=(0,))
def _put_rows(state: dict, idx, part: dict) -> dict:
    """`state` with row idx[i] replaced by `part`'s row i (an index out of range: dropped)."""
    return jax.tree.map(lambda a, p: a.at[idx].set(p, mode="drop"), state, part)


@functools.partial(jax.jit, donate_argnums=(0,))
def _with_row(state: dict, row, row_state: dict) -> dict:
    """`state` with row `row` (traced) replaced by a one-row state."""
    return jax.tree.map(lambda a, r: jax.lax.dynamic_update_slice_in_dim(a, r, row, axis=0),
                        state, row_state)


class StreamDecoder:
    """B code streams decoded incrementally (see the module docstring). Not thread-safe.

    `prefix_states` (a `PrefixStates`, shared between decoders of the same weights): a row reset
    with a prefix takes the decoder's state after that prefix from there, or decodes the prefix
    at once and stores the state; without it the prefix is decoded with the row's first push.
    The audio is the same either way (float rounding: any split of a stream decodes alike)."""

    def __init__(self, params, cfg: decoder.DecoderConfig, batch: int,
                 chunk_size: int | None = 300, left_context: int = 25,
                 prefix_states: PrefixStates | None = None, row_buckets: tuple[int, ...] = ()):
        if chunk_size is not None and not 0 <= left_context <= chunk_size:
            raise ValueError(f"left_context must be in [0, chunk_size], got {left_context}")
        self.params, self.cfg, self.batch = params, cfg, batch
        self.chunk_size, self.left_context = chunk_size, left_context
        self.prefix_states = prefix_states
        # smaller batch sizes a call may decode its due rows at (their states gathered, then put
        # back): a call for 1 row of 8 costs a 1-row program, not an 8-row one
        self.row_buckets = tuple(sorted(row_buckets))
        self.up = cfg.total_upsample
        self.state = decoder.init_stream_state(params, cfg, batch)
        Q = cfg.num_quantizers
        self._frames = [0] * batch        # frames of each stream decoded so far (prefix included)
        self._recent = [np.zeros((0, Q), np.int32)] * batch   # its last left_context frames
        self._fresh = [False] * batch     # the row's state must be dropped at its next frame
        self._prefix = [None] * batch     # codes to decode before the next push's, output dropped

    def reset(self, row: int, prefix: np.ndarray | None = None) -> None:
        """Row `row` starts a new stream. `prefix` (frames, Q): codes that come first in the
        stream but whose audio is not returned (a voice-clone reference: the official decode
        decodes the reference codes before the generated ones and cuts their audio)."""
        if not 0 <= row < self.batch:
            raise ValueError(f"row {row} is not in [0, {self.batch})")
        prefix = None if prefix is None or len(prefix) == 0 else _checked(
            prefix, f"row {row} prefix", self.cfg)
        self._frames[row], self._fresh[row], self._prefix[row] = 0, True, prefix
        self._recent[row] = self._recent[row][:0]
        if prefix is not None and self.prefix_states is not None and self.prefix_states.enabled:
            self._start_after(row, prefix)

    def regroup(self, rows: list[int], live: int) -> None:
        """New row i is row `rows[i]` (its stream goes on) for i < `live`, a fresh stream from
        `live` on: a running batch that widens or narrows (`generate.regroup`)."""
        if not 0 < live <= len(rows) or any(not 0 <= r < self.batch for r in rows):
            raise ValueError(f"regroup takes rows in [0, {self.batch}) and 0 < live <= "
                             f"{len(rows)}, got {rows}, live {live}")
        idx, n = jnp.asarray(rows, jnp.int32), len(rows)
        fresh = jnp.arange(n) >= live
        self.state = jax.tree.map(
            lambda a: jnp.where(fresh.reshape((n,) + (1,) * (a.ndim - 1)), jnp.zeros((), a.dtype),
                                jnp.take(a, idx, axis=0)), self.state)
        keep = rows[:live]
        empty = self._recent[0][:0]
        self._frames = [self._frames[r] for r in keep] + [0] * (n - live)
        self._recent = [self._recent[r] for r in keep] + [empty] * (n - live)
        self._fresh = [self._fresh[r] for r in keep] + [False] * (n - live)
        self._prefix = [self._prefix[r] for r in keep] + [None] * (n - live)
        self.batch = n

    def _start_after(self, row: int, prefix: np.ndarray) -> None:
        """Row `row` continues from the state after `prefix`: the stored one, or decoded now (this
        row alone; the others keep their state) and stored."""
        self._prefix[row] = None
        key = PrefixStates.key(prefix, self.chunk_size, self.left_context)
        entry = self.prefix_states.lookup(key)
        if entry is None:
            self.push([prefix if b == row else None for b in range(self.batch)])
            one = jax.tree.map(lambda a: a[row:row + 1], self.state)
            entry = (one, self._frames[row], self._recent[row].copy())
            self.prefix_states.store(key, entry)
        else:
            one, frames, recent = entry
            self.state = _with_row(self.state, jnp.int32(row), one)
            self._frames[row], self._recent[row] = frames, recent.copy()
        self._fresh[row] = False

    def warm(self, max_frames: int) -> float:
        """Compile (by running, on the current state with no frames, which keeps it) every
        window that pieces of at most `max_frames` new frames use, the restarts' context
        included, at the decoder's batch and each smaller `row_buckets` size. Returns seconds."""
        t = time.perf_counter()
        extra = 0 if self.chunk_size is None else self.left_context
        sizes = [self.batch] + [m for m in self.row_buckets if m < self.batch]
        for T in sorted({window_frames(n) for n in range(1, max_frames + extra + 1)}):
            for m in sizes:
                zeros = jnp.zeros((m,), jnp.int32)
                state = self.state if m == self.batch else _take_rows(self.state, zeros)
                wave, part = decoder.jit_stream_decode(
                    self.params, self.cfg, state,
                    jnp.zeros((m, T, self.cfg.num_quantizers), jnp.int32), zeros,
                    zeros.astype(bool))
                if m < self.batch:     # every index dropped: the state is kept
                    self.state = _put_rows(self.state, jnp.full((m,), self.batch, jnp.int32),
                                           part)
                wave.block_until_ready()
        return time.perf_counter() - t

    def _pieces(self, row: int, seq: np.ndarray) -> list[tuple[bool, np.ndarray, int]]:
        """(reset, window codes, context frames) of each decoder call that row `row` needs for
        its next frames `seq`; advances the row's counters."""
        out, i, C, f = [], 0, self.chunk_size, self._frames[row]
        while i < len(seq):
            reset, ctx = self._fresh[row], self._recent[row][:0]
            if C is not None and f > 0 and f % C == 0:
                # a new official chunk: the decoder restarts (positions from 0) after the left
                # context (`chunk_plan`: left_context frames, or all of them if fewer)
                n = self.left_context if f - self.left_context > 0 else f
                reset, ctx = True, self._recent[row][len(self._recent[row]) - n:]
            take = len(seq) - i if C is None else min(len(seq) - i, C - f % C)
            new = seq[i:i + take]
            out.append((reset, np.concatenate([ctx, new]), len(ctx)))
            keep = max(self.left_context, 1)
            self._recent[row] = np.concatenate([self._recent[row], new])[-keep:]
            self._fresh[row] = False
            f += take
            i += take
        self._frames[row] = f
        return out

    def push(self, new: list) -> list:
        """The next frames of each row ((frames, Q) int codes, or None for a row with nothing
        new) -> each row's float32 audio of those frames (None where None was pushed)."""
        return self.submit(new).result()

    def submit(self, new: list) -> "Pending":
        """`push` in two halves: the decoder's programs are dispatched now (the state moves on, so
        the next `submit` may follow at once) and `Pending.result()` waits for the audio. What a
        caller dispatches in between (the next chunk's frames) runs after the codec on an
        accelerator's stream, and beside it on the CPU."""
        if len(new) != self.batch:
            raise ValueError(f"push takes one entry per row ({self.batch}), got {len(new)}")
        seqs = [None if c is None else _checked(c, f"row {b}", self.cfg)
                for b, c in enumerate(new)]                 # all checked before any state moves
        pieces, drop = [], []
        for b, seq in enumerate(seqs):
            n_prefix = 0
            if seq is not None and self._prefix[b] is not None:
                n_prefix, seq = len(self._prefix[b]), np.concatenate([self._prefix[b], seq])
                self._prefix[b] = None
            pieces.append([] if seq is None else self._pieces(b, seq))
            drop.append(n_prefix)
        rounds = []
        for k in range(max(len(p) for p in pieces)):
            round_ = [p[k] if k < len(p) else None for p in pieces]
            due = [b for b, r in enumerate(round_) if r is not None]
            rows = next((m for m in self.row_buckets if len(due) <= m < self.batch), None)
            order = list(range(self.batch)) if rows is None else due + [due[0]] * (rows - len(due))
            T = window_frames(max(len(r[1]) for r in round_ if r is not None))
            window = np.zeros((len(order), T, self.cfg.num_quantizers), np.int32)
            n, reset = np.zeros(len(order), np.int32), np.zeros(len(order), bool)
            for i, b in enumerate(order[:len(due)] if rows is not None else order):
                if round_[b] is not None:
                    reset[i], codes, _ = round_[b]
                    window[i, :len(codes)], n[i] = codes, len(codes)
            args = jax.device_put((window, n, reset))   # jnp.asarray would trace per shape
            if rows is None:
                wave, self.state = decoder.jit_stream_decode(self.params, self.cfg, self.state,
                                                             *args)
            else:      # the due rows' states, decoded at `rows` rows (padding: n = 0), put back
                wave, part = decoder.jit_stream_decode(
                    self.params, self.cfg, _take_rows(self.state, jnp.asarray(order, jnp.int32)),
                    *args)
                put = due + [self.batch] * (rows - len(due))     # the padding's: dropped
                self.state = _put_rows(self.state, jnp.asarray(put, jnp.int32), part)
            at = {b: i for i, b in enumerate(order[:len(due)] if rows is not None else order)}
            rounds.append((wave, [None if r is None else (at[b], r[2], int(n[at[b]]))
                                  for b, r in enumerate(round_)]))
        return Pending(rounds, [c is None for c in new], drop, self.up)


class Pending:
    """The audio of one `StreamDecoder.submit`, on its way: `result()` waits for it (once)."""

    def __init__(self, rounds, empty, drop, up):
        self._rounds, self._empty, self._drop, self._up = rounds, empty, drop, up
        self._audio = None

    def done(self) -> bool:
        """Whether `result()` would return without waiting."""
        return self._audio is not None or all(w.is_ready() for w, _ in self._rounds)

    def result(self) -> list:
        if self._audio is None:
            audio = [[] for _ in self._empty]
            for wave, spans in self._rounds:
                wave = np.asarray(wave)
                for b, span in enumerate(spans):
                    if span is not None:            # (row in the call, context, frames)
                        i, start, end = span
                        audio[b].append(wave[i, start * self._up:end * self._up])
            self._audio = [None if empty else np.concatenate(a)[self._drop[b] * self._up:] if a
                           else np.zeros(0, np.float32)
                           for b, (empty, a) in enumerate(zip(self._empty, audio))]
            self._rounds = None
        return self._audio
