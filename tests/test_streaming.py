"""Streaming generation: the same compiled frame loop as offline, chunk by chunk, and the codec's
state carried from chunk to chunk (`StreamDecoder`); codes identical to offline for the same seed,
audio equal to the offline decode (float rounding) at any length, the official 300-frame codec
restarts included."""
import numpy as np
import pytest
import torch

from official import GREEDY
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
