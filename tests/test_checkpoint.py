"""Configs, weight conversion and loading: official keys in, our pytree out, one error listing every
bad key, the fast-loading form (`qwen3-tts-jax convert`), hub ids offline."""
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qwen3_tts_jax import CheckpointError, Qwen3TTS, checkpoint, cpu_kernels
from qwen3_tts_jax.config import ConfigError, load_config, load_generation_defaults
from qwen3_tts_jax.convert import convert


def test_config_reads_official_values(make_checkpoint):
    path = make_checkpoint("cv_proj")
    cfg = load_config(path)
    raw = json.load(open(os.path.join(path, "config.json")))
    t = raw["talker_config"]
    assert cfg.talker.head_dim == t["head_dim"] and cfg.talker.hidden_size == t["hidden_size"]
    assert cfg.talker.code_predictor.hidden_size == t["code_predictor_config"]["hidden_size"]
    assert cfg.talker.has_mtp_projection
    assert cfg.tts_pad_token_id == raw["tts_pad_token_id"]
    assert cfg.speakers["eric"] == 2875 and cfg.talker.spk_is_dialect["eric"] == "sichuan_dialect"
    assert "beijing_dialect" not in cfg.languages and "auto" in cfg.languages
    assert hash(cfg)  # static jit argument
    assert load_generation_defaults(path).max_new_tokens == 8192


def test_head_dim_fallback_like_official(tmp_path, make_checkpoint):
    """Without head_dim in the json the official talker uses hidden // heads: so do we."""
    raw = json.load(open(os.path.join(make_checkpoint("cv_proj"), "config.json")))
    del raw["talker_config"]["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = load_config(str(tmp_path))
    assert cfg.talker.head_dim == cfg.talker.hidden_size // cfg.talker.num_attention_heads


def test_params_match_official_state_dict(make_checkpoint):
    path = make_checkpoint("cv_proj")
    cfg = load_config(path)
    params = checkpoint.load_params(path, cfg)
    sd = load_file(os.path.join(path, "model.safetensors"))
    np.testing.assert_array_equal(params["talker"]["layers"][1]["attn"]["q"],
                                  sd["talker.model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(params["code_predictor"]["lm_head"][14],
                                  sd["talker.code_predictor.lm_head.14.weight"].T)
    n_ours = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert n_ours == sum(v.size for v in sd.values())


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    sd = load_file(os.path.join(dst, "model.safetensors"))
    edit(sd)
    save_file(sd, os.path.join(dst, "model.safetensors"))
    return dst


def test_mismatched_checkpoint_lists_every_bad_key(tmp_path, make_checkpoint):
    def edit(sd):
        del sd["talker.codec_head.weight"]
        del sd["talker.model.layers.0.mlp.up_proj.weight"]
        sd["talker.model.norm.weight"] = np.ones(7, np.float32)
        sd["talker.extra.weight"] = np.ones(3, np.float32)

    path = _broken_copy(make_checkpoint("cv_proj"), str(tmp_path / "bad"), edit)
    with pytest.raises(CheckpointError) as e:
        Qwen3TTS.from_pretrained(path)
    msg = str(e.value)
    for key in ("talker.codec_head.weight", "talker.model.layers.0.mlp.up_proj.weight",
                "talker.model.norm.weight", "talker.extra.weight", "2 missing", "1 unexpected",
                "wrong shape"):
        assert key in msg


def test_corrupt_file_is_a_checkpoint_error(tmp_path, make_checkpoint):
    dst = str(tmp_path / "corrupt")
    shutil.copytree(make_checkpoint("cv_proj"), dst)
    with open(os.path.join(dst, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="corrupt|cannot read"):
        Qwen3TTS.from_pretrained(dst)


ROPE_CASES = [
    dict(rope_type="linear", factor=3.0),
    dict(rope_type="yarn", factor=4.0),
    dict(type="yarn", factor=16.0, original_max_position_embeddings=4096, beta_fast=16,
         beta_slow=2, truncate=False),
    dict(rope_type="yarn", factor=8.0, mscale=1.2, mscale_all_dim=0.8),
    dict(rope_type="yarn", factor=2.0, attention_factor=0.7),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),
    dict(rope_type="llama3", factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
         original_max_position_embeddings=512),
]


@pytest.mark.parametrize("head_dim,theta,max_pos", [(128, 1e6, 32768), (16, 1e4, 64),
                                                      (64, 5e5, 65536)])
def test_rope_frequencies_match_transformers(head_dim, theta, max_pos):
    """Every supported RoPE type, as transformers' initialisers compute it for the official model
    (inverse frequencies and the factor on cos/sin), over head sizes, bases and context lengths."""
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qwen3_tts_jax import layers
    from qwen3_tts_jax.config import rope_scaling_of

    for case in ROPE_CASES:
        hf = PretrainedConfig(rope_theta=theta, head_dim=head_dim, hidden_size=head_dim * 4,
                              num_attention_heads=4, max_position_embeddings=max_pos,
                              rope_scaling=dict(case))
        kind = case.get("rope_type", case.get("type"))
        ref_inv, ref_factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
        inv, factor = layers.rope_frequencies(head_dim, theta, rope_scaling_of(
            {"rope_scaling": case}, "t"), max_pos)
        np.testing.assert_allclose(np.asarray(inv), ref_inv.numpy(), rtol=2e-6, err_msg=str(case))
        assert factor == pytest.approx(ref_factor, rel=1e-12), case
        if kind != "linear":   # the scalings change frequencies: a no-op would fail here
            plain, _ = layers.rope_frequencies(head_dim, theta)
            assert not np.allclose(np.asarray(plain), np.asarray(inv)), case


def test_activations_match_transformers():
    import torch
    from transformers.activations import ACT2FN

    from qwen3_tts_jax.activations import ACTIVATIONS

    x = np.linspace(-12, 12, 2001, dtype=np.float32)
    for name, fn in ACTIVATIONS.items():
        ref = ACT2FN[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(fn(x)), ref, atol=2e-6, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("where,change,needle", [
    ("talker", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "'dynamic' is not"),
    ("talker", dict(rope_scaling={"rope_type": "longrope"}), "longrope"),
    ("cp", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks"),
    ("cp", dict(hidden_act="prelu"), "hidden_act 'prelu' is not supported"),
    ("talker", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ("cp", dict(num_code_groups=8), "num_code_groups (8) is below the talker's (16)"),
    ("talker", dict(attention_bias=True), "talker_config sets attention_bias"),
    ("talker", dict(use_sliding_window=True), "talker_config sets use_sliding_window"),
    # the official model fails in forward on these too
    ("talker", dict(num_attention_heads=4, num_key_value_heads=3),
     "talker_config num_attention_heads (4) is not a multiple of num_key_value_heads (3); the "
     "official model cannot run it either"),
    ("cp", dict(num_attention_heads=4, num_key_value_heads=3),
     "code_predictor_config num_attention_heads (4) is not a multiple"),
    ("talker", dict(head_dim=7), "talker_config head_dim (7) must be even"),
    ("cp", dict(head_dim=7), "code_predictor_config head_dim (7) must be even (rotate-half "
     "RoPE); the official model cannot run it either"),
    # a window of 4 on predictor layers from 0 on hides positions; 4096 (cv_config_variants,
    # below: the official's codes equal ours) or sliding layers from 28 on hide none
    ("cp", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0,
                layer_types=None), "window shorter than the predictor's sequence"),
    ("cp", dict(use_sliding_window=True, sliding_window=4,
                layer_types=["full_attention", "sliding_attention"]),
     "window shorter than the predictor's sequence"),
])
def test_unsupported_config_fields_are_clear_errors(tmp_path, make_checkpoint, where, change,
                                                    needle):
    raw = json.load(open(os.path.join(make_checkpoint("cv_proj"), "config.json")))
    target = raw["talker_config"]
    if where == "cp":
        target = target["code_predictor_config"]
    target.update(change)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(str(tmp_path))


def test_harmless_predictor_windows_are_accepted(tmp_path, make_checkpoint):
    """The official makes predictor layer i a sliding layer only from max_window_layers (28) on,
    and a window as long as the predictor's sequence hides nothing: both load."""
    raw = json.load(open(os.path.join(make_checkpoint("cv_proj"), "config.json")))
    cp = raw["talker_config"]["code_predictor_config"]
    cp.pop("layer_types", None)            # saved by the official config: derived again below
    for change in (dict(use_sliding_window=True, sliding_window=4),            # layers 0-1 < 28
                   dict(use_sliding_window=True, sliding_window=32, max_window_layers=0),
                   dict(use_sliding_window=True, sliding_window=4, max_window_layers=0,
                        layer_types=["full_attention", "full_attention"])):
        (tmp_path / "config.json").write_text(json.dumps(
            dict(raw, talker_config=dict(raw["talker_config"],
                                         code_predictor_config=dict(cp, **change)))))
        load_config(str(tmp_path))


def test_wrong_folder_kinds(tmp_path, make_checkpoint, codec_dir):
    with pytest.raises((ConfigError, FileNotFoundError)):
        Qwen3TTS.from_pretrained(codec_dir)   # the speech tokenizer is not a model
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Qwen3TTS.from_pretrained(str(tmp_path / "nope"))


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        Qwen3TTS.from_pretrained("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")
    assert "huggingface-cli download" in str(e.value) and "Traceback" not in str(e.value)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_form_roundtrip(tmp_path, make_checkpoint, dtype):
    src = make_checkpoint("cv_identity_0b6")
    dst = convert(src, str(tmp_path / f"fast_{dtype}"), dtype)
    assert not os.path.exists(os.path.join(dst, "model.safetensors"))
    cfg = load_config(src)
    a = checkpoint.load_params(src, cfg, np.float32 if dtype == "float32" else "bfloat16")
    b = checkpoint.load_params(dst, cfg, np.float32 if dtype == "float32" else "bfloat16")
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    tts = Qwen3TTS.from_pretrained(dst)
    assert tts.get_supported_speakers() == sorted(cfg.speakers)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json",
                                  "speech_tokenizer/config.json"])
def test_invalid_json_names_the_file(tmp_path, name):
    from qwen3_tts_jax.codec.config import load_config as load_codec_config

    file = tmp_path / name
    file.parent.mkdir(exist_ok=True)
    file.write_text('{"talker_config": ')
    load = {"config.json": load_config, "generation_config.json": load_generation_defaults,
            "speech_tokenizer/config.json": load_codec_config}[name]
    with pytest.raises(ConfigError, match=re.escape(str(file)) + " is not valid JSON: Expecting"):
        load(str(file.parent))


@pytest.mark.parametrize("edit,needle", [
    (lambda r: r["talker_config"].update(hidden_size="32"),
     "talker_config hidden_size must be an integer, got '32'"),
    (lambda r: r["talker_config"]["code_predictor_config"].update(rms_norm_eps=[1]),
     "code_predictor_config rms_norm_eps must be a number"),
    (lambda r: r.update(tts_pad_token_id=True), "config.json tts_pad_token_id must be an integer"),
    (lambda r: r["talker_config"].update(spk_id={"ryan": 10 ** 6}),
     "spk_id 'ryan' is 1000000, outside the talker's codec vocabulary [0, "),
    (lambda r: r["talker_config"]["codec_language_id"].update(english=-1),
     "codec_language_id 'english' is -1, outside"),
])
def test_config_field_types_and_ids_name_the_file_and_field(tmp_path, make_checkpoint, edit,
                                                           needle):
    raw = json.load(open(os.path.join(make_checkpoint("cv_proj"), "config.json")))
    edit(raw)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "config.json")) + ".*"
                       + re.escape(needle)):
        load_config(str(tmp_path))


def test_generation_config_field_types(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"temperature": "hot", "top_k": 5}')
    with pytest.raises(ConfigError, match="generation_config.json: generation_config.json "
                       "temperature must be a number, got 'hot'"):
        load_generation_defaults(str(tmp_path))


def test_convert_command_errors_are_one_line(tmp_path, make_checkpoint, capsys):
    from qwen3_tts_jax.convert import main

    src = make_checkpoint("cv_proj")
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{")
    for args, needle in [([src, src], "is the source checkpoint"),
                         ([src, str(tmp_path / "afile")], "is an existing file"),
                         ([str(tmp_path / "nope"), str(tmp_path / "out")], "does not exist"),
                         ([str(bad), str(tmp_path / "out")], "is not valid JSON")]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("convert: error: ") and needle in err and "Traceback" not in err


@pytest.mark.parametrize("change, needle", [
    (dict(enc_channels=[32, 32, 32, 32, 90]), "enc_channels[-1] must be the sum"),
    (dict(enc_channels=[32, 32, 24, 32, 88]), "enc_channels[:-1] must be equal"),
    (dict(enc_channels=[36, 36, 36, 36, 108]), "divisible by enc_res2net_scale 8"),
    (dict(enc_kernel_sizes=[5, 3, 3, 1]), "the same length"),
    (dict(mel_dim=80), "mel_dim is 80"),
])
def test_speaker_encoder_config_errors_name_the_file(tmp_path, make_checkpoint, change, needle):
    """Speaker encoder shapes the official module cannot run (it refuses them or fails in forward,
    checked here) are a ConfigError naming config.json and the field, at config load."""
    import torch
    from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSSpeakerEncoderConfig
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSSpeakerEncoder

    raw = json.load(open(os.path.join(make_checkpoint("base"), "config.json")))
    spk = dict(raw["speaker_encoder_config"], **change)
    with pytest.raises((ValueError, RuntimeError)):
        official = Qwen3TTSSpeakerEncoder(Qwen3TTSSpeakerEncoderConfig(**spk))
        with torch.no_grad():
            official(torch.randn(1, 40, 128))
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, speaker_encoder_config=spk)))
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "config.json")) + ".*"
                       + re.escape(needle) + ".*official speaker encoder cannot run it either"):
        load_config(str(tmp_path))


# ------------------------------------------------------------------ the packed-weights cache
def _same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _counting_load(path, cfg, calls):
    def load():
        calls.append(1)
        return checkpoint.load_params(path, cfg)
    return load


@pytest.mark.parametrize("quantize", [None, "int8", pytest.param("int4", marks=pytest.mark.skipif(
    not cpu_kernels.available(), reason="int4 needs the CPU kernels"))])
def test_weights_cache_gives_the_packed_params_without_loading(tmp_path, make_checkpoint,
                                                               quantize):
    path = make_checkpoint("base")          # speaker encoder (float32 whatever the dtype) too
    cfg = load_config(path)
    cache = str(tmp_path / "weights")
    fresh = checkpoint.pack_for_inference(checkpoint.load_params(path, cfg), quantize=quantize)
    calls = []
    first = checkpoint.load_for_inference(path, cfg, quantize=quantize, cache_dir=cache,
                                          load=_counting_load(path, cfg, calls))
    assert calls == [1] and len(os.listdir(cache)) == 1
    again = checkpoint.load_for_inference(path, cfg, quantize=quantize, cache_dir=cache,
                                          load=_counting_load(path, cfg, calls))
    assert calls == [1]                     # read from the cache, the checkpoint not loaded
    _same_tree(first, fresh)
    _same_tree(again, fresh)


def test_weights_cache_read_needs_no_tracing(tmp_path, make_checkpoint, monkeypatch):
    """The cached file holds its tree: a warm load does not trace the packing to rebuild it."""
    path = make_checkpoint("cv_proj")
    cfg = load_config(path)
    cache = str(tmp_path / "weights")
    first = checkpoint.load_for_inference(path, cfg, quantize="int8", cache_dir=cache)

    def traced(*a, **k):
        raise AssertionError("abstract_packed called")

    monkeypatch.setattr(checkpoint, "abstract_packed", traced)
    calls = []
    again = checkpoint.load_for_inference(path, cfg, quantize="int8", cache_dir=cache,
                                          load=_counting_load(path, cfg, calls))
    assert calls == []
    _same_tree(again, first)


def test_weights_cache_is_per_choice_and_stale_keys_repack(tmp_path, make_checkpoint):
    path = str(tmp_path / "ckpt")
    shutil.copytree(make_checkpoint("cv_proj"), path)
    cfg = load_config(path)
    cache = str(tmp_path / "weights")
    calls = []
    load = _counting_load(path, cfg, calls)
    checkpoint.load_for_inference(path, cfg, cache_dir=cache, load=load)
    checkpoint.load_for_inference(path, cfg, quantize="int8", cache_dir=cache, load=load)
    assert calls == [1, 1] and len(os.listdir(cache)) == 2      # one file per choice
    # the checkpoint changes: the cached file is stale, the new weights are loaded and cached
    file = os.path.join(path, "model.safetensors")
    sd = load_file(file)
    key = "talker.model.layers.0.mlp.down_proj.weight"
    sd[key] = sd[key] * 2
    save_file(sd, file)
    got = checkpoint.load_for_inference(path, cfg, cache_dir=cache, load=load)
    assert calls == [1, 1, 1] and len(os.listdir(cache)) == 2   # rewritten in place
    _same_tree(got, checkpoint.pack_for_inference(checkpoint.load_params(path, cfg)))
    checkpoint.load_for_inference(path, cfg, cache_dir=cache, load=load)
    assert calls == [1, 1, 1]


def test_corrupt_weights_cache_warns_and_loads_the_checkpoint(tmp_path, make_checkpoint, caplog):
    path = make_checkpoint("cv_proj")
    cfg = load_config(path)
    cache = str(tmp_path / "weights")
    calls = []
    load = _counting_load(path, cfg, calls)
    good = checkpoint.load_for_inference(path, cfg, cache_dir=cache, load=load)
    (file,) = [os.path.join(cache, f) for f in os.listdir(cache)]
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with caplog.at_level("WARNING", logger="qwen3_tts_jax"):
        got = checkpoint.load_for_inference(path, cfg, cache_dir=cache, load=load)
    assert calls == [1, 1] and "cannot be read" in caplog.text
    _same_tree(got, good)
    checkpoint.load_for_inference(path, cfg, cache_dir=cache, load=load)   # rewritten
    assert calls == [1, 1]


def test_unwritable_weights_cache_warns_and_runs(tmp_path, make_checkpoint, caplog):
    path = make_checkpoint("cv_proj")
    cfg = load_config(path)
    (tmp_path / "file").write_text("")
    with caplog.at_level("WARNING", logger="qwen3_tts_jax"):
        got = checkpoint.load_for_inference(path, cfg, cache_dir=str(tmp_path / "file" / "w"))
    assert "cannot write" in caplog.text
    _same_tree(got, checkpoint.pack_for_inference(checkpoint.load_params(path, cfg)))


def test_from_pretrained_weights_cache(tmp_path, make_checkpoint):
    path = make_checkpoint("cv_proj")
    cache = str(tmp_path / "weights")
    plain = Qwen3TTS.from_pretrained(path)
    cached = Qwen3TTS.from_pretrained(path, weights_cache=cache)
    assert os.listdir(cache)
    again = Qwen3TTS.from_pretrained(path, weights_cache=cache)
    _same_tree(cached.params, plain.params)
    _same_tree(again.params, plain.params)


def test_tensor_file_reads_what_safetensors_wrote(tmp_path):
    from safetensors import safe_open

    from qwen3_tts_jax import weights

    import ml_dtypes
    rng = np.random.default_rng(0)
    tensors = {"f32": rng.standard_normal((3, 17), np.float32),
               "bf16": rng.standard_normal((5, 4)).astype(ml_dtypes.bfloat16),
               "i8": rng.integers(-127, 128, (2, 3, 65)).astype(np.int8),
               "empty": np.zeros((0, 4), np.float32)}
    file = str(tmp_path / "t.safetensors")
    save_file(tensors, file, metadata={"a": "b"})
    with weights.TensorFile(file) as f, safe_open(file, framework="np") as ref:
        assert f.metadata == {"a": "b"} and sorted(f.keys()) == sorted(tensors)
        for k in tensors:
            a = f.read(k)
            assert a.ctypes.data % weights.ALIGN == 0 or a.size == 0
            assert a.dtype == ref.get_tensor(k).dtype
            np.testing.assert_array_equal(a, ref.get_tensor(k))
            np.testing.assert_array_equal(np.asarray(weights.to_device(a)), tensors[k])
    with open(file, "r+b") as fh:
        fh.truncate(os.path.getsize(file) - 8)
    with weights.TensorFile(file) as f, pytest.raises(CheckpointError, match="ends inside"):
        for k in f.keys():
            f.read(k)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="cannot read"):
        weights.TensorFile(str(tmp_path / "junk.safetensors"))
