"""The Pallas decode kernels (`decode_kernels.py`; `Options.predictor_kernels`, `talker_kernels`):
the decoder stack's one-position step against XLA's `layers.decoder_layer` (the predictor's, and
the talker's over a cache of the batch's rows with left-padded rows), the predictor's logits and
whole greedy generations against the official code, what the kernels leave to XLA or refuse, and
the kernels lowered for CUDA (Triton IR) at the released widths.

On a GPU (JAX_PLATFORMS=cuda) the stack tests run the compiled kernels; elsewhere the interpreter.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from official import GREEDY, load_official, official_codes, with_options
from qwen3_tts_jax import code_predictor, layers, decode_kernels as dk, quantize
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


def _run_both(D, F, H, K, Dh, L, rows, index, dtype, quantized=False, split=0, S=16,
              starts=None, parts=1):
    """(XLA's hidden and caches, the kernels' hidden and caches) for one step at `index` after a
    prefill of `index` positions. `quantized`: int8 weights (XLA's side: `quantize.matmul`).
    starts None: the code predictor's step (caches of `ROWS` rows, rows >= `rows` zero padding,
    every slot attended, one RoPE row); else the talker's: caches of `rows` rows, row r left-padded
    up to slot starts[r] (masked, positions counted from it), a RoPE row each."""
    cfg, lps, rnd = _stack(D, F, H, K, Dh, L, dtype)
    if quantized:
        lps = [quantize.quantize_layer(lp, "int8") for lp in lps]
    R = dk.ROWS
    C = R if starts is None else rows
    pad = lambda a, n=R, v=0: jnp.pad(a, [(0, n - a.shape[0])] + [(0, 0)] * (a.ndim - 1),
                                      constant_values=v)
    start = jnp.zeros((C,), jnp.int32) if starts is None else jnp.asarray(starts, jnp.int32)
    slots = jnp.arange(S)
    caches = layers.init_cache(cfg, C, S, dtype, POSITIONS)
    p = {"layers": lps, "norm": jnp.ones((D,), dtype)}
    mask = ((slots[None, None, :] <= jnp.arange(index)[None, :, None])
            & (slots[None, None, :] >= start[:, None, None]))
    pos = jnp.maximum(jnp.arange(index)[None, :] - start[:, None], 0)
    _, caches = layers.transformer(p, pad(rnd((rows, index, D), 1.0), C), pos, caches, 0, mask,
                                   cfg, POSITIONS)
    x = pad(rnd((rows, D), 1.0), C)
    cos_sin = layers.transformer_rope((index - start)[:, None], cfg, dtype)
    want, want_caches = x[:, None], []
    for lp, c in zip(lps, caches):
        want, c = layers.decoder_layer(lp, want, cos_sin, c, index,
                                       ((slots <= index) & (slots >= start[:, None]))[:, None],
                                       cfg, POSITIONS)
        want_caches.append(c)
    if starts is None:   # one RoPE row for all (the predictor's)
        cos, sin = (a[0, :1] for a in cos_sin)
    else:
        cos, sin = (pad(a[:, 0]) for a in cos_sin)
    t = dk.tiles(cfg, dk.DEFAULT_TILES[:5] + (split, parts))
    assert t["split"] == split and t["parts"] == parts
    assert dk.why_not(lps, cfg, rows, jnp.dtype(dtype), "positions") is None
    got, got_caches = jax.jit(lambda x, c: dk.decoder_stack(
        lps, x, index, c, cos, sin, pad(start, v=index), cfg, rows, t, interpret=INTERPRET))(
            pad(x), caches)
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


@pytest.mark.parametrize("rows, S, index, starts, split, parts, quantized", [
    (1, 40, 33, [5], 0, 1, False), (3, 48, 41, [0, 7, 22], 0, 1, False),
    (5, 24, 17, [3, 0, 9, 16, 1], 2, 1, False), (2, 40, 30, [4, 11], 0, 1, True),
    (16, 32, 20, list(range(16)), 0, 1, False),
    (3, 64, 57, [2, 19, 40], 2, 3, False), (1, 40, 9, [1], 1, 4, False),
    (2, 48, 44, [0, 5], 2, 2, True)])
def test_talker_step_equals_xla_float32(rows, S, index, starts, split, parts, quantized):
    """The talker's step: a cache of the batch's rows only (fewer than the kernels' 16: masked
    loads and stores), longer than one attention chunk, each row left-padded to its own start
    slot (masked) with its own RoPE position - XLA's step up to float32 rounding; with slot parts
    (each head's attention over shares of the cache, combined), some parts empty for some rows or
    for all."""
    want, want_c, got, got_c = _run_both(64, 128, 4, 2, 32, 2, rows, index, jnp.float32,
                                         quantized=quantized, split=split, S=S, starts=starts,
                                         parts=parts)
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


@pytest.mark.parametrize("tiles", [(), dk.DEFAULT_TILES[:5] + (2,)])
@pytest.mark.parametrize("name, talker_too", [("cv_kernels", False), ("cv_kernels_talker", True)])
def test_greedy_codes_equal_official(models, name, talker_too, tiles):
    """Whole generations, one row and a batch of four prompts of different lengths, the
    predictor's steps unrolled as on accelerators, the attention block in one kernel and in two:
    the official greedy codes. `talker_too`: the talker's frame steps through the kernels as well
    (`Options.talker_kernels`: each row's own left padding and RoPE positions)."""
    from qwen3_tts_jax import talker
    more = dict(talker_kernels=MODE, talker_tiles=tiles) if talker_too else {}
    off, ours = _kernels(models, name, unroll_predictor=True, predictor_tiles=tiles, **more)
    assert (talker.kernel_tiles(ours.params["talker"], ours.config.talker, 4, jnp.float32,
                                ours.options) is not None) == talker_too
    for kw in [dict(text="Hello there.", speaker="Ryan", language="English"),
               dict(text=["Hi.", "A longer sentence, with more words in it.", "Third one", "x"],
                    speaker=["ryan", "vivian", "eric", "dylan"], language="auto")]:
        kw["max_new_tokens"] = 7
        ref = official_codes(off, "custom_voice", **kw, **GREEDY)
        got = ours.generate_custom_voice_codes(**kw, **GREEDY)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)


def test_engine_with_talker_kernels_equals_xla_offline(models):
    """The batching engine (the server's) with every step through the kernels: a request that
    starts in a running batch's freed row (its slots after the earlier request's, masked) and
    one that shares the batch from the start stream the audio XLA's offline generation gives."""
    import threading

    from qwen3_tts_jax.engine import BatchEngine, Job
    from qwen3_tts_jax.settings import GenerationSettings
    _, loaded = models("cv_kernels_talker")
    ours = with_options(loaded, talker_kernels=MODE)   # and predictor_kernels
    xla = with_options(loaded, predictor_kernels="xla")
    spec = {"A": ("Hello world. This is a test.", "ryan", 14), "B": ("Hi.", "vivian", 4),
            "C": ("The quick brown fox.", "eric", 9)}
    engine = BatchEngine(ours, max_batch_size=2, batch_window=0.01, chunk_frames=4,
                         first_chunk_frames=2, batch_buckets=(2,), min_prompt_bucket=48)
    out = {k: [] for k in spec}
    ended = {k: threading.Event() for k in spec}

    def emit_to(k):
        def emit(x):
            if x is None or isinstance(x, Exception):
                out[k].append(x)
                ended[k].set()
            else:
                out[k].append(np.asarray(x))
        return emit
    for k, (text, speaker, tokens) in spec.items():
        prompt = ours.custom_voice_prompts([text], speaker, "english", None, True)[0]
        settings = GenerationSettings.merge(ours.generate_defaults, max_new_tokens=tokens,
                                            **GREEDY)
        engine.submit(Job(prompt, settings, emit=emit_to(k), seed=1, stream=True))
    engine.start()
    try:
        assert all(e.wait(600) for e in ended.values())
    finally:
        engine.stop()
    assert engine.stats["joined"] >= 1 and engine.stats["errors"] == 0, engine.stats
    for k, (text, speaker, tokens) in spec.items():
        assert out[k][-1] is None, (k, out[k][-1])
        wave = np.concatenate(out[k][:-1])
        codes = xla.generate_custom_voice_codes(text, speaker=speaker, language="english",
                                                max_new_tokens=tokens, **GREEDY)
        ref = xla.decode(codes)[0][0]
        assert wave.shape == ref.shape, (k, wave.shape, ref.shape)
        np.testing.assert_allclose(wave, ref, atol=1e-5 + 1e-4 * np.abs(ref).max(), err_msg=k)


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
    assert dk.why_not(lps, cfg, 16, f32, "positions") is None
    assert "17 rows" in dk.why_not(lps, cfg, 17, f32, "positions")
    assert "cache_layout 'heads'" in dk.why_not(lps, cfg, 1, f32, "heads")
    assert "hidden_act 'gelu'" in dk.why_not(lps, dataclasses.replace(cfg, hidden_act="gelu"), 1,
                                              f32, "positions")
    assert "head_dim 16" in dk.why_not(lps, dataclasses.replace(cfg, head_dim=16), 1, f32,
                                        "positions")
    assert "slot parts > 1 need an o split" in dk.why_not(lps, cfg, 1, f32, "positions",
                                                          (64, 32, 128, 4, 3, 0, 4))
    assert "widths 72/" in dk.why_not(lps, dataclasses.replace(cfg, hidden_size=72), 1, f32,
                                      "positions")
    assert dk.why_not([quantize.quantize_layer(lp, "int8") for lp in lps], cfg, 1, f32,
                      "positions") is None
    q4 = [quantize.quantize_layer(lp, "int4") for lp in lps]
    assert "Int4Weight" in dk.why_not(q4, cfg, 1, f32, "positions")
    assert "bfloat16" in dk.why_not(lps, cfg, 1, jnp.dtype(jnp.bfloat16), "positions")
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


@pytest.mark.parametrize("field, name, fields, why", [
    ("predictor_kernels", "cv_kernels", dict(), "code predictor: cache_layout 'heads'"),
    ("predictor_kernels", "cv_kernels", dict(cache_layout="positions", cpu_kernels=True),
     "code predictor: weights of type PackedWeight"),
    ("talker_kernels", "cv_kernels_talker", dict(), "talker: cache_layout 'heads'"),
    ("talker_kernels", "cv_kernels", dict(cache_layout="positions", cpu_kernels=False),
     "talker: head_dim 16"),
    ("talker_kernels", "cv_kernels_talker", dict(cache_layout="positions", cpu_kernels=True),
     "talker: weights of type PackedWeight")])
def test_a_model_the_kernels_cannot_run_is_refused_at_load(make_checkpoint, field, name, fields,
                                                           why):
    """Asking for the kernels where they can never run (not only for a call's rows) is a
    ValueError at load that names the part and the reason, not a silent XLA path."""
    from qwen3_tts_jax import Qwen3TTS
    with pytest.raises(ValueError, match=f"{field}='interpret' cannot run this model's {why}"):
        Qwen3TTS.from_pretrained(make_checkpoint(name),
                                 options=Options.for_backend(**{field: "interpret"}, **fields))


def test_kernels_with_model_parallel_are_refused(make_checkpoint):
    from qwen3_tts_jax import Qwen3TTS
    with pytest.raises(ValueError, match="talker_kernels='interpret' with model_parallel=2"):
        Qwen3TTS.from_pretrained(make_checkpoint("cv_kernels_talker"), model_parallel=2,
                                 options=Options.for_backend(talker_kernels="interpret",
                                                             cache_layout="positions",
                                                             cpu_kernels=False))


def test_auto_takes_the_kernels_where_they_run_on_an_nvidia_gpu(models, monkeypatch):
    """"auto" (the mode for a default): the kernels only on an NVIDIA GPU and only where they
    can run; elsewhere XLA's ops, never a refusal - here a CPU's default options (heads-major
    cache, weights packed for the CPU kernels), which "pallas" and "interpret" refuse at load."""
    from qwen3_tts_jax import Qwen3TTS, talker
    _, ours = _kernels(models, "cv_kernels")
    cfg = ours.config.talker.code_predictor
    lps = ours.params["code_predictor"]["layers"]
    f32 = jnp.dtype(jnp.float32)
    args = ("auto", "predictor_kernels", lps, cfg)
    if INTERPRET:
        assert not dk.on_nvidia_gpu()
        assert dk.plan(*args, 1, f32, "positions") is None        # not an NVIDIA GPU: XLA
    monkeypatch.setattr(dk, "on_nvidia_gpu", lambda: True)
    assert dk.plan(*args, 1, f32, "positions") == dk.tiles(cfg)   # "an NVIDIA GPU": the kernels
    assert dk.plan(*args, 17, f32, "positions") is None           # where they cover the call
    assert dk.plan(*args, 1, f32, "heads") is None
    dk.check("auto", "predictor_kernels", "the predictor", lps, cfg, f32, "heads")   # never refused
    monkeypatch.undo()
    if not INTERPRET:
        return                                    # the rest: a CPU's default options
    path = ours.folder
    auto = Options.for_backend(predictor_kernels="auto", talker_kernels="auto")
    loaded = Qwen3TTS.from_pretrained(path, options=auto)
    assert talker.kernel_tiles(loaded.params["talker"], loaded.config.talker, 1, jnp.float32,
                               loaded.options) is None
    assert loaded.decode_kernels() == {"predictor": "xla (auto: not an NVIDIA GPU)",
                                       "talker": "xla (auto: not an NVIDIA GPU)"}
    kw = dict(text="Hello there.", speaker="Ryan", language="English", max_new_tokens=6, **GREEDY)
    want = Qwen3TTS.from_pretrained(path).generate_custom_voice_codes(**kw)
    np.testing.assert_array_equal(loaded.generate_custom_voice_codes(**kw)[0], want[0])
    # what a model with the kernels asked for reports (the server's GET /health): the predictor
    # through them, this checkpoint's talker (a head_dim they do not take) on XLA's ops, named
    said = with_options(ours, talker_kernels=MODE).decode_kernels()
    assert said["predictor"] == f"{MODE}: batches of up to 16 rows (larger: xla)", said
    assert said["talker"].startswith("xla (head_dim 16 "), said
    with pytest.raises(ValueError, match="predictor_kernels='interpret' cannot run"):
        Qwen3TTS.from_pretrained(path, options=dataclasses.replace(auto,
                                                                   predictor_kernels="interpret"))


@pytest.mark.parametrize("field, value", [("predictor_kernels", "triton"),
                                          ("predictor_tiles", (128, 32)),
                                          ("predictor_tiles", (128, 32, 128, 4, 2)),
                                          ("predictor_tiles", (128, 32, 0, 4, 2, 0)),
                                          ("predictor_tiles", (128, 32, 128, 4, 2, -1)),
                                          ("talker_kernels", "cuda"),
                                          ("talker_tiles", (64, 32, 128, 4, 3, 0.5)),
                                          ("talker_tiles", (64, 32, 128, 4, 3, 2, 0)),
                                          ("talker_tiles", (64, 32, 128, 4, 3, 2, 2, 1))])
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
    caches = layers.init_cache(cfg, rows, 16, jnp.bfloat16, POSITIONS)   # the batch's rows
    t = dk.tiles(cfg, dk.DEFAULT_TILES[:5] + (split,))

    def step(lps, x, index, caches, cos, sin, start):
        return dk.decoder_stack(lps, x, index, caches, cos, sin, start, cfg, rows, t)
    exported = jax.export.export(jax.jit(step), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        lps, jnp.zeros((dk.ROWS, D), jnp.bfloat16), jnp.int32(3), caches,
        jnp.zeros((1, Dh), jnp.bfloat16), jnp.zeros((1, Dh), jnp.bfloat16),
        jnp.zeros((dk.ROWS,), jnp.int32))
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == (3 if split else 2) * L


@pytest.mark.parametrize("D, F, rows, quantized, split, parts", [
    (1024, 3072, 1, False, 0, 1), (2048, 6144, 2, False, 0, 1), (2048, 6144, 5, True, 0, 1),
    (1024, 3072, 1, False, 8, 1), (2048, 6144, 2, False, 8, 4)])
def test_talker_kernels_lower_for_cuda_at_released_widths(D, F, rows, quantized, split, parts):
    """The released talkers' widths (0.6B: 1024 / 3072, 1.7B: 2048 / 6144; 16 heads over 8,
    head_dim 128) with a cache of the batch's rows only and 512 slots, bf16 and int8, slot parts:
    Triton IR for CUDA (3 of the 28 layers; 2, 3 or 4 kernels a layer)."""
    L, H, K, Dh = 3, 16, 8, 128
    cfg, lps, _ = _stack(D, F, H, K, Dh, L, jnp.bfloat16)
    if quantized:
        lps = [quantize.quantize_layer(lp, "int8") for lp in lps]
    caches = layers.init_cache(cfg, rows, 512, jnp.bfloat16, POSITIONS)
    t = dk.tiles(cfg, dk.DEFAULT_TILES[:5] + (split, parts))
    assert dk.why_not(lps, cfg, rows, jnp.dtype(jnp.bfloat16), "positions") is None

    def step(lps, x, index, caches, cos, sin, start):
        return dk.decoder_stack(lps, x, index, caches, cos, sin, start, cfg, rows, t)
    exported = jax.export.export(jax.jit(step), platforms=["cuda"], disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        lps, jnp.zeros((dk.ROWS, D), jnp.bfloat16), jnp.int32(300), caches,
        jnp.zeros((dk.ROWS, Dh), jnp.bfloat16), jnp.zeros((dk.ROWS, Dh), jnp.bfloat16),
        jnp.zeros((dk.ROWS,), jnp.int32))
    per_layer = 2 + (split > 0) + (parts > 1)
    assert exported.mlir_module().count("__gpu$xla.gpu.triton") == per_layer * L


# -- rows split over several devices ---------------------------------------------------------------

DATA_PARALLEL = """
import dataclasses, json, sys
import jax, numpy as np
from qwen3_tts_jax import Qwen3TTS, decode_kernels
from qwen3_tts_jax.options import Options
assert len(jax.local_devices()) == 2, jax.local_devices()
opts = Options.for_backend(cpu_kernels=False, cache_layout="positions")
xla = Qwen3TTS.from_pretrained(sys.argv[1], options=opts)
ours = Qwen3TTS.from_pretrained(sys.argv[1], options=dataclasses.replace(opts,
    predictor_kernels="interpret", talker_kernels="interpret", unroll_predictor=True))
rows = []                                  # the rows (and cache rows) each kernel call saw
real = decode_kernels.decoder_stack
def spy(lps, x, index, caches, *a, **k):
    rows.append((a[-2], caches[0].k.shape[0]))
    return real(lps, x, index, caches, *a, **k)
decode_kernels.decoder_stack = spy
texts = ["Hi.", "A longer sentence, with more words in it.", "Third one", "x"]
speakers = ["ryan", "vivian", "eric", "dylan"]
items = xla.custom_voice_prompts(texts, speakers, "auto", None, True)
out = {}
for name, kw in [("greedy", dict(do_sample=False, subtalker_dosample=False)),
                 ("sampled", dict(seed=[1, 2, 3, 4]))]:
    want = xla.generate_prompts_codes(items, max_new_tokens=7, **kw)
    got = ours.generate_prompts_codes(items, pad_batch_to=2, max_new_tokens=7, **kw)
    out[name] = all(a.shape == b.shape and (a == b).all() for a, b in zip(want, got))
out["rows"] = sorted(set(rows))
# "auto" with the weights split over the two devices: XLA's ops (not refused), XLA's codes
tp = Qwen3TTS.from_pretrained(sys.argv[1], model_parallel=2, options=dataclasses.replace(
    opts, predictor_kernels="auto", talker_kernels="auto"))
greedy = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=7)
out["tp_auto"] = [tp.options.predictor_kernels, tp.options.talker_kernels, all(
    (a == b).all() for a, b in zip(xla.generate_prompts_codes(items, **greedy),
                                   tp.generate_prompts_codes(items, **greedy)))]

# What a GPU runs: the frame loop over the 2-device mesh exported for CUDA (Triton kernels)
import re
from qwen3_tts_jax import generate as gen, runner, sharding
from qwen3_tts_jax.settings import GenerationSettings
split, _ = sharding.data_sharding()
settings = GenerationSettings.merge(ours.generate_defaults, max_new_tokens=7, seed=5)
batch, st, ks = jax.device_put(runner.prepare(ours.config, ours.options, items, settings, 2),
                               split)
params = ours.replicated_params()
state, ctx = gen.prefill(params, ours.config, batch, st, ks, frames=16, options=ours.options)
# a device whose rows have all ended runs on with the other's (one frame count for the batch)
ended = state._replace(done_B=jax.device_put(np.array([True, True, False, False]), split))
again = jax.tree.map(lambda a: a.copy(), ended)                  # decode donates its state
ran = gen.decode(params, ours.config, ended, ctx, st, 5, ours.options, mesh=split.mesh)
one = gen.decode(params, ours.config, again, ctx, st, 5, ours.options)    # the loop unsplit
out["frames"] = [[int(r.step), np.asarray(r.length_B).tolist()] for r in (ran, one)]
opts = dataclasses.replace(ours.options, predictor_kernels="pallas", talker_kernels="pallas")
jax.default_backend = lambda: "gpu"        # the kernels' plan asks for a GPU
exported = jax.export.export(gen._decode_jit(None, split.mesh), platforms=["cuda"],
    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
    params, ours.config, state, ctx, st, 16, options=opts)
text = exported.mlir_module()
B, S, K, Dh = state.caches[0].k.shape
calls = [l for l in text.splitlines() if "__gpu$xla.gpu.triton" in l]
cache = lambda b: f"tensor<{b}x{S}x{K}x{Dh}xf32>"
out["exported"] = {"B": B, "calls": len(calls) > 0,
                   "manual": "manual_computation" in text or "SPMDFullToShardShape" in text,
                   "local": sum(cache(B // 2) in l for l in calls) > 0,
                   "global": sum(cache(B) in l for l in calls)}
print(json.dumps(out))
"""


def test_rows_split_over_devices_run_the_kernels_per_device(tmp_path, make_checkpoint):
    """A padded batch split over two devices (`pad_batch_to`, the batch tool's padded batches)
    with every decoder step through the kernels: each device's frame loop runs them on its own
    rows (`generate._decode_rows`, a `shard_map`; the kernels are custom calls XLA's partitioner
    cannot split), and the codes, greedy and sampled, are one device's XLA codes. Then the same
    frame loop exported for CUDA (Triton kernels), as a GPU would compile it."""
    import json
    import os
    import subprocess
    import sys
    script = tmp_path / "dp.py"
    script.write_text(DATA_PARALLEL)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    r = subprocess.run([sys.executable, str(script), make_checkpoint("cv_kernels_talker")],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # 4 prompts over 2 devices: the predictor's and the talker's calls see 2 rows, caches of 2
    # what a GPU runs: the frame loop exported for CUDA over the mesh has the Triton calls in the
    # shard_map's manual region, on one device's rows (the talker's caches of 2 rows, never 4)
    assert got.pop("exported") == {"B": 4, "calls": True, "manual": True, "local": True,
                                   "global": 0}
    # a device whose rows had ended ran as many frames as the other (one frame count for the
    # batch): the unsplit loop's frame count and lengths (whether a live row ends within the 5
    # frames depends on the random weights' codes, so the lengths are compared, not fixed)
    (step, lengths), unsplit = got.pop("frames")
    assert [step, lengths] == unsplit and lengths[:2] == [0, 0]
    assert step == max(lengths) > 0
    assert got.pop("tp_auto") == ["xla", "xla", True]     # "auto" with model_parallel: XLA's
    assert got == {"greedy": True, "sampled": True, "rows": [[2, 2]]}, got
