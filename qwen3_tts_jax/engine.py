"""The batching engine under every front door (the server, the batch tool, the API's text in
pieces): one worker thread owns the model and runs the requests that arrive together as one
padded batch, streaming each row's audio as it is generated.

    engine = BatchEngine(tts, max_batch_size=8, batch_window=0.01)
    engine.start()
    engine.submit(Job(prompt, settings, emit=on_chunk, seed=0))  # on_chunk(ndarray | None | exc)

Batching. Waiting requests are collected until `batch_window` seconds pass with no new arrival
(at most 10 windows in all) or `max_batch_size` are waiting, then run as one batch, a
`cohort.Cohort` (how a batch runs chunk by chunk, refills, widens and narrows, and how text
sessions and cloned voices' prefixes run: cohort.py). The worker interleaves the batch cohort,
cohorts retried alone and text sessions (each its own one-row cohort) chunk by chunk; it bounds
the queue (`QueueFull`), restarts after a failure (`EngineUnavailable` for the jobs it held) and
reports a stall (`health`). `call` runs other device work (a voice's encoding, `prime`) between
chunks.

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
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import generate as gen, prompts, sampling
from .budget import warn_budget_reached
from .buckets import batch_rows, ladder
from .cohort import Cohort, DeadlineExceeded, Job, prefix_computes  # noqa: F401 - re-exported
from .prefix_cache import PrefixCache, batch_prefix
from .settings import traced
from .codec import StreamDecoder, bucketed_decode
from .codec import decoder as codec_decoder
from .codec.tokenizer import CHUNK_SIZE, LEFT_CONTEXT, frame_bucket
from .text_feed import TextFeed, commit_point  # noqa: F401 - re-exported
from .text_session import TextSession

log = logging.getLogger("qwen3_tts_jax.server")  # the server logs it

MAX_COLLECT_WINDOWS = 10     # a batch waits at most this many windows for company


class QueueFull(Exception):
    """More requests are waiting than the engine accepts (the server answers 429)."""


def queue_full(waiting: int, more: int, limit: int) -> QueueFull:
    return QueueFull(f"{waiting} requests are already waiting"
                     + (f" and this batch has {more}" if more > 1 else "")
                     + f" (the limit is {limit}); retry later")


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
        self._units: list[Cohort] = []
        self._codec_worker: ThreadPoolExecutor | None = None   # `Options.codec_overlap`
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "timeouts": 0, "errors": 0,
                      "rejected_queue_full": 0, "cohorts": 0, "joined": 0, "widened": 0,
                      "narrowed": 0, "sessions": 0, "frames": 0, "retried": 0, "worker_restarts": 0,
                      "budget_reached": 0, "batch_sizes": collections.Counter()}
        self.sync_prefix_stats()

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

    def codec_thread(self) -> ThreadPoolExecutor:
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
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue every job or none (the server's batch requests): QueueFull if they do not all
        fit in the queue."""
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            raise EngineUnavailable(f"the server's engine is down ({self.health()})")
        with self._lock:
            queued = sum(j.feed is None for j in jobs)
            if queued and self._waiting + queued > self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise queue_full(self._waiting, queued, self.max_queue)
            self._waiting += queued
            self.stats["requests"] += len(jobs)
        for job in jobs:
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
                cohort = Cohort(self, [quiet() for _ in range(B)])
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
                if like.prompt is not None and self.prefix_for([like.prompt], cohort.L):
                    for c in prefix_computes(cohort.L):
                        Cohort(self, [quiet() for _ in range(B)], compute=c)
                        cohort.take(quiet(), 0, compute=c)
        if whole_file_frames:
            self.warm_whole_file(whole_file_frames)
        self.stats = stats
        self.sync_prefix_stats()
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
            self.sync_prefix_stats()
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

    def _ready(self, units: list, u: Cohort) -> bool:
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

    def _refill(self, units: list, batch: Cohort, pending: list[Job]) -> None:
        """Start waiting jobs, oldest first, in the running batch's free rows. A job that does
        not fit its shapes closes the batch (it drains, and the next one forms with that job
        first), so a long prompt is not passed over forever by short ones. A job whose start
        fails restarts alone (once), and the batch takes no more."""
        while pending and not batch.closed:
            row, B = batch.free_row(), len(batch.rows)
            if row is None and self.widen and B < self.max_batch_size and batch.fits(pending[0]):
                # every row taken: a larger bucket gives the waiting jobs rows now
                try:
                    batch.widen(self.bucket(min(B + len(pending), self.max_batch_size)))
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
            cohort = Cohort(self, jobs)
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

    def prefix_for(self, items: list[prompts.Prompt], slots: int) -> gen.Prefix | None:
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
        self.sync_prefix_stats()
        return batch_prefix(entries, [p.prefix_len for p in items], slots)

    def sync_prefix_stats(self) -> None:
        if self.prefix_cache is not None:
            self.stats.update(self.prefix_cache.stats())
        if self.codec_prefix_states is not None:   # known once a cohort has built its codec
            self.stats.update(self.codec_prefix_states.stats())

    def bucket(self, n: int) -> int:
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

    def settings_for(self, rows: list[Job | None]) -> gen.Settings:
        """Per-row settings of a cohort's rows (padding rows stop at once), with the sampler
        kinds this engine has compiled (`_sampler_kind`)."""
        options = self.tts.options
        return traced([None if j is None else j.settings for j in rows], options,
                      kind=lambda role, cols: self._sampler_kind(
                          role, sampling.kind_of(**cols, options=options)))

    def decode_whole(self, histories: list[np.ndarray], new: list[np.ndarray]) -> list[np.ndarray]:
        """Whole utterances (rows of whole-file formats, once they ended), each after its prefix
        (an ICL reference), by the offline API's decode (the official 300-frame chunks): one codec
        batch, rows padded on the right (which the causal decoder ignores), the batch padded to a
        batch bucket so that few programs are compiled. Returns the new samples only."""
        codec = self.tts.speech_tokenizer
        up = codec.config.decode_upsample_rate
        T = max(len(c) + len(x) for c, x in zip(histories, new))
        window = np.zeros((self.bucket(len(new)), T, new[0].shape[-1]), np.int32)
        for i, (c, x) in enumerate(zip(histories, new)):
            window[i, :len(c) + len(x)] = np.concatenate([c, x])
        wave = bucketed_decode(codec.params, codec.config.decoder, window)
        # the reference's part cut like the offline API and the official: int(ref / total *
        # samples), one sample short of the reference's samples for some lengths
        cut = [int(len(c) / (len(c) + len(x)) * ((len(c) + len(x)) * up))
               for c, x in zip(histories, new)]
        return [wave[i, k:(len(c) + len(x)) * up].copy()
                for i, (k, c, x) in enumerate(zip(cut, histories, new))]


def stream_pieces(model, pieces, session: TextSession, chunk_frames: int,
                  first_chunk_frames: int):
    """Audio chunks of one utterance whose text comes from the iterator `pieces`, on a one-row
    engine of its own (what the server's WebSocket text sessions run): a thread reads the pieces
    into `session` (its segments' feeds: `TextSession`) while the engine's thread generates,
    extending the frame loop's trailing text between chunks and never running a frame past the
    tokens received until the iterator ends. Tokens are committed where a word ends whatever
    follows (`commit_point`), so the codes are those of the offline streaming-mode generation of
    the whole text (of each segment) with the same key. Segments play one after another with
    the session's pause between. Closing the generator early (or an exception from `pieces`)
    stops the generation. In one pass, reading stops once the text holds more tokens than
    `max_new_tokens` frames can read (an endless iterator ends the utterance at its budget, as
    the whole text would); in segments the text goes on as long as the iterator does."""
    out: queue.Queue = queue.Queue()
    engine = BatchEngine(model, max_batch_size=1, batch_window=0.0, max_queue=1,
                         chunk_frames=chunk_frames, first_chunk_frames=first_chunk_frames)
    first = session.job(0)
    # Text tokens the frames can read (`TextFeed.trailing`): past them, reading stops (an endless
    # iterator too); so does a text with no place to commit tokens, past 32 chars a token.
    readable = first.feed.room - len(first.feed.prefix) + first.settings.max_new_tokens
    max_chars = 32 * readable + 4096

    def read() -> None:
        said = False
        try:
            for i, piece in enumerate(pieces):
                if first.cancelled:
                    return
                if not isinstance(piece, str):
                    raise TypeError(f"text piece {i} is a {type(piece).__name__}, not a str")
                said = said or bool(piece.strip())
                session.push(piece)
                engine.wake()
                if session.cut is None and (len(first.feed.tokens) >= readable
                                            or first.feed.chars > max_chars):
                    break         # the rest could not be spoken within max_new_tokens
            if not said:
                raise ValueError("the text pieces ended without any text")
            session.push("", final=True)
            engine.wake()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
            session.cancel()
            out.put((None, e))

    def start(j: int) -> None:
        job = session.job(j)
        job.emit = lambda item: out.put((j, item))
        engine.submit(job)

    engine.start()
    try:
        start(0)
        threading.Thread(target=read, name="qwen3-tts-text", daemon=True).start()
        while True:
            j, item = out.get()
            if isinstance(item, BaseException):
                raise item
            if item is not None:
                yield item
                continue
            job = session.jobs[j]
            if job.finish_reason == "length":
                warn_budget_reached([j], [job.frames], max(len(session.jobs), j + 1),
                                    job.settings.max_new_tokens)
            if not session.follows(j):
                return
            if session.pause:
                yield np.zeros(session.pause, np.float32)
            start(j + 1)
    finally:
        session.cancel()
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
        self.submit_all([job])

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue every job (each on the least busy device then) or none: QueueFull if they do
        not all fit in the queue."""
        with self._lock:
            waiting, queued = self.waiting, sum(j.feed is None for j in jobs)
            if queued and waiting + queued > self.max_queue:
                self._rejected += 1
                raise queue_full(waiting, queued, self.max_queue)
            for job in jobs:
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
