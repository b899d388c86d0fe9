"""The bf16 path (the default on GPU/TPU) stays close to float32: the measure is the talker's
prefill logits (relative error against their spread) and how many greedy frames agree exactly."""
import jax.numpy as jnp
import numpy as np

from qwen3_tts_jax import Qwen3TTS, generate as gen


def test_bf16_close_to_f32(make_checkpoint):
    path = make_checkpoint("cv_proj")
    f32, bf16 = Qwen3TTS.from_pretrained(path, jnp.float32), Qwen3TTS.from_pretrained(path,
                                                                                        "bfloat16")
    assert bf16.params["talker"]["layers"][0]["attn"].qkv.dtype == jnp.bfloat16
    assert bf16.options.decode_compiler_options is None      # XLA's defaults for bf16
    kw = dict(text=["Hello world. This is a tiny test.", "Hi."], speaker=["ryan", "vivian"],
              do_sample=False, subtalker_dosample=False, max_new_tokens=17)
    logits = []
    for tts in (f32, bf16):
        batch, settings, keys = tts.prepare_custom_voice(**kw)
        state, _ = gen.prefill(tts.params, tts.config, batch, settings, keys, frames=16,
                               options=tts.options)
        logits.append(np.asarray(state.logits_BxV[:2, :2048]))
    err = np.abs(logits[1] - logits[0]).max() / logits[0].std()
    assert err < 0.1, f"bf16 prefill logits off by {err:.3f} of their spread"
    a, b = f32.generate_custom_voice_codes(**kw), bf16.generate_custom_voice_codes(**kw)
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        agree = np.argmax(np.any(x[:n] != y[:n], axis=1)) if (x[:n] != y[:n]).any() else n
        # greedy decoding amplifies any difference once a near-tie flips: require the first
        # frame's code 0 to agree and report the rest (see the issue note for measured values)
        assert x[0, 0] == y[0, 0]
        print(f"frames agreeing exactly before the first difference: {agree} of {n}")
