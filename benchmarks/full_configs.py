"""Full-size configs of the released checkpoints (values from the published config.json files as
quoted in the reference notes and cross-checked against the official code), shared by the
benchmarks. Size "tiny" keeps every id and vocabulary of the released configs with small layers
(a few MB of weights besides the text embedding): a quick run of a benchmark's every code path on
the CPU (`SMOKE=1 bash benchmarks/gpu_session.sh PART`), not a figure."""
import copy

LANG = {"chinese": 2055, "english": 2050, "german": 2053, "italian": 2070, "portuguese": 2071,
        "spanish": 2054, "japanese": 2058, "korean": 2064, "french": 2061, "russian": 2069}
LANG_CV = dict(LANG, beijing_dialect=2074, sichuan_dialect=2062)
SPK = {"serena": 3066, "vivian": 3065, "uncle_fu": 3010, "ryan": 3061, "aiden": 2861,
       "ono_anna": 2873, "sohee": 2864, "eric": 2875, "dylan": 2878}
SPK_DIALECT = {k: False for k in SPK}
SPK_DIALECT.update(eric="sichuan_dialect", dylan="beijing_dialect")

CODE_PREDICTOR = dict(hidden_size=1024, num_hidden_layers=5, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                      max_position_embeddings=65536, rope_theta=1000000, rope_scaling=None,
                      vocab_size=2048, num_code_groups=16, rms_norm_eps=1e-6,
                      hidden_act="silu", attention_bias=False)


SIZES = ("tiny", "0b6", "1b7")
# the tiny shapes' code predictor (head_dim 32: widths the Pallas predictor kernels take)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)


def _size(size):
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    return size


def talker(size, kind):
    h, ffn = {"tiny": (64, 128), "0b6": (1024, 3072), "1b7": (2048, 6144)}[_size(size)]
    tiny = size == "tiny"
    return dict(
        hidden_size=h, intermediate_size=ffn, num_hidden_layers=2 if tiny else 28,
        num_attention_heads=4 if tiny else 16, num_key_value_heads=2 if tiny else 8,
        head_dim=32 if tiny else 128, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000, attention_bias=False,
        rope_scaling={"interleaved": True, "mrope_section": [8, 4, 4] if tiny else [24, 20, 20],
                      "rope_type": "default"},
        vocab_size=3072, text_vocab_size=151936, text_hidden_size=32 if tiny else 2048,
        num_code_groups=16,
        position_id_per_seconds=13, codec_bos_id=2149, codec_eos_token_id=2150, codec_pad_id=2148,
        codec_think_id=2154, codec_nothink_id=2155, codec_think_bos_id=2156,
        codec_think_eos_id=2157,
        codec_language_id=LANG_CV if kind == "custom_voice" else LANG,
        spk_id=SPK if kind == "custom_voice" else {},
        spk_is_dialect=SPK_DIALECT if kind == "custom_voice" else {},
        code_predictor_config=dict(copy.deepcopy(CODE_PREDICTOR), **(TINY if tiny else {})),
    )


def tts_config_kwargs(size, kind):
    h = talker(size, kind)["hidden_size"]
    return dict(talker_config=talker(size, kind),
                speaker_encoder_config={"enc_dim": h, "sample_rate": 24000},
                tokenizer_type="qwen3_tts_tokenizer_12hz", tts_model_size="1b7" if size == "tiny" else size,
                tts_model_type=kind, im_start_token_id=151644, im_end_token_id=151645,
                tts_pad_token_id=151671, tts_bos_token_id=151672, tts_eos_token_id=151673,
                assistant_token_id=77091)


CODEC = dict(
    encoder_valid_num_quantizers=16, input_sample_rate=24000, output_sample_rate=24000,
    decode_upsample_rate=1920, encode_downsample_rate=1920,
    encoder_config=dict(
        sampling_rate=24000, frame_rate=12.5, audio_channels=1, hidden_size=512, num_filters=64,
        num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4], kernel_size=7, last_kernel_size=3,
        residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=True, pad_mode="constant",
        compress=2, codebook_size=2048, codebook_dim=256, num_quantizers=32,
        vector_quantization_hidden_dimension=256, num_semantic_quantizers=1, upsample_groups=512,
        num_hidden_layers=8, intermediate_size=2048, num_attention_heads=8,
        num_key_value_heads=8, head_dim=64, sliding_window=250, max_position_embeddings=8000,
        hidden_act="gelu", norm_eps=1e-5, rope_theta=10000, layer_scale_initial_scale=0.01),
    decoder_config=dict(
        codebook_size=2048, codebook_dim=512, latent_dim=1024, hidden_size=512,
        intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16, head_dim=64,
        num_hidden_layers=8, sliding_window=72, rope_theta=10000, rms_norm_eps=1e-5,
        layer_scale_initial_scale=0.01, max_position_embeddings=8000, num_quantizers=16,
        num_semantic_quantizers=1, semantic_codebook_size=4096, upsample_rates=[8, 5, 4, 3],
        upsampling_ratios=[2, 2], decoder_dim=1536, hidden_act="silu", attention_bias=False,
        vector_quantization_hidden_dimension=512),
)

# the tiny shapes' codec: the released decoder's rates and codebooks, small layers
CODEC_TINY = dict(CODEC, decoder_config=dict(
    CODEC["decoder_config"], codebook_dim=64, latent_dim=64, hidden_size=32, intermediate_size=64,
    num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_hidden_layers=2,
    decoder_dim=64, vector_quantization_hidden_dimension=64))


def codec(size):
    return CODEC_TINY if _size(size) == "tiny" else CODEC
