"""The public API's input checks: every bad input is a clear error before anything compiles."""
import logging

import numpy as np
import pytest

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
])
def test_custom_voice_bad_input(cv, kw, err, needle):
    args = dict(text="Hello.", speaker="ryan") | kw
    before = gen.prefill._cache_size()
    with pytest.raises(err, match=needle.replace("[", r"\[").replace("]", r"\]")):
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
        items = tts._custom_voice_prompts("Hi.", "ryan", None, "Speak slowly.", True)
    assert "ignores `instruct`" in caplog.text
    assert len(items[0]) == len(tts._custom_voice_prompts("Hi.", "ryan", None, None, True)[0])


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
    lengths = [len(p) for p in cv._custom_voice_prompts(texts, "ryan", None, None, True)]
    assert len({ladder(n) for n in lengths}) == 1, lengths   # one prompt bucket
    before = gen.prefill._cache_size(), gen.decode._cache_size()
    seconds = cv.warmup(texts[:1], batch_sizes=(1, 3), **kw)
    after = gen.prefill._cache_size(), gen.decode._cache_size()
    assert seconds > 0 and after[0] >= before[0] + 2 and after[1] >= before[1] + 2
    cv.generate_custom_voice_codes(texts[1], speaker="ryan", **kw)
    cv.generate_custom_voice_codes(texts[1:], speaker=["ryan", "eric", "vivian"], **kw)
    assert (gen.prefill._cache_size(), gen.decode._cache_size()) == after


def test_warmup_needs_a_voice_on_base(make_checkpoint):
    base = Qwen3TTS.from_pretrained(make_checkpoint("base"))
    with pytest.raises(ValueError, match="voice_clone_prompt"):
        base.warmup(["Hello."])


@pytest.mark.parametrize("kw", [dict(do_sample=False, subtalker_dosample=False),
                                dict(seed=5),                     # the defaults: top-k 50 only
                                dict(seed=6, top_p=0.8, subtalker_top_k=0)])
def test_specialized_sampler_gives_the_same_codes(cv, kw, monkeypatch):
    """The sampler specialized to the settings' kind (the accelerator default: no warp for greedy
    rows, no vocabulary sort without top-p) generates exactly the general sampler's codes."""
    from qwen3_tts_jax import sampling

    texts = ["Hello there, how are you?", "Fine."]
    codes = {}
    for on in (False, True):
        monkeypatch.setattr(sampling, "SPECIALIZE", on)
        codes[on] = cv.generate_custom_voice_codes(texts, speaker=["ryan", "eric"],
                                                   max_new_tokens=24, **kw)
    for a, b in zip(codes[False], codes[True]):
        np.testing.assert_array_equal(a, b)
    assert sum(len(c) for c in codes[True]) > 10
