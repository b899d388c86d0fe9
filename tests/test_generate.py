"""Parity of the talker, code predictor, prompts and the jitted generation loop with the official
qwen-tts 0.1.1 (`Qwen3TTSForConditionalGeneration.generate`, `Qwen3TTSModel.generate_custom_voice`,
`generate_voice_design`) on tiny random checkpoints of several shapes, float32 on CPU."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from official import GREEDY, official_codes, with_options
from qwen3_tts_jax import code_predictor, generate as gen, layers, prompts, sampling, talker
from qwen3_tts_jax.buckets import ladder, power_of_two
from qwen3_tts_jax.options import CPU_DECODE_OPTIONS, Options

TEXTS = ["Hello world. This is a tiny test.", "Hi.", "The quick brown fox jumps over the lazy dog.",
         "Numbers 0123, 你好世界!", "Speak slowly\nand calmly.", "A", "Ünïcödé wörds?",
         "The lazy dog.", "привет мир."]
SPEAKERS = ["serena", "vivian", "uncle_fu", "ryan", "aiden", "ono_anna", "sohee", "eric", "dylan"]
LANGS = ["english", "auto", "chinese", "german", "auto", "japanese", "korean", "chinese", "auto"]


@pytest.fixture(scope="module")
def models(model_pair):
    return model_pair


def capture_official_inputs(off, fn):
    """Run `fn` and capture what the official generate passes to the talker."""
    seen = {}
    orig = off.model.talker.generate

    def spy(**kw):
        seen.update(kw)
        kw["max_new_tokens"] = 1
        return orig(**kw)

    off.model.talker.generate = spy
    try:
        with torch.no_grad():
            try:
                fn()
            except Exception:  # noqa: BLE001 - the wrapper may fail on the truncated output
                pass
    finally:
        off.model.talker.generate = orig
    return seen


@pytest.mark.parametrize("name", ["cv_proj", "cv_identity_0b6", "vd_bigvocab"])
@pytest.mark.parametrize("non_streaming", [True, False])
def test_prompt_embeddings_match_official(models, name, non_streaming):
    off, ours = models(name)
    if ours.tts_model_type == "custom_voice":
        kw = dict(text=TEXTS[:3], speaker=["ryan", "eric", "vivian"],
                  language=["english", "auto", "chinese"], instruct=["Speak slowly.", "", None])
        if ours.config.tts_model_size == "0b6":
            kw["instruct"] = None
        call = lambda: off.generate_custom_voice(non_streaming_mode=non_streaming, **kw, **GREEDY)
        items = ours.custom_voice_prompts(kw["text"], kw["speaker"], kw["language"],
                                           kw["instruct"], non_streaming)
    else:
        kw = dict(text=TEXTS[:2], instruct=["A warm female voice.", "Fast and loud."],
                  language=["english", "auto"])
        call = lambda: off.generate_voice_design(non_streaming_mode=non_streaming, **kw, **GREEDY)
        items = ours.voice_design_prompts(kw["text"], kw["instruct"], kw["language"],
                                           non_streaming)
    ref = capture_official_inputs(off, call)
    batch = prompts.batch_prompts(ours.config, items)
    emb = gen.embed_prompts(ours.params, ours.config, batch.text_BxL, batch.codec_BxLxG,
                            batch.extra_BxD, batch.extra_pos_B)
    want = ref["inputs_embeds"].numpy()
    assert emb.shape == want.shape
    np.testing.assert_array_equal(batch.mask_BxL, ref["attention_mask"].numpy().astype(bool))
    np.testing.assert_allclose(np.asarray(emb), want, atol=1e-5, rtol=0)
    trailing = talker.embed_text(ours.params["talker"], jnp.asarray(batch.trailing_BxLt))
    np.testing.assert_allclose(np.asarray(trailing), ref["trailing_text_hidden"].numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["cv_proj", "cv_identity_0b6", "vd_bigvocab"])
def test_talker_logits_prefill_and_decode_steps(models, name):
    """Raw talker logits at prefill and at the first decode steps equal HF's `output_logits`."""
    off, ours = models(name)
    captured = {}
    orig = off.model.talker.generate

    def spy(**kw):
        out = orig(**{**kw, "output_logits": True})
        captured["logits"] = [x.numpy() for x in out.logits]
        return out

    if ours.tts_model_type == "custom_voice":
        args = dict(text=TEXTS[:2], speaker=["ryan", "sohee"], language=["english", "auto"])
        items = ours.custom_voice_prompts(args["text"], args["speaker"], args["language"], None,
                                           True)
        fn = off.generate_custom_voice
    else:
        args = dict(text=TEXTS[:2], instruct="Deep voice.", language="english")
        items = ours.voice_design_prompts(args["text"], args["instruct"], args["language"], True)
        fn = off.generate_voice_design
    off.model.talker.generate = spy
    try:
        with torch.no_grad():
            fn(**args, max_new_tokens=6, **GREEDY)
    finally:
        off.model.talker.generate = orig
    B = len(items)
    batch = prompts.batch_prompts(ours.config, items, length=gen.bucket(max(map(len, items))))
    sp = sampling.SamplingParams.create(B, do_sample=False)
    settings = gen.Settings(sp, sp, jnp.full((B,), 1.05), jnp.full((B,), 6, jnp.int32))
    keys = jnp.stack([jax.random.PRNGKey(0)] * B)
    state, ctx = gen.prefill(ours.params, ours.config, batch, settings, keys, frames=16,
                             options=ours.options)
    for step, want in enumerate(captured["logits"]):
        if step:
            state = gen.decode(ours.params, ours.config, state, ctx, settings, step, ours.options)
        np.testing.assert_allclose(np.asarray(state.logits_BxV), want, atol=1e-4, rtol=0,
                                   err_msg=f"talker logits at step {step}")


@pytest.mark.parametrize("name", ["cv_proj", "cv_identity_0b6"])
def test_code_predictor_logits(models, name):
    """Our 15-step predictor vs the official `code_predictor.generate` (greedy, output_logits)."""
    off, ours = models(name)
    cfg = ours.config.talker
    rng = np.random.RandomState(0)
    B, D = 3, cfg.hidden_size
    hidden = rng.randn(B, D).astype(np.float32)
    code0 = rng.randint(0, 2048, B)
    tm = off.model.talker
    with torch.no_grad():
        emb0 = tm.get_input_embeddings()(torch.tensor(code0))
        out = tm.code_predictor.generate(
            inputs_embeds=torch.cat([torch.tensor(hidden)[:, None], emb0[:, None]], 1),
            max_new_tokens=15, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want_codes = out.sequences.numpy()
    want_logits = np.stack([x.numpy() for x in out.logits], 1)
    codes, logits = code_predictor.predict(
        ours.params["code_predictor"], cfg, jnp.asarray(hidden),
        talker.embed_codec(ours.params["talker"], jnp.asarray(code0)),
        lambda j, lg: jnp.argmax(lg, -1), ours.options)
    np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(codes), want_codes)


def _assert_same_codes(ours_codes, ref_codes):
    assert len(ours_codes) == len(ref_codes)
    for i, (a, b) in enumerate(zip(ours_codes, ref_codes)):
        assert a.shape == b.shape, f"item {i}: {a.shape} frames vs official {b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=f"item {i}")


@pytest.mark.parametrize("non_streaming", [True, False])
def test_greedy_codes_every_speaker_batch(models, non_streaming):
    """All 9 speakers, explicit/auto languages, dialect speakers, instruct on some rows, texts of
    different lengths in one batch (left padding)."""
    off, ours = models("cv_proj")
    instructs = ["Speak slowly.", "", "Angry!", "", "", "Whisper.", "", "", ""]
    kw = dict(text=TEXTS, speaker=SPEAKERS, language=LANGS, instruct=instructs,
              non_streaming_mode=non_streaming, max_new_tokens=12)
    ref = official_codes(off, "custom_voice", **kw, **GREEDY)
    _assert_same_codes(ours.generate_custom_voice_codes(**kw, **GREEDY), ref)


@pytest.mark.parametrize("name", ["cv_identity_0b6", "cv_eos"])
def test_greedy_codes_single_and_batched(models, name):
    off, ours = models(name)
    for kw in [dict(text=TEXTS[0], speaker="Ryan", language="English"),
               dict(text=TEXTS[2], speaker="eric", language=None, non_streaming_mode=False),
               dict(text=TEXTS[:4], speaker=["ryan", "vivian", "eric", "dylan"],
                    language=["english", "auto", "chinese", "auto"], instruct="Speak slowly.")]:
        kw["max_new_tokens"] = 40 if name == "cv_eos" else 10
        ref = official_codes(off, "custom_voice", **kw, **GREEDY)
        _assert_same_codes(ours.generate_custom_voice_codes(**kw, **GREEDY), ref)
    if name == "cv_eos":  # the checkpoint is built so that EOS ends rows at different frames
        assert len({len(c) for c in ref}) > 1 and max(len(c) for c in ref) < 39


def test_rope_cos_sin_of_config_variants(models):
    """The official rotary modules' cos/sin (talker: interleaved MRoPE with yarn and its attention
    factor; predictor: llama3) against ours at positions past the 64 the config names."""
    off, ours = models("cv_config_variants")
    pos = torch.arange(0, 200, 7)[None]
    x = torch.zeros(1, 1, dtype=torch.float32)
    for module, cfg, mrope in ((off.model.talker.model, ours.config.talker, True),
                               (off.model.talker.code_predictor.model,
                                ours.config.talker.code_predictor, False)):
        cos, sin = module.rotary_emb(x, pos.expand(3, 1, -1) if mrope else pos)
        if mrope:   # (3, B, T, Dh): the three rows of equal positions are the same
            cos, sin = cos[0], sin[0]
        got = layers.transformer_rope(jnp.asarray(pos.numpy()), cfg, jnp.float32)
        np.testing.assert_allclose(np.asarray(got[0]), cos.numpy(), atol=2e-6)
        np.testing.assert_allclose(np.asarray(got[1]), sin.numpy(), atol=2e-6)


def test_greedy_codes_config_variants(models):
    """Config fields that released checkpoints leave at one value but the official code reads
    (tests/official.py "cv_config_variants": yarn and llama3 RoPE, GELU activations, a predictor
    config without num_code_groups, 64 positions that prompt + frames run past): same codes."""
    off, ours = models("cv_config_variants")
    t = ours.config.talker
    assert (t.max_position_embeddings, t.code_predictor.num_code_groups) == (64, 32)
    assert t.rope_scaling["rope_type"] == "yarn" and t.hidden_act == "gelu_pytorch_tanh"
    kw = dict(text=[TEXTS[0], TEXTS[2]], speaker=["ryan", "vivian"], language="english",
              max_new_tokens=60)
    ref = official_codes(off, "custom_voice", **kw, **GREEDY)
    assert max(len(c) for c in ref) > 40          # prompt (> 24) + frames: past 64 positions
    _assert_same_codes(ours.generate_custom_voice_codes(**kw, **GREEDY), ref)


@pytest.mark.parametrize("non_streaming", [True, False])
def test_greedy_codes_voice_design(models, non_streaming):
    off, ours = models("vd_bigvocab")
    kw = dict(text=TEXTS[:3], instruct=["A warm female voice.", "Deep and slow.", ""],
              language=["english", "auto", "french"], non_streaming_mode=non_streaming,
              max_new_tokens=10)
    ref = official_codes(off, "voice_design", **kw, **GREEDY)
    _assert_same_codes(ours.generate_voice_design_codes(**kw, **GREEDY), ref)


def _with(models, **fields):
    """`models` whose our-side models run with these option fields."""
    return lambda name: (models(name)[0], with_options(models(name)[1], **fields))


@pytest.mark.parametrize("name", ["cv_proj", "vd_bigvocab"])
def test_positions_major_cache_layout(models, name):
    """The accelerators' KV-cache layout on this CPU, whose default is heads-major: both layouts
    give the official numbers."""
    positions = _with(models, cache_layout="positions")
    assert isinstance(layers.init_cache(models(name)[1].config.talker, 1, 4, jnp.float32,
                                        positions(name)[1].options)[0], layers.KVCache)
    test_talker_logits_prefill_and_decode_steps(positions, name)
    test_code_predictor_logits(positions, "cv_proj")
    if name == "cv_proj":
        test_greedy_codes_single_and_batched(positions, "cv_eos")


@pytest.mark.parametrize("layout", ["heads", "positions"])
def test_cache_growth(models, layout):
    """A budget past the caches' first capacity (they grow twice): the official greedy codes, in
    both KV-cache layouts."""
    off, ours = _with(models, cache_layout=layout, first_frames=16)("cv_identity_0b6")
    assert gen.capacity(39, ours.options) == 16
    kw = dict(text=TEXTS[0], speaker="ryan", language="english", max_new_tokens=40)
    _assert_same_codes(ours.generate_custom_voice_codes(**kw, **GREEDY),
                       official_codes(off, "custom_voice", **kw, **GREEDY))


def test_cpu_default_cache_layout_is_heads_major(models):
    opts = models("cv_proj")[1].options
    assert opts == Options.for_backend("cpu") and opts.cache_layout == "heads"
    assert isinstance(layers.init_cache(models("cv_proj")[1].config.talker, 1, 4, jnp.float32,
                                        opts)[0], layers.KVCacheHeadsMajor)


def test_gpu_frame_defaults_together(models):
    """What an accelerator's frame runs by default (positions-major caches, the predictor's steps
    unrolled, sampler kinds without run-time dispatch, the pairwise k-th logit for top-k
    sampling, weights as arrays, two rows at least), on this CPU: the official logits and greedy
    codes, and the CPU defaults' sampled codes for the same seed."""
    from qwen3_tts_jax import Qwen3TTS

    cpu = Options.for_backend("cpu")
    assert (cpu.cache_layout, cpu.unroll_predictor, cpu.kth_by, cpu.specialize_sampler,
            cpu.runtime_dispatch, cpu.min_rows, cpu.attention) == (
        "heads", False, "top_k", False, True, 1, None)
    assert cpu.decode_compiler_options in (CPU_DECODE_OPTIONS, None)   # None: jaxlib refuses it
    assert Options.for_backend("cpu", dtype=jnp.bfloat16).decode_compiler_options is None
    gpu = Options.for_backend("gpu")
    assert gpu == Options(cache_layout="positions", unroll_predictor=True, kth_by="pairwise",
                          specialize_sampler=True, runtime_dispatch=False, cpu_kernels=False,
                          decode_compiler_options=None, attention=None, min_rows=2)
    assert Options.for_backend("tpu").min_rows == 1
    # host-side scheduling (not in the programs' key): the codec beside the frames on the CPU
    assert (cpu.codec_overlap, gpu.codec_overlap) == ("thread", "off")
    assert Options.for_backend("gpu", attention="cudnn").attention == "cudnn"

    _, on_cpu_model = models("cv_identity_0b6")
    kw = dict(text=TEXTS[:2], speaker="ryan", language="english", max_new_tokens=12, seed=5)
    on_cpu = on_cpu_model.generate_custom_voice_codes(**kw)
    as_gpu = dataclasses.replace(gpu, pairwise_max=1 << 40)   # pairwise for every batch here
    loaded = {}

    def as_on_gpu(name):
        if name not in loaded:
            off, ours = models(name)
            loaded[name] = off, Qwen3TTS.from_pretrained(ours.folder, options=as_gpu)
            assert isinstance(loaded[name][1].params["talker"]["layers"][0]["mlp"].down,
                              jax.Array)
        return loaded[name]

    test_talker_logits_prefill_and_decode_steps(as_on_gpu, "vd_bigvocab")
    test_code_predictor_logits(as_on_gpu, "cv_proj")
    test_greedy_codes_single_and_batched(as_on_gpu, "cv_eos")
    _, ours = as_on_gpu("cv_identity_0b6")
    for a, b in zip(ours.generate_custom_voice_codes(**kw), on_cpu):
        np.testing.assert_array_equal(a, b)


def test_options_are_part_of_the_program_key(models):
    """Options are static arguments: the same options reuse the compiled programs, other
    options compile their own (no cache clearing, no globals)."""
    _, ours = models("cv_proj")
    kw = dict(text="Hi.", speaker="ryan", max_new_tokens=4, **GREEDY)
    want = ours.generate_custom_voice_codes(**kw)
    before = gen.program_counts()
    ours.generate_custom_voice_codes(**kw)
    assert gen.program_counts() == before
    # a host-side choice (the codec beside the frames) is no part of the key
    host = "off" if ours.options.codec_overlap != "off" else "thread"
    with_options(ours, codec_overlap=host).generate_custom_voice_codes(**kw)
    assert gen.program_counts() == before
    other = with_options(ours, unroll_predictor=not ours.options.unroll_predictor)
    got = other.generate_custom_voice_codes(**kw)
    after = gen.program_counts()
    assert (after["prefill"], after["decode"]) == (before["prefill"] + 1, before["decode"] + 1)
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("field, value", [
    ("cache_layout", "rows"), ("kth_by", "sort"), ("attention", "flash"),
    ("unroll_predictor", 1), ("cpu_kernels", None), ("min_rows", 0), ("first_frames", 0),
    ("pairwise_max", -1), ("decode_compiler_options", [("x", [1])]),
    ("int8_activations", "int4"), ("codec_overlap", "stream")])
def test_invalid_option_is_named(field, value):
    with pytest.raises(ValueError, match=rf"Options\.{field}="):
        Options(**{field: value})
    with pytest.raises(ValueError, match=rf"Options\.{field}="):
        Options.for_backend("cpu", **{field: value})


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="no field.*'unroll'"):
        Options.for_backend("gpu", unroll=True)
    with pytest.raises(TypeError):
        Options(unroll=True)


def test_max_new_tokens_semantics(models):
    """frames = tokens - 1, like the official generate; 1 token (no frame: the official's
    generate fails on it) is refused by name."""
    _, ours = models("cv_proj")
    for m in (2, 5):
        out = ours.generate_custom_voice_codes("Hi.", "ryan", max_new_tokens=m, **GREEDY)
        assert out[0].shape == (m - 1, 16) and out[0].dtype == np.int32
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer in \[2, "):
        ours.generate_custom_voice_codes("Hi.", "ryan", max_new_tokens=1, **GREEDY)


def test_sampling_reproducible_per_seed(models):
    _, ours = models("cv_proj")
    kw = dict(text=["Hello world.", "Hi."], speaker="ryan", max_new_tokens=8)
    a = ours.generate_custom_voice_codes(**kw, seed=1)
    b = ours.generate_custom_voice_codes(**kw, seed=1)
    c = ours.generate_custom_voice_codes(**kw, seed=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(x.shape != y.shape or (x != y).any() for x, y in zip(a, c))
    # a row's samples do not depend on the rest of the batch when it has its own seed
    solo = ours.generate_custom_voice_codes("Hi.", "ryan", max_new_tokens=8, seed=[7])
    duo = ours.generate_custom_voice_codes(["Hello world.", "Hi."], "ryan", max_new_tokens=8,
                                           seed=[3, 7])
    np.testing.assert_array_equal(solo[0], duo[1])


def test_same_bucket_does_not_recompile(models):
    _, ours = models("cv_proj")
    ours.generate_custom_voice_codes("Hello world.", "ryan", max_new_tokens=6, **GREEDY)
    before = gen.program_counts()
    ours.generate_custom_voice_codes("The lazy dog.", "vivian", language="english",
                                     max_new_tokens=9, temperature=0.5, top_k=3, seed=4)
    assert gen.program_counts() == before


def test_layers_rope_is_plain_rope_of_official_mrope():
    """The talker's interleaved MRoPE with three equal position rows equals plain RoPE."""
    from qwen_tts.core.models.modeling_qwen3_tts import apply_multimodal_rotary_pos_emb

    rng = np.random.RandomState(0)
    B, H, T, Dh = 2, 3, 5, 16
    q = rng.randn(B, H, T, Dh).astype(np.float32)
    pos = np.stack([np.arange(T), np.arange(T) + 3])
    cos, sin = layers.rope_cos_sin(jnp.asarray(pos), Dh, 1e6, jnp.float32)
    c3 = torch.tensor(np.asarray(cos))[None].expand(3, -1, -1, -1)
    s3 = torch.tensor(np.asarray(sin))[None].expand(3, -1, -1, -1)
    want, _ = apply_multimodal_rotary_pos_emb(torch.tensor(q), torch.tensor(q), c3, s3, [4, 2, 2],
                                              True)
    got = layers.apply_rope(jnp.asarray(q.transpose(0, 2, 1, 3)), cos, sin)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1, 3), want.numpy(), atol=1e-6)


@pytest.mark.parametrize("layout", ["heads", "positions"])
def test_prefill_runs_only_the_positions_rows_use(models, layout):
    """A batch whose longest prompt sits low in its bucket (e.g. 33-40 positions in the bucket of
    48) prefills only the last `prefill_length` positions, into a cache of the full bucket: greedy
    codes still equal the official's, in both KV-cache layouts, with rows of different lengths."""
    from qwen3_tts_jax.buckets import fine, ladder

    off, ours = _with(models, cache_layout=layout)("cv_proj")
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    for k in range(1, len(words) + 1):  # the first text whose prompt is low in its bucket
        text = " ".join(words[:k]) + "."
        n = len(ours.custom_voice_prompts([text], "ryan", None, None, True)[0])
        if fine(n) < ladder(n):
            break
    else:
        pytest.fail("no text of these words has a prompt low in its bucket")
    kw = dict(text=[text, "Hi.", "The lazy dog."], speaker=["ryan", "vivian", "eric"],
              language=["english", "auto", "english"], max_new_tokens=12)
    batch = ours.prepare_custom_voice(**kw, **GREEDY)[0]
    assert gen.prefill_length(batch.mask_BxL) == fine(n) < batch.text_BxL.shape[1] == ladder(n)
    ref = official_codes(off, "custom_voice", **kw, **GREEDY)
    _assert_same_codes(ours.generate_custom_voice_codes(**kw, **GREEDY), ref)


# ------------------------------------------------------------- continuous batching: insert, shift
# (text, speaker, non-streaming text mode, settings, seed, max_new_tokens)
INSERT_REQUESTS = {
    "A": ("Hello world. This is a tiny test.", "ryan", False, "greedy", 0, 8),
    "B": ("Hi.", "vivian", True, "sampled", 1, 4),
    "C": ("The quick brown fox jumps over the lazy dog, twice.", "eric", False, "sampled", 2, 14),
    "D": ("A", "serena", True, "greedy", 3, 10),
}
INSERT_SAMPLED = dict(do_sample=True, temperature=0.8, top_k=5, top_p=0.9)
INSERT_GREEDY = dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0)


def insert_settings(reqs):
    rows = [INSERT_SAMPLED if r[3] == "sampled" else INSERT_GREEDY for r in reqs]
    col = lambda k: [row[k] for row in rows]
    params = sampling.SamplingParams.create(len(rows), do_sample=col("do_sample"),
                                            temperature=col("temperature"), top_k=col("top_k"),
                                            top_p=col("top_p"))
    return gen.Settings(params, params, jnp.full((len(rows),), 1.05, jnp.float32),
                        jnp.asarray([r[5] for r in reqs], jnp.int32))


def insert_prompt(tts, req):
    return tts.custom_voice_prompts([req[0]], req[1], "english", None, req[2])[0]


def insert_alone(tts, req, options):
    """The request generated by itself (its own buckets, one row)."""
    p = insert_prompt(tts, req)
    batch = prompts.batch_prompts(tts.config, [p], length=ladder(len(p)))
    state = gen.generate(tts.params, tts.config, batch, insert_settings([req]),
                         jax.random.PRNGKey(req[4])[None], req[5] - 1, options)
    return np.asarray(state.codes_BxFxG)[0, :int(state.length_B[0])]


@pytest.mark.parametrize("layout", ["heads", "positions"])
def test_inserted_rows_generate_what_they_generate_alone(model_pair, layout):
    """Rows A (8 tokens) and B (4) start together; C starts in B's row after B ended, D in A's
    row after A ended; then the batch forgets the frames before C started. Every request's codes
    equal its codes alone: greedy and sampled, streaming and non-streaming text modes, prompts of
    different lengths (padding) and budgets."""
    _, tts = model_pair("cv_proj")
    cfg, params = tts.config, tts.params
    opts = dataclasses.replace(tts.options, cache_layout=layout)
    items = {k: insert_prompt(tts, r) for k, r in INSERT_REQUESTS.items()}
    L = ladder(max(len(p) for p in items.values()))
    Lt = power_of_two(max(len(p.trailing) for p in items.values()))
    want = {k: insert_alone(tts, r, opts) for k, r in INSERT_REQUESTS.items()}
    assert [len(want[k]) for k in "ABCD"] == [7, 3, 13, 9]   # the budgets end every row

    rows = [INSERT_REQUESTS["A"], INSERT_REQUESTS["B"]]
    batch = prompts.batch_prompts(cfg, [items["A"], items["B"]], length=L, trailing_length=Lt)
    keys = jnp.stack([jax.random.PRNGKey(INSERT_REQUESTS[k][4]) for k in "AB"])
    state, ctx = gen.prefill(params, cfg, batch, insert_settings(rows), keys, frames=16,
                             options=opts)

    def take(state, ctx, row, name):
        rows[row] = INSERT_REQUESTS[name]
        one = prompts.batch_prompts(cfg, [items[name]], length=L, trailing_length=Lt)
        settings = insert_settings(rows)
        state, ctx = gen.insert(params, cfg, state, ctx, settings, row, one,
                                jax.random.PRNGKey(INSERT_REQUESTS[name][4]),
                                compute=gen.prefill_length(one.mask_BxL), options=opts)
        return state, ctx, settings

    got = {}
    state = gen.decode(params, cfg, state, ctx, insert_settings(rows), 5, opts)
    assert int(state.step) == 5 and bool(state.done_B[1]) and not bool(state.done_B[0])
    got["B"] = np.asarray(state.codes_BxFxG)[1, :int(state.length_B[1])]
    state, ctx, settings = take(state, ctx, 1, "C")
    assert int(ctx.first_frame_B[1]) == 5 and not bool(state.done_B[1])
    state = gen.decode(params, cfg, state, ctx, settings, 9, opts)
    assert int(state.step) == 9 and bool(state.done_B[0])
    got["A"] = np.asarray(state.codes_BxFxG)[0, :int(state.length_B[0])]
    state, ctx, settings = take(state, ctx, 0, "D")
    state, ctx = gen.shift(state, ctx, 5)
    assert int(state.step) == 4 and list(np.asarray(ctx.first_frame_B)) == [4, 0]
    state = gen.decode(params, cfg, state, ctx, settings, 16, opts)
    assert bool(jnp.all(state.done_B)) and int(state.step) == 13
    codes, first = np.asarray(state.codes_BxFxG), np.asarray(ctx.first_frame_B)
    lengths = np.asarray(state.length_B)
    got["C"] = codes[1, first[1]:first[1] + lengths[1]]
    got["D"] = codes[0, first[0]:first[0] + lengths[0]]
    for k in "ABCD":
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"request {k}")


def test_insert_refuses_other_buckets(model_pair):
    _, tts = model_pair("cv_proj")
    cfg, params = tts.config, tts.params
    p = insert_prompt(tts, INSERT_REQUESTS["A"])
    batch = prompts.batch_prompts(cfg, [p], length=ladder(len(p)))
    settings = insert_settings([INSERT_REQUESTS["A"]])
    state, ctx = gen.prefill(params, cfg, batch, settings, jax.random.PRNGKey(0)[None],
                             frames=16, options=tts.options)
    other = prompts.batch_prompts(cfg, [p], length=ladder(len(p)) * 2)
    with pytest.raises(ValueError, match="buckets"):
        gen.insert(params, cfg, state, ctx, settings, 0, other, jax.random.PRNGKey(0),
                   options=tts.options)
