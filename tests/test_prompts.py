"""prompts.py: the per-mode builders every front door uses, their checks, and the prompt of a text
that arrives in pieces."""
import numpy as np
import pytest

from qwen3_tts_jax import prompts
from qwen3_tts_jax.config import load_config
from qwen3_tts_jax.text import TextTokenizer
from qwen3_tts_jax.voice import VoiceClonePromptItem


@pytest.fixture(scope="module")
def models(make_checkpoint):
    out = {}
    for name in ("cv_proj", "vd_bigvocab", "base"):
        path = make_checkpoint(name)
        out[load_config(path).tts_model_type] = (load_config(path), TextTokenizer.from_dir(path))
    return out


def _same(a: list, b: list):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p.text_L, q.text_L)
        np.testing.assert_array_equal(p.codec_LxG, q.codec_LxG)
        np.testing.assert_array_equal(p.trailing, q.trailing)
        assert p.extra_pos == q.extra_pos
        assert (p.extra is None) == (q.extra is None)


def _voice(cfg, icl: bool):
    G = cfg.talker.num_code_groups
    code = np.arange(5 * G, dtype=np.int32).reshape(5, G) % 7 if icl else None
    return VoiceClonePromptItem(code, np.linspace(-1, 1, cfg.talker.hidden_size).astype(np.float32),
                                not icl, icl, "Hello there." if icl else None)


def test_for_mode_is_the_per_mode_builder_with_official_defaults(models):
    cfg, tok = models["custom_voice"]
    spk = sorted(cfg.speakers)[0]
    _same(prompts.for_mode(cfg, tok, ["Hi.", "Bye now."], "auto", speaker=spk),
          prompts.custom_voice(cfg, tok, ["Hi.", "Bye now."], spk, "auto", None, True))
    cfg, tok = models["voice_design"]
    _same(prompts.for_mode(cfg, tok, "Hi.", instruct="A low voice."),
          prompts.voice_design(cfg, tok, "Hi.", "A low voice.", None, True))
    cfg, tok = models["base"]
    voice = _voice(cfg, icl=True)
    _same(prompts.for_mode(cfg, tok, "Hi.", voices=[voice]),
          prompts.voice_clone(cfg, tok, "Hi.", [voice], None, False))
    # the text mode's default differs per mode, like the official methods
    assert len(prompts.for_mode(cfg, tok, "Hi.", voices=[voice], non_streaming_mode=True)[0]) != \
        len(prompts.for_mode(cfg, tok, "Hi.", voices=[voice])[0])


@pytest.mark.parametrize("kind,kw,err,needle", [
    ("custom_voice", dict(text="Hi.", speaker="nobody"), ValueError, "unknown speaker"),
    ("custom_voice", dict(text="Hi.", speaker=None), ValueError, "a speaker is required"),
    ("custom_voice", dict(text="  ", speaker="ryan"), ValueError, "empty"),
    ("custom_voice", dict(text=["a", 3], speaker="ryan"), TypeError, r"text\[1\]"),
    ("custom_voice", dict(text="Hi.", speaker="ryan", language="klingon"), ValueError,
     "unsupported language"),
    ("custom_voice", dict(text=["a", "b"], speaker=["ryan"] * 3), ValueError, "mismatch"),
    ("voice_design", dict(text="Hi."), ValueError, "needs `instruct`"),
    ("base", dict(text="Hi."), ValueError, "cloned voice"),
])
def test_for_mode_errors_name_the_problem(models, kind, kw, err, needle):
    cfg, tok = models[kind]
    with pytest.raises(err, match=needle):
        prompts.for_mode(cfg, tok, **kw)


def test_voice_checks(models):
    cfg, tok = models["base"]
    bad = _voice(cfg, icl=True)
    bad.ref_spk_embedding = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="x-vector"):
        prompts.voice_clone(cfg, tok, "Hi.", [bad])
    bad = _voice(cfg, icl=True)
    bad.ref_text = None
    with pytest.raises(ValueError, match="without ref_text"):
        prompts.voice_clone(cfg, tok, "Hi.", [bad])
    bad = _voice(cfg, icl=True)
    bad.ref_code = bad.ref_code + 10 ** 6
    with pytest.raises(ValueError, match="reference codes"):
        prompts.voice_clone(cfg, tok, "Hi.", [bad])


@pytest.mark.parametrize("kind", ["custom_voice", "voice_design", "base_xvec", "base_icl"])
def test_pieces_prompt_is_the_streaming_mode_prompt(models, kind):
    """A text in pieces starts from the official streaming-mode prompt of its first token, and an
    ICL voice's prompt takes the reference transcript first (`room`, `prefix`)."""
    cfg, tok = models[kind.split("_")[0] if kind.startswith("base") else kind]
    kw, whole = {}, None
    text = "Hello."
    if kind == "custom_voice":
        kw = dict(speaker=sorted(cfg.speakers)[0])
        whole = prompts.custom_voice(cfg, tok, text, kw["speaker"], None, None, False)
    elif kind == "voice_design":
        kw = dict(instruct="A calm voice.")
        whole = prompts.voice_design(cfg, tok, text, kw["instruct"], None, False)
    else:
        kw = dict(voice=_voice(cfg, icl=kind == "base_icl"))
        whole = prompts.voice_clone(cfg, tok, text, [kw["voice"]], None, False)
    pp = prompts.pieces(cfg, tok, None, **kw)
    tokens = prompts.input_ids(tok, text)[3:-5]
    assert pp.room == (1 + 5 if kind == "base_icl" else 1)
    assert (len(pp.prefix) > 0) == (kind == "base_icl")
    built = pp.build(tokens, True)
    np.testing.assert_array_equal(built.text_L, whole[0].text_L)
    np.testing.assert_array_equal(built.codec_LxG, whole[0].codec_LxG)


def test_pieces_checks_its_arguments(models):
    cfg, tok = models["custom_voice"]
    with pytest.raises(ValueError, match="unknown speaker"):
        prompts.pieces(cfg, tok, None, speaker="nobody")
    with pytest.raises(ValueError, match="unsupported language"):
        prompts.pieces(cfg, tok, "klingon", speaker=sorted(cfg.speakers)[0])
    cfg, tok = models["voice_design"]
    with pytest.raises(ValueError, match="instruct"):
        prompts.pieces(cfg, tok, None)
    cfg, tok = models["base"]
    with pytest.raises(ValueError, match="cloned voice"):
        prompts.pieces(cfg, tok, None)
