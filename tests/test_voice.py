"""Voice cloning (Base checkpoints) against the official `Qwen3TTSModel.create_voice_clone_prompt` and
`generate_voice_clone`: x-vector-only and ICL modes, both text modes, speech-like reference audio
recorded at several sample rates, greedy codes identical and audio within tolerance."""
import numpy as np
import pytest
import torch

from official import GREEDY, load_official, official_codes
from qwen3_tts_jax import Qwen3TTS, generate as gen, load_voice, prompts, save_voice
from test_audio import speech

TEXT = "Hello world. This is a tiny test."


@pytest.fixture(scope="module")
def base(make_checkpoint):
    path = make_checkpoint("base")
    return load_official(path), Qwen3TTS.from_pretrained(path)


def _same(ours, ref):
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, f"item {i}: {a.shape} vs official {b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=f"item {i}")


@pytest.mark.parametrize("sr", [16000, 24000, 44100])
def test_clone_prompt_items_match_official(base, sr):
    off, ours = base
    ref = (speech(sr), sr)
    with torch.no_grad():
        want = off.create_voice_clone_prompt(ref_audio=ref, ref_text="Hello world.")[0]
    got = ours.create_voice_clone_prompt(ref_audio=ref, ref_text="Hello world.")[0]
    np.testing.assert_array_equal(got.ref_code, want.ref_code.numpy())
    np.testing.assert_allclose(got.ref_spk_embedding, want.ref_spk_embedding.numpy(), atol=1e-4)
    assert got.icl_mode and not got.x_vector_only_mode and got.ref_text == "Hello world."


@pytest.mark.parametrize("non_streaming", [False, True])
def test_icl_prompt_embeddings_match_official(base, non_streaming):
    off, ours = base
    ref = (speech(22050), 22050)
    captured = {}
    orig = off.model.talker.generate

    def spy(**kw):
        captured.update(kw)
        return orig(**{**kw, "max_new_tokens": 2})

    off.model.talker.generate = spy
    try:
        with torch.no_grad():
            off.generate_voice_clone(TEXT, language="english", ref_audio=ref,
                                     ref_text="Hello world.", non_streaming_mode=non_streaming,
                                     **GREEDY)
    finally:
        off.model.talker.generate = orig
    items, _ = ours.voice_clone_prompts(TEXT, "english", ref, "Hello world.", False, None,
                                         non_streaming)
    batch = prompts.batch_prompts(ours.config, items)
    emb = gen.embed_prompts(ours.params, ours.config, batch.text_BxL, batch.codec_BxLxG,
                            batch.extra_BxD, batch.extra_pos_B)
    np.testing.assert_allclose(np.asarray(emb), captured["inputs_embeds"].numpy(), atol=1e-4)


@pytest.mark.parametrize("mode", ["xvector", "icl_streaming", "icl_non_streaming"])
def test_greedy_codes_match_official(base, mode):
    off, ours = base
    refs = [(speech(16000), 16000), (speech(44100)[: 44100 * 3 // 2], 44100)]
    kw = dict(text=[TEXT, "Hi."], language=["english", "auto"], ref_audio=refs,
              max_new_tokens=10)
    if mode == "xvector":
        kw["x_vector_only_mode"] = True
    else:
        kw["ref_text"] = ["Hello world.", "The quick brown fox."]
        kw["non_streaming_mode"] = mode == "icl_non_streaming"
    want = official_codes(off, "voice_clone", **kw, **GREEDY)
    _same(ours.generate_voice_clone_codes(**kw, **GREEDY), want)


def test_icl_audio_matches_official(base):
    """ICL audio: decoded after the reference codes and cut like the official."""
    off, ours = base
    kw = dict(text=TEXT, language="english", ref_audio=(speech(24000), 24000),
              ref_text="Hello world.", max_new_tokens=8)
    with torch.no_grad():
        want, sr = off.generate_voice_clone(**kw, **GREEDY)
    got, sr2 = ours.generate_voice_clone(**kw, **GREEDY)
    assert sr == sr2 == 24000 and got[0].shape == want[0].shape
    peak = np.abs(want[0]).max()
    assert peak > 1e-3
    np.testing.assert_allclose(got[0], want[0], atol=1e-4 * peak)


def test_voice_file_roundtrip(base, tmp_path):
    _, ours = base
    items = ours.create_voice_clone_prompt([(speech(24000), 24000), (speech(16000), 16000)],
                                           ref_text=["Hello world.", None],
                                           x_vector_only_mode=[False, True])
    path = str(tmp_path / "voices.safetensors")
    save_voice(items, path)
    back = load_voice(path)
    for a, b in zip(items, back):
        np.testing.assert_array_equal(a.ref_spk_embedding, b.ref_spk_embedding)
        assert (a.ref_code is None) == (b.ref_code is None)
        assert (a.ref_text, a.icl_mode, a.x_vector_only_mode) == \
            (b.ref_text, b.icl_mode, b.x_vector_only_mode)
    direct = ours.generate_voice_clone_codes(["Hi.", "Hi."], voice_clone_prompt=items,
                                             max_new_tokens=5, **GREEDY)
    from_file = ours.generate_voice_clone_codes(["Hi.", "Hi."], voice_clone_prompt=path,
                                                max_new_tokens=5, **GREEDY)
    _same(from_file, direct)


def test_bad_clone_input(base, make_checkpoint, tmp_path):
    _, ours = base
    ref = (speech(24000), 24000)
    with pytest.raises(ValueError, match="ref_text"):
        ours.generate_voice_clone_codes(TEXT, ref_audio=ref)           # ICL needs a transcript
    with pytest.raises(ValueError, match="ref_audio"):
        ours.generate_voice_clone_codes(TEXT)
    with pytest.raises(ValueError, match="silent"):
        ours.create_voice_clone_prompt((np.zeros(24000, np.float32), 24000), "Hi.")
    with pytest.raises(ValueError, match="base checkpoint"):
        ours.generate_custom_voice_codes(TEXT, speaker="ryan")          # custom voice on Base
    with pytest.raises(ValueError, match="not a qwen3-tts-jax voice file|cannot read"):
        bad = tmp_path / "x.safetensors"
        bad.write_bytes(b"junk")
        ours.generate_voice_clone_codes(TEXT, voice_clone_prompt=str(bad))
    cv = Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))
    with pytest.raises(ValueError, match="custom_voice checkpoint"):
        cv.generate_voice_clone_codes(TEXT, ref_audio=ref, x_vector_only_mode=True)


def test_voice_from_another_model_is_refused(base):
    """A voice whose x-vector or reference codes do not fit the checkpoint (another model size,
    codes transposed or from another codec) is refused with the shapes named, never generated."""
    import dataclasses

    _, ours = base
    voice = ours.create_voice_clone_prompt((speech(24000), 24000), ref_text="Hello world.")[0]
    G = ours.config.talker.num_code_groups
    V = ours.config.talker.code_predictor.vocab_size
    bad = {
        "x-vector": dataclasses.replace(voice, ref_spk_embedding=np.zeros(7, np.float32)),
        "transposed": dataclasses.replace(voice, ref_code=voice.ref_code.T.copy()),
        "out of range": dataclasses.replace(voice, ref_code=voice.ref_code + V),
        "negative": dataclasses.replace(voice, ref_code=voice.ref_code - V),
        "float": dataclasses.replace(voice, ref_code=voice.ref_code.astype(np.float32)),
        "empty": dataclasses.replace(voice, ref_code=np.zeros((0, G), np.int32)),
    }
    for name, item in bad.items():
        with pytest.raises(ValueError, match="x-vector" if name == "x-vector" else
                           rf"needs integers \(frames, {G}\) in \[0, {V}\)"):
            ours.generate_voice_clone_codes(TEXT, voice_clone_prompt=[item], max_new_tokens=3)
    assert len(ours.generate_voice_clone_codes(TEXT, voice_clone_prompt=[voice],
                                               max_new_tokens=3, **GREEDY)) == 1


@pytest.mark.parametrize("sr", [16000, 24000])
def test_ref_tail_silence(base, sr):
    """`ref_tail_silence`: the ICL codes are those of the reference with that much silence
    appended (the official encoder given the padded audio), the x-vector that of the reference
    as given; 0 is the official prompt; bad values are refused."""
    off, ours = base
    wave = speech(sr)
    padded = np.concatenate([wave, np.zeros(int(round(0.5 * sr)), wave.dtype)])
    with torch.no_grad():
        want = off.create_voice_clone_prompt(ref_audio=(padded, sr), ref_text="Hello world.")[0]
    plain = ours.create_voice_clone_prompt((wave, sr), ref_text="Hello world.")[0]
    got = ours.create_voice_clone_prompt((wave, sr), ref_text="Hello world.",
                                         ref_tail_silence=0.5)[0]
    np.testing.assert_array_equal(got.ref_code, want.ref_code.numpy())
    assert len(got.ref_code) == len(plain.ref_code) + 6 or \
        len(got.ref_code) == len(plain.ref_code) + 7          # 0.5 s = 6.25 frames
    np.testing.assert_array_equal(got.ref_spk_embedding, plain.ref_spk_embedding)
    for bad in (-0.1, 6, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="ref_tail_silence"):
            ours.create_voice_clone_prompt((wave, sr), ref_text="Hi.", ref_tail_silence=bad)
