"""api.py, `Qwen3TTS`: every bad input is a clear error before anything compiles; text to audio
end to end against the official `generate_custom_voice` / `generate_voice_design` (greedy:
identical codes, waveforms within 1e-4 of the peak); the functional form `generate.synthesize`
under jax.jit; bfloat16 close to float32."""
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from official import GREEDY
from qwen3_tts_jax import Qwen3TTS, generate as gen


@pytest.fixture(scope="module")
def cv(make_checkpoint):
    return Qwen3TTS.from_pretrained(make_checkpoint("cv_proj"))


@pytest.fixture(scope="module")
def vd(make_checkpoint):
    return Qwen3TTS.from_pretrained(make_checkpoint("vd_bigvocab"))


@pytest.mark.parametrize("kw,err,needle", [
    (dict(speaker="bob"), ValueError, "unknown speaker"),
    (dict(speaker=None), ValueError, "speaker is required"),
    (dict(language="klingon"), ValueError, "unsupported language"),
    (dict(text=""), ValueError, "empty"),
    (dict(text=["Hi.", " \n"]), ValueError, "text[1] is empty"),
    (dict(text=3), TypeError, "must be a str"),
    (dict(text=["a", "b"], speaker=["ryan", "eric", "dylan"]), ValueError, "batch size mismatch"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(subtalker_temperature=-1.0), ValueError, "subtalker_temperature"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.5), ValueError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(repetition_penalty=0), ValueError, "repetition_penalty"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(text="word " * 40000), ValueError, "positions"),
    (dict(bogus=1), TypeError, "unknown generation argument"),
    (dict(text=[]), ValueError, "no text given"),
    (dict(seed="abc"), ValueError, "seed must be an integer"),
    (dict(seed=1.5), ValueError, "seed must be an integer"),
    (dict(text=["a", "b"], seed=[1, None]), ValueError, "seed must be an integer"),
    (dict(max_new_tokens=10 ** 12), ValueError, "max_new_tokens must be an integer in [2, "),
    (dict(max_new_tokens=1), ValueError, "max_new_tokens must be an integer in [2, "),
    (dict(seed=2 ** 70), ValueError, "seed must be in [0, 2**31)"),
    (dict(seed=-1), ValueError, "seed must be in [0, 2**31)"),
    (dict(text=["a", "b"], seed=[1, 2 ** 40]), ValueError, "seed must be in"),
    (dict(temperature="0.5"), TypeError, "temperature must be a number, got str"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number"),
    (dict(subtalker_top_p=float("nan")), ValueError, "subtalker_top_p must be a finite"),
    (dict(top_k="5"), TypeError, "top_k must be an integer"),
    (dict(do_sample="no"), TypeError, "do_sample must be True or False, got str"),
    (dict(subtalker_dosample=1), TypeError, "subtalker_dosample must be True or False"),
    (dict(repetition_penalty=None, top_p=True), TypeError, "top_p must be a number, got bool"),
])
def test_custom_voice_bad_input(cv, kw, err, needle):
    args = dict(text="Hello.", speaker="ryan") | kw
    before = gen.prefill._cache_size()
    with pytest.raises(err, match=re.escape(needle)):
        cv.generate_custom_voice_codes(**args)
    assert gen.prefill._cache_size() == before          # failed before compiling anything


def test_wrong_mode_for_checkpoint(cv, vd):
    with pytest.raises(ValueError, match="voice_design checkpoint"):
        cv.generate_voice_design_codes("Hi.", instruct="x")
    with pytest.raises(ValueError, match="custom_voice checkpoint.*voice_design"):
        vd.generate_custom_voice_codes("Hi.", speaker="ryan")
    with pytest.raises(ValueError, match="base checkpoint"):
        vd.create_voice_clone_prompt((np.ones(24000, np.float32), 24000), x_vector_only_mode=True)
    with pytest.raises(ValueError, match="needs `instruct`"):
        vd.generate_voice_design_codes("Hi.", instruct=None)
    assert vd.get_supported_speakers() == [] and "auto" in vd.get_supported_languages()


def test_0b6_custom_voice_drops_instruct_with_a_warning(make_checkpoint, caplog):
    tts = Qwen3TTS.from_pretrained(make_checkpoint("cv_identity_0b6"))
    with caplog.at_level(logging.WARNING, logger="qwen3_tts_jax"):
        items = tts.custom_voice_prompts("Hi.", "ryan", None, "Speak slowly.", True)
    assert "ignores `instruct`" in caplog.text
    assert len(items[0]) == len(tts.custom_voice_prompts("Hi.", "ryan", None, None, True)[0])


def test_checkpoint_without_codec_gives_clear_error(tmp_path, make_checkpoint):
    import shutil

    dst = tmp_path / "no_codec"
    shutil.copytree(make_checkpoint("cv_proj"), dst, ignore=shutil.ignore_patterns("speech_*"))
    tts = Qwen3TTS.from_pretrained(str(dst))
    codes = tts.generate_custom_voice_codes("Hi.", "ryan", max_new_tokens=3, do_sample=False,
                                            subtalker_dosample=False)
    assert codes[0].shape == (2, 16)                      # codes work without the codec
    with pytest.raises(FileNotFoundError, match="speech_tokenizer"):
        tts.decode(codes)


def test_runtime_never_imports_the_reference_stack():
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib, qwen3_tts_jax\n"
            "for m in pkgutil.walk_packages(qwen3_tts_jax.__path__, 'qwen3_tts_jax.'):\n"
            "    importlib.import_module(m.name)\n"
            "import convert.__main__\n"
            "bad = [m for m in ('torch', 'transformers', 'qwen_tts', 'librosa') if m in sys.modules]\n"
            "print(bad)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_warmup_compiles_what_requests_use(cv):
    """`warmup` compiles the programs of a batch size / prompt bucket ahead of time: the requests
    that follow (other texts of the same bucket) compile nothing."""
    from qwen3_tts_jax.buckets import ladder

    kw = dict(max_new_tokens=77, do_sample=False, subtalker_dosample=False)  # own frame bucket
    texts = ["Hello there.", "Hi.", "Yes.", "No."]
    lengths = [len(p) for p in cv.custom_voice_prompts(texts, "ryan", None, None, True)]
    assert len({ladder(n) for n in lengths}) == 1, lengths   # one prompt bucket
    before = gen.program_counts()
    seconds = cv.warmup(texts[:1], batch_sizes=(1, 3), **kw)
    after = gen.program_counts()
    assert seconds > 0 and after["prefill"] >= before["prefill"] + 2
    assert after["decode"] >= before["decode"] + 2
    cv.generate_custom_voice_codes(texts[1], speaker="ryan", **kw)
    cv.generate_custom_voice_codes(texts[1:], speaker=["ryan", "eric", "vivian"], **kw)
    assert gen.program_counts() == after


def test_warmup_needs_a_voice_on_base(make_checkpoint):
    base = Qwen3TTS.from_pretrained(make_checkpoint("base"))
    with pytest.raises(ValueError, match="voice_clone_prompt"):
        base.warmup(["Hello."])


@pytest.mark.parametrize("kw", [dict(do_sample=False, subtalker_dosample=False),
                                dict(seed=5),                     # the defaults: top-k 50 only
                                dict(seed=6, top_p=0.8, subtalker_top_k=0)])
def test_specialized_sampler_gives_the_same_codes(cv, kw):
    """The sampler specialized to the settings' kind (the accelerator default: no warp for greedy
    rows, no vocabulary sort without top-p) generates exactly the general sampler's codes."""
    from official import with_options

    texts = ["Hello there, how are you?", "Fine."]
    codes = {}
    for on in (False, True):
        codes[on] = with_options(cv, specialize_sampler=on).generate_custom_voice_codes(
            texts, speaker=["ryan", "eric"], max_new_tokens=24, **kw)
    for a, b in zip(codes[False], codes[True]):
        np.testing.assert_array_equal(a, b)
    assert sum(len(c) for c in codes[True]) > 10


def test_warmup_and_streaming_arguments_are_checked_at_call_time(cv):
    for bad in ((0,), (), (1.5,), 4):
        with pytest.raises(ValueError, match="batch_sizes"):
            cv.warmup(["Hi."], batch_sizes=bad)
    for kw in (dict(chunk_frames=0), dict(chunk_frames="3"), dict(first_chunk_frames=True)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            cv.generate_custom_voice_streaming("Hi.", "ryan", **kw)   # no next(): at call time


def test_compilation_cache_in_an_unusable_folder_warns_and_goes_on(tmp_path, caplog):
    import jax

    from qwen3_tts_jax import enable_compilation_cache

    (tmp_path / "file").write_text("x")
    before = jax.config.jax_compilation_cache_dir
    with caplog.at_level(logging.WARNING, logger="qwen3_tts_jax"):
        assert enable_compilation_cache(str(tmp_path / "file" / "xla")) is None
        assert enable_compilation_cache(str(tmp_path / "file" / "xla")) is None
    assert jax.config.jax_compilation_cache_dir == before
    assert sum("compilation cache disabled" in r.message for r in caplog.records) == 1


def test_compilation_cache_threshold_is_an_argument(tmp_path):
    import jax

    from qwen3_tts_jax import enable_compilation_cache

    keep = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        assert enable_compilation_cache(str(tmp_path / "a"), min_compile_time_secs=0.0)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        enable_compilation_cache(str(tmp_path / "b"))
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.5
    finally:
        jax.config.update("jax_compilation_cache_dir", keep[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", keep[1])


def test_voice_clone_prompt_checks_and_forms(make_checkpoint, tmp_path):
    import pathlib

    import soundfile as sf

    from qwen3_tts_jax import VoiceClonePromptItem

    base = Qwen3TTS.from_pretrained(make_checkpoint("base"))
    D, G = base.config.talker.hidden_size, base.config.talker.num_code_groups
    xvec = np.random.default_rng(0).standard_normal(D).astype(np.float32)
    bad = xvec.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        base.generate_voice_clone_codes("Hi.", voice_clone_prompt=[
            VoiceClonePromptItem(None, bad, True, False)], max_new_tokens=3)
    with pytest.raises(ValueError, match="without ref_text"):
        base.generate_voice_clone_codes("Hi.", voice_clone_prompt=[
            VoiceClonePromptItem(np.zeros((4, G), np.int32), xvec, False, True, None)],
            max_new_tokens=3)
    with pytest.raises(TypeError, match="voice_clone_prompt item 0 is a int"):
        base.generate_voice_clone_codes("Hi.", voice_clone_prompt=[3], max_new_tokens=3)
    with pytest.raises(TypeError, match="missing \\['icl_mode'\\]"):
        base.generate_voice_clone_codes("Hi.", voice_clone_prompt=dict(
            ref_code=[None], ref_spk_embedding=[xvec], x_vector_only_mode=[True]))
    # The official wrapper's dict form gives the codes of the items it stands for.
    item = VoiceClonePromptItem(None, xvec, True, False)
    as_dict = dict(ref_code=[None], ref_spk_embedding=[xvec], x_vector_only_mode=[True],
                   icl_mode=[False])
    kw = dict(max_new_tokens=4, seed=1, do_sample=False, subtalker_dosample=False)
    a = base.generate_voice_clone_codes("Hi.", voice_clone_prompt=[item], **kw)
    b = base.generate_voice_clone_codes("Hi.", voice_clone_prompt=as_dict, **kw)
    np.testing.assert_array_equal(a[0], b[0])
    # ref_audio as a pathlib.Path, like a str path
    wav = tmp_path / "ref.wav"
    sf.write(str(wav), np.sin(np.arange(24000) / 20).astype(np.float32) * 0.3, 24000)
    p = base.create_voice_clone_prompt(pathlib.Path(wav), x_vector_only_mode=True)
    s = base.create_voice_clone_prompt(str(wav), x_vector_only_mode=True)
    np.testing.assert_array_equal(p[0].ref_spk_embedding, s[0].ref_spk_embedding)


# ------------------------------------------------------------------ text to audio vs the official
TEXTS = ["Hello world. This is a tiny test.", "Hi."]


def _close_waves(ours, ref):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.dtype == np.float32 and a.shape == b.shape
        peak = np.abs(b).max()
        assert peak > 1e-2, "the reference audio is near-silent: the comparison would be vacuous"
        np.testing.assert_allclose(a, b, atol=1e-4 * peak, rtol=0)


def test_custom_voice_audio_matches_official(model_pair):
    off, ours = model_pair("cv_proj")
    kw = dict(text=TEXTS, speaker=["ryan", "eric"], language=["english", "auto"],
              max_new_tokens=10)
    with torch.no_grad():
        ref, sr = off.generate_custom_voice(**kw, **GREEDY)
    got, sr2 = ours.generate_custom_voice(**kw, **GREEDY)
    assert sr == sr2 == 24000
    _close_waves(got, ref)


def test_voice_design_audio_matches_official(model_pair):
    off, ours = model_pair("vd_bigvocab")
    kw = dict(text=TEXTS[0], instruct="A warm voice.", language="english", max_new_tokens=9,
              non_streaming_mode=False)
    with torch.no_grad():
        ref, _ = off.generate_voice_design(**kw, **GREEDY)
    got, _ = ours.generate_voice_design(**kw, **GREEDY)
    _close_waves(got, ref)


def test_functional_synthesize_under_jit(model_pair):
    _, ours = model_pair("cv_eos")
    kw = dict(text=["Hello world. This is a tiny test.", "Hi.", "The lazy dog."],
              speaker=["ryan", "vivian", "dylan"], max_new_tokens=40, **GREEDY)
    want_codes = ours.generate_custom_voice_codes(**kw)
    want_audio, _ = ours.decode(want_codes)
    batch, settings, keys = ours.prepare_custom_voice(**kw)
    synth = jax.jit(gen.synthesize,
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
def test_lone_request_padded_to_the_backends_fewest_rows(model_pair, do_sample):
    """Where `Options.min_rows` is 2 (the GPU's), one request runs as a batch of two rows (the
    second stops at once and is dropped) and gives the same codes as one row alone."""
    from official import with_options

    _, ours = model_pair("cv_eos")
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


# ------------------------------------------------------------------ bfloat16
def test_bf16_close_to_f32(make_checkpoint):
    path = make_checkpoint("cv_proj")
    f32, bf16 = Qwen3TTS.from_pretrained(path, jnp.float32), Qwen3TTS.from_pretrained(path,
                                                                                        "bfloat16")
    assert bf16.params["talker"]["layers"][0]["attn"].qkv.dtype == jnp.bfloat16
    assert bf16.options.decode_compiler_options is None      # XLA's defaults for bf16
    kw = dict(text=["Hello world. This is a tiny test.", "Hi."], speaker=["ryan", "vivian"],
              do_sample=False, subtalker_dosample=False, max_new_tokens=17)
    logits = []
    for tts in (f32, bf16):
        batch, settings, keys = tts.prepare_custom_voice(**kw)
        state, _ = gen.prefill(tts.params, tts.config, batch, settings, keys, frames=16,
                               options=tts.options)
        logits.append(np.asarray(state.logits_BxV[:2, :2048]))
    err = np.abs(logits[1] - logits[0]).max() / logits[0].std()
    assert err < 0.1, f"bf16 prefill logits off by {err:.3f} of their spread"
    a, b = f32.generate_custom_voice_codes(**kw), bf16.generate_custom_voice_codes(**kw)
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        agree = np.argmax(np.any(x[:n] != y[:n], axis=1)) if (x[:n] != y[:n]).any() else n
        # greedy decoding amplifies any difference once a near-tie flips: require the first
        # frame's code 0 to agree and report the rest (see the issue note for measured values)
        assert x[0, 0] == y[0, 0]
        print(f"frames agreeing exactly before the first difference: {agree} of {n}")
