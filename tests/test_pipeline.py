"""Text to audio end to end against the official `generate_custom_voice` / `generate_voice_design`
(greedy: identical codes, waveforms within 1e-4 of the peak), and the functional form
`generate.synthesize` under jax.jit."""
import jax
import numpy as np
import pytest
import torch

from official import GREEDY
from qwen3_tts_jax import generate

TEXTS = ["Hello world. This is a tiny test.", "Hi."]


@pytest.fixture(scope="module")
def pair(model_pair):
    return model_pair


def _close_waves(ours, ref):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.dtype == np.float32 and a.shape == b.shape
        peak = np.abs(b).max()
        assert peak > 1e-2, "the reference audio is near-silent: the comparison would be vacuous"
        np.testing.assert_allclose(a, b, atol=1e-4 * peak, rtol=0)


def test_custom_voice_audio_matches_official(pair):
    off, ours = pair("cv_proj")
    kw = dict(text=TEXTS, speaker=["ryan", "eric"], language=["english", "auto"],
              max_new_tokens=10)
    with torch.no_grad():
        ref, sr = off.generate_custom_voice(**kw, **GREEDY)
    got, sr2 = ours.generate_custom_voice(**kw, **GREEDY)
    assert sr == sr2 == 24000
    _close_waves(got, ref)


def test_voice_design_audio_matches_official(pair):
    off, ours = pair("vd_bigvocab")
    kw = dict(text=TEXTS[0], instruct="A warm voice.", language="english", max_new_tokens=9,
              non_streaming_mode=False)
    with torch.no_grad():
        ref, _ = off.generate_voice_design(**kw, **GREEDY)
    got, _ = ours.generate_voice_design(**kw, **GREEDY)
    _close_waves(got, ref)


def test_functional_synthesize_under_jit(pair):
    _, ours = pair("cv_eos")
    kw = dict(text=["Hello world. This is a tiny test.", "Hi.", "The lazy dog."],
              speaker=["ryan", "vivian", "dylan"], max_new_tokens=40, **GREEDY)
    want_codes = ours.generate_custom_voice_codes(**kw)
    want_audio, _ = ours.decode(want_codes)
    batch, settings, keys = ours.prepare_custom_voice(**kw)
    synth = jax.jit(generate.synthesize,
                    static_argnames=("cfg", "codec_cfg", "frames", "options"))
    codec = ours.speech_tokenizer
    codes, lengths, audio = synth(ours.params, ours.config, codec.params, codec.config.decoder,
                                  batch, settings, keys, frames=64, options=ours.options)
    codes, lengths, audio = map(np.asarray, (codes, lengths, audio))
    assert len({len(c) for c in want_codes}) > 1          # rows really end at different frames
    for b, (c, w) in enumerate(zip(want_codes, want_audio)):
        assert lengths[b] == len(c)
        np.testing.assert_array_equal(codes[b, :len(c)], c)
        assert not codes[b, len(c):].any() and not audio[b, len(w):].any()
        np.testing.assert_allclose(audio[b, :len(w)], w, atol=1e-5)


@pytest.mark.parametrize("do_sample", [False, True])
def test_lone_request_padded_to_the_backends_fewest_rows(pair, do_sample):
    """Where `Options.min_rows` is 2 (the GPU's), one request runs as a batch of two rows (the
    second stops at once and is dropped) and gives the same codes as one row alone."""
    from official import with_options

    _, ours = pair("cv_eos")
    kw = dict(text="Hello world. This is a tiny test.", speaker="ryan", max_new_tokens=30,
              seed=7, **(dict(do_sample=True, subtalker_dosample=True) if do_sample else GREEDY))
    assert ours.options.min_rows == 1
    assert ours.prepare_custom_voice(**kw)[0].text_BxL.shape[0] == 1
    alone = ours.generate_custom_voice_codes(**kw)
    two = with_options(ours, min_rows=2)
    assert two.prepare_custom_voice(**kw)[0].text_BxL.shape[0] == 2
    padded = two.generate_custom_voice_codes(**kw)
    assert len(alone) == len(padded) == 1 and len(alone[0]) > 3
    np.testing.assert_array_equal(padded[0], alone[0])
