"""Greedy parity with the official qwen-tts 0.1.1 at the released 0.6B CustomVoice shapes (random
weights, float32, CPU): 20 frames of all 16 code groups identical, so the talker and the code
predictor are both covered at full width and depth, plus the first-step talker logits.

Slow (a 906M-parameter checkpoint is written, then each implementation loads it in turn, ~3.6 GB
each); run with `pytest -m slow tests/test_full_size.py`.

The checkpoint comes from the same builder as the tiny parity checkpoints (tests/official.py
`build_checkpoint`: the official classes and their own initialisation, torch seed 0; the text
tokenizer and the codec stay tiny) at the sizes of benchmarks/full_configs.py. The official init
(normal(0, 0.02) matrices, unit norms) keeps greedy decoding away from EOS, as in
benchmarks/bench_generate.py, so both run to the frame budget: max_new_tokens=21 gives 20 frames
(the official generate never predicts the codes of its last token)."""
import gc
import json
import os
import sys

import numpy as np
import pytest

from official import GREEDY, Spec, build_checkpoint, load_official, official_codes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
from full_configs import talker as full_talker_config  # noqa: E402

pytestmark = pytest.mark.slow

FRAMES = 20
TEXT = "The quick brown fox jumps over the lazy dog. Speak slowly and calmly."
PROMPT = dict(text=TEXT, speaker="ryan", language="english", non_streaming_mode=False)
FULL = full_talker_config("0b6", "custom_voice")
CP = FULL["code_predictor_config"]
FULL_0B6 = Spec(
    kind="custom_voice", size="0b6", hidden=FULL["hidden_size"], ffn=FULL["intermediate_size"],
    layers=FULL["num_hidden_layers"], heads=FULL["num_attention_heads"],
    kv_heads=FULL["num_key_value_heads"], head_dim=FULL["head_dim"],
    text_hidden=FULL["text_hidden_size"], text_vocab=FULL["text_vocab_size"],
    cp_hidden=CP["hidden_size"], cp_ffn=CP["intermediate_size"], cp_layers=CP["num_hidden_layers"],
    cp_heads=CP["num_attention_heads"], cp_kv_heads=CP["num_key_value_heads"],
    cp_head_dim=CP["head_dim"], seed=0,
    talker_extra=(("rope_scaling", FULL["rope_scaling"]),))   # the released [24, 20, 20] sections


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp("full") / "cv_0b6"), FULL_0B6)


def _official_greedy(path):
    """Greedy codes (FRAMES, 16) and the first-step (prefill) talker logits of the official
    model."""
    off = load_official(path)
    logits = {}
    orig = off.model.talker.generate

    def spy(**kw):
        out = orig(**{**kw, "output_logits": True})
        logits["first"] = out.logits[0].numpy()
        return out

    off.model.talker.generate = spy
    try:
        codes = official_codes(off, "custom_voice", **PROMPT, max_new_tokens=FRAMES + 1, **GREEDY)
    finally:
        off.model.talker.generate = orig
    return codes[0], logits["first"]


@pytest.fixture(scope="module")
def official_run(full_checkpoint):
    """The official results; its model is freed before ours is loaded."""
    out = _official_greedy(full_checkpoint)
    gc.collect()
    return out


@pytest.fixture(scope="module")
def ours(full_checkpoint, official_run):   # after the official run: one model in memory at a time
    import jax.numpy as jnp

    from qwen3_tts_jax import Qwen3TTS

    return Qwen3TTS.from_pretrained(full_checkpoint, dtype=jnp.float32)


def test_checkpoint_has_released_shapes(full_checkpoint):
    with open(os.path.join(full_checkpoint, "config.json")) as f:
        written = json.load(f)["talker_config"]
    for key, want in FULL.items():
        if key == "code_predictor_config":
            for k, v in want.items():
                assert written[key][k] == v, f"code_predictor_config.{k}"
        else:
            assert written[key] == want, key
    from safetensors import safe_open

    with safe_open(os.path.join(full_checkpoint, "model.safetensors"), "np") as f:
        n = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118
    assert abs(n - 905.8e6) < 0.05e6, n        # the released 0.6B-CustomVoice: 905.8 M


def test_greedy_codes_20_frames_identical(official_run, ours):
    ref, _ = official_run
    assert ref.shape == (FRAMES, 16), f"official stopped early: {ref.shape}"
    assert len(np.unique(ref[:, 0])) > 1, "degenerate random model: one code 0 for every frame"
    got, = ours.generate_custom_voice_codes(**PROMPT, max_new_tokens=FRAMES + 1, **GREEDY)
    assert got.shape == ref.shape
    diff = np.argwhere(got != ref)
    assert len(diff) == 0, (f"{len(diff)} codes differ, first at (frame, group) "
                            f"{tuple(diff[0])}: ours {got[tuple(diff[0])]} official "
                            f"{ref[tuple(diff[0])]}")


def test_first_step_talker_logits(official_run, ours):
    """Raw talker logits of the prefill (before the sampler's processing) within float32 noise."""
    import jax

    from qwen3_tts_jax import generate as gen

    _, want = official_run
    batch, settings, keys = ours.prepare_custom_voice(**PROMPT, max_new_tokens=FRAMES + 1,
                                                      **GREEDY)
    state, _ = gen.prefill(ours.params, ours.config, batch, settings, keys,
                           frames=gen.bucket(FRAMES), options=ours.options)
    got = np.asarray(jax.device_get(state.logits_BxV))[:1]
    assert got.shape == want.shape
    scale = float(np.abs(want).max())
    assert scale > 0.1, f"logits collapsed: max |logit| {scale}"
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, scale), rtol=0)
