"""One running batch of the engine (`engine.BatchEngine`): a `Cohort` of `Job`s.

Chunks. A cohort runs with the same compiled programs as offline generation and
`generate.stream`: `generate.prefill` once, then `generate.decode` with a growing `until` (first
after `first_chunk_frames` frames, then every `chunk_frames`), the state kept on device. After
each chunk, every row's new frames go to the cohort's `StreamDecoder` (one codec call for the due
rows, at the smallest batch bucket that holds them, the codec's state carried on device from
chunk to chunk, so a chunk costs only its new frames and the stream is the offline audio), and
the audio to the row's `emit`. A job with `stream=False` (a whole-file format) is decoded once,
when its row ends: the offline decode. After a chunk that is no row's first, its codec work may
run beside the next chunk's frames (`Options.codec_overlap`: "thread" on a worker thread of the
engine, "queue" dispatched before them; the cohort's `held` audio is handed out right after the
next chunk's frames are dispatched): the same audio, later by at most that dispatch. A row taken
meanwhile does not wait for that work: its prefill runs beside it, and its codec stream restarts
once the held audio is out (`_Held.after`).

Per-row end: a row that samples EOS or uses its `max_new_tokens` is finished (its `emit(None)`,
`Job.finish_reason` "stop" or "length") at the next chunk boundary while the others go on; a row
whose client went away (`job.cancelled`) or whose deadline passed stops being decoded, and the
cohort stops as soon as no row needs it.

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
cache's counters are in the engine's `stats` (prefix_cache_*). Likewise the codec: the decoder's
state after a voice's reference codes is kept by the speech tokenizer (`codec.PrefixStates`,
counters codec_prefix_*), so a later request of that voice decodes only its own frames before its
first chunk, not the reference's. `BatchEngine.prime` fills both before a voice's first request.

Seeds: a job with seed s samples with `PRNGKey(s)`, exactly like `Qwen3TTS` called with
`seed=[s]`, so its audio does not depend on which other requests share its batch (or device),
up to float rounding: a row that starts in a running batch sits in other cache slots, and at full
size its sums round differently, which can flip a near-tied code (docs/serving.md).

A cohort reads its engine's settings (`chunk_frames`, `admit_frames`, buckets, ...) and calls its
`settings_for`, `prefix_for`, `sync_prefix_stats`, `bucket`, `codec_thread` and `decode_whole`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import generate as gen, prompts, talker
from .budget import text_budget
from .buckets import ladder, power_of_two
from .codec import StreamDecoder
from .settings import GenerationSettings
from .text_feed import TextFeed

log = logging.getLogger("qwen3_tts_jax.server")  # the server logs it


class DeadlineExceeded(Exception):
    """The job's deadline passed before it finished (the server answers 504)."""


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


class Cohort:
    """Rows generated together: prefill at creation, then `step()` runs one chunk and emits.

    A batch cohort (not a text session) refills rows: a waiting job whose prompt fits the
    cohort's buckets starts in a free row (`take`: a padding row, or one whose request ended)
    with `generate.insert`, and the cohort forgets the frames before its oldest open row
    (`generate.shift`) when it needs room at the end. `closed`: takes no more jobs (it drains)."""

    def __init__(self, engine, jobs: list[Job], compute: int | None = None):
        self.engine = engine
        self.feed = jobs[0].feed
        tts, cfg = engine.tts, engine.tts.config
        n = len(jobs)
        now = time.monotonic()
        for j in jobs:
            j.started, j.batch_size = now, n
        B = engine.bucket(n)
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
        self.settings = engine.settings_for(self.rows)
        keys = [self._key(j) for j in jobs]
        keys = jnp.stack(keys + [keys[0]] * (B - n))
        self.first_frame = [0] * B              # host copy of ctx.first_frame_B
        self.capacity = gen.capacity(max(self._need(range(n)), engine.min_frames), tts.options)
        # padding rows copy row 0, its prefix too (a padding row without one would make the
        # prefill compute every position)
        prefix = engine.prefix_for(items, self.L)
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
            engine.sync_prefix_stats()
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
        settings = self.engine.settings_for(rows)
        prefix = self.engine.prefix_for([job.prompt], self.L)
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
        rows = self.engine.bucket(len(keep))
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
        self.settings = self.engine.settings_for(self.rows)
        if self.held is not None:        # its codec work, maybe running, has the old rows
            self.held.after.append(functools.partial(self.codec.regroup, order, live))
        else:
            self.codec.regroup(order, live)

    def _reset_codec(self, row: int, job: Job) -> None:
        self.codec.reset(row, prefix=job.ref_code)
        if job.ref_code is not None:
            self.engine.sync_prefix_stats()

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
                self.settings = self.engine.settings_for(self.rows)
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
            return dict(zip(whole, engine.decode_whole(refs, [new[b] for b in whole]))) if whole else {}

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
                future = engine.codec_thread().submit(codec_work)
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
