"""The codec decoder's weights cache (`SpeechTokenizer.from_pretrained(weights_cache=DIR)`): a warm
load reads the converted (and bf16-packed) params without converting, decodes identically, and a
stale, other-precision or corrupt cache file loads the checkpoint instead."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from qwen3_tts_jax import cpu_kernels
from qwen3_tts_jax.codec import SpeechTokenizer
from qwen3_tts_jax.codec import decoder as D
from qwen3_tts_jax.codec import tokenizer as T

PRECISIONS = ["float32", pytest.param("bf16", marks=pytest.mark.skipif(
    cpu_kernels.bf16_conv_missing() is not None, reason="bf16 kernel: "
    f"{cpu_kernels.bf16_conv_missing()}"))]


def _same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _codes():
    return np.random.default_rng(0).integers(0, 2048, (20, 16))


@pytest.fixture
def conversions(monkeypatch):
    """The number of times the decoder's params are converted from the checkpoint."""
    calls = []
    load = T._load_decoder_params

    def counting(*a, **k):
        calls.append(1)
        return load(*a, **k)
    monkeypatch.setattr(T, "_load_decoder_params", counting)
    return calls


def _no_conversion(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("converted the checkpoint")
    monkeypatch.setattr(T, "load_official", refuse)
    monkeypatch.setattr(T, "load_params", refuse)
    monkeypatch.setattr(D, "pack_bf16", refuse)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_warm_load_reads_the_cache_and_decodes_the_same(tmp_path, codec_dir, monkeypatch,
                                                        precision):
    cache = str(tmp_path / "weights")
    fresh = SpeechTokenizer.from_pretrained(codec_dir, precision=precision)
    SpeechTokenizer.from_pretrained(codec_dir, precision=precision, weights_cache=cache)
    assert len(os.listdir(cache)) == 1
    with monkeypatch.context() as m:
        _no_conversion(m)
        warm = SpeechTokenizer.from_pretrained(codec_dir, precision=precision,
                                               weights_cache=cache)
    assert warm.precision == precision
    _same_tree(warm.params, fresh.params)
    np.testing.assert_array_equal(warm.decode([_codes()])[0][0], fresh.decode([_codes()])[0][0])


def test_stale_key_or_other_precision_converts_again(tmp_path, codec_dir, conversions,
                                                     monkeypatch):
    cache = str(tmp_path / "weights")
    SpeechTokenizer.from_pretrained(codec_dir, weights_cache=cache)
    SpeechTokenizer.from_pretrained(codec_dir, weights_cache=cache)
    assert conversions == [1]
    if cpu_kernels.bf16_conv_missing() is None:      # another precision: its own file
        bf = SpeechTokenizer.from_pretrained(codec_dir, precision="bf16", weights_cache=cache)
        assert conversions == [1, 1] and len(os.listdir(cache)) == 2
        _same_tree(bf.params, SpeechTokenizer.from_pretrained(codec_dir, precision="bf16").params)
        conversions.clear()
        conversions.append(1)
    # the weights file changes (a new modification time): stale, converted and rewritten
    (src,) = T.safetensors_files(codec_dir)
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    got = SpeechTokenizer.from_pretrained(codec_dir, weights_cache=cache)
    assert conversions == [1, 1]
    SpeechTokenizer.from_pretrained(codec_dir, weights_cache=cache)
    assert conversions == [1, 1]                     # the rewritten file is current
    _same_tree(got.params, SpeechTokenizer.from_pretrained(codec_dir).params)
    # the converting code changes: stale too
    edited = tmp_path / "decoder.py"
    with open(D.__file__) as f:
        edited.write_text(f.read() + "\n# edited\n")
    monkeypatch.setattr(D, "__file__", str(edited))
    n = len(conversions)
    SpeechTokenizer.from_pretrained(codec_dir, weights_cache=cache)
    assert len(conversions) == n + 1


def test_params_file_is_the_source_when_present(tmp_path, codec_dir, conversions):
    """A folder with the fast form (`save_converted`): the key follows params.safetensors."""
    folder, cache = str(tmp_path / "fast"), str(tmp_path / "weights")
    SpeechTokenizer.from_pretrained(codec_dir).save_converted(folder)
    SpeechTokenizer.from_pretrained(folder, weights_cache=cache)
    fast = os.path.join(folder, T.PARAMS_FILE)
    st = os.stat(fast)
    os.utime(fast, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    SpeechTokenizer.from_pretrained(folder, weights_cache=cache)
    assert conversions == [1, 1, 1]    # save_converted's load, the cold load, the stale one


def test_corrupt_cache_warns_and_loads_the_checkpoint(tmp_path, codec_dir, conversions, caplog):
    cache = str(tmp_path / "weights")
    SpeechTokenizer.from_pretrained(codec_dir, weights_cache=cache)
    (file,) = [os.path.join(cache, f) for f in os.listdir(cache)]
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with caplog.at_level("WARNING", logger="qwen3_tts_jax"):
        got = SpeechTokenizer.from_pretrained(codec_dir, weights_cache=cache)
    assert "cannot be read" in caplog.text and conversions == [1, 1]
    _same_tree(got.params, SpeechTokenizer.from_pretrained(codec_dir).params)
    SpeechTokenizer.from_pretrained(codec_dir, weights_cache=cache)   # rewritten
    assert conversions == [1, 1, 1]


def test_unwritable_cache_warns_and_loads(tmp_path, codec_dir, caplog):
    (tmp_path / "file").write_text("")
    with caplog.at_level("WARNING", logger="qwen3_tts_jax"):
        got = SpeechTokenizer.from_pretrained(codec_dir, weights_cache=str(tmp_path / "file" / "w"))
    assert "cannot write" in caplog.text
    _same_tree(got.params, SpeechTokenizer.from_pretrained(codec_dir).params)


def test_without_weights_cache_nothing_is_written(tmp_path, codec_dir, monkeypatch):
    from qwen3_tts_jax import checkpoint

    def refuse(*a, **k):
        raise AssertionError("wrote a cache file")
    monkeypatch.setattr(checkpoint, "save_packed_cache", refuse)
    monkeypatch.setattr(checkpoint, "load_packed_cache", refuse)
    before = sorted(os.listdir(codec_dir))
    SpeechTokenizer.from_pretrained(codec_dir)
    assert sorted(os.listdir(codec_dir)) == before


def test_model_passes_its_weights_cache_to_the_codec(tmp_path, make_checkpoint, monkeypatch):
    from qwen3_tts_jax import Qwen3TTS

    path, cache = make_checkpoint("cv_proj"), str(tmp_path / "weights")
    _ = Qwen3TTS.from_pretrained(path, weights_cache=cache).speech_tokenizer
    assert sorted(f.split("-")[0] for f in os.listdir(cache)) == ["codec", "packed"]
    _no_conversion(monkeypatch)
    tts = Qwen3TTS.from_pretrained(path, weights_cache=cache)
    assert tts.speech_tokenizer.params is not None
