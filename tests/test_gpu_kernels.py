"""The Pallas GPU decode kernels (`qwen3_tts_jax.gpu_kernels`), run here through Pallas'
interpreter on the CPU: each kernel against XLA's computation of the same layer pieces, greedy
codes with the kernels equal to the official's, and every kernel lowered for CUDA (to Triton IR,
which needs no GPU) at the released 0.6B and 1.7B widths. Their speed is measured on a GPU only
(benchmarks/bench_scale.py --variants default,pallas)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from official import GREEDY, official_codes
from qwen3_tts_jax import gpu_kernels, layers
from qwen3_tts_jax.config import TransformerConfig

R = gpu_kernels.ROWS
# on a GPU (JAX_PLATFORMS=cuda) the kernel tests run the compiled kernels, elsewhere the interpreter
INTERPRET = jax.default_backend() != "gpu"


def rnd(rng, *shape, scale=0.1):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)


@pytest.mark.parametrize("K,N", [(64, 32), (384, 96), (1024, 128)])
def test_products_match_xla(K, N):
    rng = np.random.default_rng(K + N)
    x, w, r = rnd(rng, R, K, scale=1.0), rnd(rng, K, N), rnd(rng, R, N)
    nw = rnd(rng, K, scale=0.3) + 1.0
    run = lambda *a, **kw: np.asarray(gpu_kernels.norm_matmul(*a, **kw, interpret=INTERPRET))
    tol = dict(rtol=1e-4, atol=1e-4)  # float32 sums of up to 1024 terms of size ~1, reordered
    np.testing.assert_allclose(run(x, w, nw, 1e-6), layers.rms_norm(nw, x, 1e-6) @ w, **tol)
    np.testing.assert_allclose(run(x, w, residual_RxN=r), r + x @ w, **tol)
    w2 = rnd(rng, K, 2 * N)
    gate, up = jnp.split(layers.rms_norm(nw, x, 1e-6) @ w2, 2, axis=-1)
    np.testing.assert_allclose(run(x, w2, nw, 1e-6, swiglu=True), jax.nn.silu(gate) * up, **tol)


# (rows, heads, kv heads, head_dim, cache slots, write index): GQA 2 with slots not a multiple of
# the 64-slot chunk and left padding; the released talker's 16/8/128 early in a long cache
@pytest.mark.parametrize("B,H,KV,Dh,S,idx", [(3, 4, 2, 64, 70, 65), (1, 16, 8, 128, 300, 5)])
def test_attention_matches_xla(B, H, KV, Dh, S, idx):
    rng = np.random.default_rng(S + idx)
    qkv = rnd(rng, R, H + 2 * KV, Dh, scale=1.0)
    q_norm, k_norm = rnd(rng, Dh, scale=0.3) + 1.0, rnd(rng, Dh, scale=0.3) + 1.0
    cos, sin = layers.rope_cos_sin(jnp.full((B, 1), idx - 2), Dh, 1e6, jnp.float32)
    # slots past the write index hold garbage that must not be read
    k_cache, v_cache = rnd(rng, B, S, KV, Dh, scale=1.0), rnd(rng, B, S, KV, Dh, scale=1.0)
    k_cache = k_cache.at[:, idx + 1:].set(jnp.nan)
    pad = jnp.array([0, 3, 40][:B])
    slots = jnp.arange(S)
    mask = (slots[None] >= pad[:, None]) & (slots[None] <= idx)
    out, k_new, v_new = gpu_kernels.attend(qkv, q_norm, k_norm, cos[:, 0], sin[:, 0], k_cache,
                                           v_cache, mask, idx, H, KV, 1e-6,
                                           interpret=INTERPRET)
    q, k, v = qkv[:B, None, :H], qkv[:B, None, H:H + KV], qkv[:B, None, H + KV:]
    q = layers.apply_rope(layers.rms_norm(q_norm, q, 1e-6), cos, sin)
    k = layers.apply_rope(layers.rms_norm(k_norm, k, 1e-6), cos, sin)
    want = layers.KVCache(k_cache, v_cache).write(k, v, idx)
    np.testing.assert_allclose(out[:B], want.attend(q, mask[:, None])[:, 0], rtol=2e-5, atol=2e-6)
    assert not np.any(np.asarray(out[B:]))  # padding rows are zero
    np.testing.assert_allclose(k_new, want.k, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(v_new, want.v)


def _layer_shapes(D, F, H, KV, Dh, dtype=jnp.bfloat16):
    sd = lambda *s: jax.ShapeDtypeStruct(s, dtype)
    return {"attn": {"qkv": sd(D, (H + 2 * KV) * Dh), "o": sd(H * Dh, D), "q_norm": sd(Dh),
                     "k_norm": sd(Dh)},
            "mlp": {"gate_up": sd(D, 2 * F), "down": sd(F, D)},
            "input_norm": sd(D), "post_norm": sd(D)}


# the released stacks (tests/../benchmarks/full_configs.py): 0.6B and 1.7B talkers (~300-slot
# caches), their 5-layer code predictors (17 slots), batch 1, 8 and 16, in bfloat16
@pytest.mark.parametrize("D,F,S,B", [(1024, 3072, 300, 1), (2048, 6144, 300, 8),
                                     (1024, 3072, 17, 16)])
def test_kernels_lower_for_cuda(D, F, S, B):
    H, KV, Dh = 16, 8, 128
    cfg = TransformerConfig(D, F, 1, H, KV, Dh, 1e-6, 1e6)
    bf = jnp.bfloat16
    sd = jax.ShapeDtypeStruct

    def step(lp, x, cos, sin, k, v, mask, idx):
        return gpu_kernels.decoder_stack([lp], x, cos, sin, [layers.KVCache(k, v)], idx, mask, cfg)

    args = (_layer_shapes(D, F, H, KV, Dh), sd((B, D), bf), sd((B, Dh), bf), sd((B, Dh), bf),
            sd((B, S, KV, Dh), bf), sd((B, S, KV, Dh), bf), sd((B, S), jnp.bool_),
            sd((), jnp.int32))
    exported = jax.export.export(jax.jit(step), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 5  # five kernels a layer


def test_what_the_kernels_cover():
    cfg = TransformerConfig(64, 128, 1, 4, 2, 32, 1e-6, 1e6)
    lp = _layer_shapes(64, 128, 4, 2, 32, jnp.float32)
    x = lambda B, T: jax.ShapeDtypeStruct((B, T, 64), jnp.float32)
    pos = [layers.KVCache(jnp.zeros((2, 8, 2, 32)), jnp.zeros((2, 8, 2, 32)))]
    heads = [layers.KVCacheHeadsMajor(jnp.zeros((2, 2, 32, 8)), jnp.zeros((2, 2, 32, 8)))]
    assert gpu_kernels.covers([lp], x(2, 1), pos, cfg)
    assert not gpu_kernels.covers([lp], x(2, 2), pos, cfg)      # prefill: XLA
    assert not gpu_kernels.covers([lp], x(17, 1), pos, cfg)     # more rows than a tile
    assert not gpu_kernels.covers([lp], x(2, 1), heads, cfg)    # the CPU's cache layout
    odd = TransformerConfig(64, 128, 1, 4, 2, 24, 1e-6, 1e6)    # head_dim not a power of two
    assert not gpu_kernels.covers([_layer_shapes(64, 128, 4, 2, 24, jnp.float32)], x(2, 1), pos,
                                  odd)
    unpacked = {**lp, "attn": {k: v for k, v in lp["attn"].items() if k != "qkv"}}
    assert not gpu_kernels.covers([unpacked], x(2, 1), pos, cfg)


@pytest.fixture
def interpreted_kernels(monkeypatch):
    """The kernels on this CPU through Pallas' interpreter, on the cache layout they take, with
    weights as plain arrays (not packed for the CPU kernels)."""
    monkeypatch.setenv("QWEN3_TTS_JAX_GPU_KERNELS", "interpret")
    monkeypatch.setenv("QWEN3_TTS_JAX_CPU_KERNELS", "0")
    monkeypatch.setattr(layers, "CACHE_LAYOUT", "positions")
    calls = []
    real = gpu_kernels.decoder_stack
    monkeypatch.setattr(gpu_kernels, "decoder_stack",
                        lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    jax.clear_caches()
    yield calls
    jax.clear_caches()


@pytest.mark.skipif(not INTERPRET, reason="the official reference runs on the CPU")
def test_greedy_codes_with_kernels_equal_official(make_checkpoint, interpreted_kernels):
    from official import load_official
    from qwen3_tts_jax import Qwen3TTS

    path = make_checkpoint("cv_tiles")
    off, ours = load_official(path), Qwen3TTS.from_pretrained(path)
    kw = dict(text=["Hello world. This is a tiny test.", "Hi."], speaker=["ryan", "vivian"],
              language=["english", "auto"], max_new_tokens=6)
    ref = official_codes(off, "custom_voice", **kw, **GREEDY)
    got = ours.generate_custom_voice_codes(**kw, **GREEDY)
    # the talker's and the code predictor's decode steps both went through the kernels
    assert (2, 64) in interpreted_kernels and len(interpreted_kernels) >= 2
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(g), r)
