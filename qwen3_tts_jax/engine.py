"""The batching engine under every front door (the server, the batch tool, the API's text in
pieces): one worker thread owns the model and runs the requests that arrive together as one
padded batch, streaming each row's audio as it is generated.

    engine = BatchEngine(tts, max_batch_size=8, batch_window=0.01)
    engine.start()
    engine.submit(Job(prompt, settings, emit=on_chunk, seed=0))  # on_chunk(ndarray | None | exc)

Batching. Waiting requests are collected until `batch_window` seconds pass with no new arrival
(at most 10 windows in all) or `max_batch_size` are waiting, then run as one batch (a "cohort")
with the same compiled programs as offline generation and `generate.stream`: `generate.prefill`
once, then `generate.decode` with a growing `until` (first after `first_chunk_frames` frames, then
every `chunk_frames`), the state kept on device. After each chunk, every row's new frames go to
the cohort's `StreamDecoder` (one codec call for the due rows, at the smallest batch bucket that
holds them, the codec's state carried on device from chunk to chunk, so a chunk costs only its new
frames and the stream is the offline audio),
and the audio to the row's `emit`. A job with `stream=False` (a whole-file format) is decoded
once, when its row ends: the offline decode. After a chunk that is no row's first, its codec work
may run beside the next chunk's frames (`Options.codec_overlap`: "thread" on a worker thread of
the engine, "queue" dispatched before them; the cohort's `held` audio is handed out right after
the next chunk's frames are dispatched): the same audio, later by at most that dispatch. A row
taken meanwhile does not wait for that work: its prefill runs beside it, and its codec stream
restarts once the held audio is out (`_Held.after`).

Per-row end: a row that samples EOS or uses its `max_new_tokens` is finished (its `emit(None)`)
at the next chunk boundary while the others go on; a row whose client went away (`job.cancelled`)
or whose deadline passed stops being decoded, and the cohort stops as soon as no row needs it.

Continuous batching: while a batch runs, a waiting request starts in one of its free rows (a
padding row, or one whose request ended) within `admit_frames` frames (while a row is free, the
frame loop runs in steps of that many frames between the chunk boundaries), if its prompt fits the
batch's prompt and trailing-text buckets (`generate.insert`: its prompt runs into that row's
cache just before the batch's next frame slot, and the row counts its own frames). A request
that does not fit closes the batch to newcomers: it drains, and the next batch forms with that
request first. A batch whose rows are all taken widens to a larger batch bucket (up to
`max_batch_size`; `generate.regroup`, `StreamDecoder.regroup`) for the requests that wait, so a
request arriving while a lone one runs in a one-row batch starts beside it rather than after it;
when rows end and none wait, it narrows to the bucket its open rows need (`widen=False`: neither).
When the batch needs room for more frames it first forgets the frames before its oldest open row
(`generate.shift`), then grows its caches. A new row's first audio comes after
`first_chunk_frames`, like the first rows'.

Text sessions (`Job.feed`, the official streaming text mode fed incrementally): a session runs as
its own one-row cohort, interleaved chunk by chunk with the batch cohort. Its prompt holds the
first text token; the rest is the trailing text that the frame loop reads one token per frame
(`Context.trailing_BxLtxD`), extended between `decode` calls as text arrives, and `until` never
passes the tokens received until the text is final. So its codes are those of the offline
streaming-mode generation of the whole text, however the text was split in time.

Prompt prefixes: an ICL clone's request-independent prompt prefix (`prompts.Prompt.prefix_len`)
is prefilled once and its KV kept in the model's `prefix_cache.PrefixCache` (keyed by content):
a cohort's prefill and a row's refill write it into the rows' caches and compute only the rest,
so a registered cloned voice's later requests prefill as little as a preset speaker's. The
cache's counters are in `stats` (prefix_cache_*). Likewise the codec: the decoder's state after
a voice's reference codes is kept by the speech tokenizer (`codec.PrefixStates`, counters
codec_prefix_*), so a later request of that voice decodes only its own frames before its first
chunk, not the reference's.

Seeds: a job with seed s samples with `PRNGKey(s)`, exactly like `Qwen3TTS` called with
`seed=[s]`, so its audio does not depend on which other requests share its batch (or device),
up to float rounding: a row that starts in a running batch sits in other cache slots, and at full
size its sums round differently, which can flip a near-tied code (docs/serving.md).

Several devices: `EnginePool` runs one engine per device, each over its own copy of the weights,
and hands each job to the least busy one.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import logging
import queue
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import generate as gen, prompts, sampling, talker
from .prefix_cache import PrefixCache, batch_prefix
from .budget import text_budget, warn_budget_reached
from .settings import GenerationSettings, traced
from .buckets import batch_rows, ladder, power_of_two
from .codec import StreamDecoder, bucketed_decode
from .codec import decoder as codec_decoder
from .codec.tokenizer import CHUNK_SIZE, LEFT_CONTEXT, frame_bucket
from .text_feed import TextFeed, commit_point  # noqa: F401 - re-exported

log = logging.getLogger("qwen3_tts_jax.server")  # the server logs it

MAX_COLLECT_WINDOWS = 10     # a batch waits at most this many windows for company


class QueueFull(Exception):
    """More requests are waiting than the engine accepts (the server answers 429)."""


class DeadlineExceeded(Exception):
    """The job's deadline passed before it finished (the server answers 504)."""


class EngineUnavailable(RuntimeError):
    """The engine could not run the job: its worker failed (and restarted) or the engine is
    stopping (the server answers 503; a retry may succeed)."""


MAX_RESTARTS = 5             # worker failures within RESTART_WINDOW before it stays down
RESTART_WINDOW = 60.0


# ---------------------------------------------------------------------------------- memory bound
MEMORY_FRACTION = 0.5        # of the device's free memory a batch's prompts may take (default)


def memory_budget(fraction: float = MEMORY_FRACTION, device=None) -> tuple[int, str]:
    """(bytes, what they are) a batch may use: `fraction` of the device's free memory
    (`memory_stats()`: bytes_limit - bytes_in_use, so after the weights are loaded); where the
    device reports none (the CPU), of the host's available RAM (os.sysconf)."""
    import os

    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = {}
    if stats.get("bytes_limit"):
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        where = f"{fraction:g} x {free / 2 ** 30:.1f} GiB free on {device.platform}"
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        where = f"{fraction:g} x {free / 2 ** 30:.1f} GiB of available host RAM"
    return int(fraction * free), where


def batch_bytes(tts, rows: int, prompt_bucket: int, max_new_tokens: int) -> int:
    """Device bytes a batch of `rows` rows with prompts padded to `prompt_bucket` positions holds
    at most: the talker's KV cache over the prompt and every frame, rows x (L + F) x
    (layers x 2 x kv_heads x head_dim x dtype bytes), plus prefill's attention (float32 logits
    and probabilities), rows x 2 x heads x L x (L + F0) x 4, F0 the first cache segment
    (`Options.first_frames`). The weights and the code predictor's small caches are not in it
    (the budget is taken from what is free after loading)."""
    t = tts.config.talker
    itemsize = np.dtype(tts.params["talker"]["codec_embedding"].dtype).itemsize
    kv = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * itemsize
    first = min(max_new_tokens, tts.options.first_frames)
    return rows * ((prompt_bucket + max_new_tokens) * kv
                   + 2 * t.num_attention_heads * prompt_bucket * (prompt_bucket + first) * 4)


def max_prompt_tokens(tts, rows: int, max_new_tokens: int, budget: int,
                      min_prompt_bucket: int = 16) -> int:
    """The longest prompt (tokens: the prompt's positions and its trailing text) whose largest
    batch (`rows` rows, every prompt padded to its bucket) fits `budget` bytes by
    `batch_bytes`: the largest prompt bucket that fits, at least the smallest bucket, at most
    the model's positions less `max_new_tokens`."""
    limit = max(tts.config.talker.max_position_embeddings - max_new_tokens, min_prompt_bucket)
    best, L = min_prompt_bucket, min_prompt_bucket
    while batch_bytes(tts, rows, L, max_new_tokens) <= budget:
        if L >= limit:
            return limit
        best, L = L, ladder(L + 1, min_prompt_bucket)
    return min(best, limit)


@dataclasses.dataclass(eq=False)
class Job:
    """One utterance to generate. `emit` is called from the worker thread with each float32 audio
    chunk (24 kHz), then None at the end, or an exception instead."""
    prompt: prompts.Prompt | None
    settings: GenerationSettings
    emit: Callable[[object], None]
    seed: int | None = None
    key: jax.Array | None = None            # the PRNG key itself (instead of PRNGKey(seed))
    ref_code: np.ndarray | None = None      # ICL clone: decoded first, its audio cut
    stream: bool = True                     # False: one chunk at the end, the whole utterance
    feed: TextFeed | None = None            # a text session: the text arrives in pieces
    deadline: float = float("inf")          # time.monotonic() by which it must be finished
    cancelled: bool = False                 # set by the client side: stop generating it
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    started: float | None = None
    frames: int = 0                         # frames emitted (streamed rows: sent to the client)
    batch_size: int = 0                     # requests in the cohort it ran in
    retried: bool = False                   # restarted alone after its cohort failed
    sent_samples: int = 0                   # audio samples emitted so far
    skip_samples: int = 0                   # a restarted stream: samples its client already has
    finish_reason: str | None = None        # once ended: "stop" (EOS) or "length" (the budget)
    frames_per_token: float = 0.0           # a text session: once its text has ended, its
                                            # budget is at most `budget.text_budget` of it


@functools.partial(jax.jit, static_argnames=("dtype", "act"))
def _embed_text(tp, ids_BxL, dtype, act):
    return talker.embed_text(tp, ids_BxL, act).astype(dtype)


def prefix_compute(mask_BxL, prefix_len_B) -> int | None:
    """The prefill's compute length for rows with stored prefixes: the longest row's positions
    after its prefix on the `buckets.ladder` (not the finer steps of `generate.prefill_length`:
    the rest's length varies with both the voice and the text, and a warm-up compiles every
    ladder step below the prompt bucket, `prefix_computes`), None where that is the bucket."""
    L = mask_BxL.shape[1]
    n = int((np.asarray(mask_BxL).sum(-1) - np.asarray(prefix_len_B)).max())
    c = ladder(n)
    return None if c >= L else c


def prefix_computes(L: int) -> list[int | None]:
    """Every `prefix_compute` of a prompt bucket L."""
    out, c = [], ladder(1)
    while c < L:
        out.append(c)
        c = ladder(c + 1)
    return out + [None]


@dataclasses.dataclass
class _Held:
    """A chunk's audio on its way (`Options.codec_overlap`): `audio()` waits for the waves of
    `emit`'s rows ((job, frames so far, new frames) each, in order); `ended`: the jobs whose
    rows ended with this chunk, told after their audio."""
    emit: list
    ended: list
    audio: Callable[[], list] | None = None
    ready: Callable[[], bool] = lambda: True     # whether `audio()` would return at once
    # codec state changes that wait for this audio (a row started meanwhile: its reset)
    after: list = dataclasses.field(default_factory=list)


class _Cohort:
    """Rows generated together: prefill at creation, then `step()` runs one chunk and emits.

    A batch cohort (not a text session) refills rows: a waiting job whose prompt fits the
    cohort's buckets starts in a free row (`take`: a padding row, or one whose request ended)
    with `generate.insert`, and the cohort forgets the frames before its oldest open row
    (`generate.shift`) when it needs room at the end. `closed`: takes no more jobs (it drains)."""

    def __init__(self, engine: "BatchEngine", jobs: list[Job], compute: int | None = None):
        self.engine = engine
        self.feed = jobs[0].feed
        tts, cfg = engine.tts, engine.tts.config
        n = len(jobs)
        now = time.monotonic()
        for j in jobs:
            j.started, j.batch_size = now, n
        B = engine._bucket(n)
        self.rows: list[Job | None] = list(jobs) + [None] * (B - n)   # the job in each row
        self.tokens: list[int] = []
        if self.feed is not None:
            self.tokens, final = self.feed.snapshot()
            items = [self.feed.build(self.tokens, final)]
            items[0].trailing = self.feed.trailing(self.tokens, final)
            trailing_length = power_of_two(len(items[0].trailing) + 1, 64)
        else:
            items = [j.prompt for j in jobs]
            trailing_length = ladder(max(len(p.trailing) for p in items))
        items += [items[0]] * (B - n)
        batch = prompts.batch_prompts(
            cfg, items, length=ladder(max(len(p) for p in items), engine.min_prompt_bucket),
            trailing_length=trailing_length)
        self.L, self.Lt = batch.text_BxL.shape[1], batch.trailing_BxLt.shape[1]
        self.settings = engine._settings(self.rows)
        keys = [self._key(j) for j in jobs]
        keys = jnp.stack(keys + [keys[0]] * (B - n))
        self.first_frame = [0] * B              # host copy of ctx.first_frame_B
        self.capacity = gen.capacity(max(self._need(range(n)), engine.min_frames), tts.options)
        # padding rows copy row 0, its prefix too (a padding row without one would make the
        # prefill compute every position)
        prefix = engine._prefix(items, self.L)
        if prefix is not None and compute is None:
            compute = prefix_compute(batch.mask_BxL, [p.prefix_len for p in items])
        self.state, self.ctx = gen.prefill(tts.params, cfg, batch, self.settings, keys,
                                           frames=self.capacity, compute=compute,
                                           prefix=prefix, options=tts.options)
        # an ICL clone's reference codes: decoded before its codes, their audio cut (as offline)
        self.refs = [self._ref(j) for j in jobs] + [None] * (B - n)
        tok = tts.speech_tokenizer
        engine.codec_prefix_states = getattr(tok, "prefix_states", None)
        self.codec = StreamDecoder(tok.params, tok.config.decoder, B,
                                   prefix_states=engine.codec_prefix_states,
                                   row_buckets=engine.batch_buckets)
        for b, j in enumerate(jobs):
            self.codec.reset(b, prefix=j.ref_code)
        if any(j.ref_code is not None for j in jobs):
            engine._sync_prefix_stats()
        self.emitted = [0] * B                  # frames of each row sent so far
        self.open_rows = set(range(n))          # rows whose client still expects audio
        self.step_n = 0                         # frames the batch ran (host copy of state.step)
        self.target = engine.first_chunk_frames  # the next regular chunk boundary
        # extra boundaries of single rows (frame: that row alone is due): a row started later,
        # its first chunk; with `chunk_ramp`, a row whose next chunk would outgrow its audio out
        self.first_due: dict[int, int] = {}
        self.text_final = self.feed is None
        self.closed = self.feed is not None
        # the last chunk's audio on its way and what to do with it (`_Held`), or None
        self.held: _Held | None = None
        self.untold: list[Job] = []             # rows ended whose held audio failed

    @staticmethod
    def _key(job: Job):
        """The job's PRNG key, kept on the job: a job restarted alone samples the same."""
        if job.key is None:
            job.key = jax.random.PRNGKey(secrets.randbits(31) if job.seed is None
                                         else int(job.seed))
        return job.key

    def _ref(self, job: Job) -> np.ndarray:
        G = self.engine.tts.config.talker.num_code_groups
        return (np.zeros((0, G), np.int32) if job.ref_code is None
                else np.asarray(job.ref_code, np.int32))

    def _need(self, rows) -> int:
        """Frames the batch runs until these rows have used their budgets."""
        return max(self.first_frame[b] + self.rows[b].settings.max_new_tokens - 1 for b in rows)

    # ------------------------------------------------------------------ refilling rows
    def free_row(self) -> int | None:
        """A row that no client waits on (padding, ended, cancelled), or None."""
        return next((b for b in range(len(self.rows)) if b not in self.open_rows), None)

    def fits(self, job: Job) -> bool:
        """Whether `job` can start in this cohort: a plain request whose prompt and trailing text
        fit the cohort's buckets (those shapes are compiled)."""
        return (not self.closed and job.feed is None and len(job.prompt) <= self.L
                and len(job.prompt.trailing) <= self.Lt)

    def take(self, job: Job, row: int, compute: int | None = None) -> None:
        """Start `job` in `row` (free, and `fits(job)`) at the cohort's current frame.
        `compute`: the refill's compute length instead of its own (a warm-up's)."""
        tts, cfg = self.engine.tts, self.engine.tts.config
        one = prompts.batch_prompts(cfg, [job.prompt], length=self.L, trailing_length=self.Lt)
        rows = self.rows.copy()
        rows[row] = job
        settings = self.engine._settings(rows)
        prefix = self.engine._prefix([job.prompt], self.L)
        if compute is None:
            compute = (gen.prefill_length(one.mask_BxL) if prefix is None
                       else prefix_compute(one.mask_BxL, [job.prompt.prefix_len]))
        self.state, self.ctx = gen.insert(
            tts.params, cfg, self.state, self.ctx, settings, row, one, self._key(job),
            compute=compute, prefix=prefix, options=tts.options)
        self.rows, self.settings = rows, settings
        self.refs[row] = self._ref(job)
        # the row's codec stream restarts after the held chunk's codec work, which may still be
        # running (on the worker thread): not waited for here, where the frames would wait too
        # (and a fault of that work is the cohort's, raised by its next step, not this job's)
        if self.held is not None:
            self.held.after.append(functools.partial(self._reset_codec, row, job))
        else:
            self._reset_codec(row, job)
        self.emitted[row], self.first_frame[row] = 0, self.step_n
        self.open_rows.add(row)
        job.started, job.batch_size = time.monotonic(), len(self.open_rows)
        # its first audio after first_chunk_frames, like a request that starts a cohort: an
        # extra boundary that decodes this row only (the others keep their chunk cadence)
        if job.stream:
            self.first_due[row] = self.step_n + self.engine.first_chunk_frames

    def widen(self, rows: int) -> None:
        """`rows` rows instead of `len(self.rows)` (a larger batch bucket): free rows for waiting
        jobs when every row is taken, rather than have them wait for a row's request to end."""
        B = len(self.rows)
        self._regroup(list(range(B)) + [0] * (rows - B), B)

    def narrow(self) -> bool:
        """Down to the smallest batch bucket that holds the open rows, if smaller (they move to
        the first rows, in order): the frames of a batch that emptied cost what its rows need.
        Whether it narrowed."""
        keep = sorted(self.open_rows)
        if not keep or self.untold:
            return False
        rows = self.engine._bucket(len(keep))
        if rows >= len(self.rows):
            return False
        self._regroup(keep + [keep[0]] * (rows - len(keep)), len(keep))
        return True

    def _regroup(self, order: list[int], live: int) -> None:
        """New row i is row `order[i]` for i < `live`, padding after (`generate.regroup`)."""
        self.state, self.ctx = gen.regroup(self.state, self.ctx, order, live)
        pad = len(order) - live
        keep = order[:live]
        at = {b: i for i, b in enumerate(keep)}
        self.rows = [self.rows[b] for b in keep] + [None] * pad
        self.first_frame = [self.first_frame[b] for b in keep] + [0] * pad
        self.refs = [self.refs[b] for b in keep] + [None] * pad
        self.emitted = [self.emitted[b] for b in keep] + [0] * pad
        self.open_rows = {at[b] for b in self.open_rows}
        self.first_due = {at[b]: f for b, f in self.first_due.items() if b in at}
        self.settings = self.engine._settings(self.rows)
        if self.held is not None:        # its codec work, maybe running, has the old rows
            self.held.after.append(functools.partial(self.codec.regroup, order, live))
        else:
            self.codec.regroup(order, live)

    def _reset_codec(self, row: int, job: Job) -> None:
        self.codec.reset(row, prefix=job.ref_code)
        if job.ref_code is not None:
            self.engine._sync_prefix_stats()

    def _make_room(self) -> None:
        """Capacity for the next chunk: forget the frames before the oldest open row (every
        open row's frames not yet emitted are after it), then grow the caches if still short."""
        m = min(self.first_frame[b] for b in self.open_rows)
        if m > 0:
            self.state, self.ctx = gen.shift(self.state, self.ctx, jnp.int32(m))
            self.first_frame = [f - m for f in self.first_frame]
            self.step_n -= m
            self.target -= m
            self.first_due = {b: f - m for b, f in self.first_due.items()}
        until, need = self._until(), self._need(self.open_rows)
        while until > self.capacity:
            self.capacity = min(2 * self.capacity, power_of_two(need))
            self.state = gen.grow(self.state, self.capacity)

    # ------------------------------------------------------------------ text sessions
    def _update_text(self) -> None:
        """Extend a session's trailing text with what arrived since the last chunk."""
        tokens, final = self.feed.snapshot()
        if len(tokens) == len(self.tokens) and final == self.text_final:
            return
        self.tokens, self.text_final = tokens, final
        job = self.rows[0]
        if final and job.frames_per_token:       # frames so far <= tokens: far below it
            most = text_budget(len(tokens), job.frames_per_token)
            if most < job.settings.max_new_tokens:
                job.settings = dataclasses.replace(job.settings, max_new_tokens=most)
                self.settings = self.engine._settings(self.rows)
        ids = self.feed.trailing(tokens, final)
        Lt = self.ctx.trailing_BxLtxD.shape[1]
        if len(ids) > Lt:
            Lt = power_of_two(len(ids) + 1, 64)     # a longer text: a new compiled shape
        B = self.ctx.trailing_len_B.shape[0]
        padded = np.full((B, Lt), self.engine.tts.config.tts_pad_token_id, np.int32)
        padded[:, :len(ids)] = ids
        tp = self.engine.tts.params["talker"]
        self.ctx = self.ctx._replace(
            trailing_BxLtxD=_embed_text(tp, jnp.asarray(padded),
                                        dtype=tp["codec_embedding"].dtype,
                                        act=self.engine.tts.config.talker.hidden_act),
            trailing_len_B=jnp.full((B,), len(ids), jnp.int32))

    def _until(self) -> int:
        """The frame the next chunk runs to. A session's frame n reads trailing token n, so
        until the text is final no frame may run past the tokens received."""
        limit = self._need(self.open_rows) if self.text_final else len(
            self.feed.trailing(self.tokens, False))
        firsts = [f for b, f in self.first_due.items() if b in self.open_rows]
        until = min(self.target, *firsts, limit)
        tick = self.engine.admit_frames
        if tick and self.feed is None and not self.closed and (
                self.free_row() is not None
                or (self.engine.widen and len(self.rows) < self.engine.max_batch_size)):
            until = min(until, self.step_n + tick)   # a request arriving now waits <= tick
        return until

    def ready(self) -> bool:
        if self.feed is not None and not self.text_final:
            self._update_text()
        now = time.monotonic()
        return self.text_final or self._until() > self.step_n or any(
            self.rows[b].cancelled or now > self.rows[b].deadline for b in self.open_rows)

    # ------------------------------------------------------------------ one chunk
    def step(self) -> bool:
        """One chunk: decode frames, emit audio, end rows. False when the cohort is finished."""
        engine, tts = self.engine, self.engine.tts
        rows, open_rows, stats = self.rows, self.open_rows, engine.stats
        ran = False
        if self.held is not None:    # this chunk's frames first, then the last chunk's audio
            self._run_frames()       # (now if it is ready; else after these frames, or later)
            ran = True
            if self.held.ready():
                self.flush()
        now = time.monotonic()
        for b in list(open_rows):
            if rows[b].cancelled:
                open_rows.discard(b)
                stats["cancelled"] += 1
            elif now > rows[b].deadline:     # e.g. a text session waiting for text
                open_rows.discard(b)
                rows[b].cancelled = True
                stats["timeouts"] += 1
                rows[b].emit(DeadlineExceeded(
                    f"the request ran out of time after {rows[b].frames} frames"))
        if not open_rows:
            self.flush()
            return False
        if not ran:
            self._run_frames()
        lengths, ended = np.asarray(self.state.length_B), np.asarray(self.state.done_B)
        self.step_n = step = int(self.state.step)
        # streamed rows: their new frames; whole-file rows: all their frames once done. At an
        # extra boundary (a started row's first chunk) only that row and ended rows.
        regular = step >= self.target
        due = [b for b in sorted(open_rows) if regular or ended[b]
               or self.first_due.get(b, step + 1) <= step]
        ready = [b for b in due if lengths[b] > self.emitted[b]]
        streamed = [b for b in ready if rows[b].stream]
        whole = [b for b in ready if not rows[b].stream and ended[b]]
        codes = np.asarray(self.state.codes_BxFxG) if streamed or whole else None
        new = {b: codes[b, self.first_frame[b] + self.emitted[b]:self.first_frame[b] + lengths[b]]
               for b in streamed + whole}
        first = any(self.emitted[b] == 0 for b in streamed)
        for b in streamed + whole:
            self.emitted[b] = int(lengths[b])
        for b in due:
            self.first_due.pop(b, None)
        done = [b for b in sorted(open_rows) if ended[b]]
        if done:
            cut = gen.budget_reached(self.state, tts.config)
        for b in done:                      # free for a new job now, told after their audio
            open_rows.discard(b)
            rows[b].finish_reason = "length" if cut[b] else "stop"
            if cut[b]:
                stats["budget_reached"] += 1
                log.warning("a request reached its max_new_tokens=%d without the end token "
                            "(EOS): its audio is cut at %d frames", rows[b].settings.max_new_tokens,
                            lengths[b])
        held = _Held([(rows[b], int(lengths[b]), len(new[b])) for b in streamed + whole],
                     [rows[b] for b in done])
        mode = tts.options.codec_overlap
        # Beside the next chunk's frames only when they follow at once (a session waiting for
        # text does not), and not a row's first chunk (its audio is the time to first audio).
        ahead = (mode != "off" and bool(open_rows) and bool(streamed or whole) and not first
                 and (self.feed is None or self.text_final))
        batch = [new.get(b) if b in streamed else None for b in range(len(rows))]

        refs = [self.refs[b] for b in whole]     # now: a row may be taken before the codec runs

        def whole_waves() -> dict:
            return dict(zip(whole, engine._decode(refs, [new[b] for b in whole]))) if whole else {}

        def codec_work(pending=None) -> list:
            waves = whole_waves()
            if streamed:
                pushed = self.codec.push(batch) if pending is None else pending.result()
                waves.update((b, pushed[b]) for b in streamed)
            return [waves[b] for b in streamed + whole]

        if regular:
            self.target = step + engine.chunk_frames
        if engine.chunk_ramp:   # no streamed row's next chunk longer than the audio it has out
            for b in streamed:
                out = self.emitted[b]
                if b in open_rows and out < engine.chunk_frames and step + out < self.target:
                    self.first_due[b] = step + out
        if self.held is not None:
            if not (streamed or whole or done):  # between boundaries: let it come (`ready`)
                return bool(open_rows)
            self.flush()                         # the chunk before goes out first
        self.held = held
        try:
            if ahead and mode == "thread":
                future = engine._codec_thread().submit(codec_work)
                held.audio, held.ready = future.result, future.done
            elif ahead and mode == "queue":     # the codec dispatched now, waited for later
                pending = self.codec.submit(batch) if streamed else None
                held.audio = functools.partial(codec_work, pending)
                held.ready = pending.done if pending is not None else (lambda: True)
            else:
                held.audio = codec_work         # by the flush below
        except BaseException:
            self.held = None
            self.untold += held.ended
            raise
        if not ahead:
            self.flush()
        return bool(open_rows)

    def _run_frames(self) -> None:
        """Dispatch the frame loop up to the next chunk boundary."""
        tts = self.engine.tts
        if self._until() > self.capacity:
            self._make_room()
        self.state = gen.decode(tts.params, tts.config, self.state, self.ctx, self.settings,
                                min(self._until(), self.capacity), tts.options)

    def flush(self) -> None:
        """Hand out the held chunk's audio (waiting for it), tell the rows that ended with it,
        and end the open rows whose deadline passed. If the audio fails, the ended rows are kept
        in `untold` (`release` gives them back with the open rows) and the error is raised."""
        held, self.held = self.held, None
        if held is None:
            return
        stats = self.engine.stats
        try:
            waves = held.audio()
        except BaseException:
            self.untold += held.ended
            raise
        finally:
            for change in held.after:   # rows started while it ran (their rows are not in it)
                change()
        for (job, frames, n), wave in zip(held.emit, waves):
            if job.cancelled:
                continue
            job.frames = frames
            stats["frames"] += n
            if job.skip_samples:          # a restarted stream: what its client has is dropped
                cut = min(job.skip_samples, len(wave))
                job.skip_samples -= cut
                wave = wave[cut:]
                if not len(wave):
                    continue
            job.sent_samples += len(wave)
            job.emit(wave)
        for job in held.ended:
            if not job.cancelled:
                stats["finished"] += 1
                job.emit(None)
        now = time.monotonic()
        for b in list(self.open_rows):
            if now > self.rows[b].deadline:
                self.open_rows.discard(b)
                self.rows[b].cancelled = True
                stats["timeouts"] += 1
                self.rows[b].emit(DeadlineExceeded(
                    f"the request ran out of time after {self.rows[b].frames} frames"))

    def fail(self, e: Exception) -> None:
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - failing them anyway
            pass
        for job in self.untold:
            if not job.cancelled:
                self.engine.stats["errors"] += 1
                job.cancelled = True
                job.emit(e)
        self.untold = []
        for b in self.open_rows:
            if not self.rows[b].cancelled:
                self.engine.stats["errors"] += 1
                self.rows[b].cancelled = True
                self.rows[b].emit(e)
        self.open_rows.clear()

    def release(self) -> list[Job]:
        """The jobs that a client still waits on (the open rows', and those whose last audio
        failed), after the held audio is handed out; the cohort keeps none."""
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - its rows restart with the others
            log.exception("a chunk's audio failed")
        jobs = [self.rows[b] for b in sorted(self.open_rows) if not self.rows[b].cancelled]
        jobs += [j for j in self.untold if not j.cancelled and j not in jobs]
        self.open_rows.clear()
        self.untold = []
        return jobs


class BatchEngine:
    """The worker thread and its queue. `submit` is thread-safe; so is `call`, which runs a
    function on the worker between chunks (device work that must not overlap generation), and
    `wake`, which a text session's feeder calls when text arrived.

    Faults. A cohort whose prefill, refill or step raises, with several requests in it, does not
    fail them all: each request restarts alone (`_isolate`), so only the one at fault fails; a
    stream that already sent audio restarts too, its client's samples dropped, and goes on where
    it was (a text session that started fails with the error). The worker
    survives any exception (a BaseException too): the requests it held fail with
    `EngineUnavailable` and the loop starts again (at most MAX_RESTARTS times in RESTART_WINDOW
    seconds; then the thread ends). `health()` names a worker that is not running, or that made
    no progress for `stall_timeout` seconds while it had requests."""

    def __init__(self, tts, max_batch_size: int = 8, batch_window: float = 0.01,
                 max_queue: int = 64, chunk_frames: int = 12, first_chunk_frames: int = 3,
                 batch_buckets: tuple[int, ...] | None = None,
                 min_prompt_bucket: int = 16, refill: bool = True, widen: bool = True,
                 stall_timeout: float = 300.0,
                 prefix_cache: PrefixCache | None = None, admit_frames: int | None = None,
                 chunk_ramp: bool = False, min_frames: int = 0):
        if max_batch_size < 1 or max_queue < 1 or chunk_frames < 1 or first_chunk_frames < 1:
            raise ValueError("max_batch_size, max_queue, chunk_frames and first_chunk_frames "
                             "must be >= 1")
        if admit_frames is not None and (isinstance(admit_frames, bool) or
                                         not isinstance(admit_frames, int) or admit_frames < 0):
            raise ValueError(f"admit_frames must be an integer >= 0, got {admit_frames!r}")
        self.tts = tts
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window
        self.max_queue = max_queue
        self.chunk_frames = chunk_frames
        self.first_chunk_frames = first_chunk_frames
        # While a running batch has a free row, its frame loop runs at most this many frames a
        # call (None: first_chunk_frames; 0: a chunk at a time), so that a request arriving
        # mid-chunk starts within that many frames, not at the chunk's end; audio still goes
        # out at the chunk boundaries (between them only the step counters are read back)
        self.admit_frames = first_chunk_frames if admit_frames is None else admit_frames
        # A streamed row's chunks grow from its first one instead of jumping to chunk_frames: a
        # chunk is never longer than the row's audio already out (3, 3, 6, 12, ... frames), so
        # where frames come at least twice real time the next chunk arrives before the audio
        # out has played, whatever the first chunk's size (extra boundaries of that row only)
        self.chunk_ramp = chunk_ramp
        # Padded batch sizes (one compiled program set each): powers of two up to the maximum by
        # default, from the fewest rows (`Options.min_rows`: two on a GPU); a single
        # bucket (e.g. (8,)) compiles once and pads every batch to it.
        self.batch_buckets = tuple(sorted(batch_buckets or {
            batch_rows(n, tts.options.min_rows) for n in range(1, max_batch_size + 1)}))
        if self.batch_buckets[-1] < max_batch_size:
            raise ValueError(f"batch buckets {list(self.batch_buckets)} do not reach "
                             f"max_batch_size {max_batch_size}")
        self.min_prompt_bucket = min_prompt_bucket
        # A cohort's first KV cache holds at least this many frames' bucket (at most
        # `Options.first_frames`), whatever its rows' budgets: the server passes its cap, so a
        # request's smaller budget (its own, or its text's) runs the shapes its warm-up compiled
        self.min_frames = min_frames
        self.refill = refill                  # start waiting jobs in a running batch's free rows
        self.widen = widen                    # ... widened to a larger bucket when none is free
        # ICL prompt prefixes' KV (None: the model's own, `Qwen3TTS.prefix_cache`, which the
        # engines of text sessions on the same model share; a model without one: none)
        self.prefix_cache = prefix_cache if prefix_cache is not None else getattr(
            tts, "prefix_cache", None)
        # the codec's per-reference states (`codec.PrefixStates` of the model's speech
        # tokenizer), for the counters; set by the first cohort, which loads the codec
        self.codec_prefix_states = None
        self._queue: queue.Queue = queue.Queue()
        self._waiting = 0                     # jobs submitted and not started or dropped
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.active = 0                       # rows in running cohorts
        self._kinds: dict[str, set] = {}      # sampler kinds used, per role (`_sampler_kind`)
        self.stall_timeout = stall_timeout
        self.beat = time.monotonic()          # the worker's last sign of progress
        self.last_failure: str | None = None  # the worker's last failure (restarted)
        self._failures: list[float] = []      # when the worker failed (MAX_RESTARTS)
        # the worker's work in hand: waiting jobs, sessions waiting for their first token,
        # running cohorts (at most one batch cohort, retries and sessions)
        self._pending: list[Job] = []
        self._sessions: list[Job] = []
        self._units: list[_Cohort] = []
        self._codec_worker: ThreadPoolExecutor | None = None   # `Options.codec_overlap`
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "timeouts": 0, "errors": 0,
                      "rejected_queue_full": 0, "cohorts": 0, "joined": 0, "widened": 0,
                      "narrowed": 0, "sessions": 0, "frames": 0, "retried": 0, "worker_restarts": 0,
                      "budget_reached": 0, "batch_sizes": collections.Counter()}
        self._sync_prefix_stats()

    # ------------------------------------------------------------------ client side
    def start(self) -> "BatchEngine":
        self.beat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="qwen3-tts-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._codec_worker is not None:
            self._codec_worker.shutdown(wait=False)

    def _codec_thread(self) -> ThreadPoolExecutor:
        """The thread that runs a chunk's codec beside the next chunk's frames ("thread")."""
        if self._codec_worker is None:
            self._codec_worker = ThreadPoolExecutor(1, thread_name_prefix="qwen3-tts-codec")
        return self._codec_worker

    @property
    def waiting(self) -> int:
        return self._waiting

    def health(self) -> str | None:
        """None while the worker runs and makes progress; else why not (the server's /health
        answers 503 with it)."""
        if self._thread is None:
            return "the engine's worker has not started"
        if not self._thread.is_alive():
            return ("the engine's worker thread is not running"
                    + (f" (last failure: {self.last_failure})" if self.last_failure else ""))
        idle = time.monotonic() - self.beat
        busy = self.active or self._waiting or self._units or self._sessions
        if busy and idle > self.stall_timeout:
            return (f"the engine's worker made no progress for {idle:.0f} s with requests in "
                    f"hand (the limit is {self.stall_timeout:g} s)")
        return None

    def submit(self, job: Job) -> None:
        """Queue a job or a text session. A job waits in the queue (QueueFull if `max_queue`
        jobs already wait there); a session does not count against it (the server caps its
        sessions itself), whether it waits for text or runs."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            raise EngineUnavailable(f"the server's engine is down ({self.health()})")
        with self._lock:
            if job.feed is None:
                if self._waiting >= self.max_queue:
                    self.stats["rejected_queue_full"] += 1
                    raise QueueFull(f"{self._waiting} requests are already waiting (the limit "
                                    f"is {self.max_queue}); retry later")
                self._waiting += 1
            self.stats["requests"] += 1
        self._queue.put(job)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the worker thread between chunks; its result or exception in a Future."""
        fut: Future = Future()
        self._queue.put((fn, fut))
        return fut

    def wake(self) -> None:
        """New text for a session (or a stop): let a waiting worker look again."""
        self._queue.put(None)

    def warmup(self, jobs_like: list[Job], chunks: int = 2, whole_file_frames: int = 0) -> float:
        """Compile before serving (call it before `start`): for every job in `jobs_like` (one per
        prompt bucket) and every batch bucket, a cohort of that many copies runs its prefill and
        `chunks` chunks, then starts a copy in a running row and runs one more chunk (with a
        cloned voice's stored prompt prefix: also the prefill and the refill at each compute
        length, `prefix_computes`): the programs that a first request of those shapes would
        compile (the frame loop at the first
        KV-cache size, a row's refill), and every streaming codec window of a chunk. With
        `whole_file_frames`, also every codec window that whole-file formats (flac, mp3, opus)
        decode utterances of up to that many frames with (`warm_whole_file`). Nothing is emitted
        and the stats stay as they were. Returns seconds."""
        if self._thread is not None:
            raise RuntimeError("warm the engine up before start()")
        t, stats = time.perf_counter(), copy.deepcopy(self.stats)
        for like in jobs_like:
            quiet = functools.partial(dataclasses.replace, like, emit=lambda _: None)
            for B in self.batch_buckets:
                cohort = _Cohort(self, [quiet() for _ in range(B)])
                for _ in range(chunks):
                    if not cohort.step():
                        break
                # a request starting in a running batch: row 0 handed to another copy
                cohort.open_rows.discard(0)
                cohort.take(quiet(), 0)
                cohort.step()
                cohort.flush()
                # every codec window a chunk can use (shorter last chunks, codec restarts)
                cohort.codec.warm(max(self.chunk_frames, self.first_chunk_frames))
                # a cloned voice's stored prefix: the prefill and refill at every compute
                # length of the bucket (the rest after the prefix varies with the text)
                if like.prompt is not None and self._prefix([like.prompt], cohort.L):
                    for c in prefix_computes(cohort.L):
                        _Cohort(self, [quiet() for _ in range(B)], compute=c)
                        cohort.take(quiet(), 0, compute=c)
        if whole_file_frames:
            self.warm_whole_file(whole_file_frames)
        self.stats = stats
        self._sync_prefix_stats()
        return time.perf_counter() - t

    def prime(self, job: Job) -> Future:
        """Fill the per-voice caches that jobs like `job` read (a cloned voice): the talker's
        prompt-prefix KV of its prompt (`prefix_cache`) and the codec's state after its ICL
        reference codes (`codec.PrefixStates`), so that the voice's first request starts as fast
        as its later ones. On the worker thread once started (between chunks), else now.
        The Future's result: True where something was computed (False: already there, or no
        cache)."""
        def work() -> bool:
            tts, filled = self.tts, False
            cache = self.prefix_cache
            if cache is not None and cache.enabled and job.prompt is not None \
                    and job.prompt.prefix_len:
                misses = cache.misses
                cache.get(tts.params, tts.config, job.prompt, tts.options)
                filled = cache.misses > misses
            tok = tts.speech_tokenizer
            states = getattr(tok, "prefix_states", None)
            if job.ref_code is not None and states is not None and states.enabled:
                misses = states.misses
                StreamDecoder(tok.params, tok.config.decoder, 1,
                              prefix_states=states).reset(0, prefix=job.ref_code)
                filled = filled or states.misses > misses
                self.codec_prefix_states = states
            self._sync_prefix_stats()
            return filled

        if self._thread is not None:
            return self.call(work)
        done: Future = Future()
        done.set_result(work())
        return done

    def caches_have_room(self) -> bool:
        """Whether the per-voice caches would take one more voice without evicting one
        (`ByteLRU.has_room`)."""
        states = getattr(self.tts.speech_tokenizer, "prefix_states", None)
        return all(c.has_room() for c in (self.prefix_cache, states) if c is not None)

    def whole_file_windows(self, max_frames: int) -> list[tuple[int, int]]:
        """(batch bucket, window frames) of every codec call `_decode` makes for utterances (an
        ICL reference included) of at most `max_frames` frames: the official 300-frame chunks
        with 25 frames of context, each window padded to `frame_bucket`."""
        cap = CHUNK_SIZE + LEFT_CONTEXT
        windows = sorted({frame_bucket(min(n, cap), cap) for n in range(1, max_frames + 1)})
        return [(B, T) for B in self.batch_buckets for T in windows]

    def warm_whole_file(self, max_frames: int) -> float:
        """Compile the whole-file decode's codec windows (`whole_file_windows`). Seconds."""
        t = time.perf_counter()
        codec = self.tts.speech_tokenizer
        Q = codec.config.decoder.num_quantizers
        for B, T in self.whole_file_windows(max_frames):
            window = jnp.asarray(np.zeros((B, T, Q), np.int32))  # as `bucketed_decode` makes it
            jax.block_until_ready(codec_decoder.jit_decode(codec.params, codec.config.decoder,
                                                           window))
        return time.perf_counter() - t

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        """The worker thread: `_loop`, started again after a failure (the requests it held fail
        with EngineUnavailable; those still queued run); it ends after MAX_RESTARTS failures
        within RESTART_WINDOW seconds (`health()` then says so) or at `stop()`, failing what it
        holds and what is queued."""
        try:
            while not self._stop.is_set():
                try:
                    self._loop()
                except BaseException as e:  # noqa: BLE001 - the worker outlives any failure
                    now = time.monotonic()
                    self.last_failure = f"{type(e).__name__}: {e}"
                    self._failures = [t for t in self._failures if now - t < RESTART_WINDOW]
                    self._failures.append(now)
                    self.stats["worker_restarts"] += 1
                    log.error("the engine's worker failed (%s); restarting it", self.last_failure,
                              exc_info=e)
                    self._drop(EngineUnavailable(f"the server's engine failed "
                                                 f"({self.last_failure}) and restarted; retry"))
                    if len(self._failures) > MAX_RESTARTS:
                        log.error("the engine's worker failed %d times within %g s; it stays "
                                  "down", len(self._failures), RESTART_WINDOW)
                        return
        finally:
            stopped = EngineUnavailable("the server is shutting down or its engine stopped")
            self._drop(stopped)
            try:
                queued = self._pull(0.0)
            except BaseException:  # noqa: BLE001 - stopping anyway
                queued = []
            for item in queued:
                if isinstance(item, Job):
                    self._drop_job(item, stopped)
                elif item is not None and item[1].set_running_or_notify_cancel():
                    item[1].set_exception(stopped)

    def _drop(self, e: Exception) -> None:
        """Fail every request the worker holds (waiting, sessions, running) with `e`."""
        units, self._units = self._units, []
        for u in units:
            try:
                jobs = u.release()
            except BaseException:  # noqa: BLE001 - a broken cohort: its rows as they are
                jobs = [j for j in u.rows if j is not None and not j.cancelled]
            for j in jobs:
                self._fail_job(j, e)
        held, self._pending, self._sessions = self._pending + self._sessions, [], []
        for j in held:
            self._drop_job(j, e)
        self.active = 0

    def _drop_job(self, job: Job, e: Exception) -> None:
        """Fail a job that was submitted but not started."""
        if job.feed is None:
            with self._lock:
                self._waiting -= 1
        if not job.cancelled:
            self._fail_job(job, e)

    def _fail_job(self, job: Job, e: Exception) -> None:
        self.stats["errors"] += 1
        job.cancelled = True
        try:
            job.emit(e)
        except Exception:  # noqa: BLE001 - a client callback must not stop the others
            log.exception("a request's callback failed")

    def _loop(self) -> None:
        pending = self._pending          # waiting for the next batch
        sessions = self._sessions        # text sessions waiting for their first token
        units = self._units              # running: at most one batch cohort, retries, sessions
        while not self._stop.is_set():
            self.beat = time.monotonic()
            batch_running = any(u.feed is None for u in units)
            runnable = [u for u in list(units) if self._ready(units, u)]
            now = time.monotonic()
            if runnable:
                timeout = 0.0
            elif pending and not batch_running:
                timeout = max(self._form_at(pending) - now, 0.0)
            else:
                timeout = 0.1
            for item in self._pull(timeout):
                if isinstance(item, Job):
                    (sessions if item.feed is not None else pending).append(item)
                elif item is not None:
                    fn, fut = item
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(fn())
                        except BaseException as e:  # noqa: BLE001 - handed to the caller
                            fut.set_exception(e)
            self.beat = time.monotonic()
            for job in list(sessions):
                tokens, final = job.feed.snapshot()
                if (job.cancelled or time.monotonic() > job.deadline
                        or job.feed.can_start(tokens, final)):
                    sessions.remove(job)
                    if not self._admit(job):
                        continue
                    if not tokens:
                        job.emit(ValueError("the session ended without any text"))
                        continue
                    self.stats["sessions"] += 1
                    self._start(units, [job])
            batch = next((u for u in units if u.feed is None and not u.closed), None)
            if pending and batch is not None and self.refill:
                self._refill(units, batch, pending)
            now = time.monotonic()
            if pending and not batch_running and (len(pending) >= self.max_batch_size
                                                  or now >= self._form_at(pending)):
                jobs = [j for j in pending[:self.max_batch_size] if self._admit(j)]
                del pending[:self.max_batch_size]
                if jobs:
                    self.stats["cohorts"] += 1
                    self.stats["batch_sizes"][len(jobs)] += 1
                    self._start(units, jobs)
            for u in list(units):
                if u in units and self._ready(units, u):
                    try:
                        alive = u.step()
                        # rows ended and none wait: the frames at the bucket its rows need
                        if (alive and self.widen and not pending and u.feed is None
                                and not u.closed and u.narrow()):
                            self.stats["narrowed"] += 1
                    except Exception as e:  # noqa: BLE001 - a bug must not kill the server
                        log.exception("generation failed")
                        units.remove(u)
                        self._isolate(units, u.release(), e)
                        continue
                    finally:
                        self.beat = time.monotonic()
                    if not alive:
                        units.remove(u)
            self.active = sum(len(u.open_rows) for u in units)

    def _ready(self, units: list, u: _Cohort) -> bool:
        """`u.ready()`, guarded: a failure there (a session's text update) fails that cohort's
        requests (each restarted alone, as a failed step)."""
        try:
            return u.ready()
        except Exception as e:  # noqa: BLE001 - a bug must not kill the server
            log.exception("updating a cohort failed")
            if u in units:
                units.remove(u)
            self._isolate(units, u.release(), e)
            return False

    def _isolate(self, units: list, jobs: list[Job], e: Exception) -> None:
        """The requests of a cohort that failed: alone, or one restarted already, a request
        fails with the error; with others, each restarts alone in a cohort of its own (same
        key: the same codes as in the failed cohort), so only the request at fault fails. A
        stream that has sent audio restarts too, unseen: the samples its client already has
        are generated again and dropped (`skip_samples`), and the rest follows, the audio it
        would have had. A text session that has started cannot restart (its text was read):
        it fails with the error."""
        retry = [j for j in jobs if not j.retried and (j.frames == 0 or j.feed is None)] \
            if len(jobs) > 1 else []
        for j in jobs:
            if j not in retry:
                self._fail_job(j, e)
        for j in retry:
            j.retried = True
            j.skip_samples, j.frames = j.sent_samples, 0
            self.stats["retried"] += 1
            self._start(units, [j], retry=True)

    def _refill(self, units: list, batch: _Cohort, pending: list[Job]) -> None:
        """Start waiting jobs, oldest first, in the running batch's free rows. A job that does
        not fit its shapes closes the batch (it drains, and the next one forms with that job
        first), so a long prompt is not passed over forever by short ones. A job whose start
        fails restarts alone (once), and the batch takes no more."""
        while pending and not batch.closed:
            row, B = batch.free_row(), len(batch.rows)
            if row is None and self.widen and B < self.max_batch_size and batch.fits(pending[0]):
                # every row taken: a larger bucket gives the waiting jobs rows now
                try:
                    batch.widen(self._bucket(min(B + len(pending), self.max_batch_size)))
                except Exception:  # noqa: BLE001 - a bug must not kill the server
                    log.exception("widening a running batch failed")
                    batch.closed = True
                    return
                self.stats["widened"] += 1
                row = batch.free_row()
            if row is None:
                return
            if not batch.fits(pending[0]):
                batch.closed = True
                return
            job = pending.pop(0)
            if not self._admit(job):
                continue
            try:
                batch.take(job, row)
            except Exception as e:  # noqa: BLE001 - a bug must not kill the server
                log.exception("starting a request in a running batch failed")
                batch.closed = True
                batch.open_rows.discard(row)
                if job.retried:
                    self._fail_job(job, e)
                else:
                    job.retried = True
                    self.stats["retried"] += 1
                    self._start(units, [job], retry=True)
                return
            self.stats["joined"] += 1

    def _pull(self, timeout: float) -> list:
        """Everything queued: the first item waited for up to `timeout`, the rest as they are."""
        items = []
        try:
            items.append(self._queue.get(timeout=timeout) if timeout > 0
                         else self._queue.get_nowait())
            while True:
                items.append(self._queue.get_nowait())
        except queue.Empty:
            return items

    def _form_at(self, pending: list[Job]) -> float:
        """When the waiting jobs start: `batch_window` after the last arrival (the batch grows
        while requests keep coming), at most MAX_COLLECT_WINDOWS windows after the first."""
        first = min(j.submitted for j in pending)
        last = max(j.submitted for j in pending)
        return min(last + self.batch_window, first + MAX_COLLECT_WINDOWS * self.batch_window)

    def _start(self, units: list, jobs: list[Job], retry: bool = False) -> None:
        """A cohort of `jobs` (prefill); a retry runs alone (it takes no waiting jobs). A
        failing prefill goes to `_isolate`."""
        try:
            cohort = _Cohort(self, jobs)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the server
            log.exception("prefill failed")
            self._isolate(units, [j for j in jobs if not j.cancelled], e)
            return
        cohort.closed = cohort.closed or retry
        units.append(cohort)

    def _admit(self, job: Job) -> bool:
        if job.feed is None:           # sessions do not count as waiting (`submit`)
            with self._lock:
                self._waiting -= 1
        if job.cancelled:
            self.stats["cancelled"] += 1
            return False
        if time.monotonic() > job.deadline:
            self.stats["timeouts"] += 1
            job.cancelled = True
            job.emit(DeadlineExceeded(f"the request waited {time.monotonic() - job.submitted:.1f}"
                                      " s in the queue and ran out of time before it started"))
            return False
        return True

    def _prefix(self, items: list[prompts.Prompt], slots: int) -> gen.Prefix | None:
        """The stored prompt-prefix KV of a cohort's rows (`PrefixCache.get`, computed on a
        miss) padded to `slots` (the prompt bucket: one compiled program whatever the voice),
        or None where no row has one (or there is no cache)."""
        cache = self.prefix_cache
        if cache is None or not cache.enabled or not any(p.prefix_len for p in items):
            return None
        tts, got = self.tts, {}
        entries = []
        for p in items:
            if id(p) not in got:
                got[id(p)] = cache.get(tts.params, tts.config, p, tts.options)
            entries.append(got[id(p)])
        self._sync_prefix_stats()
        return batch_prefix(entries, [p.prefix_len for p in items], slots)

    def _sync_prefix_stats(self) -> None:
        if self.prefix_cache is not None:
            self.stats.update(self.prefix_cache.stats())
        if self.codec_prefix_states is not None:   # known once a cohort has built its codec
            self.stats.update(self.codec_prefix_states.stats())

    def _bucket(self, n: int) -> int:
        return next(b for b in self.batch_buckets if b >= n)

    def _sampler_kind(self, role: str, kind: str) -> str:
        """The narrowest sampler kind (`sampling.KINDS`) this engine has used for `role` that
        serves `kind`'s settings, so that a cohort reuses a compiled program (a greedy request
        on a server that has run sampled ones runs their program instead of compiling another
        one while every stream waits); `kind` itself (compiled on first use) if none has."""
        used = self._kinds.setdefault(role, set())
        for k in sampling.KINDS[sampling.KINDS.index(kind):]:
            if k in used:
                return k
        used.add(kind)
        return kind

    def _settings(self, rows: list[Job | None]) -> gen.Settings:
        """Per-row settings of a cohort's rows (padding rows stop at once), with the sampler
        kinds this engine has compiled (`_sampler_kind`)."""
        options = self.tts.options
        return traced([None if j is None else j.settings for j in rows], options,
                      kind=lambda role, cols: self._sampler_kind(
                          role, sampling.kind_of(**cols, options=options)))

    def _decode(self, histories: list[np.ndarray], new: list[np.ndarray]) -> list[np.ndarray]:
        """Whole utterances (rows of whole-file formats, once they ended), each after its prefix
        (an ICL reference), by the offline API's decode (the official 300-frame chunks): one codec
        batch, rows padded on the right (which the causal decoder ignores), the batch padded to a
        batch bucket so that few programs are compiled. Returns the new samples only."""
        codec = self.tts.speech_tokenizer
        up = codec.config.decode_upsample_rate
        T = max(len(c) + len(x) for c, x in zip(histories, new))
        window = np.zeros((self._bucket(len(new)), T, new[0].shape[-1]), np.int32)
        for i, (c, x) in enumerate(zip(histories, new)):
            window[i, :len(c) + len(x)] = np.concatenate([c, x])
        wave = bucketed_decode(codec.params, codec.config.decoder, window)
        # the reference's part cut like the offline API and the official: int(ref / total *
        # samples), one sample short of the reference's samples for some lengths
        cut = [int(len(c) / (len(c) + len(x)) * ((len(c) + len(x)) * up))
               for c, x in zip(histories, new)]
        return [wave[i, k:(len(c) + len(x)) * up].copy()
                for i, (k, c, x) in enumerate(zip(cut, histories, new))]


def stream_pieces(model, pieces, feed: TextFeed, settings: GenerationSettings, key,
                  chunk_frames: int, first_chunk_frames: int, ref_code=None):
    """Audio chunks of one utterance whose text comes from the iterator `pieces`, on a one-row
    engine of its own (what the server's WebSocket text sessions run): a thread reads the pieces
    into `feed` while the engine's thread generates, extending the frame loop's trailing text
    between chunks and never running a frame past the tokens received until the iterator ends.
    Tokens are committed where a word ends whatever follows (`commit_point`), so the codes are
    those of the offline streaming-mode generation of the whole text with the same key. Closing
    the generator early (or an exception from `pieces`) stops the generation. Reading stops once
    the text holds more tokens than `max_new_tokens` frames can read (an endless iterator ends
    the utterance at its budget, as the whole text would)."""
    out: queue.Queue = queue.Queue()
    job = Job(None, settings, emit=out.put, key=key, ref_code=ref_code, feed=feed)
    engine = BatchEngine(model, max_batch_size=1, batch_window=0.0, max_queue=1,
                         chunk_frames=chunk_frames, first_chunk_frames=first_chunk_frames)
    # Text tokens the frames can read (`TextFeed.trailing`): past them, reading stops (an endless
    # iterator too); so does a text with no place to commit tokens, past 32 chars a token.
    readable = feed.room - len(feed.prefix) + settings.max_new_tokens
    max_chars = 32 * readable + 4096

    def read() -> None:
        try:
            for i, piece in enumerate(pieces):
                if job.cancelled:
                    return
                if not isinstance(piece, str):
                    raise TypeError(f"text piece {i} is a {type(piece).__name__}, not a str")
                feed.push(piece)
                engine.wake()
                if len(feed.tokens) >= readable or feed.chars > max_chars:
                    break         # the rest could not be spoken within max_new_tokens
            if not feed.snapshot()[0] and not feed.text.strip():
                raise ValueError("the text pieces ended without any text")
            feed.push("", final=True)
            engine.wake()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
            job.cancelled = True
            out.put(e)

    engine.start()
    try:
        engine.submit(job)
        threading.Thread(target=read, name="qwen3-tts-text", daemon=True).start()
        while True:
            item = out.get()
            if item is None:
                if job.finish_reason == "length":
                    warn_budget_reached([0], [job.frames], 1, settings.max_new_tokens)
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        job.cancelled = True
        engine.stop()


class EnginePool:
    """Data parallel over devices: one `BatchEngine` per device, each over its own copy of the
    weights (`Qwen3TTS.on_device`) with its own worker thread, batches and continuous refill; no
    collective between them. A job goes to the engine with the fewest jobs running or waiting
    (ties: the first device), so a burst is dealt round the devices and a device whose rows
    ended gets the next job. The interface is `BatchEngine`'s: `submit`, `call` (on the first
    device's worker), `wake` (every worker), `warmup` (every device at once), `start`, `stop`,
    and `stats`, `waiting`, `active` summed over the devices (`per_device` has each)."""

    def __init__(self, tts, devices=None, max_queue: int = 64, **engine_kwargs):
        devices = list(jax.local_devices() if devices is None else devices)
        if not devices:
            raise ValueError("an engine pool needs at least one device")
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.tts, self.devices, self.max_queue = tts, devices, max_queue
        self.engines = [BatchEngine(tts.on_device(d), max_queue=max_queue, **engine_kwargs)
                        for d in devices]
        self.batch_buckets = self.engines[0].batch_buckets
        self._lock = threading.Lock()
        self._rejected = 0

    def start(self) -> "EnginePool":
        for e in self.engines:
            e.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        for e in self.engines:
            e._stop.set()
            e.wake()
        for e in self.engines:
            e.stop(timeout)

    @property
    def waiting(self) -> int:
        return sum(e.waiting for e in self.engines)

    @property
    def active(self) -> int:
        return sum(e.active for e in self.engines)

    def health(self) -> str | None:
        """None while every device's worker is healthy; else the first one's reason."""
        return next((f"{d}: {r}" for d, r in ((d, e.health()) for d, e in
                                               zip(self.devices, self.engines)) if r), None)

    def submit(self, job: Job) -> None:
        """Queue a job on the least busy device; QueueFull if `max_queue` jobs already wait (a
        text session does not count, as in `BatchEngine.submit`)."""
        with self._lock:
            waiting = self.waiting
            if job.feed is None and waiting >= self.max_queue:
                self._rejected += 1
                raise QueueFull(f"{waiting} requests are already waiting (the limit is "
                                f"{self.max_queue}); retry later")
            min(self.engines, key=lambda e: e.waiting + e.active).submit(job)

    def call(self, fn: Callable[[], object]) -> Future:
        return self.engines[0].call(fn)

    def caches_have_room(self) -> bool:
        return all(e.caches_have_room() for e in self.engines)

    def prime(self, job: Job) -> Future:
        """`BatchEngine.prime` on every device (each has its own caches): True where any
        computed something."""
        futures = [e.prime(job) for e in self.engines]
        done: Future = Future()
        left, lock = [len(futures)], threading.Lock()

        def gather(_) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                done.set_exception(errors[0])
            else:
                done.set_result(any(f.result() for f in futures))

        for f in futures:
            f.add_done_callback(gather)
        return done

    def wake(self) -> None:
        for e in self.engines:
            e.wake()

    def warmup(self, jobs_like: list[Job], chunks: int = 2, whole_file_frames: int = 0) -> float:
        """`BatchEngine.warmup` on every device at once (a thread each). Returns seconds."""
        t = time.perf_counter()
        with ThreadPoolExecutor(len(self.engines)) as ex:
            list(ex.map(lambda e: e.warmup(jobs_like, chunks, whole_file_frames), self.engines))
        return time.perf_counter() - t

    @property
    def per_device(self) -> list[dict]:
        return [{"device": str(d), "queue": e.waiting, "active": e.active,
                 "requests": e.stats["requests"], "frames": e.stats["frames"]}
                for d, e in zip(self.devices, self.engines)]

    @property
    def stats(self) -> dict:
        total: dict = {}
        for e in self.engines:
            for k, v in e.stats.items():
                total[k] = total[k] + v if k in total else copy.copy(v)
        total["rejected_queue_full"] = total.get("rejected_queue_full", 0) + self._rejected
        return total
