"""Random-weight checkpoints in the official on-disk layout, built with the OFFICIAL qwen-tts 0.1.1
classes (torch), for parity tests. Nothing is downloaded.

`build_checkpoint(path, spec)` writes config.json, model.safetensors, generation_config.json, the
tokenizer files and speech_tokenizer/ exactly like a released checkpoint, with the sizes in `spec`.
`load_official(path)` returns the official `Qwen3TTSModel` wrapper (float32, CPU).

The text tokenizer is a small byte-level BPE trained here with the Qwen2 pre-tokenizer regex; the
official prompt slicing needs "assistant" and "\\n" to be single tokens.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil

import numpy as np

QWEN2_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|tts_pad|>", "<|tts_text_bos|>",
            "<|tts_text_eod|>"]
CORPUS = ["assistant\n", "user\n", "Hello world. This is a tiny test of Qwen3 TTS.",
          "The quick brown fox jumps over the lazy dog.", "Speak slowly and calmly.",
          "A warm female voice, speaking English.", "Numbers 0123456789, punctuation!?;:",
          "Ünïcödé wörds, 你好世界, こんにちは, привет мир."] * 50

LANG = {"chinese": 2055, "english": 2050, "german": 2053, "italian": 2070, "portuguese": 2071,
        "spanish": 2054, "japanese": 2058, "korean": 2064, "french": 2061, "russian": 2069}
LANG_CV = dict(LANG, beijing_dialect=2074, sichuan_dialect=2062)
SPK = {"serena": 3066, "vivian": 3065, "uncle_fu": 3010, "ryan": 3061, "aiden": 2861,
       "ono_anna": 2873, "sohee": 2864, "eric": 2875, "dylan": 2878}
SPK_DIALECT = {k: False for k in SPK}
SPK_DIALECT.update(eric="sichuan_dialect", dylan="beijing_dialect")

GEN_CFG = {"do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 1.0,
           "repetition_penalty": 1.05, "subtalker_dosample": True, "subtalker_temperature": 0.9,
           "subtalker_top_k": 50, "subtalker_top_p": 1.0, "max_new_tokens": 8192}
FE_CFG = {"feature_extractor_type": "EncodecFeatureExtractor", "feature_size": 1,
          "sampling_rate": 24000, "padding_side": "right", "padding_value": 0.0,
          "return_attention_mask": True, "chunk_length_s": None, "overlap": None}


@dataclasses.dataclass(frozen=True)
class Spec:
    """Sizes of a tiny checkpoint. cp_hidden != hidden exercises small_to_mtp_projection."""
    kind: str = "custom_voice"          # custom_voice | voice_design | base
    size: str = "1b7"                   # tts_model_size: "0b6" drops instruct in custom voice
    hidden: int = 32
    ffn: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    text_hidden: int = 48
    text_vocab: int | None = None       # None: the tokenizer size rounded up to 64
    cp_hidden: int = 24
    cp_ffn: int = 48
    cp_layers: int = 2
    cp_heads: int = 4
    cp_kv_heads: int = 2
    cp_head_dim: int = 8
    seed: int = 0
    eos_scale: float = 1.0              # scales codec_head's EOS row: > 1 makes rows end early
    talker_extra: tuple = ()            # (key, value) pairs over talker_config; value None: drop key
    cp_extra: tuple = ()                # the same over code_predictor_config

    @property
    def name(self):
        return (f"{self.kind}-{self.size}-h{self.hidden}-q{self.heads}kv{self.kv_heads}"
                f"-cp{self.cp_hidden}-v{self.text_vocab or 'tok'}")


# Width, GQA ratio and predictor kind vary across these; one has the real 151936-token vocabulary.
SPECS = {
    "cv_proj": Spec(),
    "cv_identity_0b6": Spec(size="0b6", hidden=32, cp_hidden=32, heads=4, kv_heads=1, head_dim=8,
                            cp_heads=2, cp_kv_heads=2, cp_head_dim=16, layers=3, seed=1),
    "vd_bigvocab": Spec(kind="voice_design", hidden=48, ffn=96, heads=6, kv_heads=3, head_dim=16,
                        text_vocab=151936, text_hidden=32, cp_hidden=32, cp_heads=4,
                        cp_kv_heads=4, cp_head_dim=8, seed=2),
    "base": Spec(kind="base", size="0b6", hidden=32, cp_hidden=32, seed=3),
    # predictors whose widths the Pallas kernels take (half a head >= 16, power-of-two tiles):
    # with the mtp projection and GQA 2, and the 0.6B's identity projection with GQA 1
    "cv_kernels": Spec(cp_hidden=64, cp_ffn=128, cp_heads=4, cp_kv_heads=2, cp_head_dim=32,
                       seed=7),
    "cv_kernels_0b6": Spec(size="0b6", hidden=64, ffn=128, cp_hidden=64, cp_ffn=256, cp_heads=2,
                           cp_kv_heads=2, cp_head_dim=32, cp_layers=3, seed=8),
    # a talker (and predictor) whose widths the Pallas kernels take: `Options.talker_kernels`
    "cv_kernels_talker": Spec(hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=32, cp_hidden=64,
                              cp_ffn=128, cp_heads=4, cp_kv_heads=2, cp_head_dim=32, seed=9),
    # EOS likely enough that rows of a batch stop at different frames
    "cv_eos": Spec(seed=4, eos_scale=6.0),
    # EOS never the greedy choice (its logit 0 against 2048 others): a row runs to its budget
    "cv_noeos": Spec(seed=6, eos_scale=0.0),
    # Config fields no released checkpoint varies but the official code reads: the talker's yarn
    # RoPE (attention factor too) and tanh-GELU, the predictor's llama3 RoPE (a blended middle
    # band) and exact GELU, no num_code_groups in the predictor config (its class default 32:
    # 31 heads, the first 15 used), sliding-window predictor layers whose default window (4096)
    # hides nothing, and 64 positions, which prompt + frames run past.
    "cv_config_variants": Spec(
        seed=5, talker_extra=(("max_position_embeddings", 64), ("hidden_act", "gelu_pytorch_tanh"),
                              ("rope_scaling", {"interleaved": True, "mrope_section": [4, 2, 2],
                                                "rope_type": "yarn", "factor": 4.0})),
        cp_extra=(("hidden_act", "gelu"), ("num_code_groups", None),
                  ("use_sliding_window", True), ("max_window_layers", 0),   # window 4096: no-op
                  ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 512}))),
}

CODEC_ENCODER = dict(  # a transformers MimiConfig
    sampling_rate=24000, frame_rate=12.5, audio_channels=1, hidden_size=32, num_filters=8,
    num_residual_layers=1, upsampling_ratios=[8, 6, 5, 4], kernel_size=7,
    last_kernel_size=3, residual_kernel_size=3, dilation_growth_rate=2,
    use_causal_conv=True, pad_mode="constant", compress=2, codebook_size=2048,
    codebook_dim=32, num_quantizers=32, vector_quantization_hidden_dimension=32,
    num_semantic_quantizers=1, upsample_groups=32, num_hidden_layers=2,
    intermediate_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
    sliding_window=250, max_position_embeddings=8000,
)
CODEC_DECODER = dict(
    codebook_size=2048, codebook_dim=64, latent_dim=64, hidden_size=32,
    intermediate_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
    num_hidden_layers=2, sliding_window=72, rope_theta=10000, rms_norm_eps=1e-5,
    layer_scale_initial_scale=0.01, max_position_embeddings=8000, num_quantizers=16,
    num_semantic_quantizers=1, semantic_codebook_size=4096,
    upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2], decoder_dim=64,
    hidden_act="silu", attention_bias=False,
)


def codec_config(encoder=None, decoder=None):
    return dict(encoder_valid_num_quantizers=16, input_sample_rate=24000, output_sample_rate=24000,
                decode_upsample_rate=1920, encode_downsample_rate=1920,
                encoder_config=copy.deepcopy(encoder or CODEC_ENCODER),
                decoder_config=copy.deepcopy(decoder or CODEC_DECODER))


def build_text_tokenizer(path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None,
                              eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    fast.save_pretrained(path)
    return fast


def randomize_codec_(codec, seed=0):
    """The official init leaves codebooks at zero and gives near-silent audio (rms ~1e-8); make the
    codebooks and SnakeBeta parameters random so decoded audio has real amplitude."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in codec.named_parameters():
            if n.endswith("embedding_sum"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif n.endswith(".alpha") or n.endswith(".beta"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def randomize_for_parity_(dec, seed: int, usage_rows: int = 4):
    """Re-draw every parameter of an official `Qwen3TTSTokenizerV2Decoder` in place so that every
    branch contributes at O(1): fan-in-scaled conv/linear weights, O(1) LayerScale / gamma / norm
    weights and SnakeBeta logs, random codebooks. The first `usage_rows` rows of each codebook get
    cluster_usage 1e-7 (below the clamp) and tiny sums, so a missing clamp would be visible."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g)

    with torch.no_grad():
        for m in dec.modules():
            if isinstance(m, torch.nn.ConvTranspose1d):
                fan_in = m.in_channels * m.kernel_size[0] // m.stride[0]
            elif isinstance(m, torch.nn.Conv1d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0]
            elif isinstance(m, torch.nn.Linear):
                fan_in = m.in_features
            else:
                continue
            m.weight.copy_(randn(m.weight.shape) / fan_in ** 0.5)
            if m.bias is not None:
                m.bias.copy_(0.05 * randn(m.bias.shape))
        for name, p in dec.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "embedding_sum":
                p.copy_(randn(p.shape))
                p[:usage_rows] *= 1e-6
            elif leaf == "cluster_usage":
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
                p[:usage_rows] = 1e-7
            elif leaf in ("alpha", "beta"):
                p.copy_(0.3 * randn(p.shape))
            elif leaf in ("scale", "gamma"):
                p.copy_(0.5 + 0.1 * randn(p.shape))
            elif p.ndim == 1 and leaf == "weight":       # RMSNorm / LayerNorm
                p.copy_(1.0 + 0.1 * randn(p.shape))
            elif p.ndim == 1 and leaf == "bias" and "norm" in name:
                p.copy_(0.1 * randn(p.shape))
        # Small residual branches in the vocoder's residual units (as in a trained one): at full
        # scale the stream grows ~3x per block, and float32 noise through sin(alpha x) of
        # activations in the hundreds would swamp the 1e-4 tolerance.
        for name, m in dec.named_modules():
            if name.startswith("decoder.") and hasattr(m, "conv2"):
                m.conv2.conv.weight *= 0.2
                m.conv2.conv.bias *= 0.2


def make_audible_(codec, seed=0, frames=24):
    """`randomize_for_parity_` the decoder, then scale its last conv so that decoding random codes
    peaks at ~0.9 before the clamp: a codec whose audio has real amplitude."""
    import torch

    dec = codec.decoder
    randomize_for_parity_(dec, seed)
    seen = {}
    hook = dec.decoder[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("y", o))
    codes = torch.from_numpy(np.random.default_rng(seed).integers(0, 2048, (1, 16, frames)))
    with torch.no_grad():
        dec(codes)
        hook.remove()
        peak = float(seen["y"].abs().max())
        dec.decoder[-1].conv.weight *= 0.9 / peak
        dec.decoder[-1].conv.bias *= 0.9 / peak


def build_codec(path, config=None, seed=0, audible=True):
    import torch
    from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model

    torch.manual_seed(seed)
    codec = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**(config or codec_config()))).eval()
    randomize_codec_(codec, seed)
    if audible:
        make_audible_(codec, seed)
    codec.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(FE_CFG, f, indent=2)
    return codec


def talker_config(spec: Spec, text_vocab: int):
    section = spec.head_dim // 2  # sum(mrope_section) must equal head_dim // 2
    mrope = [section - 2 * (section // 3), section // 3, section // 3]
    d = dict(
        hidden_size=spec.hidden, intermediate_size=spec.ffn, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
        hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000, attention_bias=False,
        rope_scaling={"interleaved": True, "mrope_section": mrope, "rope_type": "default"},
        vocab_size=3072, text_vocab_size=text_vocab, text_hidden_size=spec.text_hidden,
        num_code_groups=16, position_id_per_seconds=13,
        codec_bos_id=2149, codec_eos_token_id=2150, codec_pad_id=2148, codec_think_id=2154,
        codec_nothink_id=2155, codec_think_bos_id=2156, codec_think_eos_id=2157,
        codec_language_id=LANG_CV if spec.kind == "custom_voice" else LANG,
        spk_id=SPK if spec.kind == "custom_voice" else {},
        spk_is_dialect=SPK_DIALECT if spec.kind == "custom_voice" else {},
        code_predictor_config=dict(
            hidden_size=spec.cp_hidden, intermediate_size=spec.cp_ffn,
            num_hidden_layers=spec.cp_layers, num_attention_heads=spec.cp_heads,
            num_key_value_heads=spec.cp_kv_heads, head_dim=spec.cp_head_dim,
            max_position_embeddings=65536, rope_theta=1000000, rope_scaling=None,
            vocab_size=2048, num_code_groups=16, rms_norm_eps=1e-6),
    )
    for over, target in ((spec.talker_extra, d), (spec.cp_extra, d["code_predictor_config"])):
        for k, v in over:
            target.pop(k, None) if v is None else target.__setitem__(k, v)
    return d


def speaker_encoder_config(spec: Spec):
    return dict(mel_dim=128, enc_dim=spec.hidden, enc_channels=[32, 32, 32, 32, 96],
                enc_kernel_sizes=[5, 3, 3, 3, 1], enc_dilations=[1, 2, 3, 4, 1],
                enc_attention_channels=16, enc_res2net_scale=8, enc_se_channels=16,
                sample_rate=24000)


def build_checkpoint(path, spec: Spec, codec_dir=None, tokenizer=None):
    """Write a random-weight checkpoint folder in the released layout; returns its path."""
    import torch
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    os.makedirs(path, exist_ok=True)
    tok = tokenizer or build_text_tokenizer(os.path.join(path, "_tok"))
    ids = tok.convert_tokens_to_ids(SPECIALS)
    text_vocab = spec.text_vocab or ((len(tok) + 63) // 64) * 64
    spk_cfg = speaker_encoder_config(spec)
    cfg = Qwen3TTSConfig(
        talker_config=talker_config(spec, text_vocab), speaker_encoder_config=spk_cfg,
        tokenizer_type="qwen3_tts_tokenizer_12hz", tts_model_size=spec.size,
        tts_model_type=spec.kind, im_start_token_id=ids[1], im_end_token_id=ids[2],
        tts_pad_token_id=ids[3], tts_bos_token_id=ids[4], tts_eos_token_id=ids[5],
        assistant_token_id=tok.convert_tokens_to_ids("assistant"))
    torch.manual_seed(spec.seed)
    model = Qwen3TTSForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.talker.codec_head.weight[2150] *= spec.eos_scale
    model.save_pretrained(path)
    # Qwen3TTSSpeakerEncoderConfig takes no **kwargs: the "model_type" key that save_pretrained
    # adds would make config.json unloadable (the released file has only enc_dim, sample_rate).
    cpath = os.path.join(path, "config.json")
    with open(cpath) as f:
        c = json.load(f)
    c["speaker_encoder_config"] = {k: v for k, v in c["speaker_encoder_config"].items()
                                   if k in spk_cfg}
    with open(cpath, "w") as f:
        json.dump(c, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(GEN_CFG, f, indent=2)
    tok.save_pretrained(path)
    shutil.rmtree(os.path.join(path, "_tok"), ignore_errors=True)
    st = os.path.join(path, "speech_tokenizer")
    if codec_dir is None:
        build_codec(st, seed=spec.seed)
    else:
        shutil.copytree(codec_dir, st, dirs_exist_ok=True)
    return path


def load_official(path):
    import torch
    from qwen_tts import Qwen3TTSModel

    return Qwen3TTSModel.from_pretrained(path, dtype=torch.float32)


GREEDY = dict(do_sample=False, subtalker_dosample=False)


def official_codes(tts, mode, **kw):
    """Greedy codes from the official wrapper without decoding audio: (list of (T,16) int arrays)."""
    import torch

    captured = {}
    orig = tts.model.generate

    def capture(*a, **k):
        codes, hid = orig(*a, **k)
        captured["codes"] = [c.cpu().numpy().astype(np.int32) for c in codes]
        return codes, hid

    tts.model.generate = capture
    try:
        with torch.no_grad():
            getattr(tts, f"generate_{mode}")(**kw)
    finally:
        tts.model.generate = orig
    return captured["codes"]


def with_options(tts, **fields):
    """A shallow copy of our loaded `Qwen3TTS` whose `options` has `fields` changed (the same
    weights: for fields that do not change the weights' layout, i.e. all but cpu_kernels)."""
    other = copy.copy(tts)
    other.options = dataclasses.replace(tts.options, **fields)
    return other
