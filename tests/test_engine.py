"""engine.py: the batching engine under the server, the batch tool and the API's text in pieces.
Requests that arrive over time start in a running batch's free rows and generate exactly what
they generate alone; per-row settings, sampler kinds and batch buckets."""

import numpy as np
import pytest

from qwen3_tts_jax import generate as gen

SAMPLED = dict(do_sample=True, temperature=0.8, top_k=5, top_p=0.9)
GREEDY = dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0)



def test_engine_starts_waiting_requests_in_a_running_batch(model_pair, monkeypatch):
    """Five requests, batches of two: A and B start; C starts in B's row once B ended, D in A's;
    the batch then forgets the frames before C (a shift) and grows for C; E's prompt is longer
    than the batch's prompt bucket, so it closes the batch and runs next, in a batch of its own.
    Every request's audio (streamed, or whole for D) equals its offline audio for the seed."""
    import threading

    from qwen3_tts_jax.settings import GenerationSettings
    from qwen3_tts_jax.engine import BatchEngine, Job

    _, tts = model_pair("cv_proj")
    calls = []
    for name in ("shift", "grow"):
        def spy(*a, _f=getattr(gen, name), _n=name, **kw):  # noqa: B008 - bound per name
            calls.append((_n, int(a[2]) if _n == "shift" else a[1]))
            return _f(*a, **kw)
        monkeypatch.setattr(gen, name, spy)
    long_text = " ".join(["A much longer sentence that needs a bigger prompt bucket."] * 3)
    spec = {  # text, speaker, tokens, settings, stream
        "A": ("Hello world. This is a test.", "ryan", 20, GREEDY, True),
        "B": ("Hi.", "vivian", 6, SAMPLED, True),
        "C": ("The quick brown fox.", "eric", 40, SAMPLED, True),
        "D": ("A", "serena", 10, GREEDY, False),
        "E": (long_text, "aiden", 8, SAMPLED, True),
    }
    engine = BatchEngine(tts, max_batch_size=2, batch_window=0.01, chunk_frames=4,
                         first_chunk_frames=2, batch_buckets=(2,), min_prompt_bucket=48)
    out = {k: [] for k in spec}
    ended = {k: threading.Event() for k in spec}
    order = []

    def emit_to(k):
        def emit(x):
            if x is None or isinstance(x, Exception):
                out[k].append(x)
                order.append(k)
                ended[k].set()
            else:
                out[k].append(np.asarray(x))
        return emit

    gen_kw = {}
    for i, (k, (text, speaker, tokens, mode, stream)) in enumerate(spec.items()):
        kw = {"max_new_tokens": tokens, "do_sample": mode["do_sample"],
              "temperature": mode["temperature"] or None, "top_k": mode["top_k"],
              "top_p": mode["top_p"], "subtalker_dosample": False}
        gen_kw[k] = kw
        prompt = tts.custom_voice_prompts([text], speaker, "english", None, True)[0]
        engine.submit(Job(prompt, GenerationSettings.merge(tts.generate_defaults, **kw),
                          emit=emit_to(k), seed=10 + i, stream=stream))
    engine.start()
    try:
        assert all(e.wait(300) for e in ended.values()), {k: e.is_set() for k, e in ended.items()}
    finally:
        engine.stop()
    assert order.index("B") < order.index("D") and order[-1] == "E", order
    assert engine.stats["joined"] == 2 and engine.stats["cohorts"] == 2, engine.stats
    assert engine.stats["finished"] == 5 and engine.stats["errors"] == 0
    assert calls == [("shift", 6), ("grow", 64)], calls     # C started at frame 6
    # C's first audio after first_chunk_frames (an extra boundary for it alone); A keeps its
    # cadence: 2 frames, then 4 per chunk (the last: what was left)
    assert len(out["C"][0]) == 2 * 1920, len(out["C"][0])
    assert [len(w) // 1920 for w in out["A"][:-2]] == [2] + [4] * (len(out["A"]) - 3)
    for i, (k, (text, speaker, tokens, _, stream)) in enumerate(spec.items()):
        assert out[k][-1] is None, (k, out[k][-1])
        chunks = out[k][:-1]
        assert len(chunks) == 1 if not stream else len(chunks) > 1, (k, len(chunks))
        wave = np.concatenate(chunks)
        codes = tts.generate_custom_voice_codes(text, speaker=speaker, language="english",
                                                seed=[10 + i], **gen_kw[k])
        ref = tts.decode(codes)[0][0]
        assert wave.shape == ref.shape == ((tokens - 1) * 1920,), (k, wave.shape, ref.shape)
        np.testing.assert_allclose(wave, ref, atol=1e-5 + 1e-4 * np.abs(ref).max(), err_msg=k)


def test_chunk_ramp_keeps_each_chunk_within_the_audio_out(model_pair):
    """`chunk_ramp`: a streamed row's chunks grow from its first (1 frame here) and none is
    longer than the audio the row already has out, for the rows that start the batch (A, B) and
    for one started later in a freed row (C), so frames coming at twice real time never leave a
    gap; the audio is the offline audio either way. Without it the second chunk jumps to the
    cadence's (8 for A, 7 for C: what is left to the batch's next boundary)."""
    import threading

    from qwen3_tts_jax.engine import BatchEngine, Job
    from qwen3_tts_jax.settings import GenerationSettings

    _, tts = model_pair("cv_proj")
    spec = {"A": ("Hello world. This is a test.", "ryan", 30, GREEDY),   # text, speaker, tokens
            "B": ("Hi.", "vivian", 4, SAMPLED),
            "C": ("The quick brown fox.", "eric", 24, SAMPLED)}

    def run(ramp):
        engine = BatchEngine(tts, max_batch_size=2, chunk_frames=8, first_chunk_frames=1,
                             batch_buckets=(2,), min_prompt_bucket=48, chunk_ramp=ramp)
        out = {k: [] for k in spec}
        ended = {k: threading.Event() for k in spec}
        kws = {}
        for i, (k, (text, speaker, tokens, mode)) in enumerate(spec.items()):
            kws[k] = dict(mode, max_new_tokens=tokens, subtalker_dosample=False,
                          temperature=mode["temperature"] or None)
            prompt = tts.custom_voice_prompts([text], speaker, "english", None, True)[0]

            def emit(x, k=k):
                if x is None or isinstance(x, Exception):
                    ended[k].set()
                out[k].append(x)
            engine.submit(Job(prompt, GenerationSettings.merge(tts.generate_defaults, **kws[k]),
                              emit=emit, seed=20 + i))
        engine.start()
        try:
            assert all(e.wait(300) for e in ended.values())
        finally:
            engine.stop()
        assert engine.stats["joined"] == 1 and engine.stats["errors"] == 0, engine.stats
        for i, (k, (text, speaker, _, _)) in enumerate(spec.items()):
            assert out[k][-1] is None, out[k][-1]
            codes = tts.generate_custom_voice_codes(text, speaker=speaker, language="english",
                                                    seed=[20 + i], **kws[k])
            ref = tts.decode(codes)[0][0]
            wave = np.concatenate(out[k][:-1])
            assert wave.shape == ref.shape, (k, wave.shape, ref.shape)
            np.testing.assert_allclose(wave, ref, atol=1e-5 + 1e-4 * np.abs(ref).max(),
                                       err_msg=k)
        return {k: [len(w) // 1920 for w in out[k][:-1]] for k in spec}

    ramped, fixed = run(True), run(False)
    for k, sizes in ramped.items():
        assert sizes[0] == 1 and max(sizes) <= 8, (k, sizes)
        assert all(n <= sum(sizes[:i]) for i, n in enumerate(sizes) if i), (k, sizes)
    assert ramped["A"][:5] == [1, 1, 2, 4, 1], ramped          # then 8 per chunk, on the cadence
    assert fixed["A"][:2] == [1, 8] and fixed["C"][1] > 1, fixed   # the cadence's whole chunk


def test_engine_whole_file_clone_cut_like_offline(model_pair):
    """A whole-file ICL row is decoded after its reference codes and the reference's part cut as
    the offline API and the official do: int(ref / total * samples), which for 1 reference frame
    in 49 keeps one sample of the reference (float rounding); other lengths cut exactly (1 in
    187 too, which int(ref / total * total * 1920) would not)."""
    from qwen3_tts_jax.engine import BatchEngine

    _, tts = model_pair("cv_proj")
    rng = np.random.default_rng(0)
    engine = BatchEngine(tts, max_batch_size=4, batch_buckets=(4,))
    refs, codes = [rng.integers(0, 2048, (n, 16)) for n in (1, 3, 1)], \
        [rng.integers(0, 2048, (n, 16)) for n in (48, 20, 186)]
    got = engine.decode_whole(refs, codes)
    for r, c, w in zip(refs, codes, got):
        full = tts.decode([np.concatenate([r, c])])[0][0]
        cut = int(len(r) / (len(r) + len(c)) * len(full))
        assert w.shape == full[cut:].shape
        np.testing.assert_allclose(w, full[cut:], atol=1e-5 * np.abs(full).max())  # other batch
    assert [len(w) for w in got] == [48 * 1920 + 1, 20 * 1920, 186 * 1920]


def test_default_batch_buckets_start_at_the_backends_fewest_rows():
    """Powers of two up to max_batch_size, from `Options.min_rows` (two rows on a GPU)."""
    from types import SimpleNamespace

    from qwen3_tts_jax.engine import BatchEngine
    from qwen3_tts_jax.options import Options

    one, two = (SimpleNamespace(options=Options(min_rows=n)) for n in (1, 2))
    assert BatchEngine(one, max_batch_size=5).batch_buckets == (1, 2, 4, 8)
    assert BatchEngine(two, max_batch_size=5).batch_buckets == (2, 4, 8)
    assert BatchEngine(two, max_batch_size=1).batch_buckets == (2,)
    assert BatchEngine(None, max_batch_size=5, batch_buckets=(1, 8)).batch_buckets == (1, 8)


def test_a_request_arriving_mid_chunk_starts_within_admit_frames(model_pair, monkeypatch):
    """A request that arrives while a batch with a free row runs a long chunk starts within
    `admit_frames` frames (the frame loop runs that many frames a call while a row is free), not
    at the chunk's end (`admit_frames=0`); the running request's chunks and audio are the same
    either way, and so is the newcomer's (its audio for the seed)."""
    import threading

    from qwen3_tts_jax import engine as engine_mod
    from qwen3_tts_jax.engine import BatchEngine, Job
    from qwen3_tts_jax.settings import GenerationSettings

    _, tts = model_pair("cv_proj")
    real_take, real_decode = engine_mod.Cohort.take, engine_mod.gen.decode
    results = {}
    for admit in (2, 0):
        joined_at = []

        def take(self, job, row, compute=None):
            joined_at.append(self.step_n)
            return real_take(self, job, row, compute)

        monkeypatch.setattr(engine_mod.Cohort, "take", take)
        engine = BatchEngine(tts, max_batch_size=2, batch_window=0.0, chunk_frames=12,
                             first_chunk_frames=2, batch_buckets=(2,), min_prompt_bucket=48,
                             admit_frames=admit)
        out = {"A": [], "B": []}
        done = {k: threading.Event() for k in out}
        settings = GenerationSettings.merge(tts.generate_defaults, max_new_tokens=30, **SAMPLED,
                                            subtalker_dosample=False)
        prompt = tts.custom_voice_prompts(["Hello world. This is a test."], "ryan", "english",
                                          None, True)[0]
        b_job = Job(prompt, settings, emit=lambda x: (out["B"].append(x), x is None and
                                                      done["B"].set()), seed=2)

        def emit_a(x):
            out["A"].append(x)
            if x is None:
                done["A"].set()

        sent = []

        def decode(params, cfg, state, ctx, settings, until, *a, **kw):
            if until > 2 and not sent:     # B arrives as the chunk after A's first one starts
                sent.append(until)
                engine.submit(b_job)
            return real_decode(params, cfg, state, ctx, settings, until, *a, **kw)

        monkeypatch.setattr(engine_mod.gen, "decode", decode)
        engine.submit(Job(prompt, settings, emit=emit_a, seed=1))
        engine.start()
        try:
            assert all(d.wait(120) for d in done.values())
        finally:
            engine.stop()
        assert engine.stats["joined"] == 1 and engine.stats["errors"] == 0, engine.stats
        results[admit] = joined_at, out, sent
    (ticked, with_ticks, t_sent), (chunked, without, c_sent) = results[2], results[0]
    assert c_sent == [14] and chunked == [14], (c_sent, chunked)   # the end of that chunk
    assert t_sent == [4] and ticked == [4], (t_sent, ticked)       # 2 frames after arrival
    for k in ("A", "B"):
        assert with_ticks[k][-1] is None and without[k][-1] is None
        a, b = np.concatenate(with_ticks[k][:-1]), np.concatenate(without[k][:-1])
        assert a.shape == b.shape == (29 * 1920,), k
        np.testing.assert_allclose(a, b, atol=1e-5 + 1e-4 * np.abs(b).max(), err_msg=k)
    # A's audio still goes out per chunk: 2 frames, then 12 (the last: what was left)
    assert ([len(c) // 1920 for c in with_ticks["A"][:-1]]
            == [len(c) // 1920 for c in without["A"][:-1]] == [2, 12, 12, 3])


@pytest.mark.parametrize("arrive", [2, 6])
def test_a_full_running_batch_widens_for_waiting_requests(model_pair, arrive, monkeypatch):
    """Batch buckets 1, 2, 4: A starts alone in a one-row batch; B and C arrive while it runs
    (after frame `arrive`: 6 is while A's second chunk is decoded beside the next frames). The
    batch widens (to 4 rows: B and C start in it, not after A has ended), and every request's
    audio equals its offline audio for the seed."""
    import threading

    from qwen3_tts_jax import engine as engine_mod
    from qwen3_tts_jax.engine import BatchEngine, Job
    from qwen3_tts_jax.settings import GenerationSettings

    _, tts = model_pair("cv_proj")
    spec = {"A": ("Hello world. This is a test.", "ryan", 30),
            "B": ("Hi there.", "vivian", 8),
            "C": ("The quick brown fox.", "eric", 10)}
    engine = BatchEngine(tts, max_batch_size=4, batch_window=0.0, chunk_frames=4,
                         first_chunk_frames=2, batch_buckets=(1, 2, 4), min_prompt_bucket=48)
    out = {k: [] for k in spec}
    times = {k: [] for k in spec}
    done = {k: threading.Event() for k in spec}
    kw = dict(do_sample=True, temperature=0.8, top_k=5, top_p=0.9, subtalker_dosample=False)

    def job(k, seed):
        text, speaker, tokens = spec[k]
        settings = GenerationSettings.merge(tts.generate_defaults, max_new_tokens=tokens, **kw)
        prompt = tts.custom_voice_prompts([text], speaker, "english", None, True)[0]

        def emit(x):
            out[k].append(x)
            times[k].append(len(out["A"]))
            if x is None:
                done[k].set()
        return Job(prompt, settings, emit=emit, seed=seed)

    real_decode, sent = engine_mod.gen.decode, []

    def decode(params, cfg, state, ctx, settings, until, *a, **kwargs):
        if until > arrive and not sent:     # B and C arrive
            sent.append(until)
            engine.submit(job("B", 2))
            engine.submit(job("C", 3))
        return real_decode(params, cfg, state, ctx, settings, until, *a, **kwargs)

    monkeypatch.setattr(engine_mod.gen, "decode", decode)
    engine.submit(job("A", 1))
    engine.start()
    try:
        assert all(d.wait(120) for d in done.values())
    finally:
        engine.stop()
    stats = engine.stats
    assert stats["cohorts"] == 1 and stats["joined"] == 2 and stats["widened"] == 1, stats
    assert stats["narrowed"] >= 1, stats       # back to fewer rows once B and C ended
    assert stats["errors"] == 0 and stats["finished"] == 3, stats
    # B and C ended while A still had chunks to go (A's chunks counted when each of theirs ended)
    assert times["B"][-1] < len(out["A"]) and times["C"][-1] < len(out["A"]), times
    for seed, (k, (text, speaker, tokens)) in enumerate(spec.items(), 1):
        assert out[k][-1] is None, (k, out[k][-1])
        wave = np.concatenate(out[k][:-1])
        codes = tts.generate_custom_voice_codes(text, speaker=speaker, language="english",
                                                seed=[seed], max_new_tokens=tokens, **kw)
        ref = tts.decode(codes)[0][0]
        assert wave.shape == ref.shape, (k, wave.shape, ref.shape)
        np.testing.assert_allclose(wave, ref, atol=1e-5 + 1e-4 * np.abs(ref).max(), err_msg=k)
