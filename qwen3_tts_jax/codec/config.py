"""The speech tokenizer's config.json (official `Qwen3TTSTokenizerV2Config`, TC:124-169).

Only the decoder values that the official code reads are kept; where the json omits one, the default
is the official class default (TC:72-94), because that is what the official model would run with.
Traps (shared NOTES.md section 2 and 8.1):
- `codebook_dim` and `head_dim` are not named parameters of the official decoder config class: they
  arrive through **kwargs. `codebook_dim` is required (the decoder reads it unconditionally);
  `head_dim` silently falls back to hidden_size // num_attention_heads (512 // 16 = 32, while the
  released value is 64). We do the same.
- both quantizers use `codebook_size` rows; `semantic_codebook_size`, `num_semantic_quantizers` and
  `vector_quantization_hidden_dimension` are never read.
- every pre-transformer layer is sliding-window attention (`layer_types` is a property, TC:116-121).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from ..activations import ACTIVATIONS
from ..config import ConfigError, check_fields, read_json, rope_scaling_of

MODEL_TYPE = "qwen3_tts_tokenizer_12hz"


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """`Qwen3TTSTokenizerV2DecoderConfig`. Hashable: the jitted decoder takes it as a static arg."""
    codebook_dim: int
    head_dim: int
    codebook_size: int = 2048
    hidden_size: int = 1024
    latent_dim: int = 1024
    rope_theta: float = 10000.0
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    sliding_window: int = 72
    intermediate_size: int = 3072
    rms_norm_eps: float = 1e-5
    num_hidden_layers: int = 8
    num_quantizers: int = 16
    upsample_rates: tuple = (8, 5, 4, 3)
    upsampling_ratios: tuple = (2, 2)
    decoder_dim: int = 1536
    hidden_act: str = "silu"                        # a key of `activations.ACTIVATIONS`
    max_position_embeddings: int = 8000             # only yarn RoPE reads it
    rope_scaling: Mapping[str, Any] | None = None   # see `config.ROPE_TYPES`

    @property
    def total_upsample(self) -> int:
        """Waveform samples per code frame (the official `Decoder.total_upsample`)."""
        return math.prod(self.upsample_rates + self.upsampling_ratios)


@dataclasses.dataclass(frozen=True)
class SpeechTokenizerConfig:
    """`Qwen3TTSTokenizerV2Config`: the decoder config plus the top-level rates.

    `encoder_config` is the raw Mimi config dict, kept for the encoder port."""
    decoder: DecoderConfig
    encoder_valid_num_quantizers: int = 16
    input_sample_rate: int = 24000
    output_sample_rate: int = 24000
    decode_upsample_rate: int = 1920
    encode_downsample_rate: int = 1920
    encoder_config: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False,
                                                          hash=False)


def parse_decoder_config(d: Mapping[str, Any]) -> DecoderConfig:
    if not isinstance(d, Mapping):
        raise ConfigError(f"decoder_config must be an object, got {d!r}")
    if "codebook_dim" not in d:
        raise ConfigError("decoder_config has no codebook_dim: the official decoder requires it "
                          "(the released speech tokenizer has 512)")
    names = {f.name for f in dataclasses.fields(DecoderConfig)}
    vals = {k: v for k, v in d.items() if k in names}
    check_fields(vals, DecoderConfig, "decoder_config")
    vals.setdefault("head_dim", d.get("hidden_size", 1024) // d.get("num_attention_heads", 16))
    for k in ("upsample_rates", "upsampling_ratios"):
        if k in vals:
            vals[k] = tuple(vals[k])
    # Read by the official code though no released codec changes them: RoPE scaling and the MLP
    # activation, honoured like the talker's; attention biases are not implemented.
    vals["rope_scaling"] = rope_scaling_of(d, "decoder_config")
    if vals.get("hidden_act", "silu") not in ACTIVATIONS:
        raise ConfigError(f"decoder_config hidden_act {vals['hidden_act']!r} is not supported "
                          f"(supported: {sorted(ACTIVATIONS)})")
    cfg = DecoderConfig(**vals)
    if d.get("attention_bias", False):
        raise ConfigError("decoder_config attention_bias=true is not supported (the released "
                          "speech tokenizer has none)")
    # Shapes the official decoder cannot run either (it fails at construction or in forward):
    # refused here by name. Everything else it builds, we load, e.g. a decoder_dim that
    # 2**len(upsample_rates) does not divide (block i has decoder_dim // 2**i channels, floored).
    official = "; the official decoder cannot run it either"
    if cfg.num_quantizers < 2:
        raise ConfigError(f"decoder_config num_quantizers ({cfg.num_quantizers}) must be >= 2 "
                          f"(one semantic + acoustic){official}")
    if cfg.codebook_dim < 2:
        raise ConfigError(f"decoder_config codebook_dim ({cfg.codebook_dim}) must be >= 2 (the "
                          f"quantizer works in codebook_dim // 2 dimensions){official}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(f"decoder_config num_attention_heads ({cfg.num_attention_heads}) is not "
                          f"a multiple of num_key_value_heads ({cfg.num_key_value_heads}){official}")
    if cfg.head_dim % 2:
        raise ConfigError(f"decoder_config head_dim ({cfg.head_dim}) must be even (rotate-half "
                          f"RoPE){official}")
    if cfg.decoder_dim // 2 ** len(cfg.upsample_rates) < 1:
        raise ConfigError(f"decoder_config decoder_dim ({cfg.decoder_dim}) leaves no channel after "
                          f"{len(cfg.upsample_rates)} halvings (decoder_dim // 2**len(upsample_rates)"
                          f" is 0){official}")
    return cfg


def parse_config(d: Mapping[str, Any]) -> SpeechTokenizerConfig:
    if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ConfigError(f"config.json has model_type {d.get('model_type')!r}, expected "
                          f"{MODEL_TYPE!r} (the 12 Hz Qwen3-TTS speech tokenizer; the 25 Hz one "
                          "is not supported)")
    names = {f.name for f in dataclasses.fields(SpeechTokenizerConfig)} - {"decoder",
                                                                           "encoder_config"}
    top = {k: v for k, v in d.items() if k in names}
    check_fields(top, SpeechTokenizerConfig, "config.json")
    return SpeechTokenizerConfig(decoder=parse_decoder_config(d.get("decoder_config") or {}),
                                 encoder_config=dict(d.get("encoder_config") or {}), **top)


def load_config(folder: str) -> tuple[SpeechTokenizerConfig, dict]:
    """(parsed config, raw json dict) of `folder/config.json`."""
    file = os.path.join(folder, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} is missing: a speech tokenizer folder has config.json "
                                "and model.safetensors")
    raw = read_json(file)
    try:
        return parse_config(raw), raw
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from None
