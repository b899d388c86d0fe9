"""qwen3_tts_jax.sampling against HuggingFace's logits-processor chain (float32, CPU).

The HF reference is built by HF's own ``GenerationMixin._get_logits_processor`` from a
``GenerationConfig`` carrying the official Qwen3-TTS talker / code-predictor settings, so the
processor order and the skip conditions (penalty 1.0, top_k 0, top_p 1.0, temperature 1.0,
greedy) are HF's, not ours.

XLA-CPU compiles are slow (seconds each), so every setting combination is packed into the rows
of ONE jitted call per vocabulary (the settings are per-row traced values anyway): the chain tests
check hundreds of (settings, logits) rows against HF with two compiled programs.
"""
import dataclasses
import functools
import itertools
import warnings
from unittest import mock

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.utils import GenerationMixin

from qwen3_tts_jax import sampling as S
from qwen3_tts_jax.options import Options

EOS = 2150
TALKER_V = 3072
PREDICTOR_V = 2048
SUPPRESS_IDS = [i for i in range(TALKER_V - 1024, TALKER_V) if i != EOS]  # as in the official code
ROWS = 256  # fixed batch of the packed calls (one compile per vocabulary)
KINDS = ["normal", "ties", "extreme"]
TEMPS, TOPKS, TOPPS, PENALTIES = (0.5, 0.9, 1.3), (0, 1, 50, 5000), (1.0, 0.9, 0.3), (1.0, 1.05, 1.3)


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    # torch's intra-op threads fight XLA's for the few CPU cores: ~6x slower small HF calls.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# HF reference
# ---------------------------------------------------------------------------------------------

class _Gen(GenerationMixin):
    pass


_GEN = _Gen()
_TORCH_SORT = torch.sort


def hf_processors(*, talker, do_sample, temperature, top_k, top_p, penalty=1.0):
    """HF's processor list for one row's settings (talker: + penalty, min_new_tokens=2, suppress)."""
    kw = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    if talker:
        kw.update(repetition_penalty=penalty, min_new_tokens=2, eos_token_id=EOS,
                  suppress_tokens=SUPPRESS_IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = GenerationConfig(**kw)
    cfg._eos_token_tensor = torch.tensor([EOS]) if talker else None
    # The talker prompt is embeds-only: HF's input_ids start empty (input_ids_seq_length 0).
    return _GEN._get_logits_processor(generation_config=cfg, input_ids_seq_length=0,
                                      logits_processor=LogitsProcessorList(), device="cpu")


def hf_apply(procs, history_BxN, logits_BxV, stable=False):
    """Run HF processors; stable=True makes HF's top-p sort stable (our documented tie rule)."""
    ids = torch.from_numpy(np.asarray(history_BxN, np.int64))
    scores = torch.from_numpy(np.array(logits_BxV, np.float32))
    if stable:
        with mock.patch.object(torch, "sort", functools.partial(_TORCH_SORT, stable=True)):
            return procs(ids, scores).numpy()
    return procs(ids, scores).numpy()


# ---------------------------------------------------------------------------------------------
# Ours: one jitted call for a packed batch of rows, each with its own settings
# ---------------------------------------------------------------------------------------------

TRACES = []


@functools.partial(jax.jit, static_argnames=("talker",))
def ours(keys_B, logits_BxV, seen_BxV, penalty_B, n_generated_B, params, talker):
    TRACES.append(talker)  # Python side effect: runs once per trace
    if talker:
        logits_BxV = S.process_talker_logits(
            logits_BxV, seen_BxV, penalty_B, n_generated_B,
            S.talker_suppress_mask(logits_BxV.shape[-1], EOS), EOS, min_new_tokens=2)
    return S.warp(logits_BxV, params), logits_BxV, S.sample(keys_B, logits_BxV, params)


def run_ours(rows, talker, seed=0):
    """rows: dicts with x (V,), seen (V,), penalty, n, do_sample, temperature, top_k, top_p.
    Padded to ROWS rows; returns numpy (warped, processed, ids) for the given rows."""
    assert 0 < len(rows) <= ROWS
    padded = rows + [rows[-1]] * (ROWS - len(rows))
    col = lambda name: [r[name] for r in padded]  # noqa: E731
    params = S.SamplingParams.create(ROWS, do_sample=col("do_sample"), temperature=col("temperature"),
                                     top_k=col("top_k"), top_p=col("top_p"))
    keys = jax.random.split(jax.random.key(seed), ROWS)
    out = ours(keys, np.stack(col("x")), np.stack(col("seen")),
               np.asarray(col("penalty"), np.float32), np.asarray(col("n"), np.int32), params,
               talker=talker)
    return tuple(np.asarray(o)[:len(rows)] for o in out)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def make_logits(rng, kind, B, V):
    if kind == "normal":
        x = rng.normal(size=(B, V)) * 3.0
    elif kind == "ties":  # heavy ties, also among the maxima
        x = np.round(rng.normal(size=(B, V)) * 2.0) / 2.0
        x[:, rng.integers(0, V, 3)] = x.max() + 1.0
    elif kind == "extreme":  # very large / very small values, signed zeros, duplicated huge maxima
        x = rng.normal(size=(B, V)) * 3.0
        vals = np.array([1e30, -1e30, 1e-30, -1e-30, 0.0, -0.0, 80.0, -80.0, 1e4, -1e4])
        for b in range(B):
            x[b, rng.integers(0, V, 40)] = rng.choice(vals, 40)
            x[b, rng.integers(0, 2048, 2)] = 1e30  # two tied dominant tokens (not suppressed)
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


def history(rng, B, n, V):
    """(B, n) previously generated ids with repeats (and EOS) + the matching seen mask."""
    ids = rng.integers(0, 60, size=(B, n)) * 41 % V  # few distinct ids -> repeats
    if n:
        ids[:, -1] = EOS % V
    seen = np.zeros((B, V), bool)
    for b in range(B):
        seen[b, ids[b]] = True
    return ids, seen


def tie_mask(x_BxV):
    """True where the value occurs more than once in its row."""
    out = np.zeros(x_BxV.shape, bool)
    for b, row in enumerate(x_BxV):
        _, inv, counts = np.unique(row, return_inverse=True, return_counts=True)
        out[b] = counts[inv] > 1
    return out


def assert_same_logits(a, b, msg=""):
    np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b), err_msg=f"filtered set {msg}")
    fin = np.isfinite(b)
    # bit-identical in practice (IEEE division like torch); the brief allows 1e-6
    np.testing.assert_allclose(a[fin], b[fin], rtol=1e-6, atol=0, err_msg=msg)


def check_against_hf(rng, kind, B, V, talker, settings):
    """settings: (penalty, n_generated, do_sample, temperature, top_k, top_p) tuples; each is
    applied to the same B logits rows (own history per setting) and compared with HF."""
    x = make_logits(rng, kind, B, V)
    cases, rows = [], []
    for st in settings:
        pen, n, ds, t, k, p = st
        ids, seen = history(rng, B, n, V)
        cases.append((st, ids))
        rows += [dict(x=x[b], seen=seen[b], penalty=pen, n=n, do_sample=ds, temperature=t,
                      top_k=k, top_p=p) for b in range(B)]
    warped, processed, drawn = run_ours(rows, talker, seed=len(settings))
    counters = dict(tie_splits=0, filtered=0)
    for i, ((pen, n, ds, t, k, p), ids) in enumerate(cases):
        sl = slice(i * B, (i + 1) * B)
        w, pr, d = warped[sl], processed[sl], drawn[sl]
        procs = hf_processors(talker=talker, do_sample=ds, temperature=t, top_k=max(k, 0),
                              top_p=p, penalty=pen)
        msg = f"{kind} B={B} V={V} pen={pen} n={n} sample={ds} t={t} k={k} p={p}"
        # 1) exactly HF's chain with a stable top-p sort (our documented tie rule)
        hf_stable = hf_apply(procs, ids, x, stable=True)
        assert_same_logits(w, hf_stable, msg)
        counters["filtered"] += int(np.isneginf(w[:, :2048]).any())
        if ds:
            # every sampled id is allowed by HF
            assert np.isfinite(hf_stable[np.arange(B), d]).all(), msg
        else:
            # greedy = argmax of the HF-processed logits (first index on ties, like torch)
            np.testing.assert_array_equal(d, torch.from_numpy(hf_stable).argmax(-1).numpy(), msg)
        # 2) HF as shipped (unstable torch.sort in top-p): same multiset of surviving values per
        #    row; differences only inside tie groups straddling the top-p cut.
        if ds and p < 1:
            hf = hf_apply(procs, ids, x)
            np.testing.assert_array_equal(np.sort(w, -1), np.sort(hf, -1), err_msg=msg)
            diff = np.isneginf(w) != np.isneginf(hf)
            if diff.any():
                assert not (diff & ~tie_mask(pr)).any(), msg
                counters["tie_splits"] += 1
    return counters


# ---------------------------------------------------------------------------------------------
# Processed logits == HF
# ---------------------------------------------------------------------------------------------

def talker_settings():
    sampled = [(pen, (0, 1, 2, 7)[i % 4], True, t, k, p) for i, (pen, t, k, p) in
               enumerate(itertools.product(PENALTIES, TEMPS, TOPKS, TOPPS))]
    extras = [(1.05, 3, True, 1.0, 50, 1.0),    # temperature 1.0 (HF skips the warper)
              (1.0, 0, True, 0.9, -5, 0.95),    # negative top_k = off
              (1.3, 4, True, 1.3, 20, 0.0),     # top_p 0 -> only the best token
              (1.05, 2, True, 0.9, TALKER_V, 0.99)]
    odd = [(0.9, 50, 1.0), (0.0, 1, 0.3), (-1.0, -3, 0.0), (7.0, 5000, 0.9)]  # ignored when greedy
    greedy = [(pen, n, False) + odd[i % 4] for i, (pen, n) in
              enumerate(itertools.product(PENALTIES, (0, 1, 2, 30)))]
    return sampled + extras + greedy


@pytest.mark.parametrize("kind,B", [("normal", 2), ("ties", 1), ("extreme", 2)])
def test_talker_chain_matches_hf(kind, B):
    """Penalty 1/1.05/1.3 with history, min-new-tokens on (n<2) / off, suppression, every
    temperature x top_k x top_p combination, greedy rows mixed in the same batch."""
    rng = np.random.default_rng([KINDS.index(kind), B])
    counters = check_against_hf(rng, kind, B, TALKER_V, True, talker_settings())
    assert counters["filtered"] > 0
    if kind == "extreme":  # the tied 1e30 maxima at top_p=0.3 must have hit an HF tie split
        assert counters["tie_splits"] > 0


@pytest.mark.parametrize("kind,B", [("normal", 5), ("ties", 3), ("extreme", 6)])
def test_predictor_chain_matches_hf(kind, B):
    rng = np.random.default_rng([1000, KINDS.index(kind), B])
    settings = [(1.0, 0, True, t, k, p) for t, k, p in itertools.product(TEMPS, TOPKS, TOPPS)]
    settings += [(1.0, 0, False, 0.9, 50, 1.0), (1.0, 0, False, 0.0, 0, 0.0),
                 (1.0, 0, True, 1.0, 50, 1.0), (1.0, 0, True, 0.9, 4000, 0.05)]
    check_against_hf(rng, kind, B, PREDICTOR_V, False, settings)


FAST_TOPKS = (1, 2, 50, S.TOP_K_CANDIDATES)


@jax.jit
def _both_paths(x_BxV, params):
    return S.warp(x_BxV, params), S.warp_by_sort(x_BxV, params), S.top_k_path_rows(x_BxV, params)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_path_matches_hf_and_the_full_sort(kind):
    """With 1 <= top_k <= TOP_K_CANDIDATES everywhere (the official settings), `warp` works from
    `lax.top_k` candidates instead of sorting the vocabulary: still exactly HF's chain, and the
    same kept set and values as the full-sort path. "ties" rows (values on a 0.5 grid) tie far
    more than 64 logits at the k-th value, so there the fallback is what runs and is checked."""
    rng = np.random.default_rng([2000, KINDS.index(kind)])
    for V, talker in ((TALKER_V, True), (PREDICTOR_V, False)):
        settings = [(pen, 3, True, t, k, p) for pen, t, k, p in
                    itertools.product((1.0, 1.3), TEMPS, FAST_TOPKS, TOPPS)]
        settings += [(1.05, 2, False, 0.9, 0, 1.0)]  # a greedy row does not block the fast path
        check_against_hf(rng, kind, 3, V, talker, settings)
        x = make_logits(rng, kind, 64, V)
        params = S.SamplingParams.create(
            64, do_sample=True, temperature=rng.choice(TEMPS, 64),
            top_k=rng.choice(FAST_TOPKS, 64), top_p=rng.choice(TOPPS, 64))
        warped, by_sort, fast_rows = (np.asarray(a) for a in _both_paths(x, params))
        assert_same_logits(warped, by_sort, f"{kind} V={V}")
        if kind == "ties":
            assert not fast_rows.all()
        else:
            assert fast_rows.all()  # the candidates path did run


def test_top_k_path_falls_back_when_off_or_too_large():
    rng = np.random.default_rng(7)
    x = make_logits(rng, "normal", 4, PREDICTOR_V)
    for k in (0, -1, S.TOP_K_CANDIDATES + 1, 5000):
        params = S.SamplingParams.create(4, top_k=[50, 50, 50, k], top_p=[0.9, 0.9, 0.9, 1.0])
        warped, by_sort, fast_rows = (np.asarray(a) for a in _both_paths(x, params))
        assert fast_rows.tolist() == [True, True, True, False]
        assert_same_logits(warped, by_sort, f"top_k={k}")
        if k > S.TOP_K_CANDIDATES:  # more survivors than the candidates could hold
            assert (np.isfinite(warped[3]).sum() > S.TOP_K_CANDIDATES)


def test_greedy_rows_are_not_warped():
    rng = np.random.default_rng(3)
    x = make_logits(rng, "ties", 4, PREDICTOR_V)
    rows = [dict(x=x[b], seen=np.zeros(PREDICTOR_V, bool), penalty=1.0, n=0, do_sample=False,
                 temperature=t, top_k=k, top_p=p)
            for b, (t, k, p) in enumerate([(0.0, 1, 0.0), (-1.0, 0, 0.5), (0.5, 3, 1.0), (1e-9, 50, 0.1)])]
    warped, _, ids = run_ours(rows, talker=False)
    np.testing.assert_array_equal(warped, x)  # unchanged; no NaN/inf from t <= 0
    np.testing.assert_array_equal(ids, x.argmax(-1))


def test_all_greedy_batch_draws_no_random_bits():
    """With `runtime_dispatch` the random draw sits in the branch taken when some row samples:
    an all-greedy batch computes no random bits (the ids are the same either way)."""
    def prims(jaxpr, top_only):
        out = []
        for e in jaxpr.eqns:
            out.append(e.primitive.name)
            if not top_only:
                for sub in jax.extend.core.jaxprs_in_params(e.params):   # JAX >= 0.11 too
                    out += prims(sub, False)
        return out

    RANDOM = {"random_bits", "threefry2x32", "random_wrap"}
    x = jnp.zeros((2, PREDICTOR_V))
    for dispatch, top_level in ((True, False), (False, True)):
        params = S.SamplingParams.create(2, do_sample=jnp.array([False, True]),
                                         options=Options(runtime_dispatch=dispatch))
        jaxpr = jax.make_jaxpr(lambda x, k: S.sample(k, x, params, Options(
            runtime_dispatch=dispatch)))(x, jax.random.PRNGKey(0)).jaxpr
        assert bool(RANDOM & set(prims(jaxpr, True))) == top_level, dispatch
        assert RANDOM & set(prims(jaxpr, False)), dispatch
    for do_sample in (False, True):
        params = S.SamplingParams.create(2, do_sample=do_sample, temperature=0.9, top_k=5)
        ids = S.sample(jax.random.PRNGKey(1), x + jnp.arange(PREDICTOR_V) * 1e-3, params,
                       Options(runtime_dispatch=True))
        assert (np.asarray(ids) == PREDICTOR_V - 1).all() or do_sample


@jax.jit
def _masks_and_penalty():  # one compile instead of many eager ones
    mn = S.min_new_tokens_mask(jnp.array([0, 1, 2, 3]), TALKER_V, EOS)
    seen = S.mark_seen(jnp.zeros((3, 10), bool), jnp.array([4, 0, 9]))
    seen = S.mark_seen(seen, jnp.array([4, 2, 9]))
    x = jnp.array([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    pen = S.apply_repetition_penalty(x, jnp.array([[1, 1, 0], [1, 1, 1]], bool),
                                     jnp.array([2.0, 4.0]))
    pen_scalar = S.apply_repetition_penalty(x, jnp.ones((2, 3), bool), 2.0)
    masked = S.mask_ids(x, jnp.array([True, False, False]))
    return mn, seen, pen, pen_scalar, masked


def test_masks_and_penalty():
    m = S.talker_suppress_mask(TALKER_V, EOS)
    assert m.shape == (TALKER_V,) and m.dtype == bool
    np.testing.assert_array_equal(np.flatnonzero(m), SUPPRESS_IDS)
    mn, seen, pen, pen_scalar, masked = (np.asarray(a) for a in _masks_and_penalty())
    assert mn.shape == (4, TALKER_V)
    np.testing.assert_array_equal(mn.sum(-1), [1, 1, 0, 0])
    assert mn[0, EOS] and mn[1, EOS]
    np.testing.assert_array_equal(np.argwhere(seen).tolist(), [[0, 4], [1, 0], [1, 2], [2, 9]])
    np.testing.assert_array_equal(pen, [[0.5, -4.0, 3.0], [0.125, 0.0, -4.0]])
    np.testing.assert_array_equal(pen_scalar, [[0.5, -4.0, 1.5], [0.25, 0.0, -2.0]])
    np.testing.assert_array_equal(masked[:, 0], [-np.inf, -np.inf])
    np.testing.assert_array_equal(masked[:, 1:], np.asarray([[-2.0, 3.0], [0.0, -1.0]]))


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

def test_sampling_reproducible_key_dependent_row_independent():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(ROWS, PREDICTOR_V)).astype(np.float32)
    rows = [dict(x=x[b], seen=np.zeros(PREDICTOR_V, bool), penalty=1.0, n=0, do_sample=b % 4 != 3,
                 temperature=1.0, top_k=0, top_p=1.0) for b in range(ROWS)]
    a, b, c = (run_ours(rows, False, seed=s)[2] for s in (5, 5, 6))
    assert a.dtype == np.int32 and a.shape == (ROWS,)
    np.testing.assert_array_equal(a, b)
    sampled = np.array([r["do_sample"] for r in rows])
    assert (a != c)[sampled].mean() > 0.9  # ~uniform over 2048 ids: almost all differ
    np.testing.assert_array_equal(a[~sampled], c[~sampled])  # greedy rows ignore the key
    # per-row keys: changing the other rows' logits does not change a row's draw
    for r in rows[64:]:
        r["x"] = r["x"][::-1].copy()
    d = run_ours(rows, False, seed=5)[2]
    np.testing.assert_array_equal(d[:64], a[:64])
    assert (d[64:] != a[64:]).mean() > 0.5
    assert S._is_batched_key(jax.random.split(jax.random.key(0), 3))
    assert S._is_batched_key(jax.random.split(jax.random.PRNGKey(0), 3))
    assert not S._is_batched_key(jax.random.key(0))
    assert not S._is_batched_key(jax.random.PRNGKey(0))


def test_sampling_never_draws_filtered_ids():
    """Suppressed ids get the largest raw logits, EOS is blocked by min-new-tokens: neither, nor
    anything top-k / top-p filtered, is ever drawn."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=TALKER_V).astype(np.float32) * 2
    x[2048:] += 10.0
    configs = [(50, 1.0), (5000, 0.3), (0, 0.9), (3, 1.0)]
    per = ROWS // len(configs)
    rows = [dict(x=x, seen=np.zeros(TALKER_V, bool), penalty=1.05, n=i % 2, do_sample=True,
                 temperature=1.3, top_k=k, top_p=p) for k, p in configs for i in range(per)]
    drawn = {c: set() for c in configs}
    for seed in range(3):
        warped, _, ids = run_ours(rows, True, seed=seed)
        allowed = np.isfinite(warped)
        assert allowed[np.arange(ROWS), ids].all()
        assert (ids < 2048).all() and (ids != EOS).all()
        for j, c in enumerate(configs):
            drawn[c].update(ids[j * per:(j + 1) * per].tolist())
    for j, c in enumerate(configs):
        n_allowed = np.isfinite(warped[j * per]).sum()
        assert 1 <= n_allowed < 2048
        assert len(drawn[c]) > 1
    assert len(drawn[(3, 1.0)]) == 3


SMALL_X = np.array([2.0, 1.5, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 3.0, -3.0, 0.2], np.float32)
N_DRAWS = 20_000
sample_jit = jax.jit(S.sample)


def _draw(t, k, p, seed=11):
    params = S.SamplingParams.create(N_DRAWS, temperature=t, top_k=k, top_p=p)
    x = jnp.broadcast_to(jnp.asarray(SMALL_X), (N_DRAWS, SMALL_X.size))
    return np.asarray(sample_jit(jax.random.key(seed), x, params))


def _chi2(counts, probs):
    support = probs > 0
    expected = probs[support] * counts.sum()
    return ((counts[support] - expected) ** 2 / expected).sum(), support.sum() - 1


def test_sampling_frequencies_match_hf_softmax():
    V = SMALL_X.size
    for t, k, p in [(1.3, 8, 0.9), (0.5, 0, 1.0), (0.9, 50, 0.95), (1.0, 4, 1.0)]:
        procs = hf_processors(talker=False, do_sample=True, temperature=t, top_k=k, top_p=p)
        ref = torch.softmax(torch.from_numpy(hf_apply(procs, np.zeros((1, 0)), SMALL_X[None])),
                            -1).numpy()[0].astype(np.float64)
        ids = _draw(t, k, p)
        counts = np.bincount(ids, minlength=V)
        assert counts[ref == 0].sum() == 0, (t, k, p)
        chi2, dof = _chi2(counts, ref)
        assert dof > 0 and chi2 < stats.chi2.ppf(1 - 1e-4, dof), (t, k, p, chi2)
        np.testing.assert_allclose(counts / N_DRAWS, ref, atol=0.015)
    np.testing.assert_array_equal(ids, _draw(t, k, p))  # single key: reproducible
    assert (ids != _draw(t, k, p, seed=12)).mean() > 0.3  # ... and key dependent
    # the check has power: draws at t=0.9 are rejected against t=1.3's distribution
    ids = _draw(0.9, 0, 1.0)
    wrong = np.asarray(jax.nn.softmax(jnp.asarray(SMALL_X) / 1.3), np.float64)
    chi2, dof = _chi2(np.bincount(ids, minlength=V), wrong)
    assert chi2 > stats.chi2.ppf(1 - 1e-4, dof)


# ---------------------------------------------------------------------------------------------
# No recompilation when settings change
# ---------------------------------------------------------------------------------------------

def test_settings_changes_do_not_recompile():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, TALKER_V)).astype(np.float32)
    configs = [  # (penalty, n, do_sample, temperature, top_k, top_p): scalars, per-row, odd types
        (1.05, 0, True, 0.9, 50, 1.0), (1.0, 5, False, 0.9, 50, 1.0), (1.3, 1, True, 1.3, 0, 0.3),
        (1.0, 2, 1, 1, 10.0, 1), (2.0, 9, False, 0.1, 1, 0.5),
    ]
    before_traces, outs = None, []
    for i, (pen, n, ds, t, k, p) in enumerate(configs):
        rows = [dict(x=x[b], seen=np.arange(TALKER_V) % (b + 2) == 0, penalty=pen, n=n,
                     do_sample=ds, temperature=t, top_k=k, top_p=p) for b in range(3)]
        outs.append(run_ours(rows, True, seed=i))
        if before_traces is None:  # the first call may compile (unless an earlier test did)
            before_traces, before_cache = len(TRACES), ours._cache_size()
    assert len(TRACES) == before_traces and ours._cache_size() == before_cache
    assert TRACES.count(True) == 1  # one trace of the talker variant in the whole session
    # and the settings did take effect
    greedy_processed = outs[1][1]
    np.testing.assert_array_equal(outs[1][2], greedy_processed.argmax(-1))
    np.testing.assert_array_equal(np.isfinite(outs[0][0]).sum(-1), 50)  # top_k 50
    np.testing.assert_array_equal(np.isfinite(outs[3][0]).sum(-1), 10)  # top_k 10.0
    np.testing.assert_array_equal(outs[1][0], outs[1][1])  # greedy rows: not warped
    assert (np.isfinite(outs[2][0]).sum(-1) > 50).all()  # top_k off, top_p 0.3 at t=1.3


def test_params_is_pytree():
    p = S.SamplingParams.create(4, do_sample=[1, 0, 1, 0], top_k=[0, 1, 2, 3])
    leaves, tree = jax.tree.flatten(p)
    assert len(leaves) == 4
    q = jax.tree.unflatten(tree, leaves)
    assert isinstance(q, S.SamplingParams) and q.batch_size == 4
    assert p.do_sample.dtype == jnp.bool_ and p.top_k.dtype == jnp.int32
    assert p.temperature.dtype == jnp.float32 and p.top_p.dtype == jnp.float32
    assert p.do_sample.shape == p.temperature.shape == p.top_p.shape == (4,)
    with pytest.raises(ValueError):
        S.SamplingParams.create(4, top_k=[1, 2])


def test_accelerator_sampler_program_gives_the_same_ids():
    """Off the CPU `sample` is one full-sort program without conditionals
    (`Options.runtime_dispatch` off):
    the same warped logits and the same draws as the CPU's dispatching program, whose fast path
    runs for the second settings (all top_k in 1..64) and its fallback for the first."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(make_logits(rng, "normal", 16, TALKER_V))
    keys = jax.random.split(jax.random.key(3), 16)
    for top_ks in ((0, 1, 50, 64, 5000), FAST_TOPKS):
        params = S.SamplingParams.create(16, do_sample=rng.random(16) < 0.7,
                                         temperature=rng.choice(TEMPS, 16),
                                         top_k=rng.choice(top_ks, 16), top_p=rng.choice(TOPPS, 16))
        outs = {}
        f = jax.jit(lambda k, x, p, o: (S.warp(x, p, o), S.sample(k, x, p, o)),
                    static_argnames="o")
        for dispatch in (True, False):
            outs[dispatch] = [np.asarray(a) for a in f(keys, x, params,
                                                        o=Options(runtime_dispatch=dispatch))]
        assert_same_logits(outs[True][0], outs[False][0])
        np.testing.assert_array_equal(outs[True][1], outs[False][1])


# ---------------------------------------------------------------------------------------------
# Sampler kinds (`SamplingParams.kind`, specialized programs on accelerators)
# ---------------------------------------------------------------------------------------------

SPECIALIZE = Options(specialize_sampler=True)


def test_kind_of_settings():
    create = functools.partial(S.SamplingParams.create, options=SPECIALIZE)
    assert create(3, do_sample=False, top_p=0.5, top_k=5000).kind == "greedy"
    assert create(3).kind == "top_k"                        # the official defaults
    assert create(3, do_sample=[1, 0, 1], top_k=[50, 0, 64], top_p=[1.0, 0.2, 1.0]).kind == "top_k"
    assert create(3, top_k=[50, 0, 1]).kind == "top_k"      # top-k off: temperature only
    assert create(3, top_k=[50, 65, 1]).kind == "full"      # beyond the candidates
    assert create(3, do_sample=[0, 1, 0], top_p=[1.0, 0.9, 1.0]).kind == "full"
    assert create(3, do_sample=False, options=Options()).kind == "full"
    assert S.SamplingParams.create(3, do_sample=False).kind == "full"     # options None
    # the backends' defaults: specialized off the CPU only
    for backend, want in (("cpu", "full"), ("gpu", "greedy"), ("tpu", "greedy")):
        assert create(3, do_sample=False, options=Options.for_backend(backend)).kind == want


def _kind_program_impl(keys_B, x_BxV, seen_BxV, penalty_B, params, talker, options):
    if talker:
        x_BxV = S.process_talker_logits(x_BxV, seen_BxV, penalty_B, jnp.full_like(penalty_B, 1),
                                        S.talker_suppress_mask(x_BxV.shape[1], EOS), EOS)
    return S.warp(x_BxV, params, options), S.sample(keys_B, x_BxV, params, options)


_kind_program = jax.jit(_kind_program_impl, static_argnames=("talker", "options"))


@pytest.mark.parametrize("kth", ["top_k", "pairwise"])
@pytest.mark.parametrize("kind", KINDS)
def test_specialized_kinds_give_the_full_samplers_ids(kind, kth):
    """Each kind's program (no sort for "top_k", no warp or draw for "greedy") warps to the same
    logits and draws the same ids as the general program, for the talker (penalty, masks) and the
    predictor, with ties at the k-th value beyond the candidates ("ties" rows), greedy rows mixed
    in, top-k off in some rows, and under either sampler dispatch; the k-th largest value from
    `lax.top_k` candidates or by pairwise counts (`Options.kth_by`)."""
    # pairwise for all 32 rows here
    base = Options(specialize_sampler=True, kth_by=kth, pairwise_max=1 << 40)
    rng = np.random.default_rng([3000, KINDS.index(kind)])
    B = 32
    for V, talker in ((TALKER_V, True), (PREDICTOR_V, False)):
        x = jnp.asarray(make_logits(rng, kind, B, V))
        seen = jnp.asarray(history(rng, B, 20, V)[1])
        penalty = jnp.asarray(rng.choice(PENALTIES, B).astype(np.float32))
        keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), B)
        cols = dict(temperature=rng.choice(TEMPS, B),
                    top_k=rng.choice((0, 1, 2, 50, S.TOP_K_CANDIDATES, -3), B))
        for do_sample, want in ((rng.random(B) < 0.7, "top_k"), (np.zeros(B, bool), "greedy")):
            params = S.SamplingParams.create(B, do_sample=do_sample, top_p=1.0, **cols,
                                             options=base)
            assert params.kind == want
            full = S.SamplingParams(params.do_sample, params.temperature, params.top_k,
                                    params.top_p)
            assert full.kind == "full"
            for dispatch in (True, False):
                o = dataclasses.replace(base, runtime_dispatch=dispatch)
                got = [np.asarray(a) for a in _kind_program(keys, x, seen, penalty, params,
                                                            talker=talker, options=o)]
                ref = [np.asarray(a) for a in _kind_program(keys, x, seen, penalty, full,
                                                            talker=talker, options=o)]
                np.testing.assert_array_equal(got[1], ref[1], err_msg=f"{want} V={V}")
                if want == "top_k":
                    assert_same_logits(got[0], ref[0], f"{want} V={V}")
            if want == "top_k":
                assert (np.isfinite(got[0]).sum(-1)[do_sample & (cols["top_k"] == 1)] >= 1).all()
                if kind == "ties":  # more survivors than candidates somewhere: still exact
                    assert (np.isfinite(got[0]).sum(-1) > S.TOP_K_CANDIDATES).any()
