"""Dynamic batching for the server: one worker thread owns the model and runs the requests that
arrive together as one padded batch, streaming each row's audio as it is generated.

    engine = BatchEngine(tts, max_batch_size=8, batch_window=0.01)
    engine.start()
    engine.submit(Job(prompt, settings, emit=on_chunk, seed=0))  # on_chunk(ndarray | None | exc)

Batching. Waiting requests are collected until `batch_window` seconds pass with no new arrival
(at most 10 windows in all) or `max_batch_size` are waiting, then run as one batch (a "cohort")
with the same compiled programs as offline generation and `Qwen3TTS._stream`: `generate.prefill`
once, then `generate.decode` with a growing `until` (first after `first_chunk_frames` frames, then
every `chunk_frames`), the state kept on device. After each chunk, every row's new frames are
decoded by the codec in one padded batch, after up to `left_context` frames of that row's earlier
codes, and sent to the row's `emit`. A job with `stream=False` (a whole-file format) is decoded
once, when its row ends, after all of its history: the offline decode.

Per-row end: a row that samples EOS or uses its `max_new_tokens` is finished (its `emit(None)`)
at the next chunk boundary while the others go on; a row whose client went away (`job.cancelled`)
or whose deadline passed stops being decoded, and the cohort stops as soon as no row needs it.

Finished rows are NOT replaced by waiting requests: every row of `generate.State` shares one frame
counter (`step`), which positions, the trailing text, the PRNG folding and the minimum-length rule
all read; a row that joined later would need per-row offsets in `generate.frame_step`. Waiting
requests start as the next cohort when the current one ends.

Text sessions (`Job.feed`, the official streaming text mode fed incrementally): a session runs as
its own one-row cohort, interleaved chunk by chunk with the batch cohort. Its prompt holds the
first text token; the rest is the trailing text that the frame loop reads one token per frame
(`Context.trailing_BxLtxD`), extended between `decode` calls as text arrives, and `until` never
passes the tokens received until the text is final. So its codes are those of the offline
streaming-mode generation of the whole text, however the text was split in time.

Seeds: a job with seed s samples with `PRNGKey(s)`, exactly like `Qwen3TTS` called with
`seed=[s]`, so its audio does not depend on which other requests share its batch.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import logging
import queue
import re
import secrets
import threading
import time
from concurrent.futures import Future
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import generate as gen, prompts, sampling, talker
from ..api import GenerationSettings
from ..buckets import batch_rows, ladder, power_of_two
from ..codec import bucketed_decode
from ..text import assistant_text

log = logging.getLogger("qwen3_tts_jax.server")

MAX_COLLECT_WINDOWS = 10     # a batch waits at most this many windows for company


class QueueFull(Exception):
    """More requests are waiting than the engine accepts (the server answers 429)."""


class DeadlineExceeded(Exception):
    """The job's deadline passed before it finished (the server answers 504)."""


class TextFeed:
    """Text that arrives in pieces (thread-safe), tokenized as it comes.

    Tokens are committed only up to the last whitespace (a word can still grow, and BPE merges
    within it) until the text is final; they are the text tokens of the official prompt,
    `encode(assistant_text(text))[3:-5]`, so a text sent in pieces gives the tokens of the whole
    text (except in the rare case where a later piece changes how an earlier word splits; the
    committed tokens are then kept).

    The official streaming text mode lays the text sequence, `prefix` (an ICL clone's reference
    transcript; else nothing) + the text tokens + EOS, against the prompt's last `room`
    positions (one; an ICL clone: its reference frames + 1) and feeds the rest one per frame
    (`trailing`). A session starts once the prompt's share is there or the text is final (a
    short final text then ends inside the prompt: `build` gets it whole)."""

    def __init__(self, tokenizer, build: Callable[[list[int], bool], prompts.Prompt],
                 room: int = 1, prefix: tuple[int, ...] = (), eos_id: int = 0, pad_id: int = 0):
        self.tokenizer = tokenizer
        self.build = build              # (committed text tokens, final) -> the prompt
        self.room, self.prefix = max(1, room), list(prefix)
        self.eos_id, self.pad_id = eos_id, pad_id
        self.text = ""
        self.final = False
        self.tokens: list[int] = []
        self._lock = threading.Lock()

    def can_start(self, tokens: list[int], final: bool) -> bool:
        return final or bool(tokens) and len(self.prefix) + len(tokens) >= self.room

    def trailing(self, tokens: list[int], final: bool) -> np.ndarray:
        """The text ids the frames read after the prompt: the sequence past the prompt's share,
        EOS last once final (a pad alone where the final text ended inside the prompt)."""
        seq = self.prefix + list(tokens) + ([self.eos_id] if final else [])
        if final and len(seq) <= self.room:
            return np.asarray([self.pad_id], np.int32)
        return np.asarray(seq[self.room:], np.int32)

    def push(self, piece: str, final: bool = False) -> None:
        with self._lock:
            if self.final:
                raise ValueError("the text was already ended")
            self.text += piece
            self.final = final
            cut = len(self.text) if final else max(
                (m.start() for m in re.finditer(r"\s", self.text)), default=0)
            if self.text[:cut].strip():
                toks = self.tokenizer.encode(assistant_text(self.text[:cut]))[3:-5]
                if len(toks) > len(self.tokens):
                    self.tokens = self.tokens + toks[len(self.tokens):]

    def snapshot(self) -> tuple[list[int], bool]:
        with self._lock:
            return list(self.tokens), self.final


@dataclasses.dataclass(eq=False)
class Job:
    """One utterance to generate. `emit` is called from the worker thread with each float32 audio
    chunk (24 kHz), then None at the end, or an exception instead."""
    prompt: prompts.Prompt | None
    settings: GenerationSettings
    emit: Callable[[object], None]
    seed: int | None = None
    ref_code: np.ndarray | None = None      # ICL clone: the codec's first left context
    stream: bool = True                     # False: one chunk at the end, the whole utterance
    feed: TextFeed | None = None            # a text session: the text arrives in pieces
    deadline: float = float("inf")          # time.monotonic() by which it must be finished
    cancelled: bool = False                 # set by the client side: stop generating it
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    started: float | None = None
    frames: int = 0
    batch_size: int = 0                     # requests in the cohort it ran in


@functools.partial(jax.jit, static_argnames=("dtype", "act"))
def _embed_text(tp, ids_BxL, dtype, act):
    return talker.embed_text(tp, ids_BxL, act).astype(dtype)


class _Cohort:
    """Rows generated together: prefill at creation, then `step()` runs one chunk and emits."""

    def __init__(self, engine: "BatchEngine", jobs: list[Job]):
        self.engine, self.jobs = engine, jobs
        self.feed = jobs[0].feed
        tts, cfg = engine.tts, engine.tts.config
        n = len(jobs)
        now = time.monotonic()
        for j in jobs:
            j.started, j.batch_size = now, n
        B = engine._bucket(n)
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
        self.settings = engine._settings(jobs, B)
        keys = [jax.random.PRNGKey(secrets.randbits(31) if j.seed is None else int(j.seed))
                for j in jobs]
        keys = jnp.stack(keys + [keys[0]] * (B - n))
        self.max_frames = max(j.settings.max_new_tokens for j in jobs) - 1
        self.full = power_of_two(self.max_frames)
        self.capacity = min(self.full, gen.FIRST_FRAMES)
        self.state, self.ctx = gen.prefill(
            tts.params, cfg, batch.text_BxL, batch.codec_BxLxG, batch.mask_BxL, batch.extra_BxD,
            batch.extra_pos_B, batch.trailing_BxLt, batch.trailing_len_B, self.settings, keys,
            frames=self.capacity)
        G = cfg.talker.num_code_groups
        self.history = [np.zeros((0, G), np.int32) if j.ref_code is None
                        else np.asarray(j.ref_code, np.int32) for j in jobs]
        self.emitted = [0] * n
        self.open_rows = set(range(n))          # rows whose client still expects audio
        self.step_n = 0                         # frames generated (host copy of state.step)
        self.target = engine.first_chunk_frames
        self.text_final = self.feed is None

    def _update_text(self) -> None:
        """Extend a session's trailing text with what arrived since the last chunk."""
        tokens, final = self.feed.snapshot()
        if len(tokens) == len(self.tokens) and final == self.text_final:
            return
        self.tokens, self.text_final = tokens, final
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

    def _limit(self) -> int:
        """Frames that may exist now: a session's frame n reads trailing token n, so until the
        text is final no frame may run past the tokens received."""
        return self.max_frames if self.text_final else len(
            self.feed.trailing(self.tokens, False))

    def ready(self) -> bool:
        if self.feed is not None and not self.text_final:
            self._update_text()
        return self.text_final or self._limit() > self.step_n or any(
            self.jobs[b].cancelled for b in self.open_rows)

    def step(self) -> bool:
        """One chunk: decode frames, emit audio, end rows. False when the cohort is finished."""
        engine, tts, cfg = self.engine, self.engine.tts, self.engine.tts.config
        jobs, open_rows, stats = self.jobs, self.open_rows, engine.stats
        for b in list(open_rows):
            if jobs[b].cancelled:
                open_rows.discard(b)
                stats["cancelled"] += 1
        if not open_rows:
            return False
        until = min(self.target, self._limit())
        while until > self.capacity and self.capacity < self.full:
            self.capacity = min(2 * self.capacity, self.full)
            self.state = gen.grow(self.state, self.capacity)
        self.state = gen.decode(tts.params, cfg, self.state, self.ctx, self.settings,
                                min(until, self.capacity))
        codes = np.asarray(self.state.codes_BxFxG)
        lengths, done = np.asarray(self.state.length_B), np.asarray(self.state.done_B)
        self.step_n = step = int(self.state.step)
        ended = done | (step >= self.max_frames)
        # streamed rows: their new frames; whole-file rows: all their frames once done
        ready = [b for b in sorted(open_rows) if lengths[b] > self.emitted[b]]
        whole = [b for b in ready if not jobs[b].stream and ended[b]]
        for rows in ([b for b in ready if jobs[b].stream], whole):
            if not rows:
                continue
            new = [codes[b, self.emitted[b]:lengths[b]] for b in rows]
            waves = engine._decode([self.history[b] for b in rows], new, whole=rows is whole)
            for b, c, w in zip(rows, new, waves):
                self.history[b] = np.concatenate([self.history[b], c])
                self.emitted[b] = jobs[b].frames = int(lengths[b])
                jobs[b].emit(w)
            stats["frames"] += sum(len(c) for c in new)
        now = time.monotonic()
        for b in list(open_rows):
            if ended[b]:
                open_rows.discard(b)
                stats["finished"] += 1
                jobs[b].emit(None)
            elif now > jobs[b].deadline:
                open_rows.discard(b)
                jobs[b].cancelled = True
                stats["timeouts"] += 1
                jobs[b].emit(DeadlineExceeded(
                    f"the request ran out of time after {jobs[b].frames} frames"))
        self.target = step + engine.chunk_frames
        return bool(open_rows)

    def fail(self, e: Exception) -> None:
        for b in self.open_rows:
            if not self.jobs[b].cancelled:
                self.engine.stats["errors"] += 1
                self.jobs[b].cancelled = True
                self.jobs[b].emit(e)
        self.open_rows.clear()


class BatchEngine:
    """The worker thread and its queue. `submit` is thread-safe; so is `call`, which runs a
    function on the worker between chunks (device work that must not overlap generation), and
    `wake`, which a text session's feeder calls when text arrived."""

    def __init__(self, tts, max_batch_size: int = 8, batch_window: float = 0.01,
                 max_queue: int = 64, chunk_frames: int = 12, first_chunk_frames: int = 3,
                 left_context: int = 72, batch_buckets: tuple[int, ...] | None = None,
                 min_prompt_bucket: int = 16):
        if max_batch_size < 1 or max_queue < 1 or chunk_frames < 1 or first_chunk_frames < 1:
            raise ValueError("max_batch_size, max_queue, chunk_frames and first_chunk_frames "
                             "must be >= 1")
        self.tts = tts
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window
        self.max_queue = max_queue
        self.chunk_frames = chunk_frames
        self.first_chunk_frames = first_chunk_frames
        self.left_context = left_context
        # Padded batch sizes (one compiled program set each): powers of two up to the maximum by
        # default, from the backend's fewest rows (`buckets.MIN_ROWS`: two on a GPU); a single
        # bucket (e.g. (8,)) compiles once and pads every batch to it.
        backend = jax.default_backend()
        self.batch_buckets = tuple(sorted(batch_buckets or {batch_rows(n, backend) for n in
                                                            range(1, max_batch_size + 1)}))
        if self.batch_buckets[-1] < max_batch_size:
            raise ValueError(f"batch buckets {list(self.batch_buckets)} do not reach "
                             f"max_batch_size {max_batch_size}")
        self.min_prompt_bucket = min_prompt_bucket
        self._queue: queue.Queue = queue.Queue()
        self._waiting = 0                     # jobs submitted and not started or dropped
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.active = 0                       # rows in running cohorts
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "timeouts": 0, "errors": 0,
                      "rejected_queue_full": 0, "cohorts": 0, "sessions": 0, "frames": 0,
                      "batch_sizes": collections.Counter()}

    # ------------------------------------------------------------------ client side
    def start(self) -> "BatchEngine":
        self._thread = threading.Thread(target=self._loop, name="qwen3-tts-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, job: Job) -> None:
        """Queue a job (or a text session); QueueFull if `max_queue` jobs are already waiting."""
        with self._lock:
            if self._waiting >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull(f"{self._waiting} requests are already waiting (the limit is "
                                f"{self.max_queue}); retry later")
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

    def warmup(self, jobs_like: list[Job], chunks: int = 2) -> float:
        """Compile before serving (call it before `start`): for every job in `jobs_like` (one per
        prompt bucket) and every batch bucket, a cohort of that many copies runs its prefill and
        `chunks` chunks: the programs that a first request of those shapes would compile (the
        frame loop at the first KV-cache size, the first codec windows). Nothing is emitted and
        the stats stay as they were. Returns seconds."""
        if self._thread is not None:
            raise RuntimeError("warm the engine up before start()")
        t, stats = time.perf_counter(), copy.deepcopy(self.stats)
        for like in jobs_like:
            for B in self.batch_buckets:
                cohort = _Cohort(self, [dataclasses.replace(like, emit=lambda _: None)
                                        for _ in range(B)])
                for _ in range(chunks):
                    if not cohort.step():
                        break
        self.stats = stats
        return time.perf_counter() - t

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        pending: list[Job] = []          # waiting for the next batch
        sessions: list[Job] = []         # text sessions waiting for their first token
        units: list[_Cohort] = []        # running: at most one batch cohort, and sessions
        while not self._stop.is_set():
            batch_running = any(u.feed is None for u in units)
            runnable = [u for u in units if u.ready()]
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
            for job in list(sessions):
                tokens, final = job.feed.snapshot()
                if job.cancelled or job.feed.can_start(tokens, final):
                    sessions.remove(job)
                    if not self._admit(job):
                        continue
                    if not tokens:
                        job.emit(ValueError("the session ended without any text"))
                        continue
                    self.stats["sessions"] += 1
                    self._start(units, [job])
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
                if u.ready():
                    try:
                        alive = u.step()
                    except Exception as e:  # noqa: BLE001 - a bug must not kill the server
                        log.exception("generation failed")
                        u.fail(e)
                        alive = False
                    if not alive:
                        units.remove(u)
            self.active = sum(len(u.open_rows) for u in units)

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

    def _start(self, units: list, jobs: list[Job]) -> None:
        try:
            units.append(_Cohort(self, jobs))
        except Exception as e:  # noqa: BLE001 - a bug must not kill the server
            log.exception("prefill failed")
            for j in jobs:
                self.stats["errors"] += 1
                j.cancelled = True
                j.emit(e)

    def _admit(self, job: Job) -> bool:
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

    def _bucket(self, n: int) -> int:
        return next(b for b in self.batch_buckets if b >= n)

    def _settings(self, jobs: list[Job], B: int) -> gen.Settings:
        """Per-row settings; padding rows copy row 0 and get a budget of 1 (they stop at once)."""
        rows = [j.settings for j in jobs] + [jobs[0].settings] * (B - len(jobs))
        col = lambda name: [getattr(s, name) for s in rows]
        talker_p = sampling.SamplingParams.create(
            B, do_sample=col("do_sample"), temperature=col("temperature"), top_k=col("top_k"),
            top_p=col("top_p"))
        predictor = sampling.SamplingParams.create(
            B, do_sample=col("subtalker_dosample"), temperature=col("subtalker_temperature"),
            top_k=col("subtalker_top_k"), top_p=col("subtalker_top_p"))
        budget = [j.settings.max_new_tokens for j in jobs] + [1] * (B - len(jobs))
        return gen.Settings(talker_p, predictor,
                            jnp.asarray(np.asarray(col("repetition_penalty"), np.float32)),
                            jnp.asarray(np.asarray(budget, np.int32)))

    def _decode(self, histories: list[np.ndarray], new: list[np.ndarray], whole: bool = False
                ) -> list[np.ndarray]:
        """Each row's new frames decoded after up to `left_context` frames of its history (all of
        it with `whole`, as the offline decode does): one codec batch (rows padded on the right,
        which the causal decoder ignores; the batch padded to a batch bucket so that few programs
        are compiled). Returns the new samples only."""
        codec = self.tts.speech_tokenizer
        up = codec.config.decode_upsample_rate
        keep = None if whole else self.left_context
        ctx = [h if keep is None else h[max(0, len(h) - keep):] for h in histories]
        T = max(len(c) + len(x) for c, x in zip(ctx, new))
        Bc = self._bucket(len(new))
        window = np.zeros((Bc, T, new[0].shape[-1]), np.int32)
        for i, (c, x) in enumerate(zip(ctx, new)):
            window[i, :len(c) + len(x)] = np.concatenate([c, x])
        wave = bucketed_decode(codec.params, codec.config.decoder, window, chunk_size=None)
        return [wave[i, len(c) * up:(len(c) + len(x)) * up].copy()
                for i, (c, x) in enumerate(zip(ctx, new))]
