"""Faults at the engine level (no HTTP): settings that would overflow the compiled program's
int32 / float32 are bounded, a request whose prefill or step fails fails alone (the others restart
alone with their own keys and give the audio they would have had), a worker that dies restarts
and one that makes no progress is reported, sessions take no queue place and time out while they
wait for text, the prompt-token bound's formula, and commit points found in linear time."""
import threading
import time

import numpy as np
import pytest

from qwen3_tts_jax import Qwen3TTS
from qwen3_tts_jax import engine as engine_mod
from qwen3_tts_jax import text_feed
from qwen3_tts_jax.engine import BatchEngine, DeadlineExceeded, EngineUnavailable, Job, QueueFull
from qwen3_tts_jax.text_feed import TextFeed
from qwen3_tts_jax.settings import (FACTOR_RANGE, TOP_K_MAX, GenerationSettings, SettingError,
                                    traced)

MARK = 1.2345          # the repetition penalty that the planted faults look for
SAMPLED = dict(do_sample=True, temperature=0.8, top_k=5, top_p=1.0, subtalker_dosample=False)


@pytest.fixture(scope="module")
def tts(make_checkpoint):
    return Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))


def engine_of(tts, **kw):
    """Every cohort padded to 4 rows and 48 prompt positions: one compiled program set."""
    return BatchEngine(tts, **{"max_batch_size": 4, "batch_window": 0.05, "chunk_frames": 4,
                               "first_chunk_frames": 2, "batch_buckets": (4,),
                               "min_prompt_bucket": 48, **kw})


class Collect:
    """A job's emitted items: audio chunks, then None or an exception."""

    def __init__(self):
        self.chunks, self.end, self.done = [], None, threading.Event()

    def __call__(self, x):
        if x is None or isinstance(x, BaseException):
            self.end = x
            self.done.set()
        else:
            self.chunks.append(np.asarray(x))

    @property
    def wave(self):
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)


def job_of(tts, text, speaker, seed, tokens=12, stream=True, penalty=1.05, **kw):
    settings = GenerationSettings.merge(tts.generate_defaults, max_new_tokens=tokens,
                                        repetition_penalty=penalty, **SAMPLED)
    prompt = tts.custom_voice_prompts([text], speaker, "english", None, True)[0]
    out = Collect()
    return Job(prompt, settings, emit=out, seed=seed, stream=stream, **kw), out


def run(engine, jobs, timeout=300):
    for j, _ in jobs:
        engine.submit(j)
    engine.start()
    try:
        assert all(out.done.wait(timeout) for _, out in jobs), "a job did not end"
    finally:
        engine.stop()
    return [out for _, out in jobs]


GOOD = [("Hello world. This is a test.", "ryan", 1, True), ("Hi there.", "vivian", 2, True),
        ("The quick brown fox.", "eric", 3, False)]          # the last: a whole-file format


# ---------------------------------------------------------------------------------- settings
def test_settings_are_bounded_where_validated_and_clamped_for_the_program(tts):
    """top_k at or above 2**31 (a no-op above the vocabulary in the official) is accepted and
    clamped to int32; temperatures and penalties float32 cannot hold (or invert) are clamped;
    numbers past float's range are a SettingError naming the setting, not an OverflowError."""
    s = GenerationSettings.merge(tts.generate_defaults, top_k=2 ** 31, subtalker_top_k=10 ** 30,
                                 temperature=1e300, subtalker_temperature=1e-300,
                                 repetition_penalty=1e-300, top_p=1e-300)
    t = traced([s, None], tts.options)
    assert np.asarray(t.talker.top_k).tolist() == [TOP_K_MAX] * 2
    assert np.asarray(t.predictor.top_k).dtype == np.int32
    assert np.asarray(t.talker.temperature)[0] == np.float32(FACTOR_RANGE[1])
    assert np.asarray(t.predictor.temperature)[0] == np.float32(FACTOR_RANGE[0])
    assert np.asarray(t.repetition_penalty)[0] == np.float32(FACTOR_RANGE[0])
    for name in ("temperature", "top_p", "repetition_penalty", "subtalker_temperature"):
        with pytest.raises(SettingError) as e:
            GenerationSettings.merge(tts.generate_defaults, **{name: 10 ** 400})
        assert e.value.param == name and "finite" in str(e.value)
    with pytest.raises(SettingError) as e:
        GenerationSettings.merge(tts.generate_defaults, top_k=-1)
    assert e.value.param == "top_k"


def test_a_huge_top_k_generates_like_the_vocabulary(tts):
    """End to end: top_k 2**40 samples exactly as top_k = vocabulary size (both keep every
    token), where it used to overflow int32 in the cohort's prefill."""
    V = tts.config.talker.vocab_size
    outs = []
    for k in (2 ** 40, V):
        settings = GenerationSettings.merge(tts.generate_defaults, max_new_tokens=6,
                                            do_sample=True, top_k=k, subtalker_top_k=k)
        prompt = tts.custom_voice_prompts(["Hello."], "ryan", "english", None, True)[0]
        out = Collect()
        outs.append(run(engine_of(tts), [(Job(prompt, settings, emit=out, seed=5), out)])[0])
    assert all(o.end is None for o in outs), [o.end for o in outs]
    np.testing.assert_array_equal(outs[0].wave, outs[1].wave)


# ---------------------------------------------------------------------------------- isolation
def marked(settings) -> bool:
    return bool(np.any(np.abs(np.asarray(settings.repetition_penalty) - MARK) < 1e-4))


@pytest.fixture(scope="module")
def reference(tts):
    """The good jobs' audio in a batch of their own (no fault)."""
    outs = run(engine_of(tts), [job_of(tts, t, s, seed, stream=st) for t, s, seed, st in GOOD])
    assert all(o.end is None for o in outs)
    return [o.wave for o in outs]


def check_same(got, want):
    assert got.shape == want.shape and len(got) > 0
    np.testing.assert_allclose(got, want, atol=1e-5 + 1e-4 * np.abs(want).max())


def test_a_failing_prefill_fails_only_its_request(tts, reference, monkeypatch):
    """A fault planted in prefill for one row's settings: that request fails with it; the three
    others, batched with it, restart alone and give the audio of a fault-free batch."""
    real = engine_mod.gen.prefill

    def prefill(params, cfg, batch, settings, *a, **kw):
        if marked(settings):
            raise RuntimeError("planted prefill fault")
        return real(params, cfg, batch, settings, *a, **kw)

    monkeypatch.setattr(engine_mod.gen, "prefill", prefill)
    engine = engine_of(tts)
    jobs = [job_of(tts, t, s, seed, stream=st) for t, s, seed, st in GOOD]
    jobs.insert(1, job_of(tts, "Bad one.", "aiden", 9, penalty=MARK))
    outs = run(engine, jobs)
    assert "planted prefill fault" in str(outs[1].end)
    good = outs[:1] + outs[2:]
    assert [o.end for o in good] == [None] * 3
    for o, want in zip(good, reference):
        check_same(o.wave, want)
    assert engine.stats["retried"] == 4 and engine.stats["errors"] == 1, engine.stats
    assert engine.stats["cohorts"] == 1 and engine.stats["finished"] == 3


def test_a_failing_step_fails_only_its_request(tts, reference, monkeypatch):
    """A fault planted in the frame loop's second chunk for one row's settings: the requests
    batched with it restart alone, the streamed ones (which had sent their first chunk) unseen:
    their clients get the fault-free audio, each sample once; the bad one, alone, fails again."""
    real = engine_mod.gen.decode

    at_fault = []

    def decode(params, cfg, state, ctx, settings, until, *a, **kw):
        if marked(settings) and until > 2:
            at_fault.append([len(out.chunks) for _, out in jobs])
            raise RuntimeError("planted step fault")
        return real(params, cfg, state, ctx, settings, until, *a, **kw)

    monkeypatch.setattr(engine_mod.gen, "decode", decode)
    engine = engine_of(tts)
    jobs = [job_of(tts, t, s, seed, stream=st) for t, s, seed, st in GOOD]
    jobs.append(job_of(tts, "Bad one.", "aiden", 9, stream=False, penalty=MARK))
    outs = run(engine, jobs)
    assert "planted step fault" in str(outs[-1].end), outs[-1].end
    for o, want in zip(outs[:-1], reference):
        assert o.end is None, o.end
        check_same(o.wave, want)
    assert at_fault and at_fault[0][:2] == [1, 1]      # the streams had sent their 1st chunk
    assert engine.stats["retried"] == 4 and engine.stats["errors"] == 1, engine.stats


# ------------------------------------------------------------ the codec beside the next frames
OVERLAP_JOBS = [("Hello world. This is a test.", "ryan", 1, True, 12),
                ("Hi there.", "vivian", 2, True, 7),       # 6 frames: ends at a chunk boundary
                ("The quick brown fox.", "eric", 3, False, 15)]


def overlap_run(tts, mode, jobs=OVERLAP_JOBS, timeout=300):
    from official import with_options

    other = with_options(tts, codec_overlap=mode)
    return other, run(engine_of(other), [job_of(other, t, s, seed, tokens=n, stream=st)
                                         for t, s, seed, st, n in jobs], timeout)


@pytest.fixture(scope="module")
def overlap_reference(tts):
    _, outs = overlap_run(tts, "off")
    assert all(o.end is None for o in outs)
    return outs


@pytest.mark.parametrize("mode", ["queue", "thread"])
def test_codec_overlap_gives_the_same_audio(tts, overlap_reference, mode, monkeypatch):
    """`Options.codec_overlap` in the engine: every job's chunks, bit for bit, as with "off"
    (streamed and whole-file rows, rows ending at a chunk boundary and between), and in "thread"
    the codec did run on the engine's codec thread."""
    from qwen3_tts_jax.codec import streaming

    threads, push = set(), streaming.StreamDecoder.push

    def spy(self, new):
        threads.add(threading.current_thread().name)
        return push(self, new)

    monkeypatch.setattr(streaming.StreamDecoder, "push", spy)
    _, outs = overlap_run(tts, mode)
    for o, want in zip(outs, overlap_reference):
        assert o.end is None, o.end
        assert [len(c) for c in o.chunks] == [len(c) for c in want.chunks]
        for a, b in zip(o.chunks, want.chunks):
            np.testing.assert_array_equal(a, b)
    assert any(n.startswith("qwen3-tts-codec") for n in threads) == (mode == "thread"), threads


@pytest.mark.parametrize("mode", ["off", "queue", "thread"])
def test_codec_overlap_hands_a_chunk_out_after_the_next_frames_start(tts, mode, monkeypatch):
    """The order of work for one stream of 14 frames (chunks of 2, 4, 4, 4): with "off" a chunk's
    audio goes out before the next chunk's frames are dispatched; with "queue" and "thread" a
    chunk after the first goes out right after the next chunk's frames are dispatched (the first
    chunk at once: time to first audio; the last at once: no frames follow)."""
    events = []
    real = engine_mod.gen.decode

    def decode(params, cfg, state, ctx, settings, until, *a, **kw):
        events.append(f"frames to {until}")
        return real(params, cfg, state, ctx, settings, until, *a, **kw)

    monkeypatch.setattr(engine_mod.gen, "decode", decode)
    from official import with_options

    other = with_options(tts, codec_overlap=mode)
    job, out = job_of(other, "Hello world. This is a test.", "ryan", 1, tokens=15)
    real_emit = job.emit

    def emit(x):
        events.append("end" if x is None else f"audio {len(x) // 1920}")
        real_emit(x)

    job.emit = emit
    (out,) = run(engine_of(other, admit_frames=0), [(job, out)])   # chunks only
    assert out.end is None and len(out.wave) == 14 * 1920, out.end
    if mode == "off":
        want = ["frames to 2", "audio 2", "frames to 6", "audio 4", "frames to 10", "audio 4",
                "frames to 14", "audio 4", "end"]
    else:
        want = ["frames to 2", "audio 2", "frames to 6", "frames to 10", "audio 4",
                "frames to 14", "audio 4", "audio 4", "end"]
    assert events == want


def test_failing_held_audio_restarts_its_rows(tts, overlap_reference, monkeypatch):
    """A fault in a chunk's codec work on the codec thread (the first held chunk, with which the
    second job's row ends): the cohort's requests restart alone as after a failed step, the row
    that had ended included, and every client gets the fault-free audio, each sample once."""
    from qwen3_tts_jax.codec import streaming

    push, planted = streaming.StreamDecoder.push, []

    def push_once_failing(self, new):
        if threading.current_thread().name.startswith("qwen3-tts-codec") and not planted:
            planted.append(True)
            raise RuntimeError("planted codec fault")
        return push(self, new)

    monkeypatch.setattr(streaming.StreamDecoder, "push", push_once_failing)
    other, outs = overlap_run(tts, "thread", timeout=60)
    assert planted
    for o, want in zip(outs, overlap_reference):
        assert o.end is None, o.end
        np.testing.assert_array_equal(o.wave, want.wave)


def join_while_held(tts, monkeypatch, spec, late, fault=False, **engine_kw):
    """Run `spec`'s jobs ({name: (text, speaker, seed, tokens)}) in an engine with the codec on
    its thread; job `late` is submitted by the codec thread's first push (a held chunk's work),
    which then waits until a prefill into the running batch has returned (at most 15 s) and runs,
    or with `fault` raises. Each job's audio must be its audio alone. Returns (whether the prefill
    came while the codec work waited, the engine's stats)."""
    from official import with_options

    from qwen3_tts_jax.codec import streaming

    other = with_options(tts, codec_overlap="thread")
    alone = {k: run(engine_of(tts), [job_of(tts, t, s, seed, tokens=n)])[0]
             for k, (t, s, seed, n) in spec.items()}
    jobs = {k: job_of(other, t, s, seed, tokens=n) for k, (t, s, seed, n) in spec.items()}
    engine = engine_of(other, **engine_kw)
    inserted, released, push = threading.Event(), [], streaming.StreamDecoder.push
    real_insert = engine_mod.gen.insert

    def insert(*a, **kw):
        try:
            return real_insert(*a, **kw)
        finally:
            inserted.set()

    def push_held(self, new):
        if threading.current_thread().name.startswith("qwen3-tts-codec") and not released:
            engine.submit(jobs[late][0])              # arrives while this chunk is decoded
            released.append(inserted.wait(15))        # until its prefill (or 15 s: it waited)
            if fault:
                raise RuntimeError("planted codec fault")
        return push(self, new)

    monkeypatch.setattr(engine_mod.gen, "insert", insert)
    monkeypatch.setattr(streaming.StreamDecoder, "push", push_held)
    for k in spec:
        if k != late:
            engine.submit(jobs[k][0])
    engine.start()
    try:
        assert all(out.done.wait(120) for _, out in jobs.values()), "a job did not end"
    finally:
        engine.stop()
    for k, (_, out) in jobs.items():
        assert out.end is None, (k, out.end)
        want = alone[k].wave
        assert out.wave.shape == want.shape, k
        np.testing.assert_allclose(out.wave, want, atol=1e-5 + 1e-4 * np.abs(want).max(),
                                   err_msg=k)
    return released == [True], engine.stats


@pytest.mark.parametrize("fault", [False, True])
def test_a_row_taken_while_its_last_audio_is_decoded_does_not_wait_for_it(tts, fault,
                                                                         monkeypatch):
    """"thread": C's row ends with a chunk whose codec work is still running on the codec thread
    (held there until B's prefill returns) when B arrives and takes that row at an admission
    step. B's prefill does not wait for that codec work, the row's codec stream restarts only
    after it (C's last audio is decoded from C's stream), and A, B and C each get their audio
    alone. With `fault` that codec work then fails: the cohort's requests restart (B's with
    them), and each client still gets its audio alone, each sample once."""
    spec = {"A": ("Hello world. This is a test.", "ryan", 1, 20),
            "C": ("Hi there.", "vivian", 2, 7),        # 6 frames: ends with the first held chunk
            "B": ("The quick brown fox.", "eric", 3, 10)}
    in_time, stats = join_while_held(tts, monkeypatch, spec, "B", fault)
    assert in_time, "B's prefill waited for the held chunk's codec"
    assert stats["joined"] == 1 and stats["errors"] == 0, stats
    assert stats["retried"] == (3 if fault else 0), stats


def test_a_batch_widened_while_its_last_audio_is_decoded(tts, monkeypatch):
    """"thread", batch buckets 1, 2, 4: A runs alone in a one-row batch; B arrives while A's
    second chunk is decoded on the codec thread (held there until B's prefill returns). The batch
    widens and B starts at once; the codec's rows grow only after that chunk (whose work has A's
    one row); no fault, no restart, and A and B each get their audio alone."""
    spec = {"A": ("Hello world. This is a test.", "ryan", 1, 20),
            "B": ("The quick brown fox.", "eric", 3, 10)}
    in_time, stats = join_while_held(tts, monkeypatch, spec, "B", batch_buckets=(1, 2, 4))
    assert in_time, "B's start waited for the held chunk's codec"
    assert (stats["widened"], stats["joined"], stats["cohorts"]) == (1, 1, 1), stats
    assert stats["errors"] == stats["retried"] == 0, stats


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_a_bad_admit_frames_is_named(tts, bad):
    with pytest.raises(ValueError, match="admit_frames"):
        BatchEngine(tts, admit_frames=bad)


# ---------------------------------------------------------------------------------- liveness
def test_a_dead_worker_restarts_and_a_stalled_one_is_reported(tts, monkeypatch):
    """A BaseException inside the worker's loop (SystemExit from a step): the request in flight
    fails with EngineUnavailable, the worker restarts and the next request is served. A step that
    blocks makes health() report no progress once stall_timeout passes, and clears after."""
    real = engine_mod.Cohort.step
    mode = {"die": True, "block": None}

    def step(self):
        if mode["die"]:
            mode["die"] = False
            raise SystemExit("planted worker death")
        if mode["block"] is not None:
            mode["block"].wait(60)
        return real(self)

    monkeypatch.setattr(engine_mod.Cohort, "step", step)
    engine = engine_of(tts, stall_timeout=0.5).start()
    try:
        assert engine.health() is None
        j, out = job_of(tts, "Hello.", "ryan", 1, tokens=6)
        engine.submit(j)
        assert out.done.wait(300) and isinstance(out.end, EngineUnavailable), out.end
        assert "planted worker death" in str(out.end)
        assert engine.stats["worker_restarts"] == 1 and engine.health() is None
        j, out = job_of(tts, "Hello.", "ryan", 1, tokens=6)
        engine.submit(j)
        assert out.done.wait(300) and out.end is None and out.chunks
        mode["block"] = threading.Event()
        j, out = job_of(tts, "Hello.", "ryan", 1, tokens=6)
        engine.submit(j)
        deadline = time.monotonic() + 120
        while engine.health() is None:
            assert time.monotonic() < deadline, "the stall was not reported"
            time.sleep(0.1)
        assert "no progress" in engine.health()
        mode["block"].set()
        mode["block"] = None
        assert out.done.wait(300) and out.end is None
        assert engine.health() is None
    finally:
        engine.stop()
    assert not engine._thread.is_alive()


def test_a_worker_that_keeps_failing_stays_down_and_says_so(tts, monkeypatch):
    """More than MAX_RESTARTS failures within RESTART_WINDOW: the thread ends, health() says
    it is not running (the server's /health: 503), and submit refuses with EngineUnavailable."""
    def pull(self, timeout):
        raise SystemExit("planted")

    monkeypatch.setattr(BatchEngine, "_pull", pull)
    engine = engine_of(tts).start()
    engine._thread.join(30)
    assert not engine._thread.is_alive()
    assert engine.stats["worker_restarts"] == engine_mod.MAX_RESTARTS + 1
    assert "not running" in engine.health() and "planted" in engine.health()
    with pytest.raises(EngineUnavailable):
        engine.submit(job_of(tts, "Hello.", "ryan", 1)[0])


# ---------------------------------------------------------------------------------- sessions
def session_job(tts, deadline=float("inf")):
    feed = TextFeed.of(tts.tokenizer, tts.text_prompt("english", speaker="ryan"))
    settings = GenerationSettings.merge(tts.generate_defaults, max_new_tokens=8)
    out = Collect()
    return Job(None, settings, emit=out, feed=feed, seed=0, deadline=deadline), out


def test_sessions_take_no_queue_place_and_time_out_waiting_for_text(tts):
    """max_queue counts HTTP jobs only: two sessions waiting for text leave the one queue place
    free. A session that gets no text before its deadline ends with DeadlineExceeded."""
    engine = engine_of(tts, max_queue=1)
    s1, out1 = session_job(tts, deadline=time.monotonic() + 0.5)
    engine.submit(s1)
    engine.submit(session_job(tts)[0])
    assert engine.waiting == 0
    engine.submit(job_of(tts, "Hello.", "ryan", 1)[0])
    with pytest.raises(QueueFull):
        engine.submit(job_of(tts, "Hello.", "ryan", 1)[0])
    engine.start()
    try:
        assert out1.done.wait(60) and isinstance(out1.end, DeadlineExceeded), out1.end
    finally:
        engine.stop()


# ---------------------------------------------------------------------------------- memory
def test_the_prompt_bound_is_the_largest_bucket_whose_batch_fits(tts):
    """batch_bytes: rows x ((L + F) x the talker's KV bytes per position + 2 x heads x L x
    (L + F0) x 4); max_prompt_tokens: the largest prompt bucket whose batch fits the budget."""
    from qwen3_tts_jax.buckets import ladder

    t = tts.config.talker
    kv = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * 4       # float32
    assert engine_mod.batch_bytes(tts, 8, 96, 1000) == 8 * (
        (96 + 1000) * kv + 2 * t.num_attention_heads * 96 * (96 + 256) * 4)
    budget = 2 ** 30
    n = engine_mod.max_prompt_tokens(tts, 8, 8192, budget)
    assert n == ladder(n) and engine_mod.batch_bytes(tts, 8, n, 8192) <= budget
    assert engine_mod.batch_bytes(tts, 8, ladder(n + 1), 8192) > budget
    assert engine_mod.max_prompt_tokens(tts, 8, 8192, 2 * budget) > n
    assert engine_mod.max_prompt_tokens(tts, 8, 8192, 0) == 16          # at least one bucket
    assert engine_mod.max_prompt_tokens(tts, 1, 64, 10 ** 15) == (
        t.max_position_embeddings - 64)                                 # at most the positions
    budget, where = engine_mod.memory_budget()
    assert budget > 0 and "GiB" in where


# ---------------------------------------------------------------------------------- text feed
def test_commit_points_are_found_in_linear_time(monkeypatch):
    """200,000 characters without a break point, sent one at a time: each character is
    examined once (it used to rescan the uncommitted text on every piece: n**2 / 2 = 2e10),
    and the text is tokenized once, at the end."""
    calls = {"n": 0}
    real = text_feed._is_break

    def counted(c, before):
        calls["n"] += 1
        assert calls["n"] <= 2 * 200_000, "characters are examined more than once"
        return real(c, before)

    monkeypatch.setattr(text_feed, "_is_break", counted)

    class Tok:
        encoded = []

        def encode(self, s):
            self.encoded.append(len(s))
            return list(range(len(s) + 8))

    n = 200_000
    feed = TextFeed(Tok(), build=None)
    for _ in range(n):
        feed.push("x")
    assert calls["n"] <= n and feed.scanned == n and feed.chars == n and not feed.tokens
    feed.push("", final=True)
    assert len(Tok.encoded) == 1 and Tok.encoded[0] > n
    # a break point every word: still one examination per character
    calls["n"] = 0
    feed = TextFeed(Tok(), build=None)
    for i in range(20_000):
        feed.push("ab "[i % 3])
    assert calls["n"] <= 20_000 and len(feed.tokens) > 0
