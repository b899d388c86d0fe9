"""Dynamic batching for the server: one worker thread owns the model and runs the requests that
arrive together as one padded batch, streaming each row's audio as it is generated.

    engine = BatchEngine(tts, max_batch_size=8, batch_window=0.01)
    engine.start()
    engine.submit(Job(prompt, settings, seed=0, emit=on_chunk))  # on_chunk(np.ndarray | None | exc)

The worker takes the first waiting job, waits at most `batch_window` seconds for more (up to
`max_batch_size`), and runs them as one batch ("cohort") with the same compiled programs as
offline generation and `Qwen3TTS._stream`: `generate.prefill` once, then `generate.decode` with a
growing `until` (first after `first_chunk_frames` frames, then every `chunk_frames`), the state
kept on device. After each chunk, every row's new frames are decoded by the codec in one padded
batch, after up to `left_context` frames of that row's earlier codes, and sent to the row's `emit`.

A job with `stream=False` (a whole-file format) is decoded once, when its row ends, after all of
its history: the offline decode, without the re-decoded left context of every chunk.

Per-row end: a row that samples EOS or uses its `max_new_tokens` is finished (its `emit(None)`)
at the next chunk boundary while the others go on; a row whose client went away (`job.cancelled`)
or whose deadline passed stops being decoded, and the cohort stops as soon as no row needs it.

Finished rows are NOT replaced by waiting requests: every row of `generate.State` shares one frame
counter (`step`), which positions, the trailing text, the PRNG folding and the minimum-length rule
all read; a row that joined later would need per-row offsets in `generate.frame_step`. Waiting
requests start as the next cohort when the current one ends (see docs/serving.md for the
latency this costs and why it is bounded).

Seeds: a job with seed s samples with `PRNGKey(s)`, exactly like `Qwen3TTS` called with
`seed=[s]`, so its audio does not depend on which other requests share its batch.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import generate as gen, prompts, sampling
from ..api import GenerationSettings
from ..buckets import ladder, power_of_two
from ..codec import bucketed_decode

log = logging.getLogger("qwen3_tts_jax.server")


class QueueFull(Exception):
    """More requests are waiting than the engine accepts (the server answers 429)."""


class DeadlineExceeded(Exception):
    """The job's deadline passed before it finished (the server answers 504)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One utterance to generate. `emit` is called from the worker thread with each float32 audio
    chunk (24 kHz), then None at the end, or an exception instead."""
    prompt: prompts.Prompt
    settings: GenerationSettings
    emit: Callable[[object], None]
    seed: int | None = None
    ref_code: np.ndarray | None = None      # ICL clone: the codec's first left context
    stream: bool = True                     # False: one chunk at the end, the whole utterance
    deadline: float = float("inf")          # time.monotonic() by which it must be finished
    cancelled: bool = False                 # set by the client side: stop generating it
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    started: float | None = None
    frames: int = 0
    batch_size: int = 0                     # requests in the cohort it ran in


class BatchEngine:
    """The worker thread and its queue. `submit` is thread-safe; so is `call`, which runs a
    function on the worker between cohorts (device work that must not overlap generation)."""

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
        # default; a single bucket (e.g. (8,)) compiles once and pads every batch to it.
        self.batch_buckets = tuple(sorted(batch_buckets or {power_of_two(n, 1) for n in
                                                            range(1, max_batch_size + 1)}))
        if self.batch_buckets[-1] < max_batch_size:
            raise ValueError(f"batch buckets {list(self.batch_buckets)} do not reach "
                             f"max_batch_size {max_batch_size}")
        self.min_prompt_bucket = min_prompt_bucket
        self._queue: queue.Queue = queue.Queue()
        self._waiting = 0                     # jobs in the queue (calls not counted)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.active = 0                       # jobs in the running cohort
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "timeouts": 0, "errors": 0,
                      "rejected_queue_full": 0, "cohorts": 0, "frames": 0,
                      "batch_sizes": collections.Counter()}

    # ------------------------------------------------------------------ client side
    def start(self) -> "BatchEngine":
        self._thread = threading.Thread(target=self._loop, name="qwen3-tts-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        return self._waiting

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull if `max_queue` jobs are already waiting."""
        with self._lock:
            if self._waiting >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull(f"{self._waiting} requests are already waiting (the limit is "
                                f"{self.max_queue}); retry later")
            self._waiting += 1
            self.stats["requests"] += 1
        self._queue.put(job)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the worker thread between cohorts; its result or exception in a Future."""
        fut: Future = Future()
        self._queue.put((fn, fut))
        return fut

    # ------------------------------------------------------------------ worker
    def _take(self, block_for: float | None):
        item = self._queue.get(timeout=block_for) if block_for else self._queue.get_nowait()
        if isinstance(item, Job):
            with self._lock:
                self._waiting -= 1
        return item

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._take(0.1)
            except queue.Empty:
                continue
            jobs, calls = [], []
            (jobs if isinstance(first, Job) else calls).append(first)
            if jobs:   # the collection window: more requests that arrive together
                end = time.monotonic() + self.batch_window
                while len(jobs) < self.max_batch_size:
                    try:
                        item = self._take(max(end - time.monotonic(), 0) or None)
                    except queue.Empty:
                        break
                    (jobs if isinstance(item, Job) else calls).append(item)
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
            jobs = [j for j in jobs if self._admit(j)]
            if jobs:
                try:
                    self._run_cohort(jobs)
                except Exception as e:  # noqa: BLE001 - a bug must not kill the server
                    log.exception("generation failed")
                    for j in jobs:
                        if not j.cancelled:
                            self.stats["errors"] += 1
                            j.cancelled = True
                            j.emit(e)
                finally:
                    self.active = 0

    def _admit(self, job: Job) -> bool:
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
        talker = sampling.SamplingParams.create(
            B, do_sample=col("do_sample"), temperature=col("temperature"), top_k=col("top_k"),
            top_p=col("top_p"))
        predictor = sampling.SamplingParams.create(
            B, do_sample=col("subtalker_dosample"), temperature=col("subtalker_temperature"),
            top_k=col("subtalker_top_k"), top_p=col("subtalker_top_p"))
        budget = [j.settings.max_new_tokens for j in jobs] + [1] * (B - len(jobs))
        return gen.Settings(talker, predictor,
                            jnp.asarray(np.asarray(col("repetition_penalty"), np.float32)),
                            jnp.asarray(np.asarray(budget, np.int32)))

    def _run_cohort(self, jobs: list[Job]) -> None:
        tts, cfg = self.tts, self.tts.config
        n = len(jobs)
        now = time.monotonic()
        for j in jobs:
            j.started, j.batch_size = now, n
        self.active = n
        self.stats["cohorts"] += 1
        self.stats["batch_sizes"][n] += 1
        B = self._bucket(n)
        items = [j.prompt for j in jobs]
        items += [items[0]] * (B - n)
        batch = prompts.batch_prompts(
            cfg, items, length=ladder(max(len(p) for p in items), self.min_prompt_bucket),
            trailing_length=ladder(max(len(p.trailing) for p in items)))
        settings = self._settings(jobs, B)
        keys = [jax.random.PRNGKey(secrets.randbits(31) if j.seed is None else int(j.seed))
                for j in jobs]
        keys = jnp.stack(keys + [keys[0]] * (B - n))
        max_frames = max(j.settings.max_new_tokens for j in jobs) - 1
        full = power_of_two(max_frames)
        capacity = min(full, gen.FIRST_FRAMES)
        state, ctx = gen.prefill(tts.params, cfg, batch.text_BxL, batch.codec_BxLxG,
                                 batch.mask_BxL, batch.extra_BxD, batch.extra_pos_B,
                                 batch.trailing_BxLt, batch.trailing_len_B, settings, keys,
                                 frames=capacity)
        G = cfg.talker.num_code_groups
        history = [np.zeros((0, G), np.int32) if j.ref_code is None
                   else np.asarray(j.ref_code, np.int32) for j in jobs]
        emitted = [0] * n
        open_rows = set(range(n))        # rows whose client still expects audio
        target = self.first_chunk_frames
        while open_rows:
            while target > capacity and capacity < full:
                capacity = min(2 * capacity, full)
                state = gen.grow(state, capacity)
            state = gen.decode(tts.params, cfg, state, ctx, settings, min(target, capacity))
            codes = np.asarray(state.codes_BxFxG)
            lengths, done = np.asarray(state.length_B), np.asarray(state.done_B)
            step = int(state.step)
            for b in list(open_rows):
                if jobs[b].cancelled:
                    open_rows.discard(b)
                    self.stats["cancelled"] += 1
            # streamed rows: their new frames; whole-file rows: all their frames once done
            ready = [b for b in sorted(open_rows) if lengths[b] > emitted[b]]
            whole = [b for b in ready if not jobs[b].stream and (done[b] or step >= max_frames)]
            for rows in ([b for b in ready if jobs[b].stream], whole):
                if not rows:
                    continue
                new = [codes[b, emitted[b]:lengths[b]] for b in rows]
                waves = self._decode([history[b] for b in rows], new, whole=rows is whole)
                for b, c, w in zip(rows, new, waves):
                    history[b] = np.concatenate([history[b], c])
                    emitted[b] = jobs[b].frames = int(lengths[b])
                    jobs[b].emit(w)
                self.stats["frames"] += sum(len(c) for c in new)
            now = time.monotonic()
            for b in list(open_rows):
                if done[b] or step >= max_frames:
                    open_rows.discard(b)
                    self.stats["finished"] += 1
                    jobs[b].emit(None)
                elif now > jobs[b].deadline:
                    open_rows.discard(b)
                    jobs[b].cancelled = True
                    self.stats["timeouts"] += 1
                    jobs[b].emit(DeadlineExceeded(
                        f"the request ran out of time after {jobs[b].frames} frames"))
            target = step + self.chunk_frames

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
