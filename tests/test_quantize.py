"""Weight-only int8 (`quantize.py`, `--quantize int8`): the quantizer's error bound, the CPU
kernel's int8 products against float64 and against XLA's int8 product, what a quantized load
holds, generation through the kernel equal to XLA's int8 products, closeness to float32 (measured
next to bf16's), and the errors."""
import dataclasses
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_tts_jax import Qwen3TTS, checkpoint, cpu_kernels, quantize
from qwen3_tts_jax import generate as gen
from qwen3_tts_jax.config import load_config


def test_int8_quantizer_error_bound():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 40)).astype(np.float32) * rng.uniform(0.01, 3, 40)
    w[:, 3] = 0.0                                        # an all-zero column
    w[7, 5] = 50.0                                       # an outlier sets its column's scale
    q = quantize.quantize_int8(jnp.asarray(w))
    v, s = np.asarray(q.values), np.asarray(q.scale)
    assert v.dtype == np.int8 and s.dtype == np.float32 and v.shape == w.shape
    assert s.shape == (40,) and np.abs(v).max() == 127 and v.min() >= -127
    np.testing.assert_allclose(s, np.where(np.abs(w).max(0) > 0, np.abs(w).max(0) / 127, 1.0),
                               rtol=1e-6)
    err = np.abs(v.astype(np.float64) * s - w)
    assert np.all(err <= s / 2 * (1 + 1e-5))             # round to nearest: half a step
    assert np.all(v[:, 3] == 0)
    np.testing.assert_allclose(np.asarray(q.dequantize()), v * s, rtol=1e-6)


@pytest.mark.skipif(not cpu_kernels.available(), reason="kernel not built here")
@pytest.mark.parametrize("K,N", [(8, 16), (37, 48), (1024, 6144), (3072, 1024)])
def test_int8_kernel_matches_float64_and_xla(K, N):
    rng = np.random.default_rng(K + N)
    q = quantize.quantize_int8(jnp.asarray(rng.standard_normal((K, N), dtype=np.float32) * 0.05))
    deq = np.asarray(q.values, np.float64) * np.asarray(q.scale, np.float64)
    packed = cpu_kernels.pack(q)
    assert isinstance(packed, cpu_kernels.PackedInt8Weight) and packed.shape == (K, N)
    kernel, xla = jax.jit(cpu_kernels.linear), jax.jit(quantize.matmul)
    # every row tile: one tile (1-6 rows) widens in it, two tiles (7-12) widen in each, three
    # or more (13+) widen the panel once into a float32 copy
    rows = [1, 2, 5, 6, 7, 8, 12, 13, 19, 40] if K * N < 10**6 else [1, 8, 13]
    for M in rows:
        x = rng.standard_normal((M, K), dtype=np.float32) * 3.0
        got = np.asarray(kernel(jnp.asarray(x), packed))
        want = x.astype(np.float64) @ deq
        bound = np.abs(x.astype(np.float64)) @ np.abs(deq)
        assert got.shape == (M, N) and got.dtype == np.float32
        assert np.all(np.abs(got - want) <= 4 * np.finfo(np.float32).eps * np.sqrt(K) * bound
                      + 1e-30), (M, np.abs(got - want).max())
        other = np.asarray(xla(jnp.asarray(x), q))
        assert np.all(np.abs(other - want) <= 4 * np.finfo(np.float32).eps * np.sqrt(K) * bound
                      + 1e-30), (M, np.abs(other - want).max())
    # past LIBRARY_ROWS: XLA's product over the unpacked int8 weight
    x = jnp.asarray(rng.standard_normal((cpu_kernels.LIBRARY_ROWS, K), dtype=np.float32))
    assert "ffi_call" not in str(jax.make_jaxpr(cpu_kernels.linear)(x, packed))
    np.testing.assert_allclose(np.asarray(kernel(x, packed)), np.asarray(xla(x, q)), rtol=1e-4,
                               atol=1e-4 * float(np.abs(np.asarray(xla(x, q))).max()))


def _kinds(params):
    return {type(v).__name__ for part in ("talker", "code_predictor")
            for lp in params[part]["layers"] for sub in ("attn", "mlp") for v in lp[sub]._asdict().values()}


def test_quantized_load_and_kernel_codes_equal_xla(make_checkpoint):
    from qwen3_tts_jax.options import Options

    path = make_checkpoint("cv_identity_0b6")
    # float32 activations: the kernel whose arithmetic XLA's int8 product has too
    tts = Qwen3TTS.from_pretrained(path, quantize="int8",
                                   options=Options.for_backend(int8_activations="float"))
    cfg = load_config(path)
    xla = dataclasses.replace(tts.options, cpu_kernels=False)
    plain = checkpoint.pack_for_inference(checkpoint.load_params(path, cfg), quantize="int8",
                                          options=xla)
    assert _kinds(plain) == {"Int8Weight", "ArrayImpl"}
    lp = plain["talker"]["layers"][0]
    assert set(k for k, v in {**lp["attn"]._asdict(), **lp["mlp"]._asdict()}.items()
               if isinstance(v, quantize.Int8Weight)) == {"qkv", "o", "gate_up", "down"}
    # norms, embeddings and the heads stay float32
    assert plain["talker"]["codec_head"].dtype == jnp.float32
    assert lp["attn"].q_norm.dtype == jnp.float32
    if cpu_kernels.available():
        assert "PackedInt8Weight" in _kinds(tts.params)
    kw = dict(text=["Hello there, a test of int8.", "Short."], speaker=["ryan", "vivian"],
              max_new_tokens=20)
    for sampled in (dict(do_sample=False, subtalker_dosample=False), dict(seed=[3, 4])):
        batch, settings, keys = tts.prepare_custom_voice(**kw, **sampled)
        a = gen.generate(tts.params, cfg, batch, settings, keys, max_frames=20,
                         options=tts.options)
        b = gen.generate(plain, cfg, batch, settings, keys, max_frames=20, options=xla)
        assert np.array_equal(np.asarray(a.length_B), np.asarray(b.length_B))
        assert np.array_equal(np.asarray(a.codes_BxFxG), np.asarray(b.codes_BxFxG)), sampled


def _prefill_logits(tts, mode, kw):
    batch, settings, keys = getattr(tts, f"prepare_{mode}")(**kw)
    state, _ = gen.prefill(tts.params, tts.config, batch, settings, keys, frames=16,
                           options=tts.options)
    return np.asarray(state.logits_BxV[:2, :2048], np.float64)


@pytest.mark.parametrize("name,mode,voice", [
    ("cv_proj", "custom_voice", dict(speaker=["ryan", "vivian"])),
    ("vd_bigvocab", "voice_design", dict(instruct=["A calm voice.", "Fast and bright."]))])
def test_int8_close_to_float32(make_checkpoint, name, mode, voice):
    """The measure: the talker's prefill logits, error over their spread (as
    tests/test_api.py::test_bf16_close_to_f32), next to bf16's error on the same checkpoint; and
    the first frame's code 0. Greedy frames
    after a near-tie flips diverge whatever the error (random tiny models have many)."""
    path = make_checkpoint(name)
    f32 = Qwen3TTS.from_pretrained(path, jnp.float32)
    q8 = Qwen3TTS.from_pretrained(path, jnp.float32, quantize="int8")
    bf16 = Qwen3TTS.from_pretrained(path, jnp.bfloat16)
    kw = dict(text=["Hello world. This is a tiny test.", "Hi."], do_sample=False,
              subtalker_dosample=False, max_new_tokens=17, **voice)
    ref = _prefill_logits(f32, mode, kw)
    err8 = np.abs(_prefill_logits(q8, mode, kw) - ref).max() / ref.std()
    err16 = np.abs(_prefill_logits(bf16, mode, kw) - ref).max() / ref.std()
    print(f"{name}: prefill logits error / spread: int8 {err8:.4f}, bf16 {err16:.4f}")
    assert 0 < err8 < 0.1, err8
    a = getattr(f32, f"generate_{mode}_codes")(**kw)
    b = getattr(q8, f"generate_{mode}_codes")(**kw)
    for x, y in zip(a, b):
        assert x[0, 0] == y[0, 0]


def test_bad_quantize_is_a_clear_error(make_checkpoint):
    path = make_checkpoint("cv_proj")
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        Qwen3TTS.from_pretrained(path, quantize="int4")
    r = subprocess.run([sys.executable, "-m", "qwen3_tts_jax.cli", "custom-voice", "--model",
                        path, "--quantize", "fp4", "--text", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "--quantize" in r.stderr and "fp4" in r.stderr


def test_int8_under_bf16_activations(make_checkpoint):
    """int8 weights with bf16 activations (what an accelerator runs): the products keep the
    activations' dtype on every path (the CPU kernel sums in float32 inside), and generation
    runs and starts like the float32-activation int8 model."""
    rng = np.random.default_rng(5)
    q = quantize.quantize_int8(jnp.asarray(rng.standard_normal((64, 32), dtype=np.float32)))
    x = jnp.asarray(rng.standard_normal((3, 64), dtype=np.float32)).astype(jnp.bfloat16)
    assert quantize.matmul(x, q).dtype == jnp.bfloat16
    if cpu_kernels.available():
        y = cpu_kernels.linear(x, cpu_kernels.pack(q))
        assert y.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(y, np.float32),
                                   np.asarray(quantize.matmul(x, q), np.float32), rtol=2e-2,
                                   atol=2e-2)
    path = make_checkpoint("cv_proj")
    kw = dict(text="Hello there, a test.", speaker="ryan", do_sample=False,
              subtalker_dosample=False, max_new_tokens=12)
    a = Qwen3TTS.from_pretrained(path, jnp.bfloat16, quantize="int8").generate_custom_voice_codes(
        **kw)[0]
    b = Qwen3TTS.from_pretrained(path, jnp.float32, quantize="int8").generate_custom_voice_codes(
        **kw)[0]
    assert len(a) > 0 and a[0, 0] == b[0, 0]


# ---------------------------------------------------------------------------------------------
# int8 activations (`Options.int8_activations="int8"`): the int8 x int8 kernel
# (`cpu_kernels.PackedInt8DotWeight`, kernels/cpu_kernels.cc `RowsMatmulInt8Dot`)

def int8_dot_reference(x, values, wscale, block):
    """The kernel's arithmetic in numpy: each row quantized per block of `block` k (0: the whole
    row), exact integer sums per block, then float32 in the kernel's order."""
    x = np.asarray(x, np.float32)
    values = np.asarray(values, np.int64)
    M, K = x.shape
    Kp = -(-K // 4) * 4
    blk = block or Kp
    out = np.zeros((M, values.shape[1]), np.float32)
    for lo in range(0, Kp, blk):
        xb = x[:, lo:min(lo + blk, K)]
        amax = np.abs(xb).max(axis=1)
        safe = np.where(amax > 0, amax, np.float32(1))
        inv = np.float32(127) / safe
        q = np.rint(np.clip(xb * inv[:, None], -127, 127)).astype(np.int64)
        q[amax == 0] = 0
        acc = q @ values[lo:lo + xb.shape[1]]                       # exact
        s = np.where(amax > 0, amax / np.float32(127), np.float32(0)).astype(np.float32)
        out = out + acc.astype(np.float32) * s[:, None]
    return out * np.asarray(wscale, np.float32)


needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="kernel not built here")


def platform_x86() -> bool:
    import platform
    return platform.machine() in ("x86_64", "AMD64", "i686")


def _int8_weight(rng, K, N):
    return quantize.quantize_int8(jnp.asarray(rng.standard_normal((K, N), dtype=np.float32)
                                              * 0.05))


def test_int8_dot_layout_roundtrip():
    rng = np.random.default_rng(3)
    q = _int8_weight(rng, 37, 48)
    p = cpu_kernels.pack(q, "int8", block=32)
    assert isinstance(p, cpu_kernels.PackedInt8DotWeight) and p.shape == (37, 48)
    assert p.panels.shape == (3, 10, 64) and p.panels.dtype == jnp.uint8 and p.block == 32
    v = np.asarray(q.values)
    # panels[p, g, 4 j + i] = values[4 g + i, 16 p + j] + 128
    assert int(p.panels[2, 5, 4 * 3 + 1]) == int(v[4 * 5 + 1, 32 + 3]) + 128
    assert np.all(np.asarray(p.panels[:, 9]).reshape(3, 16, 4)[:, :, 1:] == 128)  # K padding
    back = p.unpack()
    assert np.array_equal(back.values, q.values) and np.array_equal(back.scale, q.scale)
    # a pytree whose static fields (K, block) are part of the treedef
    assert len(jax.tree_util.tree_leaves(p)) == 2
    assert (jax.tree_util.tree_structure(p) !=
            jax.tree_util.tree_structure(cpu_kernels.pack(q, "int8", block=64)))


@needs_kernels
@pytest.mark.parametrize("K,N", [(8, 16), (37, 48), (100, 32), (1024, 6144), (3072, 1024)])
def test_int8_dot_kernel_equals_reference_on_every_path(K, N):
    """Every instruction path this CPU has (scalar always; AVX2, AVX-512 VNNI from CPUID) gives
    exactly the numpy model of the quantized arithmetic, for every row tile and block size."""
    paths = cpu_kernels.int8_paths()
    assert "scalar" in paths
    rng = np.random.default_rng(K * N)
    q = _int8_weight(rng, K, N)
    rows = [1, 2, 3, 4, 5, 7, 8, 9, 13, 17, 40] if K * N < 10**6 else [1, 3, 8, 11]
    for block in (32, 64, 0):
        packed = cpu_kernels.pack(q, "int8", block=block)
        f = {p: jax.jit(functools.partial(cpu_kernels.linear, path=p)) for p in ("auto", *paths)}
        for M in rows:
            x = rng.standard_normal((M, K), dtype=np.float32) * rng.uniform(0.1, 10, (M, 1))
            x[0, :min(K, 40)] = 0.0                     # an all-zero block
            x = x.astype(np.float32)
            want = int8_dot_reference(x, q.values, q.scale, block)
            for p, fn in f.items():
                got = np.asarray(fn(jnp.asarray(x), packed))
                assert got.shape == (M, N) and got.dtype == np.float32
                assert np.array_equal(got, want), (p, block, M, np.abs(got - want).max())
    # and close to the float64 product of the int8 weights (per-block activation rounding)
    x = rng.standard_normal((4, K), dtype=np.float32)
    deq = np.asarray(q.values, np.float64) * np.asarray(q.scale, np.float64)
    got = np.asarray(cpu_kernels.linear(jnp.asarray(x), cpu_kernels.pack(q, "int8")))
    exact = x.astype(np.float64) @ deq
    assert np.abs(got - exact).max() <= 0.02 * np.abs(exact).max()


@needs_kernels
def test_int8_dot_kernel_prefers_the_widest_path_and_propagates_nan():
    paths = cpu_kernels.int8_paths()
    rng = np.random.default_rng(7)
    q = _int8_weight(rng, 64, 32)
    packed = cpu_kernels.pack(q, "int8")
    x = rng.standard_normal((2, 64), dtype=np.float32)
    auto = np.asarray(cpu_kernels.linear(jnp.asarray(x), packed))
    assert np.array_equal(auto, np.asarray(cpu_kernels.linear(jnp.asarray(x), packed,
                                                              path=paths[-1])))
    x[1, 40] = np.nan
    y = np.asarray(cpu_kernels.linear(jnp.asarray(x), packed))
    assert np.all(np.isfinite(y[0])) and np.all(np.isnan(y[1]))


def test_int8_activations_option_picks_the_packing_and_the_program(make_checkpoint):
    """`Options.int8_activations` decides the int8 products' packing at load and, as a static
    field, the compiled program; the new path's greedy codes equal the float-activation int8
    path's for the first 12 frames of every row at least (a tiny random model has many
    near-ties; after the first flip the rows go their own ways)."""
    from qwen3_tts_jax.options import Options

    path = make_checkpoint("cv_identity_0b6")
    cfg = load_config(path)
    base = Options.for_backend("cpu")
    if not base.cpu_kernels:
        pytest.skip("kernel not built here")
    # the CPU default: int8 activations where the CPU has an integer dot path
    want = "int8" if {"avx2", "avx512vnni"} & set(cpu_kernels.int8_paths()) else "float"
    assert base.int8_activations == want
    old = dataclasses.replace(base, int8_activations="float")
    new = dataclasses.replace(base, int8_activations="int8")
    assert old != new and hash(old) != hash(new)
    p_old = checkpoint.pack_for_inference(checkpoint.load_params(path, cfg), quantize="int8",
                                          options=old)
    p_new = checkpoint.pack_for_inference(checkpoint.load_params(path, cfg), quantize="int8",
                                          options=new)
    assert "PackedInt8Weight" in _kinds(p_old) and "PackedInt8DotWeight" not in _kinds(p_old)
    assert "PackedInt8DotWeight" in _kinds(p_new) and "PackedInt8Weight" not in _kinds(p_new)
    # float32 weights are packed the same whatever the field
    p_f32 = checkpoint.pack_for_inference(checkpoint.load_params(path, cfg), options=new)
    assert "PackedWeight" in _kinds(p_f32) and "PackedInt8DotWeight" not in _kinds(p_f32)

    tts = Qwen3TTS.from_pretrained(path, quantize="int8", options=new)
    assert "PackedInt8DotWeight" in _kinds(tts.params)
    kw = dict(text=["Hello there, a test of int8 activations.", "Short one."],
              speaker=["ryan", "vivian"], max_new_tokens=41, do_sample=False,
              subtalker_dosample=False)
    batch, settings, keys = tts.prepare_custom_voice(**kw)
    lowered = {name: gen.prefill.lower(params, cfg, batch, settings, keys, frames=16,
                                       options=opts).as_text()
               for name, params, opts in (("old", p_old, old), ("new", p_new, new))}
    assert cpu_kernels.TARGET_INT8_DOT in lowered["new"]
    assert cpu_kernels.TARGET_INT8_DOT not in lowered["old"]
    assert cpu_kernels.TARGET_INT8 in lowered["old"]
    a = gen.generate(p_old, cfg, batch, settings, keys, max_frames=40, options=old)
    b = gen.generate(p_new, cfg, batch, settings, keys, max_frames=40, options=new)
    n = np.minimum(np.asarray(a.length_B), np.asarray(b.length_B))
    assert n.min() >= 20
    for row in range(len(n)):
        ca = np.asarray(a.codes_BxFxG)[row, :n[row]]
        cb = np.asarray(b.codes_BxFxG)[row, :n[row]]
        same = np.all(ca == cb, axis=-1)                 # (F,): all 16 codes equal
        first = int(np.argmin(same)) if not same.all() else len(same)
        print(f"row {row}: old vs new int8 path: first difference at frame {first}, "
              f"{same.sum()} of {len(same)} frames equal, {(ca == cb).mean():.3f} of codes")
        # measured: rows part at frames 19 and 23 of 40, after which the random model's
        # near-ties make every later frame differ
        assert first >= 12, (row, first)


GENERIC_BUILD = """
import sys
sys.path.insert(0, sys.argv[1])
from qwen3_tts_jax import cpu_kernels
cpu_kernels.FLAGS = [f if f != "-march=native" else "-march=x86-64" for f in cpu_kernels.FLAGS]
import numpy as np, jax.numpy as jnp
from test_quantize import int8_dot_reference, _int8_weight
assert cpu_kernels.available()
rng = np.random.default_rng(5)
q = _int8_weight(rng, 100, 48)
packed = cpu_kernels.pack(q, "int8")
x = rng.standard_normal((9, 100), dtype=np.float32)
want = int8_dot_reference(x, q.values, q.scale, cpu_kernels.ACT_BLOCK)
for p in cpu_kernels.int8_paths():
    assert np.array_equal(np.asarray(cpu_kernels.linear(jnp.asarray(x), packed, path=p)), want), p
print(",".join(cpu_kernels.int8_paths()))
"""


@needs_kernels
@pytest.mark.skipif(not platform_x86(), reason="x86 paths")
def test_int8_paths_are_picked_at_run_time_in_a_generic_build(tmp_path):
    """Built for the baseline x86-64 (no AVX at compile time), the library still finds and runs
    the AVX2 and VNNI paths this CPU has (function target attributes, CPUID at run time)."""
    import os

    r = subprocess.run([sys.executable, "-c", GENERIC_BUILD, os.path.dirname(__file__)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HOME=str(tmp_path), JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].split(",") == list(cpu_kernels.int8_paths())
