"""The code predictor's Pallas kernels (`predictor_kernels.py`, `Options.predictor_kernels`): the
decoder stack's one-position step against XLA's `layers.decoder_layer`, the predictor's logits and
codes against the official code, what the kernels leave to XLA, and the kernels lowered for CUDA
(Triton IR) at the released widths.

On a GPU (JAX_PLATFORMS=cuda) the stack tests run the compiled kernels; elsewhere the interpreter.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from official import GREEDY, load_official, official_codes, with_options
from qwen3_tts_jax import code_predictor, layers, predictor_kernels as pk, quantize
from qwen3_tts_jax.config import TransformerConfig
from qwen3_tts_jax.options import Options

INTERPRET = jax.default_backend() != "gpu"
MODE = "interpret" if INTERPRET else "pallas"
POSITIONS = Options(cache_layout="positions")


def _stack(D, F, H, K, Dh, L, dtype, seed=0):
    cfg = TransformerConfig(D, F, L, H, K, Dh, 1e-6, 1e6)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16 * L))

    def rnd(shape, scale=0.05, offset=0.0):
        return (offset + scale * jax.random.normal(next(keys), shape)).astype(dtype)
    lps = [layers.pack_layer({
        "attn": {"q": rnd((D, H * Dh)), "k": rnd((D, K * Dh)), "v": rnd((D, K * Dh)),
                 "o": rnd((H * Dh, D)), "q_norm": rnd((Dh,), 0.1, 1.0),
                 "k_norm": rnd((Dh,), 0.1, 1.0)},
        "mlp": {"gate": rnd((D, F)), "up": rnd((D, F)), "down": rnd((F, D))},
        "input_norm": rnd((D,), 0.1, 1.0), "post_norm": rnd((D,), 0.1, 1.0)}) for _ in range(L)]
    return cfg, lps, rnd


def _run_both(D, F, H, K, Dh, L, rows, index, dtype, quantized=False, split=0):
    """(XLA's hidden and caches, the kernels' hidden and caches) for one step at `index` after a
    prefill of `index` positions; rows >= `rows` are zero padding. `quantized`: int8 weights
    (XLA's side: `quantize.matmul`)."""
    cfg, lps, rnd = _stack(D, F, H, K, Dh, L, dtype)
    if quantized:
        lps = [quantize.quantize_layer(lp, "int8") for lp in lps]
    R, S = pk.ROWS, 16
    pad = lambda a: jnp.pad(a, [(0, R - rows)] + [(0, 0)] * (a.ndim - 1))
    slots = jnp.arange(S)
    caches = layers.init_cache(cfg, R, S, dtype, POSITIONS)
    p = {"layers": lps, "norm": jnp.ones((D,), dtype)}
    mask = jnp.broadcast_to(slots[None, :] <= jnp.arange(index)[:, None], (R, index, S))
    _, caches = layers.transformer(p, pad(rnd((rows, index, D), 1.0)),
                                   jnp.broadcast_to(jnp.arange(index), (R, index)), caches, 0,
                                   mask, cfg, POSITIONS)
    x = pad(rnd((rows, D), 1.0))
    cos_sin = layers.transformer_rope(jnp.full((R, 1), index), cfg, dtype)
    want, want_caches = x[:, None], []
    for lp, c in zip(lps, caches):
        want, c = layers.decoder_layer(lp, want, cos_sin, c, index,
                                       jnp.broadcast_to(slots <= index, (R, 1, S)), cfg,
                                       POSITIONS)
        want_caches.append(c)
    cos, sin = (a[0] for a in layers.transformer_rope(slots[None], cfg, dtype))
    t = pk.tiles(cfg, pk.DEFAULT_TILES[:5] + (split,))
    assert t["split"] == split and pk.why_not(lps, cfg, rows, jnp.dtype(dtype), "positions") is None
    got, got_caches = jax.jit(lambda x, c: pk.decoder_stack(lps, x, index, c, cos, sin, cfg, rows,
                                                            t, interpret=INTERPRET))(x, caches)
    return (want[:rows, 0], [(c.k[:rows], c.v[:rows]) for c in want_caches],
            got[:rows], [(c.k[:rows], c.v[:rows]) for c in got_caches])


@pytest.mark.parametrize("rows, heads, kv_heads, index", [
    (1, 4, 2, 1), (3, 4, 4, 7), (16, 8, 2, 15), (5, 4, 1, 14)])
def test_stack_step_equals_xla_float32(rows, heads, kv_heads, index):
    """Rows 1..16, GQA ratios 1..4, the first and last steps: the kernels' hidden state and
    caches are XLA's up to the order of float32 additions."""
    want, want_c, got, got_c = _run_both(64, 128, heads, kv_heads, 32, 2, rows, index, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)
    for (wk, wv), (gk, gv) in zip(want_c, got_c):
        np.testing.assert_allclose(np.asarray(gk), np.asarray(wk), rtol=0, atol=2e-5)
        np.testing.assert_allclose(np.asarray(gv), np.asarray(wv), rtol=0, atol=2e-5)


@pytest.mark.parametrize("rows, heads, kv_heads, index, split", [
    (1, 4, 2, 1, 2), (16, 8, 2, 15, 4), (3, 4, 4, 6, 1)])
def test_split_attention_equals_xla_float32(rows, heads, kv_heads, index, split):
    """The attention block as two kernels (`qkv_heads`, then `attend_o` over the o product's
    column blocks): XLA's step too."""
    want, want_c, got, got_c = _run_both(64, 128, heads, kv_heads, 32, 2, rows, index,
                                         jnp.float32, split=split)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)
    for (wk, wv), (gk, gv) in zip(want_c, got_c):
        np.testing.assert_allclose(np.asarray(gk), np.asarray(wk), rtol=0, atol=2e-5)
        np.testing.assert_allclose(np.asarray(gv), np.asarray(wv), rtol=0, atol=2e-5)


@pytest.mark.parametrize("rows, index, split", [(1, 3, 0), (7, 12, 0), (2, 5, 2)])
def test_stack_step_int8_weights_equal_xla_int8(rows, index, split):
    """int8 weights (`quantize="int8"`): the kernels' int8 tiles and column scales give XLA's int8
    products (`quantize.matmul`) up to float32 rounding."""
    want, want_c, got, got_c = _run_both(64, 128, 4, 2, 32, 2, rows, index, jnp.float32,
                                         quantized=True, split=split)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)
    for (wk, wv), (gk, gv) in zip(want_c, got_c):
        np.testing.assert_allclose(np.asarray(gk), np.asarray(wk), rtol=0, atol=2e-5)
        np.testing.assert_allclose(np.asarray(gv), np.asarray(wv), rtol=0, atol=2e-5)


def test_stack_step_bfloat16_within_rounding():
    """In bfloat16 (the GPU's dtype) within a few units of bf16 rounding of XLA's: the kernels
    round a block's product and residual once instead of twice and take the online softmax."""
    want, want_c, got, got_c = _run_both(128, 256, 4, 2, 64, 3, 2, 5, jnp.bfloat16)
    w, g = np.asarray(want, np.float32), np.asarray(got, np.float32)
    scale = np.abs(w).max()
    assert np.abs(g - w).max() <= 4 * 2 ** -8 * scale
    assert np.mean(np.abs(g - w)) <= 2 ** -8 * np.mean(np.abs(w))
    for (wk, _), (gk, _) in zip(want_c, got_c):
        np.testing.assert_allclose(np.asarray(gk, np.float32), np.asarray(wk, np.float32),
                                   rtol=0, atol=4 * 2 ** -8 * float(jnp.abs(wk).max()))


# -- the predictor with the kernels, against the official code ----------------------------------

def _kernels(models, name, **more):
    off, ours = models(name)
    return off, with_options(ours, **more) if more else ours


@pytest.fixture(scope="module")
def models(make_checkpoint):
    """name -> (official, ours with the kernels), ours loaded without the CPU kernels' packed
    weights (which the Pallas kernels do not take)."""
    from qwen3_tts_jax import Qwen3TTS
    loaded = {}

    def get(name):
        if name not in loaded:
            options = Options.for_backend(cpu_kernels=False, cache_layout="positions",
                                          predictor_kernels=MODE)
            loaded[name] = (load_official(make_checkpoint(name)),
                            Qwen3TTS.from_pretrained(make_checkpoint(name), options=options))
        return loaded[name]
    return get


@pytest.mark.parametrize("name", ["cv_kernels", "cv_kernels_0b6"])
def test_predictor_logits_and_codes_equal_official(models, name):
    """`code_predictor.predict` with the kernels (steps 1..14 through them: the checkpoints'
    predictors are widths they cover) against the official `code_predictor.generate`."""
    import test_generate
    _, ours = models(name)
    assert code_predictor.kernel_tiles(ours.params["code_predictor"],
                                       ours.config.talker.code_predictor, 3, jnp.float32,
                                       ours.options) is not None
    test_generate.test_code_predictor_logits(models, name)


@pytest.mark.parametrize("tiles", [(), pk.DEFAULT_TILES[:5] + (2,)])
def test_greedy_codes_equal_official(models, tiles):
    """Whole generations, one row and a batch of four, the predictor's steps unrolled as on
    accelerators, the attention block in one kernel and in two: the official greedy codes."""
    off, ours = _kernels(models, "cv_kernels", unroll_predictor=True, predictor_tiles=tiles)
    for kw in [dict(text="Hello there.", speaker="Ryan", language="English"),
               dict(text=["Hi.", "A longer sentence here.", "Third one", "x"],
                    speaker=["ryan", "vivian", "eric", "dylan"], language="auto")]:
        kw["max_new_tokens"] = 6
        ref = official_codes(off, "custom_voice", **kw, **GREEDY)
        got = ours.generate_custom_voice_codes(**kw, **GREEDY)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)


def test_int8_greedy_codes_equal_xla_int8(make_checkpoint):
    """With `quantize="int8"` (not the official codes) the kernels give XLA's int8 codes."""
    from qwen3_tts_jax import Qwen3TTS
    opts = Options.for_backend(cpu_kernels=False, cache_layout="positions")
    path = make_checkpoint("cv_kernels")
    xla = Qwen3TTS.from_pretrained(path, quantize="int8", options=opts)
    ours = with_options(xla, predictor_kernels=MODE)
    assert code_predictor.kernel_tiles(ours.params["code_predictor"],
                                       ours.config.talker.code_predictor, 4, jnp.float32,
                                       ours.options) is not None
    kw = dict(text=["Hi.", "A longer sentence here.", "Third one", "x"],
              speaker=["ryan", "vivian", "eric", "dylan"], language="auto", max_new_tokens=6,
              **GREEDY)
    for a, b in zip(ours.generate_custom_voice_codes(**kw), xla.generate_custom_voice_codes(**kw)):
        np.testing.assert_array_equal(a, b)


# -- what the kernels leave to XLA ----------------------------------------------------------------

def test_uncovered_calls_are_named_and_take_xla(models):
    """`why_not` names each reason; such calls run XLA's ops (the same codes as without)."""
    _, ours = _kernels(models, "cv_kernels")
    cfg = ours.config.talker.code_predictor
    lps = ours.params["code_predictor"]["layers"]
    f32 = jnp.dtype(jnp.float32)
    assert pk.why_not(lps, cfg, 16, f32, "positions") is None
    assert "17 rows" in pk.why_not(lps, cfg, 17, f32, "positions")
    assert "cache_layout 'heads'" in pk.why_not(lps, cfg, 1, f32, "heads")
    assert "hidden_act 'gelu'" in pk.why_not(lps, dataclasses.replace(cfg, hidden_act="gelu"), 1,
                                              f32, "positions")
    assert "head_dim 16" in pk.why_not(lps, dataclasses.replace(cfg, head_dim=16), 1, f32,
                                        "positions")
    assert "widths 72/" in pk.why_not(lps, dataclasses.replace(cfg, hidden_size=72), 1, f32,
                                      "positions")
    assert pk.why_not([quantize.quantize_layer(lp, "int8") for lp in lps], cfg, 1, f32,
                      "positions") is None
    q4 = [quantize.quantize_layer(lp, "int4") for lp in lps]
    assert "Int4Weight" in pk.why_not(q4, cfg, 1, f32, "positions")
    assert "bfloat16" in pk.why_not(lps, cfg, 1, jnp.dtype(jnp.bfloat16), "positions")
    kw = dict(text="Hello there.", speaker="Ryan", language="English", max_new_tokens=4, **GREEDY)
    heads = with_options(ours, cache_layout="heads")   # not covered: XLA's ops
    assert code_predictor.kernel_tiles(heads.params["code_predictor"], cfg, 1, jnp.float32,
                                   heads.options) is None
    np.testing.assert_array_equal(heads.generate_custom_voice_codes(**kw)[0],
                                  with_options(ours, predictor_kernels="xla")
                                  .generate_custom_voice_codes(**kw)[0])


@pytest.mark.skipif(not INTERPRET, reason="the GPU runs them")
def test_pallas_off_gpu_is_refused(models, make_checkpoint):
    _, ours = _kernels(models, "cv_kernels")
    with pytest.raises(ValueError, match="predictor_kernels='pallas' needs an NVIDIA GPU"):
        with_options(ours, predictor_kernels="pallas").generate_custom_voice_codes(
            text="Hi.", speaker="Ryan", language="English", max_new_tokens=2, **GREEDY)
    from qwen3_tts_jax import Qwen3TTS
    with pytest.raises(ValueError, match="predictor_kernels='pallas' needs an NVIDIA GPU"):
        Qwen3TTS.from_pretrained(make_checkpoint("cv_kernels"), options=Options.for_backend(
            cpu_kernels=False, cache_layout="positions", predictor_kernels="pallas"))


@pytest.mark.parametrize("fields, why", [
    (dict(), "cache_layout 'heads'"),                          # the CPU's defaults
    (dict(cache_layout="positions", cpu_kernels=True), "PackedWeight")])
def test_a_model_the_kernels_cannot_run_is_refused_at_load(make_checkpoint, fields, why):
    """Asking for the kernels where they can never run (not only for a call's rows) is a
    ValueError at load that names the reason, not a silent XLA path."""
    from qwen3_tts_jax import Qwen3TTS
    with pytest.raises(ValueError, match=f"cannot run this model's code predictor: .*{why}"):
        Qwen3TTS.from_pretrained(make_checkpoint("cv_kernels"),
                                 options=Options.for_backend(predictor_kernels="interpret",
                                                             **fields))


@pytest.mark.parametrize("field, value", [("predictor_kernels", "triton"),
                                          ("predictor_tiles", (128, 32)),
                                          ("predictor_tiles", (128, 32, 128, 4, 2)),
                                          ("predictor_tiles", (128, 32, 0, 4, 2, 0)),
                                          ("predictor_tiles", (128, 32, 128, 4, 2, -1))])
def test_invalid_kernel_options_are_named(field, value):
    with pytest.raises(ValueError, match=rf"Options\.{field}="):
        Options(**{field: value})


# -- lowered for CUDA ------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, quantized, split", [
    (1, False, 0), (2, False, 0), (16, False, 0), (1, True, 0), (2, False, 8), (1, True, 8)])
def test_kernels_lower_for_cuda_at_released_widths(rows, quantized, split):
    """The released predictor's widths (both sizes: 1024 wide, 3072 intermediate, 16 heads over
    8, head_dim 128, 5 layers) in bfloat16, and with int8 weights, lower to Triton IR for CUDA,
    two kernels a layer, three with the attention split (on this CPU: what a GPU compiles, short
    of PTX)."""
    D, F, H, K, Dh, L = 1024, 3072, 16, 8, 128, 5
    cfg, lps, _ = _stack(D, F, H, K, Dh, L, jnp.bfloat16)
    if quantized:
        lps = [quantize.quantize_layer(lp, "int8") for lp in lps]
    caches = layers.init_cache(cfg, pk.ROWS, 16, jnp.bfloat16, POSITIONS)
    t = pk.tiles(cfg, pk.DEFAULT_TILES[:5] + (split,))

    def step(lps, x, index, caches, cos, sin):
        return pk.decoder_stack(lps, x, index, caches, cos, sin, cfg, rows, t)
    exported = jax.export.export(jax.jit(step), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        lps, jnp.zeros((pk.ROWS, D), jnp.bfloat16), jnp.int32(3), caches,
        jnp.zeros((16, Dh), jnp.bfloat16), jnp.zeros((16, Dh), jnp.bfloat16))
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == (3 if split else 2) * L
