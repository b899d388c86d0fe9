"""prefix_cache.py: an ICL clone's request-independent prompt prefix prefilled once and reused.
With the cache the greedy codes are those without it and the official's (a miss, then a hit), in
both text modes, in a batch with a row that has no prefix, and for a row that joins a running
batch (`generate.insert`); a different x-vector, language, reference or transcript misses; the
byte bound evicts; the engine uses the model's cache and counts hits and misses."""
import dataclasses
import io
import threading

import numpy as np
import pytest
import soundfile as sf
import torch

from official import GREEDY, official_codes
from qwen3_tts_jax import generate as gen, prompts
from qwen3_tts_jax.buckets import ladder
from qwen3_tts_jax.prefix_cache import PrefixCache, batch_prefix
from qwen3_tts_jax.runner import prepare
from qwen3_tts_jax.settings import GenerationSettings
from qwen3_tts_jax.voice import VoiceClonePromptItem

TEXTS = ("Hello world. This is a tiny test.", "Quite another sentence, a bit longer than that.")
REF_TEXT = "The quick brown fox jumps over the dog."
TOKENS = 10


@pytest.fixture(scope="module")
def base(model_pair):
    return model_pair("base")


def _voice(tts, seed=0, frames=30, ref_text=REF_TEXT, icl=True):
    t = tts.config.talker
    rng = np.random.default_rng(seed)
    return VoiceClonePromptItem(
        ref_code=rng.integers(0, t.code_predictor.vocab_size, (frames, t.num_code_groups)
                              ).astype(np.int32) if icl else None,
        ref_spk_embedding=rng.standard_normal(t.hidden_size).astype(np.float32),
        x_vector_only_mode=not icl, icl_mode=icl, ref_text=ref_text if icl else None)


def _official_item(v):
    from qwen_tts.inference.qwen3_tts_model import VoiceClonePromptItem as Off

    return Off(ref_code=None if v.ref_code is None else torch.from_numpy(v.ref_code).long(),
               ref_spk_embedding=torch.from_numpy(v.ref_spk_embedding),
               x_vector_only_mode=v.x_vector_only_mode, icl_mode=v.icl_mode,
               ref_text=v.ref_text)


def _prompts(tts, texts, voices, non_streaming, language="english"):
    return [tts.voice_clone_prompts(t, language, voice_clone_prompt=[v],
                                    non_streaming_mode=non_streaming)[0][0]
            for t, v in zip(texts, voices)]


def _settings(tts):
    return GenerationSettings.merge(tts.generate_defaults, max_new_tokens=TOKENS, **GREEDY)


def _run(tts, items, cache):
    """Greedy codes of `items` as one batch (the runner's buckets), the prefix from `cache`
    (None: computed whole); and the first step's logits."""
    batch, settings, keys = prepare(tts.config, tts.options, items, _settings(tts))
    B = batch.text_BxL.shape[0]
    rows = items + [items[0]] * (B - len(items))
    prefix = None if cache is None else batch_prefix(
        [cache.get(tts.params, tts.config, p, tts.options) for p in rows],
        [p.prefix_len for p in rows])
    lens = None if prefix is None else [p.prefix_len for p in rows]
    if prefix is not None:       # the prefill computes fewer positions
        L = batch.text_BxL.shape[1]
        assert (gen.prefill_length(batch.mask_BxL, lens) or L) < \
            (gen.prefill_length(batch.mask_BxL) or L)
    frames = gen.capacity(TOKENS - 1, tts.options)
    state, ctx = gen.prefill(tts.params, tts.config, batch, settings, keys, frames=frames,
                             compute=gen.prefill_length(batch.mask_BxL, lens), prefix=prefix,
                             options=tts.options)
    logits = np.asarray(state.logits_BxV)
    state = gen.decode(tts.params, tts.config, state, ctx, settings, frames, tts.options)
    codes, lengths = np.asarray(state.codes_BxFxG), np.asarray(state.length_B)
    return [codes[b, :lengths[b]] for b in range(len(items))], logits[:len(items)]


def _same(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        np.testing.assert_array_equal(a, b, err_msg=f"row {i}")


def test_prefix_is_the_rows_before_the_target_text(base):
    """prefix_len: the same rows for any text, and the first row where two texts differ (the
    target text's first token, or in streaming mode the reference frame it is summed into)."""
    _, tts = base
    v = _voice(tts)
    ref_tokens = len(tts.tokenizer.encode(f"<|im_start|>assistant\n{REF_TEXT}<|im_end|>\n")) - 5
    for ns in (False, True):
        a, b = _prompts(tts, TEXTS, [v, v], ns)
        P = a.prefix_len
        assert P == b.prefix_len > ref_tokens and 0 <= a.extra_pos < P
        np.testing.assert_array_equal(a.text_L[:P], b.text_L[:P])
        np.testing.assert_array_equal(a.codec_LxG[:P], b.codec_LxG[:P])
        assert a.text_L[P] != b.text_L[P], ns
        assert a.text_L[P - ref_tokens:P].tolist() == \
            tts.tokenizer.encode(f"<|im_start|>assistant\n{REF_TEXT}<|im_end|>\n")[3:-2]
    # x-vector only: no ICL rows, no prefix; a transcript longer than the reference frames in
    # streaming mode: every ICL row is in it but the last, which is computed
    assert _prompts(tts, TEXTS[:1], [_voice(tts, icl=False)], False)[0].prefix_len == 0
    short = _prompts(tts, TEXTS[:1], [_voice(tts, frames=3)], False)[0]
    assert short.prefix_len == len(short) - 1


@pytest.mark.parametrize("non_streaming", [False, True])
def test_codes_with_the_cache_equal_without_and_official(base, non_streaming):
    """A miss (text A, with an x-vector-only row that has no prefix), then a hit (text B): the
    codes equal the runs without the cache, the API's and the official's; first-step logits
    close."""
    off, tts = base
    v, x = _voice(tts), _voice(tts, seed=1, icl=False)
    cache = PrefixCache()
    for n, text in enumerate(TEXTS):
        items = _prompts(tts, [text, "Hi."], [v, x], non_streaming)
        got, logits = _run(tts, items, cache)
        assert (cache.misses, cache.hits, len(cache)) == (1, n, 1)
        want, want_logits = _run(tts, items, None)
        _same(got, want)
        print(f"first-step logits max abs diff (ns={non_streaming}, {['miss', 'hit'][n]}): "
              f"{np.abs(logits - want_logits).max():.3g}")
        np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=1e-4)
        kw = dict(text=[text, "Hi."], language="english", max_new_tokens=TOKENS,
                  non_streaming_mode=non_streaming)
        _same(got, tts.generate_voice_clone_codes(voice_clone_prompt=[v, x], **kw, **GREEDY))
        _same(got, official_codes(off, "voice_clone", **kw, **GREEDY,
                                  voice_clone_prompt=[_official_item(v), _official_item(x)]))


def test_row_joining_a_running_batch_reuses_the_prefix(base):
    """`generate.insert` with a stored prefix: the joining row's codes are its codes alone, its
    first logits close."""
    _, tts = base
    v, x = _voice(tts), _voice(tts, seed=1, icl=False)
    cache = PrefixCache()
    first = _prompts(tts, [TEXTS[0], "Hi."], [v, x], False)
    alone, alone_logits = _run(tts, _prompts(tts, [TEXTS[1]], [v], False), None)
    batch, settings, keys = prepare(tts.config, tts.options, first, _settings(tts))
    L, Lt = batch.text_BxL.shape[1], batch.trailing_BxLt.shape[1]
    frames = gen.capacity(TOKENS - 1, tts.options) * 2
    state, ctx = gen.prefill(tts.params, tts.config, batch, settings, keys, frames=frames,
                             options=tts.options)
    state = gen.decode(tts.params, tts.config, state, ctx, settings, 3, tts.options)
    joining = _prompts(tts, [TEXTS[1]], [v], False)[0]
    assert len(joining) <= L and len(joining.trailing) <= Lt
    one = prompts.batch_prompts(tts.config, [joining], length=L, trailing_length=Lt)
    prefix = batch_prefix([cache.get(tts.params, tts.config, joining, tts.options)],
                          [joining.prefix_len])
    key = prepare(tts.config, tts.options, [joining], _settings(tts))[2][0]
    state, ctx = gen.insert(tts.params, tts.config, state, ctx, settings, 1, one, key,
                            compute=gen.prefill_length(one.mask_BxL, [joining.prefix_len]),
                            prefix=prefix, options=tts.options)
    np.testing.assert_allclose(np.asarray(state.logits_BxV)[1], alone_logits[0], atol=1e-4,
                               rtol=1e-4)
    state = gen.decode(tts.params, tts.config, state, ctx, settings, frames, tts.options)
    n = int(np.asarray(state.length_B)[1])
    _same([np.asarray(state.codes_BxFxG)[1, 3:3 + n]], alone)
    assert cache.misses == 1


def test_key_tells_voices_languages_references_and_transcripts_apart(base):
    _, tts = base
    v = _voice(tts)
    cache = PrefixCache()

    def key(voice, language="english", ns=False, text=TEXTS[0]):
        p = _prompts(tts, [text], [voice], ns, language)[0]
        return cache.key(p, np.float32, tts.options)

    other_x = VoiceClonePromptItem(v.ref_code, v.ref_spk_embedding + np.float32(1e-3), False,
                                   True, REF_TEXT)
    other_code = VoiceClonePromptItem(v.ref_code.copy(), v.ref_spk_embedding, False, True,
                                      REF_TEXT)
    other_code.ref_code[0, 5] ^= 1
    keys = [key(v), key(other_x), key(v, "chinese"), key(v, "auto"), key(other_code),
            key(VoiceClonePromptItem(v.ref_code, v.ref_spk_embedding, False, True,
                                     REF_TEXT + " And more.")), key(v, ns=True)]
    assert len(set(keys)) == len(keys)
    assert key(v, text=TEXTS[1]) == keys[0]                  # the target text is not in it
    p = _prompts(tts, [TEXTS[0]], [v], False)[0]
    other = "positions" if tts.options.cache_layout == "heads" else "heads"
    assert cache.key(p, np.float32, dataclasses.replace(tts.options, cache_layout=other)) \
        != keys[0] != cache.key(p, np.dtype("bfloat16"), tts.options)

def test_byte_bound_evicts_least_recent_and_zero_disables(base):
    _, tts = base
    voices = [_voice(tts, seed=s) for s in range(3)]
    items = [_prompts(tts, [TEXTS[0]], [v], False)[0] for v in voices]
    probe = PrefixCache()
    size = sum(x.nbytes for c in probe.get(tts.params, tts.config, items[0], tts.options)
               for x in c)
    cache = PrefixCache(max_bytes=2 * size)
    for p in items[:2]:
        cache.get(tts.params, tts.config, p, tts.options)
    cache.get(tts.params, tts.config, items[0], tts.options)       # 0 most recent
    cache.get(tts.params, tts.config, items[2], tts.options)       # evicts 1
    assert (len(cache), cache.bytes, cache.evictions, cache.hits, cache.misses) == \
        (2, 2 * size, 1, 1, 3)
    cache.get(tts.params, tts.config, items[0], tts.options)
    assert cache.hits == 2
    cache.get(tts.params, tts.config, items[1], tts.options)
    assert cache.misses == 4 and cache.evictions == 2
    off = PrefixCache(0)
    assert off.get(tts.params, tts.config, items[0], tts.options) is None and len(off) == 0


def test_engine_reuses_the_models_prefix_and_counts(base):
    """Through the engine (the server's path): the same audio with the cache as without, a
    miss and then hits for the same voice, counters in `stats` (the codec's state after the
    reference codes too: `codec.PrefixStates`, shared by both runs)."""
    from qwen3_tts_jax.engine import BatchEngine, Job

    _, tts = base
    v, x = _voice(tts), _voice(tts, seed=1, icl=False)
    runs = [[(TEXTS[0], v)], [(TEXTS[1], v), ("Hi.", x)]]   # one after the other

    def serve(cache):
        engine = BatchEngine(tts, max_batch_size=2, batch_window=0.05, batch_buckets=(2,),
                             prefix_cache=cache)
        engine.start()
        waves = []
        try:
            for run in runs:
                done = [threading.Event() for _ in run]
                out = [[] for _ in run]
                for i, (text, voice) in enumerate(run):
                    def emit(a, i=i):
                        (done[i].set() if a is None or isinstance(a, Exception)
                         else out[i].append(np.asarray(a)))
                        if isinstance(a, Exception):
                            out[i].append(a)
                    p = _prompts(tts, [text], [voice], False)[0]
                    engine.submit(Job(p, _settings(tts), emit, seed=0, ref_code=voice.ref_code,
                                      stream=False))
                assert all(d.wait(300) for d in done)
                waves += [np.concatenate(o) for o in out]
        finally:
            engine.stop()
        return waves, dict(engine.stats)

    with_cache, stats = serve(PrefixCache())
    without, stats_off = serve(PrefixCache(0))
    for a, b in zip(with_cache, without):
        np.testing.assert_array_equal(a, b)
    assert (stats["prefix_cache_misses"], stats["prefix_cache_hits"],
            stats["prefix_cache_entries"]) == (1, 1, 1), stats
    assert stats_off["prefix_cache_entries"] == 0 and stats_off["prefix_cache_misses"] == 0
    # the codec's state after the reference codes: decoded for the first request, then reused
    assert stats["codec_prefix_misses"] == 1 and stats["codec_prefix_hits"] >= 1, stats
    assert isinstance(tts.prefix_cache, PrefixCache) and tts.prefix_cache.enabled


def test_warmup_with_a_cloned_voice_compiles_what_its_requests_use(base):
    """After `BatchEngine.warmup` with an ICL voice, a request of that voice with another text
    (same prompt bucket) compiles no prefill, refill or frame
    loop."""
    from qwen3_tts_jax.engine import BatchEngine, Job

    _, tts = base
    v = _voice(tts, seed=5)
    cache = PrefixCache()
    engine = BatchEngine(tts, max_batch_size=1, batch_window=0.0, batch_buckets=(1,),
                         prefix_cache=cache)
    like, other = _prompts(tts, ["Hi.", "Hello world, how are you?"], [v, v], True)
    assert len(like) != len(other) and ladder(len(like)) == ladder(len(other))
    engine.warmup([Job(like, _settings(tts), lambda _: None, seed=0, ref_code=v.ref_code)])
    assert cache.misses == 1 and len(cache) == 1
    before = gen.program_counts()
    done = threading.Event()
    engine.start()
    try:
        engine.submit(Job(other, _settings(tts), lambda a: a is None and done.set(), seed=0,
                          ref_code=v.ref_code, stream=True))
        assert done.wait(300)
    finally:
        engine.stop()
    assert gen.program_counts() == before
    assert cache.hits >= 1 and cache.misses == 1


def _wave_of(engine, tts, text, voice):
    from qwen3_tts_jax.engine import Job

    done, out = threading.Event(), []

    def emit(a):
        if a is None or isinstance(a, Exception):
            out.append(a)
            done.set()
        else:
            out.append(np.asarray(a))
    p = _prompts(tts, [text], [voice], False)[0]
    engine.submit(Job(p, _settings(tts), emit, seed=0, ref_code=voice.ref_code, stream=True))
    assert done.wait(300) and out[-1] is None, out[-1:]
    return np.concatenate(out[:-1])


def test_prime_fills_a_voices_caches_before_its_first_request(base):
    """`BatchEngine.prime`: a voice's prompt-prefix KV and the codec's state after its
    reference are computed before its first request, which then only hits them; its audio is
    the unprimed engine's."""
    from qwen3_tts_jax.engine import BatchEngine, Job

    _, tts = base
    v = _voice(tts, seed=11)                 # a reference no other test decoded
    states = tts.speech_tokenizer.prefix_states

    def engine(cache):
        return BatchEngine(tts, max_batch_size=2, batch_window=0.0, batch_buckets=(2,),
                           prefix_cache=cache)

    cold = engine(PrefixCache())
    cold.start()
    try:
        want = _wave_of(cold, tts, TEXTS[1], v)
    finally:
        cold.stop()
    states.clear()

    e = engine(PrefixCache())
    like = Job(_prompts(tts, ["x"], [v], False)[0], _settings(tts), None, ref_code=v.ref_code)
    before = states.misses
    assert e.prime(like).result() is True
    assert (e.stats["prefix_cache_misses"], e.stats["prefix_cache_entries"]) == (1, 1)
    assert states.misses == before + 1 and len(states) == 1
    assert e.prime(like).result() is False              # already there: nothing computed
    e.start()
    try:
        misses = (e.stats["prefix_cache_misses"], states.misses)
        got = _wave_of(e, tts, TEXTS[1], v)
        assert (e.stats["prefix_cache_misses"], states.misses) == misses   # hits only
        assert e.prime(like).result() is False          # on the worker thread once started
    finally:
        e.stop()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_server_fills_a_registered_voices_caches(make_checkpoint, tmp_path, caplog):
    """POST /v1/audio/voices fills the voice's caches before it answers, so its first request
    only hits them; a restart with --warmup fills those of the voices in --voices-dir."""
    pytest.importorskip("fastapi")
    from test_audio import write_speech
    from test_server import Running, get, multipart, post

    from qwen3_tts_jax import Qwen3TTS
    from qwen3_tts_jax.server.app import ServerOptions, create_app

    tts = Qwen3TTS.from_pretrained(make_checkpoint("base"))
    with open(write_speech(tmp_path / "ref.wav", 24000), "rb") as f:
        ref = f.read()
    opts = dict(voices_dir=str(tmp_path / "voices"), max_new_tokens=TOKENS, min_prompt_bucket=64,
                batch_buckets=(1,), max_batch_size=1)

    def caches(s):
        st = get(s.url + "/health")["stats"]
        return (st["prefix_cache_misses"], st["prefix_cache_hits"], st["codec_prefix_misses"],
                st["codec_prefix_hits"])

    s = Running(create_app(tts, ServerOptions(**opts)))
    try:
        code, out = multipart(s.url + "/v1/audio/voices", {"name": "me", "transcript": REF_TEXT},
                              {"audio_sample": ("ref.wav", ref)})
        assert code == 200 and out["mode"] == "icl", out
        assert caches(s) == (1, 0, 1, 0)
        body = {"model": "m", "input": TEXTS[0], "voice": "me", "response_format": "pcm"}
        assert post(s.url + "/v1/audio/speech", body)[0] == 200
        assert caches(s)[0::2] == (1, 1) and min(caches(s)[1::2]) >= 1
        other = io.BytesIO()            # other audio: other reference codes
        sf.write(other, np.random.default_rng(3).uniform(-0.3, 0.3, 36000), 24000, format="WAV")
        code, out = multipart(s.url + "/v1/audio/voices",
                              {"name": "you", "transcript": "Another transcript, not this."},
                              {"audio_sample": ("ref2.wav", other.getvalue())})
        assert code == 200 and caches(s)[0::2] == (2, 2), out
    finally:
        s.stop()
    tts.prefix_cache.clear()
    tts.speech_tokenizer.prefix_states.clear()
    with caplog.at_level("INFO", logger="qwen3_tts_jax.server"):
        s = Running(create_app(tts, ServerOptions(**opts, warmup=(1,))))
    try:
        assert any("the caches of 2 registered voice(s) filled" in r.message
                   for r in caplog.records)
        misses = caches(s)[0::2]
        for voice in ("me", "you"):      # the warm-up ran one of them; both were filled
            assert post(s.url + "/v1/audio/speech", dict(body, voice=voice))[0] == 200
            assert caches(s)[0::2] == misses, voice
    finally:
        s.stop()
