"""The CPU kernels (`qwen3_tts_jax.cpu_kernels`, kernels/cpu_kernels.cc): products against
float64 numpy over row counts that hit every row tile and panel split, the packed layout, what is
packed at load, generation with the kernel vs XLA's products, and the fallback when the kernel
cannot be built."""
import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from official import GREEDY, official_codes
from qwen3_tts_jax import Qwen3TTS, checkpoint, cpu_kernels, layers, prompts, sampling
from qwen3_tts_jax import generate as gen
from qwen3_tts_jax.config import load_config
from qwen3_tts_jax.options import Options
from qwen3_tts_jax.text import assistant_text

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="kernel not built here")
KERNELS = Options(cpu_kernels=True)


def reference(x, w):
    """x @ w in float64, and the scale of its rounding error (sum of |terms|)."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return x64 @ w64, np.abs(x64) @ np.abs(w64)


# (K, N): tiny, odd K, one panel, a long K of no round size, a real layer's gate|up and down
# (0.6B), a 1.7B-wide q|k|v
@pytest.mark.parametrize("K,N", [(8, 16), (37, 48), (600, 32), (1024, 6144), (3072, 1024),
                                 (2048, 4096)])
def test_products_match_float64(K, N):
    rng = np.random.default_rng(K + N)
    w = rng.standard_normal((K, N), dtype=np.float32) * 0.05
    packed = cpu_kernels.pack(jnp.asarray(w))
    f = jax.jit(cpu_kernels.linear)
    rows = [1, 2, 3, 5, 6, 7, 8, 9, 12, 13, 16, 33, 70] if K * N < 10**6 else [1, 7, 8, 32, 130]
    for M in rows:
        x = rng.standard_normal((M, K), dtype=np.float32) * 3.0
        got = np.asarray(f(jnp.asarray(x), packed))
        want, scale = reference(x, w)
        assert got.shape == (M, N) and got.dtype == np.float32
        # float32 sums of K terms: error below K * eps * sum|terms|, and far below it in practice
        assert np.all(np.abs(got - want) <= 4 * np.finfo(np.float32).eps * np.sqrt(K) * scale
                      + 1e-30), (M, np.abs(got - want).max())
        assert np.array_equal(got, np.asarray(f(jnp.asarray(x), packed)))  # deterministic


def test_many_rows_take_the_library_product():
    """From LIBRARY_ROWS rows (a large batch's prefill) the product is XLA's over the unpacked
    weight; below, the kernel. Both match float64."""
    rng = np.random.default_rng(1)
    K, N = 96, 48
    w = rng.standard_normal((K, N), dtype=np.float32)
    packed = cpu_kernels.pack(jnp.asarray(w))
    for M, kernel in [(cpu_kernels.LIBRARY_ROWS - 1, True), (cpu_kernels.LIBRARY_ROWS, False)]:
        x = rng.standard_normal((M, K), dtype=np.float32)
        jaxpr = str(jax.make_jaxpr(cpu_kernels.linear)(jnp.asarray(x), packed))
        assert ("ffi_call" in jaxpr) == kernel, M
        got = np.asarray(jax.jit(cpu_kernels.linear)(jnp.asarray(x), packed))
        want, scale = reference(x, w)
        assert np.all(np.abs(got - want) <= 4 * np.finfo(np.float32).eps * np.sqrt(K) * scale)


def test_leading_dims_and_xla_fallback_agree():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((64, 96), dtype=np.float32))
    x = jnp.asarray(rng.standard_normal((3, 5, 64), dtype=np.float32))
    got = cpu_kernels.linear(x, cpu_kernels.pack(w))
    assert got.shape == (3, 5, 96)
    np.testing.assert_allclose(got, cpu_kernels.linear(x, w), rtol=1e-5, atol=1e-5)
    # inside another program: vmap-free, under jit with a while loop, as the frame loop uses it
    loop = jax.jit(lambda x, p: jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(
        cpu_kernels.linear(h, p)[..., :64]), x))
    ref = jax.jit(lambda x, p: jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(
        (h @ p)[..., :64]), x))
    np.testing.assert_allclose(loop(x, cpu_kernels.pack(w)), ref(x, w), rtol=1e-5, atol=1e-5)


def test_packed_layout_roundtrip_and_what_is_packed():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((24, 32), dtype=np.float32))
    p = cpu_kernels.pack(w)
    assert p.panels.shape == (2, 24, 16) and p.shape == (24, 32)
    assert np.array_equal(p.unpack(), w)
    assert np.array_equal(p.panels[1, 3], w[3, 16:32])
    layer = {"attn": layers.Attention(w, jnp.ones((32, 24)), jnp.ones(8), jnp.ones(8)),
             "mlp": layers.MLP(jnp.ones((24, 96)), jnp.ones((48, 24))),
             "input_norm": jnp.ones(24)}
    out = cpu_kernels.pack_layer(layer)
    assert isinstance(out["attn"].qkv, cpu_kernels.PackedWeight)
    assert isinstance(out["mlp"].gate_up, cpu_kernels.PackedWeight)
    # widths that are not whole panels, norms, and non-float32 weights stay arrays
    assert not isinstance(out["attn"].o, cpu_kernels.PackedWeight)
    assert not isinstance(out["mlp"].down, cpu_kernels.PackedWeight)
    assert out["attn"].q_norm is layer["attn"].q_norm
    assert type(out["attn"]) is layers.Attention and type(out["mlp"]) is layers.MLP
    assert not cpu_kernels.packable(w.astype(jnp.bfloat16))
    # a pytree: leaves, device_put and tree_map keep the type
    assert len(jax.tree_util.tree_leaves(p)) == 1
    assert isinstance(jax.device_put(p), cpu_kernels.PackedWeight)


@pytest.mark.parametrize("H,K,N", [(1, 8, 16), (3, 37, 48), (15, 256, 2048)])
def test_stacked_product_reads_the_indexed_weight(H, K, N):
    """`linear_at`: x @ w[j] for a traced j, the weight read in place from the stack; an index
    out of range is clamped (XLA's dynamic slice does the same), and the array path agrees."""
    rng = np.random.default_rng(H + K)
    w = rng.standard_normal((H, K, N), dtype=np.float32) * 0.05
    packed = cpu_kernels.pack_stack(jnp.asarray(w))
    assert packed.shape == (H, K, N) and np.array_equal(packed.unpack(), w)
    assert np.array_equal(packed.panels[H - 1, 0, :, :], w[H - 1, :, :16])
    assert np.array_equal(packed[H - 1].unpack(), w[H - 1])
    f = jax.jit(cpu_kernels.linear_at)
    for M in (1, 7, 13):
        x = rng.standard_normal((M, K), dtype=np.float32)
        for j in sorted({0, H // 2, H - 1}):
            got = np.asarray(f(jnp.asarray(x), packed, j))
            want, scale = reference(x, w[j])
            assert got.shape == (M, N)
            assert np.all(np.abs(got - want) <= 4 * np.finfo(np.float32).eps * np.sqrt(K) * scale
                          + 1e-30), (M, j)
            np.testing.assert_allclose(f(jnp.asarray(x), jnp.asarray(w), j), got, rtol=1e-5,
                                       atol=1e-5)
        for j, edge in ((-3, 0), (H + 4, H - 1)):
            np.testing.assert_array_equal(f(jnp.asarray(x), packed, j),
                                          f(jnp.asarray(x), packed, edge))
    # inside a scan over the index, as the code predictor's steps use it
    x = jnp.asarray(rng.standard_normal((2, K), dtype=np.float32))
    step = lambda w: jax.jit(lambda x: jax.lax.scan(
        lambda c, j: (c, cpu_kernels.linear_at(c, w, j)), x, jnp.arange(H))[1])
    np.testing.assert_allclose(step(packed)(x), np.einsum("bk,hkn->hbn", x, w), rtol=1e-4,
                               atol=1e-5)
    # only float32 stacks whose width is whole panels are packed
    assert cpu_kernels.stackable(jnp.asarray(w))
    assert not cpu_kernels.stackable(jnp.asarray(w).astype(jnp.bfloat16))
    assert not cpu_kernels.stackable(jnp.asarray(w[:, :, :N - 1]))


@pytest.mark.parametrize("H,K,N", [(1, 8, 16), (3, 37, 48), (15, 256, 2048)])
def test_int8_stacked_product_is_the_picked_weights_int8_product(H, K, N):
    """`pack_stack(int8=True)`: each weight quantized per column; `linear_at` gives exactly the
    int8 x int8 kernel's product with that weight alone, on every instruction path; from
    LIBRARY_ROWS rows the library product of the same weight; indexes clamped."""
    from qwen3_tts_jax import quantize

    rng = np.random.default_rng(H * K)
    w = jnp.asarray(rng.standard_normal((H, K, N), dtype=np.float32) * 0.05)
    packed = cpu_kernels.pack_stack(w, int8=True)
    assert isinstance(packed, cpu_kernels.PackedInt8DotStack) and packed.shape == (H, K, N)
    paths = [p for p in cpu_kernels.int8_paths()]
    for j in sorted({0, H // 2, H - 1}):
        one = cpu_kernels.pack(quantize.quantize_int8(w[j]), "int8")
        assert np.array_equal(packed[j].panels, one.panels)
        for M in (1, 6, 13):
            x = jnp.asarray(rng.standard_normal((M, K), dtype=np.float32))
            for path in paths:
                got = jax.jit(functools.partial(cpu_kernels.linear_at, path=path))(x, packed, j)
                want = cpu_kernels.linear(x, one, path=path)
                np.testing.assert_array_equal(got, want, err_msg=f"{path} {M} {j}")
    x = jnp.asarray(rng.standard_normal((cpu_kernels.LIBRARY_ROWS, K), dtype=np.float32))
    np.testing.assert_allclose(cpu_kernels.linear_at(x, packed, H - 1),
                               quantize.matmul(x, quantize.quantize_int8(w[H - 1])),
                               rtol=1e-4, atol=1e-4)
    x = x[:3]
    np.testing.assert_array_equal(cpu_kernels.linear_at(x, packed, H + 3),
                                  cpu_kernels.linear_at(x, packed, H - 1))


@pytest.mark.parametrize("quantize,acts,kind", [
    (None, "int8", "PackedStack"), ("int8", "float", "PackedStack"),
    ("int8", "int8", "PackedInt8DotStack"), ("int4", "int8", "PackedInt8DotStack")])
def test_what_the_predictor_heads_are_packed_as(quantize, acts, kind):
    """The heads follow the products: int8 x int8 where the products are int8 x int8 or int4,
    float32 otherwise; without the CPU kernels they stay the stacked array."""
    cfg_like = {"talker": {"layers": []}, "code_predictor": {
        "layers": [], "lm_head": jnp.ones((15, 64, 32), jnp.float32)}}
    options = Options(cpu_kernels=True, int8_activations=acts)
    out = checkpoint.pack_for_inference(cfg_like, quantize=quantize, options=options)
    assert type(out["code_predictor"]["lm_head"]).__name__ == kind
    plain = checkpoint.pack_for_inference(cfg_like, quantize=None if quantize == "int4" else
                                          quantize, options=Options(cpu_kernels=False))
    assert isinstance(plain["code_predictor"]["lm_head"], jax.Array)


def test_loaded_model_uses_the_kernel_and_codes_match_xla_products(make_checkpoint):
    path = make_checkpoint("cv_identity_0b6")
    tts = Qwen3TTS.from_pretrained(path)
    kinds = {type(v).__name__ for lp in tts.params["talker"]["layers"]
             for part in ("attn", "mlp") for v in lp[part]._asdict().values()}
    assert "PackedWeight" in kinds and tts.options.cpu_kernels
    assert isinstance(tts.params["code_predictor"]["lm_head"], cpu_kernels.PackedStack)
    cfg = load_config(path)
    xla = dataclasses.replace(tts.options, cpu_kernels=False)
    plain = checkpoint.pack_for_inference(checkpoint.load_params(path, cfg), options=xla)
    packed_types = (cpu_kernels.PackedWeight, cpu_kernels.PackedStack)
    assert not any(isinstance(x, packed_types) for x in jax.tree_util.tree_leaves(
        plain, is_leaf=lambda x: isinstance(x, packed_types)))
    items = [prompts.build_prompt(cfg, tts.tokenizer.encode(assistant_text(t)), "english", "ryan", None,
                                  non_streaming_mode=nsm)
             for t, nsm in (("Hello there, a test.", True), ("Short.", False))]
    L = gen.bucket(max(len(i) for i in items))
    batch = prompts.batch_prompts(cfg, items, length=L,
                                  trailing_length=gen.bucket(max(len(i.trailing) for i in items)))
    B = len(items)

    def settings(do_sample):
        sp = lambda: sampling.SamplingParams.create(B, do_sample=do_sample, temperature=0.9,
                                                    top_k=50, top_p=1.0, options=tts.options)
        return gen.Settings(sp(), sp(), jnp.full((B,), 1.05, jnp.float32),
                            jnp.full((B,), 24, jnp.int32))

    keys = jnp.stack([jax.random.PRNGKey(i) for i in range(B)])
    for do_sample in (False, True):
        a = gen.generate(tts.params, cfg, batch, settings(do_sample), keys, max_frames=23,
                         options=tts.options)
        b = gen.generate(plain, cfg, batch, settings(do_sample), keys, max_frames=23,
                         options=xla)
        assert np.array_equal(np.asarray(a.length_B), np.asarray(b.length_B))
        assert np.array_equal(np.asarray(a.codes_BxFxG), np.asarray(b.codes_BxFxG)), do_sample


def test_library_product_path_keeps_official_codes(model_pair, monkeypatch):
    """A prefill past LIBRARY_ROWS takes XLA's product over the unpacked weight while the frames
    keep the kernel (the switch point forced down to 16 rows, so that a tiny batch crosses it):
    greedy codes still equal the official's."""
    off, ours = model_pair("cv_identity_0b6")
    kw = dict(text=["Hello world. This is a tiny test.", "Hi."], speaker=["ryan", "vivian"],
              language=["english", "auto"], max_new_tokens=10)
    ref = official_codes(off, "custom_voice", **kw, **GREEDY)
    monkeypatch.setattr(cpu_kernels, "LIBRARY_ROWS", 16)
    jax.clear_caches()
    try:
        got = ours.generate_custom_voice_codes(**kw, **GREEDY)
    finally:
        jax.clear_caches()
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(g), r)


def _probe(tmp_path, **env):
    code = ("import logging, sys; logging.basicConfig(stream=sys.stderr)\n"
            "from qwen3_tts_jax import cpu_kernels; print(cpu_kernels.available())")
    full = dict(os.environ, HOME=str(tmp_path), JAX_PLATFORMS="cpu", **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full, timeout=300)


def test_without_a_compiler_it_warns_and_uses_xla(tmp_path):
    r = _probe(tmp_path, CXX="/nonexistent/c++")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
    assert "CPU kernels are not available" in r.stderr


def test_builds_into_the_cache_once(tmp_path):
    r = _probe(tmp_path)
    assert r.stdout.strip() == "True", r.stderr
    built = os.listdir(tmp_path / ".cache" / "qwen3-tts-jax" / "kernels")
    assert len(built) == 1 and built[0].endswith(".so")
    r = _probe(tmp_path, CXX="/nonexistent/c++")  # cached: no compiler needed any more
    assert r.stdout.strip() == "True", r.stderr


# (B, K kv heads, G query heads per kv head, Dh, S slots): the 0.6B talker and predictor shapes,
# a 1.7B-like GQA ratio, odd sizes; `filled` from one slot to all of them
@pytest.mark.parametrize("B,K,G,Dh,S", [(8, 8, 2, 128, 304), (8, 8, 2, 128, 16), (1, 2, 3, 64, 37),
                                       (3, 1, 4, 8, 9), (2, 4, 1, 16, 70)])
def test_attention_matches_xla(B, K, G, Dh, S):
    rng = np.random.default_rng(B * S + Dh)
    cache = layers.KVCacheHeadsMajor(
        jnp.asarray(rng.standard_normal((B, K, Dh, S), dtype=np.float32) * 2),
        jnp.asarray(rng.standard_normal((B, K, Dh, S), dtype=np.float32)))
    q = jnp.asarray(rng.standard_normal((B, 1, K * G, Dh), dtype=np.float32) * 2)
    for filled in sorted({1, 2, S // 3 + 1, S - 1, S} - {0}):
        # left padding (row b's first b slots masked) and nothing past `filled`, as in decode
        slots = np.arange(S)[None, :]
        mask = (slots < filled) & (slots >= np.minimum(np.arange(B)[:, None], filled - 1))
        mask = jnp.asarray(mask[:, None, :])
        # without the kernels: XLA's computation over every slot
        want = cache.attend(q, mask, jnp.int32(filled), Options(cpu_kernels=False))
        got = jax.jit(cache.attend, static_argnums=3)(q, mask, jnp.int32(filled), KERNELS)
        assert got.shape == want.shape == (B, 1, K * G, Dh)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=f"filled={filled}")
        # slots past `filled` are never read: garbage there changes nothing
        junk = layers.KVCacheHeadsMajor(cache.k.at[..., filled:].set(jnp.nan),
                                        cache.v.at[..., filled:].set(1e30))
        assert np.array_equal(jax.jit(junk.attend, static_argnums=3)(q, mask, jnp.int32(filled),
                                                                     KERNELS), got)
