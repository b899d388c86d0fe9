"""runner.py's streamed runs and the API's streaming methods (text in pieces through the
engine's `stream_pieces` included): the same compiled frame loop as offline, chunk by chunk, and
the codec's state carried from chunk to chunk (`StreamDecoder`); codes identical to offline for the same seed,
audio equal to the offline decode (float rounding) at any length, the official 300-frame codec
restarts included."""
import numpy as np
import pytest
import torch

from official import GREEDY, with_options
from test_audio import speech


@pytest.fixture(scope="module")
def tts(model_pair):
    return model_pair("cv_proj")[1]


def _check(stream, offline, first):
    peak = np.abs(offline).max()
    assert peak > 0
    np.testing.assert_allclose(stream[:first], offline[:first], atol=1e-5 * peak)
    err = np.abs(stream - offline).max() / peak
    print(f"max |stream - offline| / peak = {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("sampled", [False, True])
def test_stream_equals_offline(tts, sampled):
    kw = dict(text="Hello world. This is a tiny test.", speaker="ryan", language="english",
              max_new_tokens=40)
    kw.update(seed=3) if sampled else kw.update(GREEDY)
    codes = tts.generate_custom_voice_codes(**kw)[0]
    offline, _ = tts.decode([codes])
    chunks = list(tts.generate_custom_voice_streaming(**kw, chunk_frames=8, first_chunk_frames=2))
    assert len(chunks[0]) == 2 * 1920 and all(len(c) % 1920 == 0 for c in chunks)
    stream = np.concatenate(chunks)
    assert stream.shape == offline[0].shape == (len(codes) * 1920,)
    _check(stream, offline[0], 2 * 1920)


def test_long_stream_equals_offline(tts):
    """330 frames: longer than the codec's attention window (72 frames, where a windowed
    re-decode would drift) and than the official decode's 300-frame chunk (where it restarts
    after 25 frames of context); the stream, in 40-frame chunks, is still the offline audio."""
    kw = dict(text="Hello world. This is a tiny test.", speaker="ryan", language="english",
              max_new_tokens=331, **GREEDY)
    codes = tts.generate_custom_voice_codes(**kw)[0]
    assert len(codes) == 330, "the test needs an utterance past the 300-frame codec chunk"
    offline, _ = tts.decode([codes])
    chunks = list(tts.generate_custom_voice_streaming(**kw, chunk_frames=40, first_chunk_frames=3))
    assert [len(c) // 1920 for c in chunks] == [3] + [40] * 8 + [7]
    _check(np.concatenate(chunks), offline[0], 3 * 1920)
    whole, _ = tts.speech_tokenizer.decode([codes], chunk_size=None)
    assert np.abs(whole[0] - offline[0]).max() > 1e-3 * np.abs(offline[0]).max()  # restarts matter


def test_icl_clone_stream_equals_offline(model_pair):
    """ICL voice clone: the reference codes go through the codec first and their audio is cut,
    as in the official offline decode (which cuts int(ref / total * samples) samples: at most one
    sample fewer than the reference's)."""
    off, base = model_pair("base")
    kw = dict(text="Hello world. This is a tiny test.", language="english",
              ref_audio=(speech(24000), 24000), ref_text="Hello world.", max_new_tokens=30,
              **GREEDY)
    with torch.no_grad():
        want, _ = off.generate_voice_clone(**kw)
    offline, _ = base.generate_voice_clone(**kw)
    np.testing.assert_allclose(offline[0], want[0], atol=1e-4 * np.abs(want[0]).max())
    stream = np.concatenate(list(base.generate_voice_clone_streaming(**kw, chunk_frames=6)))
    assert 0 <= len(offline[0]) - len(stream) <= 1 and len(stream) % 1920 == 0
    _check(stream, offline[0][len(offline[0]) - len(stream):], 3 * 1920)


# ------------------------------------------------------------------------ text arriving in pieces
def _slowly(pieces, pause=0.0):
    """An iterator of text pieces, as an LLM would yield them."""
    import time

    for p in pieces:
        time.sleep(pause)
        yield p


TEXT = "Hello world, this is a test of text that arrives in pieces."
PIECES = ["Hel", "lo wor", "ld, this ", "is a", " test of text ", "that arrives in pieces."]


@pytest.mark.parametrize("sampled", [False, True])
def test_text_pieces_equal_offline_streaming_mode(tts, sampled):
    """An iterator of pieces (split mid-word, with and without pauses) gives the audio of the
    offline generation of the whole text in the official streaming text mode, same seed: the
    frame loop never runs past the text received."""
    kw = dict(speaker="ryan", language="english", max_new_tokens=40)
    kw.update(seed=7) if sampled else kw.update(GREEDY, seed=7)
    codes = tts.generate_custom_voice_codes(TEXT, non_streaming_mode=False, **kw)[0]
    offline = tts.decode([codes])[0][0]
    for pause in (0.0, 0.05):
        chunks = list(tts.generate_custom_voice_streaming(_slowly(PIECES, pause), **kw,
                                                          chunk_frames=5, first_chunk_frames=2))
        assert len(chunks[0]) == 2 * 1920
        _check(np.concatenate(chunks), offline, 2 * 1920)
    # the whole text as a str in the same mode: the same audio
    whole = tts.generate_custom_voice_streaming(TEXT, non_streaming_mode=False, **kw)
    _check(np.concatenate(list(whole)), offline, 3 * 1920)


def test_text_pieces_voice_design_and_clone(model_pair):
    """Voice design and both clone modes (x-vector; ICL, whose prompt holds as many text tokens
    as the reference has frames beyond its transcript) from text pieces: the offline
    streaming-mode audio of the whole text."""
    _, vd = model_pair("vd_bigvocab")
    kw = dict(instruct="A calm voice.", language="auto", max_new_tokens=30, seed=2, **GREEDY)
    offline, _ = vd.generate_voice_design(TEXT, non_streaming_mode=False, **kw)
    stream = vd.generate_voice_design_streaming(iter(PIECES), **kw, chunk_frames=7)
    _check(np.concatenate(list(stream)), offline[0], 3 * 1920)

    _, base = model_pair("base")
    ref = (speech(24000), 24000)
    for voice in (base.create_voice_clone_prompt(ref, x_vector_only_mode=True),
                  base.create_voice_clone_prompt(ref, ref_text="Hi.")):
        kw = dict(language="english", voice_clone_prompt=voice, max_new_tokens=30, seed=3,
                  **GREEDY)
        offline, _ = base.generate_voice_clone(TEXT, **kw)        # streaming mode: the default
        stream = np.concatenate(list(base.generate_voice_clone_streaming(
            _slowly(PIECES, 0.02), **kw, chunk_frames=6)))
        want = offline[0][len(offline[0]) - len(stream):]         # ICL: at most 1 sample cut
        assert 0 <= len(offline[0]) - len(stream) <= 1
        _check(stream, want, 3 * 1920)


def test_text_pieces_errors_and_early_close(tts):
    kw = dict(speaker="ryan", max_new_tokens=20, **GREEDY)
    with pytest.raises(ValueError, match="non_streaming_mode=True needs the whole text"):
        tts.generate_custom_voice_streaming(iter(["Hi."]), non_streaming_mode=True, **kw)
    with pytest.raises(ValueError, match="unknown speaker"):   # checked at the call
        tts.generate_custom_voice_streaming(iter(["Hi."]), speaker="bob", max_new_tokens=20)
    with pytest.raises(ValueError, match="ended without any text"):
        list(tts.generate_custom_voice_streaming(iter(["", " "]), **kw))
    with pytest.raises(TypeError, match="text piece 1 is a int"):
        list(tts.generate_custom_voice_streaming(iter(["Hello ", 5]), **kw))

    def failing():
        yield "Hello there, "
        raise RuntimeError("the LLM went away")

    with pytest.raises(RuntimeError, match="the LLM went away"):
        list(tts.generate_custom_voice_streaming(failing(), **kw))
    # closing the generator after the first chunk stops the generation (and its threads)
    import threading

    gen = tts.generate_custom_voice_streaming(_slowly(PIECES, 0.01), **kw, first_chunk_frames=2)
    assert len(next(gen)) == 2 * 1920
    gen.close()
    alive = [t.name for t in threading.enumerate() if t.name.startswith("qwen3-tts-")]
    assert not any(n == "qwen3-tts-engine" for n in alive), alive


def test_text_pieces_without_spaces_start_before_the_text_ends(tts):
    """Chinese has no spaces: its words are committed at punctuation, so the first audio comes
    while the text is still arriving (the last piece waits for it), and the audio is still the
    offline streaming-mode audio of the whole text."""
    import threading

    heard = threading.Event()

    def pieces():
        yield "你好，世界。今天天"
        yield "气很"
        assert heard.wait(120), "no audio before the text ended"
        yield "好！"

    kw = dict(speaker="vivian", language="chinese", max_new_tokens=30, seed=1, **GREEDY)
    chunks = []
    for chunk in tts.generate_custom_voice_streaming(pieces(), **kw, first_chunk_frames=1,
                                                     chunk_frames=4):
        chunks.append(chunk)
        heard.set()
    codes = tts.generate_custom_voice_codes("你好，世界。今天天气很好！", non_streaming_mode=False,
                                            **kw)[0]
    _check(np.concatenate(chunks), tts.decode([codes])[0][0], 1920)


def test_endless_text_pieces_end_at_the_budget(tts):
    """An iterator that never ends (or outruns the budget) is read only as far as the frames
    can read: the utterance ends at max_new_tokens with the audio of a long enough whole text."""
    import itertools

    kw = dict(speaker="ryan", language="english", max_new_tokens=20, seed=0, **GREEDY)
    chunks = list(tts.generate_custom_voice_streaming(itertools.repeat("la "), **kw))
    codes = tts.generate_custom_voice_codes("la " * 100, non_streaming_mode=False, **kw)[0]
    assert len(codes) == 19
    _check(np.concatenate(chunks), tts.decode([codes])[0][0], 3 * 1920)


# ------------------------------------------------------------------ the codec beside the frames
def _with_overlap(tts, mode):
    return with_options(tts, codec_overlap=mode)


def test_codec_overlap_modes_give_the_same_chunks(tts):
    """`Options.codec_overlap`: the codec of a chunk beside the next chunk's frames changes when
    the work runs, never the audio: the same chunks, bit for bit, in every mode."""
    kw = dict(text="Hello world. This is a tiny test.", speaker="ryan", language="english",
              max_new_tokens=30, seed=5)
    runs = {m: list(_with_overlap(tts, m).generate_custom_voice_streaming(
        **kw, chunk_frames=4, first_chunk_frames=1)) for m in ("off", "queue", "thread")}
    assert len(runs["off"]) > 3
    for m in ("queue", "thread"):
        assert [len(c) for c in runs[m]] == [len(c) for c in runs["off"]]
        for a, b in zip(runs[m], runs["off"]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["off", "queue", "thread"])
def test_codec_overlap_order_of_work(tts, mode, monkeypatch):
    """What runs when, per mode: "off" decodes a chunk's audio and hands it out before the next
    chunk's frames are dispatched; "queue" dispatches the codec, then the next chunk's frames,
    then waits for the audio; "thread" runs the codec on another thread while the next chunk's
    frames are dispatched. The first chunk is decoded alone in every mode (time to first audio)."""
    import threading

    from qwen3_tts_jax import generate as gen
    from qwen3_tts_jax.codec import streaming

    events, main = [], threading.get_ident()
    dispatch, submit = gen.Chunks.dispatch, streaming.StreamDecoder.submit
    result = streaming.Pending.result

    def on(name, fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            if out is not False:                 # a dispatch after the end queues nothing
                events.append(name + ("" if threading.get_ident() == main else "@worker"))
            return out
        return wrapped

    monkeypatch.setattr(gen.Chunks, "dispatch", on("frames", dispatch))
    monkeypatch.setattr(streaming.StreamDecoder, "submit", on("codec", submit))
    monkeypatch.setattr(streaming.Pending, "result", on("audio", result))
    kw = dict(text="Hello world. This is a tiny test.", speaker="ryan", language="english",
              max_new_tokens=14, **GREEDY)
    sizes = []
    for chunk in _with_overlap(tts, mode).generate_custom_voice_streaming(
            **kw, chunk_frames=4, first_chunk_frames=1):
        events.append("yield")
        sizes.append(len(chunk) // 1920)
    assert sizes == [1, 4, 4, 4]          # 13 frames (max_new_tokens - 1)
    segs, seg = [], []
    for e in events:
        seg.append(e)
        if e == "yield":
            segs.append(seg)
            seg = []
    assert segs[0] == ["frames", "codec", "audio", "yield"], events   # the first chunk alone
    for k, seg in enumerate(segs[1:], 1):
        last = k == len(segs) - 1
        if mode == "off":
            assert seg == ["frames", "codec", "audio", "yield"], events
        elif mode == "queue":
            assert seg == (["frames"] if k == 1 else []) + ["codec"] + (
                [] if last else ["frames"]) + ["audio", "yield"], events
        else:       # the worker's codec and the next frames' dispatch: any interleaving
            body = seg[1:-1] if k == 1 else seg[:-1]
            assert seg[-1] == "yield" and (k > 1 or seg[0] == "frames"), events
            want = ["codec@worker", "audio@worker"] + ([] if last else ["frames"])
            assert sorted(body) == sorted(want), events
            assert body.index("codec@worker") < body.index("audio@worker"), events
