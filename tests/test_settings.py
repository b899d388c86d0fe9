"""settings.py: the user's generation settings checked, and their one conversion to the traced
per-row arrays of the compiled program."""
import jax
import numpy as np
import pytest

from qwen3_tts_jax.config import GenerationDefaults
from qwen3_tts_jax.options import Options
from qwen3_tts_jax.settings import GenerationSettings, SettingError, as_list, keys, traced

DEFAULTS = GenerationDefaults()


def test_setting_errors_name_the_param():
    with pytest.raises(SettingError) as e:
        GenerationSettings.merge(DEFAULTS, temperature="hot")
    assert e.value.param == "temperature"
    s = GenerationSettings.merge(DEFAULTS, do_sample=np.bool_(False), top_k=np.int64(3),
                                 max_new_tokens=2 ** 20, seed=2 ** 31 - 1)
    assert s.top_k == 3 and s.max_new_tokens == 2 ** 20
    with pytest.raises(TypeError, match="unknown generation argument"):
        GenerationSettings.merge(DEFAULTS, topk=3)


def test_traced_rows_and_padding():
    a = GenerationSettings.merge(DEFAULTS, do_sample=False, temperature=0.5, top_k=7,
                                 repetition_penalty=1.1, max_new_tokens=30)
    b = GenerationSettings.merge(DEFAULTS, do_sample=True, temperature=0.8, top_k=0,
                                 repetition_penalty=1.3, max_new_tokens=9)
    t = traced([a, b, None, None], Options())
    np.testing.assert_array_equal(np.asarray(t.talker.do_sample), [False, True, False, False])
    np.testing.assert_allclose(np.asarray(t.talker.temperature), [0.5, 0.8, 0.5, 0.5])
    np.testing.assert_array_equal(np.asarray(t.talker.top_k), [7, 0, 7, 7])
    np.testing.assert_allclose(np.asarray(t.repetition_penalty), [1.1, 1.3, 1.1, 1.1], rtol=1e-6)
    # padding rows copy the first row's settings with a budget of one token: they stop at once
    np.testing.assert_array_equal(np.asarray(t.max_new_tokens), [30, 9, 1, 1])
    np.testing.assert_array_equal(np.asarray(t.predictor.top_k),
                                  [a.subtalker_top_k, b.subtalker_top_k] + [a.subtalker_top_k] * 2)
    kinds = []
    traced([a, None], Options(), kind=lambda role, cols: kinds.append(role) or "full")
    assert kinds == ["talker", "predictor"]


def test_keys_of_a_seed():
    k = np.asarray(keys(5, 2, 4))
    base = jax.random.PRNGKey(5)
    want = [jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)]
    np.testing.assert_array_equal(k, np.stack([want[0], want[1], want[0], want[0]]))
    # one seed per row: a row samples the same whatever else is in the batch
    np.testing.assert_array_equal(np.asarray(keys([3, 9], 2, 2)),
                                  np.stack([jax.random.PRNGKey(3), jax.random.PRNGKey(9)]))
    assert not np.array_equal(np.asarray(keys(None, 1, 1)), np.asarray(keys(None, 1, 1)))
    for bad in (-1, 2 ** 31, 1.5, True):
        with pytest.raises(SettingError, match="seed"):
            keys(bad, 1, 1)


def test_host_keys_are_jax_keys():
    """`keys` computes threefry on the host: the keys JAX's PRNGKey / fold_in give."""
    rng = np.random.default_rng(0)
    for seed in [0, 1, 2 ** 31 - 1] + [int(x) for x in rng.integers(0, 2 ** 31, 20)]:
        base = jax.random.PRNGKey(seed)
        want = np.stack([jax.random.fold_in(base, b) for b in range(9)])
        got = np.asarray(keys(seed, 9, 16))
        assert got.dtype == want.dtype == np.uint32
        np.testing.assert_array_equal(got[:9], want)
        np.testing.assert_array_equal(got[9:], np.repeat(want[:1], 7, 0))


def test_as_list_broadcasts_like_the_official():
    assert as_list("x", 3, "speaker") == ["x"] * 3
    assert as_list(["a", "b"], 2, "speaker") == ["a", "b"]
    with pytest.raises(ValueError, match="2 text.s. but 3 speaker"):
        as_list(["a", "b", "c"], 2, "speaker")
