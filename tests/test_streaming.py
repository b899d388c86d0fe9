"""Streaming generation: the same compiled frame loop as offline, chunk by chunk; codes identical to
offline for the same seed, audio equal to the offline decode within a measured tolerance."""
import numpy as np
import pytest


@pytest.fixture(scope="module")
def tts(model_pair):
    return model_pair("cv_proj")[1]


@pytest.mark.parametrize("sampled", [False, True])
def test_stream_equals_offline(tts, sampled):
    kw = dict(text="Hello world. This is a tiny test.", speaker="ryan", language="english",
              max_new_tokens=40)
    kw.update(seed=3) if sampled else kw.update(do_sample=False, subtalker_dosample=False)
    codes = tts.generate_custom_voice_codes(**kw)[0]
    offline, _ = tts.decode([codes])
    chunks = list(tts.generate_custom_voice_streaming(**kw, chunk_frames=8, first_chunk_frames=2))
    assert len(chunks[0]) == 2 * 1920 and all(len(c) % 1920 == 0 for c in chunks)
    stream = np.concatenate(chunks)
    assert stream.shape == offline[0].shape == (len(codes) * 1920,)
    # the codes are identical (same step, same keys) and, with the default 72-frame context
    # covering this 39-frame utterance, every chunk is decoded with all of its history: the
    # stream equals the offline audio to float rounding (other padded shapes)
    peak = np.abs(offline[0]).max()
    np.testing.assert_allclose(stream[:2 * 1920], offline[0][:2 * 1920], atol=1e-5 * peak)
    err = np.abs(stream - offline[0]).max() / peak
    print(f"max |stream - offline| / peak = {err:.2e}")
    assert err < 1e-4


def test_stream_short_context(tts):
    """A left context shorter than the history (5 frames): chunks still line up sample for sample
    (lengths, first chunk exact) though later samples may differ from the offline decode."""
    kw = dict(text="Hi.", speaker="vivian", do_sample=False, subtalker_dosample=False,
              max_new_tokens=20)
    codes = tts.generate_custom_voice_codes(**kw)[0]
    offline, _ = tts.decode([codes])
    chunks = list(tts.generate_custom_voice_streaming(**kw, chunk_frames=5, first_chunk_frames=1,
                                                      left_context=5))
    stream = np.concatenate(chunks)
    assert [len(c) for c in chunks][:2] == [1920, 5 * 1920] and stream.shape == offline[0].shape
    np.testing.assert_allclose(stream[:6 * 1920], offline[0][:6 * 1920],
                               atol=1e-5 * np.abs(offline[0]).max())
