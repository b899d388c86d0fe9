"""A small RANDOM-WEIGHT checkpoint in the official layout, built without torch or downloads.

It exists so that a fresh machine with no hub access can run the whole pipeline (text -> BPE ->
prompt -> talker + code predictor -> codec decoder -> WAV) of every checkpoint type
(`build(folder, kind=...)`: custom_voice, voice_design, base) and prove the install works. Its
audio is noise, not speech. The folder has what a released checkpoint has: config.json,
generation_config.json, model.safetensors with the official key names (a Base checkpoint's
speaker encoder included), Qwen2-style tokenizer files and speech_tokenizer/ (config.json +
model.safetensors; a Base checkpoint's codec also has the encoder that cloning needs, and
preprocessor_config.json).
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from . import checkpoint, speaker_encoder
from .codec import decoder as codec_decoder
from .codec import encoder as codec_encoder
from .codec.config import parse_config as parse_codec_config
from .config import parse_config

SPEAKERS = {"serena": 3066, "vivian": 3065, "uncle_fu": 3010, "ryan": 3061, "aiden": 2861,
            "ono_anna": 2873, "sohee": 2864, "eric": 2875, "dylan": 2878}
LANGUAGES = {"chinese": 2055, "english": 2050, "german": 2053, "italian": 2070,
             "portuguese": 2071, "spanish": 2054, "japanese": 2058, "korean": 2064,
             "french": 2061, "russian": 2069, "beijing_dialect": 2074, "sichuan_dialect": 2062}
DIALECTS = {k: False for k in SPEAKERS} | {"eric": "sichuan_dialect", "dylan": "beijing_dialect"}
KINDS = ("custom_voice", "voice_design", "base")
# The speaker encoder's output width is the talker's hidden size (64 here).
SPEAKER_ENCODER = dict(mel_dim=128, enc_dim=64, enc_channels=[32, 32, 32, 32, 96],
                       enc_kernel_sizes=[5, 3, 3, 3, 1], enc_dilations=[1, 2, 3, 4, 1],
                       enc_attention_channels=16, enc_res2net_scale=8, enc_se_channels=16,
                       sample_rate=24000)
CODEC_ENCODER = dict(  # a transformers MimiConfig, tiny
    sampling_rate=24000, frame_rate=12.5, audio_channels=1, hidden_size=32, num_filters=8,
    num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4], kernel_size=7, last_kernel_size=3,
    residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=True, pad_mode="constant",
    compress=2, codebook_size=2048, codebook_dim=32, num_quantizers=32,
    vector_quantization_hidden_dimension=32, num_semantic_quantizers=1, upsample_groups=32,
    num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
    head_dim=8, sliding_window=250, max_position_embeddings=8000)
PREPROCESSOR = {"feature_extractor_type": "EncodecFeatureExtractor", "feature_size": 1,
                "sampling_rate": 24000, "padding_side": "right", "padding_value": 0.0,
                "return_attention_mask": True, "chunk_length_s": None, "overlap": None}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|tts_pad|>", "<|tts_text_bos|>",
            "<|tts_text_eod|>"]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _tokenizer(folder: str) -> dict:
    """Train a tiny byte-level BPE with the Qwen2 split regex; returns the special token ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["assistant\n", "user\n", "Hello world, this is a random-weight demo of Qwen3 TTS."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS))
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "model_max_length": 131072}, f, indent=2)
    return {s: tok.token_to_id(s) for s in SPECIALS}, tok.get_vocab_size()


def _random(shapes: dict, rng: np.random.Generator, special=lambda k, s: None) -> dict:
    out = {}
    for k, shape in shapes.items():
        a = special(k, shape)
        if a is None:
            a = (np.ones(shape) if len(shape) == 1 and k.endswith("norm.weight")
                 else rng.normal(0, 0.05, shape))
        out[k] = np.asarray(a, np.float32)
    return out


def _fan_in(k, shape, rng):
    """Weights scaled by their fan-in, so that activations stay O(1) through the layers."""
    if len(shape) == 1:
        return np.ones(shape) if k.endswith(("norm.weight", "layernorm.weight")) else \
            np.zeros(shape)
    return rng.normal(0, 1.0 / np.sqrt(np.prod(shape[1:])), shape)


def build(folder: str, seed: int = 0, kind: str = "custom_voice") -> str:
    """Write a random-weight checkpoint of type `kind` (custom_voice, voice_design or base) and
    its codec to `folder`; returns it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    os.makedirs(os.path.join(folder, "speech_tokenizer"), exist_ok=True)
    rng = np.random.default_rng(seed)
    ids, vocab = _tokenizer(folder)
    talker = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000,
        rope_scaling={"interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
        vocab_size=3072, text_vocab_size=((vocab + 63) // 64) * 64, text_hidden_size=64,
        num_code_groups=16, max_position_embeddings=32768, codec_bos_id=2149,
        codec_eos_token_id=2150, codec_pad_id=2148, codec_think_id=2154, codec_nothink_id=2155,
        codec_think_bos_id=2156, codec_think_eos_id=2157,
        # preset speakers and the dialects they speak: CustomVoice only
        codec_language_id=LANGUAGES if kind == "custom_voice" else
        {k: v for k, v in LANGUAGES.items() if not k.endswith("_dialect")},
        spk_id=SPEAKERS if kind == "custom_voice" else {},
        spk_is_dialect=DIALECTS if kind == "custom_voice" else {},
        code_predictor_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                   rms_norm_eps=1e-6, rope_theta=1000000, vocab_size=2048,
                                   num_code_groups=16))
    config = dict(model_type="qwen3_tts", architectures=["Qwen3TTSForConditionalGeneration"],
                  talker_config=talker,
                  speaker_encoder_config=SPEAKER_ENCODER if kind == "base" else
                  {"enc_dim": 64, "sample_rate": 24000},
                  tokenizer_type="qwen3_tts_tokenizer_12hz", tts_model_size="1b7",
                  tts_model_type=kind, im_start_token_id=ids["<|im_start|>"],
                  im_end_token_id=ids["<|im_end|>"], tts_pad_token_id=ids["<|tts_pad|>"],
                  tts_bos_token_id=ids["<|tts_text_bos|>"],
                  tts_eos_token_id=ids["<|tts_text_eod|>"], random_weights_demo=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 1.0,
                   "repetition_penalty": 1.05, "subtalker_dosample": True,
                   "subtalker_temperature": 0.9, "subtalker_top_k": 50, "subtalker_top_p": 1.0,
                   "max_new_tokens": 8192}, f, indent=2)
    cfg = parse_config(config)
    tensors = _random(checkpoint.expected_shapes(cfg), rng)
    if kind == "base":
        tensors.update(_random(speaker_encoder.expected_shapes(cfg.speaker_encoder), rng,
                               lambda k, shape: _fan_in(k, shape, rng)))
    save_file(tensors, os.path.join(folder, "model.safetensors"))

    codec = dict(
        model_type="qwen3_tts_tokenizer_12hz", encoder_valid_num_quantizers=16,
        input_sample_rate=24000, output_sample_rate=24000, decode_upsample_rate=1920,
        encode_downsample_rate=1920,
        decoder_config=dict(codebook_size=2048, codebook_dim=64, latent_dim=64, hidden_size=32,
                            intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                            head_dim=8, num_hidden_layers=2, sliding_window=72, rope_theta=10000,
                            rms_norm_eps=1e-5, layer_scale_initial_scale=0.01,
                            max_position_embeddings=8000, num_quantizers=16,
                            upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2],
                            decoder_dim=64))
    if kind == "base":
        codec["encoder_config"] = CODEC_ENCODER
    sub = os.path.join(folder, "speech_tokenizer")
    with open(os.path.join(sub, "config.json"), "w") as f:
        json.dump(codec, f, indent=2)

    def codec_special(k, shape):
        if k.endswith("cluster_usage"):
            return np.ones(shape)
        if k.endswith("embedding_sum"):
            return rng.normal(0, 1.0, shape)
        if k.endswith((".alpha", ".beta")):
            return rng.normal(0, 0.1, shape)
        if k.endswith(("norm.weight", "scale", "gamma")):
            return np.ones(shape) if "norm" in k else np.full(shape, 0.01)
        return rng.normal(0, 1.0 / np.sqrt(np.prod(shape[1:]) or 1), shape)

    codec_cfg = parse_codec_config(codec)
    tensors = _random(codec_decoder.expected_shapes(codec_cfg.decoder), rng, codec_special)
    if kind == "base":
        def encoder_special(k, shape):
            if k.endswith(("cluster_usage", "initialized")):
                return np.ones(shape)
            if k.endswith("embed_sum"):
                return rng.normal(0, 1.0, shape)
            if k.endswith("scale"):
                return np.full(shape, 0.01)
            return _fan_in(k, shape, rng)

        enc_cfg = codec_encoder.parse_encoder_config(CODEC_ENCODER)
        tensors.update(_random(codec_encoder.expected_shapes(enc_cfg), rng, encoder_special))
        with open(os.path.join(sub, "preprocessor_config.json"), "w") as f:
            json.dump(PREPROCESSOR, f, indent=2)
    save_file(tensors, os.path.join(sub, "model.safetensors"))
    return folder
