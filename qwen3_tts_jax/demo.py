"""A small RANDOM-WEIGHT checkpoint in the official layout, built without torch or downloads.

It exists so that a fresh machine with no hub access can run the whole pipeline (text -> BPE ->
prompt -> talker + code predictor -> codec decoder -> WAV) and prove the install works. Its audio is
noise, not speech. The folder has what a released checkpoint has: config.json,
generation_config.json, model.safetensors with the official key names, Qwen2-style tokenizer files
and speech_tokenizer/ (config.json + model.safetensors).
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from . import checkpoint
from .codec import decoder as codec_decoder
from .codec.config import parse_config as parse_codec_config
from .config import parse_config

SPEAKERS = {"serena": 3066, "vivian": 3065, "uncle_fu": 3010, "ryan": 3061, "aiden": 2861,
            "ono_anna": 2873, "sohee": 2864, "eric": 2875, "dylan": 2878}
LANGUAGES = {"chinese": 2055, "english": 2050, "german": 2053, "italian": 2070,
             "portuguese": 2071, "spanish": 2054, "japanese": 2058, "korean": 2064,
             "french": 2061, "russian": 2069, "beijing_dialect": 2074, "sichuan_dialect": 2062}
DIALECTS = {k: False for k in SPEAKERS} | {"eric": "sichuan_dialect", "dylan": "beijing_dialect"}
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


def build(folder: str, seed: int = 0) -> str:
    """Write a random-weight CustomVoice checkpoint (and its codec) to `folder`; returns it."""
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
        codec_think_bos_id=2156, codec_think_eos_id=2157, codec_language_id=LANGUAGES,
        spk_id=SPEAKERS, spk_is_dialect=DIALECTS,
        code_predictor_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                   rms_norm_eps=1e-6, rope_theta=1000000, vocab_size=2048,
                                   num_code_groups=16))
    config = dict(model_type="qwen3_tts", architectures=["Qwen3TTSForConditionalGeneration"],
                  talker_config=talker, speaker_encoder_config={"enc_dim": 64, "sample_rate": 24000},
                  tokenizer_type="qwen3_tts_tokenizer_12hz", tts_model_size="1b7",
                  tts_model_type="custom_voice", im_start_token_id=ids["<|im_start|>"],
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
    shapes = checkpoint.expected_shapes(parse_config(config))
    save_file(_random(shapes, rng), os.path.join(folder, "model.safetensors"))

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

    dec_shapes = codec_decoder.expected_shapes(parse_codec_config(codec).decoder)
    save_file(_random(dec_shapes, rng, codec_special), os.path.join(sub, "model.safetensors"))
    return folder
