"""The speech tokenizer's encoder: 24 kHz audio -> 12.5 Hz codes (official
`Qwen3TTSTokenizerV2Encoder`, TM:899-908, which is transformers' `MimiModel` without its decoder
half, as called by `Qwen3TTSTokenizerV2Model.encode`, TM:961-991), as pure float32 functions over
nested-dict params, plus the host side of the official `Qwen3TTSTokenizer.encode` (WT:128-257).

    wave (B, L) --conv_encoder (SEANet)--> (B, L/960, D) --encoder_transformer--> (B, L/960, D)
      --downsample (conv k4 s2)--> (B, L/1920, D) --quantize (split RVQ)--> codes (B, L/1920, 16)

Only the first `encoder_valid_num_quantizers` (16) of Mimi's 32 codebooks are kept by the official
code; the residual quantizer is sequential, so we compute only those 16 (1 semantic + 15 acoustic).
Item b keeps ceil(valid_samples_b / encode_downsample_rate) frames, like the official.

Causality and the official padding (why bucketing is exact). Every convolution is left-padded;
a strided one (kernel 2r, stride r) reads its own r-sample block and the previous one; the encoder
transformer is causal with FULL attention (`MimiTransformerModel` builds `create_causal_mask`,
which ignores `config.sliding_window`; one-shot encoding has no cache); the downsample reads 25 Hz
frames 2i-2..2i+1. So code frame i depends only on samples < (i + 1) * 1920, but its value still
depends on the *array width* W the official runs on, not only on the audio: `MimiConv1d` pads each
strided conv's input on the right to a whole number of strides, with zeros at THAT layer (pad_mode
"constant") and, for the downsample, by repeating the last 25 Hz frame (pad_mode "replicate").
When W is not a multiple of 1920, the last frame of the longest item sees that per-layer padding,
while a shorter item of the same (zero-padded) batch sees encoded zero audio instead; the
official's codes for an item therefore depend on the batch it is encoded in (last frame only).
We run on a buffer rounded up to a shape bucket and reproduce width W exactly: before each strided
conv the positions the official would not have are reset to what its padding puts there (zeros,
or the last frame for the downsample). `widths_B` is traced, so a new W costs no compilation.

params (from `rules(cfg)`; Linear weights are (in, out), conv weights keep the torch layout
(out, in, k)):
  seanet/conv_in, seanet/stages/[s]/{res/[j]/{conv1, conv2}, down}, seanet/conv_out: {weight, bias}
  transformer/layers/[i]/{input_norm, post_norm}: {weight, bias}, attn/{q, k, v, o},
                         mlp/{fc1, fc2}, attn_scale, mlp_scale
  downsample/weight (D, D, k)
  quantizer/{semantic, acoustic}/{input_proj (Dq, D, 1) when Dq != D,
                                  codebooks/[i]/{embed_sum (N, Dq), cluster_usage (N,)}}
  (only the codebooks the 16 kept codes use; `initialized`, `output_proj` and the other codebooks
  are decode-side tensors and are dropped at load time).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .. import layers
from ..buckets import ladder
from ..activations import ACTIVATIONS
from ..config import ConfigError, rope_scaling_of
from ..weights import Rule, expected_ours, flatten, load_official, nest
# The decoder's attention reads only num_attention_heads, num_key_value_heads and head_dim from its
# config, which EncoderConfig has under the same names.
from .decoder import attention, layer_norm

CODEBOOK_EPS = 1e-5     # MimiEuclideanCodebook(epsilon=1e-5): embed = embed_sum / clamp(usage, eps)
MIN_BUCKET_FRAMES = 16  # 1.28 s of audio


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The transformers `MimiConfig` values the encoder reads (its class defaults where the json
    omits one), plus the two top-level values `Qwen3TTSTokenizerV2Model.encode` uses.
    Hashable: the jitted encoder takes it as a static argument."""
    sampling_rate: int = 24000
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: tuple = (8, 6, 5, 4)
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    compress: int = 2
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    vector_quantization_hidden_dimension: int = 256
    num_semantic_quantizers: int = 1
    num_hidden_layers: int = 8
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "gelu"            # a key of `activations.ACTIVATIONS` (MimiMLP's ACT2FN)
    max_position_embeddings: int = 8000  # only yarn RoPE reads it
    rope_scaling: Mapping[str, Any] | None = None   # see `config.ROPE_TYPES`
    downsample_kernel: int = 4          # 2 * int(encodec_frame_rate / frame_rate); stride 2
    valid_num_quantizers: int = 16      # top-level encoder_valid_num_quantizers
    encode_downsample_rate: int = 1920  # top-level: samples per frame when counting valid frames

    @property
    def hop_length(self) -> int:
        """Samples per frame of the SEANet output (25 Hz at 24 kHz)."""
        return math.prod(self.upsampling_ratios)

    @property
    def frame_size(self) -> int:
        """Samples per code frame (Mimi's `frame_size`): SEANet hop times the downsample stride."""
        return 2 * self.hop_length

    @property
    def has_input_proj(self) -> bool:
        return self.vector_quantization_hidden_dimension != self.hidden_size

    @property
    def used_codebooks(self) -> tuple[int, int]:
        """(semantic, acoustic) codebooks that the kept `valid_num_quantizers` codes come from."""
        sem = min(self.num_semantic_quantizers, self.valid_num_quantizers)
        return sem, self.valid_num_quantizers - sem


def parse_encoder_config(d: Mapping[str, Any], *, valid_num_quantizers: int = 16,
                         encode_downsample_rate: int = 1920) -> EncoderConfig:
    """The speech tokenizer config.json's `encoder_config` dict (a `MimiConfig`), with the top-level
    `encoder_valid_num_quantizers` and `encode_downsample_rate`. Raises ConfigError for values the
    official code would reject or that no released codec uses."""
    names = {f.name for f in dataclasses.fields(EncoderConfig)} - {
        "downsample_kernel", "valid_num_quantizers", "encode_downsample_rate"}
    vals = {k: v for k, v in d.items() if k in names and v is not None}
    # MimiConfig.__init__: falsy ratios / head_dim fall back, codebook_dim None means hidden_size.
    vals["upsampling_ratios"] = tuple(d.get("upsampling_ratios") or EncoderConfig.upsampling_ratios)
    hidden = vals.get("hidden_size", EncoderConfig.hidden_size)
    heads = vals.get("num_attention_heads", EncoderConfig.num_attention_heads)
    vals["head_dim"] = d.get("head_dim") or hidden // heads
    if d.get("codebook_dim", 0) is None:
        vals["codebook_dim"] = hidden
    vals["rope_scaling"] = rope_scaling_of(d, "encoder_config")
    cfg = EncoderConfig(valid_num_quantizers=valid_num_quantizers,
                        encode_downsample_rate=encode_downsample_rate, **vals)

    sr = cfg.sampling_rate
    encodec_frame_rate = math.ceil(sr / cfg.hop_length)
    # MimiConfig keeps an explicit frame rate as `_frame_rate`, the key save_pretrained writes
    # (and which, when present, wins over `frame_rate`); None: computed from the strides.
    frame_rate = d["_frame_rate"] if "_frame_rate" in d else d.get("frame_rate")
    frame_rate = frame_rate or sr / cfg.frame_size
    kernel = 2 * int(encodec_frame_rate / frame_rate)
    if frame_rate == encodec_frame_rate or kernel < 2:
        raise ConfigError(f"encoder_config frame_rate {frame_rate} must be below the SEANet frame "
                          f"rate {encodec_frame_rate}: the official MimiModel otherwise has no "
                          "(or an empty) downsample layer and cannot encode")
    cfg = dataclasses.replace(cfg, downsample_kernel=kernel)

    unsupported = {  # key: (official default, why we only run that value)
        "audio_channels": (1, "mono audio"), "use_causal_conv": (True, "causal convolutions"),
        "pad_mode": ("constant", "zero padding"),
        "use_conv_shortcut": (False, "identity shortcuts"),
        "attention_bias": (False, "no attention bias"),
    }
    for k, (default, what) in unsupported.items():
        if d.get(k, default) != default:
            raise ConfigError(f"encoder_config {k}={d[k]!r} is not supported (only {default!r}: "
                              f"{what}, as in the released speech tokenizer)")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"encoder_config hidden_act {cfg.hidden_act!r} is not supported "
                          f"(supported: {sorted(ACTIVATIONS)})")
    if not isinstance(cfg.residual_kernel_size, int):
        raise ConfigError("encoder_config residual_kernel_size must be one integer (the official "
                          f"MimiResnetBlock uses (residual_kernel_size, 1)); got "
                          f"{cfg.residual_kernel_size!r}")
    # Shapes the official encoder cannot run either (MimiModel refuses them at construction or
    # fails in forward): refused here by name.
    official = "; the official encoder cannot run it either"
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    if cfg.hidden_size % H:
        raise ConfigError(f"encoder_config num_attention_heads ({H}) must divide hidden_size "
                          f"({cfg.hidden_size}) (MimiAttention requires it even with an explicit "
                          f"head_dim){official}")
    if H % K:
        raise ConfigError(f"encoder_config num_attention_heads ({H}) must be a multiple of "
                          f"num_key_value_heads ({K}){official}")
    if cfg.head_dim % 2:
        raise ConfigError(f"encoder_config head_dim ({cfg.head_dim}) must be even (rotate-half "
                          f"RoPE){official}")
    q_dim = cfg.vector_quantization_hidden_dimension if cfg.has_input_proj else cfg.hidden_size
    if cfg.codebook_dim != q_dim:
        raise ConfigError(f"encoder_config codebook_dim ({cfg.codebook_dim}) must equal the "
                          f"quantizer input width ({q_dim}: vector_quantization_hidden_dimension, "
                          f"or hidden_size when they are equal){official}")
    if not 1 <= cfg.num_semantic_quantizers < cfg.num_quantizers:
        raise ConfigError(f"encoder_config num_semantic_quantizers ({cfg.num_semantic_quantizers})"
                          f" must be in [1, num_quantizers = {cfg.num_quantizers}){official}")
    if valid_num_quantizers < 1:
        raise ConfigError(f"encoder_valid_num_quantizers ({valid_num_quantizers}) must be >= 1 "
                          "(the official encode would return codes of no codebook, which no "
                          "decoder reads)")
    # The official keeps codes[:, :encoder_valid_num_quantizers]: a larger value keeps all of them.
    cfg = dataclasses.replace(cfg, valid_num_quantizers=min(valid_num_quantizers,
                                                            cfg.num_quantizers))
    return cfg


# ----------------------------------------------------------------------------- weights

def _seanet_convs(cfg: EncoderConfig):
    """(official key prefix, our path, (out, in, k)) of every conv of `MimiEncoder.layers`, whose
    list interleaves convs, resnet blocks and parameter-free ELUs."""
    L = "encoder.encoder.layers."
    convs = [(f"{L}0.conv", "seanet/conv_in", (cfg.num_filters, 1, cfg.kernel_size))]
    i, dim = 1, cfg.num_filters
    for s, ratio in enumerate(reversed(cfg.upsampling_ratios)):
        hidden = dim // cfg.compress
        for j in range(cfg.num_residual_layers):
            # block = [ELU, conv1, ELU, conv2]
            convs += [(f"{L}{i}.block.1.conv", f"seanet/stages/{s}/res/{j}/conv1",
                       (hidden, dim, cfg.residual_kernel_size)),
                      (f"{L}{i}.block.3.conv", f"seanet/stages/{s}/res/{j}/conv2",
                       (dim, hidden, 1))]
            i += 1
        convs.append((f"{L}{i + 1}.conv", f"seanet/stages/{s}/down", (2 * dim, dim, 2 * ratio)))
        i, dim = i + 2, 2 * dim
    convs.append((f"{L}{i + 1}.conv", "seanet/conv_out",
                  (cfg.hidden_size, dim, cfg.last_kernel_size)))
    return convs


_T = r"encoder\.encoder_transformer\.layers\.(\d+)\."
_Q = r"encoder\.quantizer\.(semantic|acoustic)_residual_vector_quantizer\."
_RULES = [
    Rule(_T + r"self_attn\.(q|k|v|o)_proj\.weight", "transformer/layers/{1}/attn/{2}", "linear"),
    Rule(_T + r"mlp\.(fc1|fc2)\.weight", "transformer/layers/{1}/mlp/{2}", "linear"),
    Rule(_T + r"input_layernorm\.(weight|bias)", "transformer/layers/{1}/input_norm/{2}"),
    Rule(_T + r"post_attention_layernorm\.(weight|bias)", "transformer/layers/{1}/post_norm/{2}"),
    Rule(_T + r"self_attn_layer_scale\.scale", "transformer/layers/{1}/attn_scale"),
    Rule(_T + r"mlp_layer_scale\.scale", "transformer/layers/{1}/mlp_scale"),
    Rule(r"encoder\.downsample\.conv\.weight", "downsample/weight"),
    Rule(_Q + r"layers\.(\d+)\.codebook\.(embed_sum|cluster_usage|initialized)",
         "quantizer/{1}/codebooks/{2}/{3}"),
    Rule(_Q + r"(input_proj|output_proj)\.weight", "quantizer/{1}/{2}"),
]


def rules(cfg: EncoderConfig) -> list[Rule]:
    """Official `encoder.*` key -> our path (the SEANet indices depend on the config)."""
    return [Rule(re.escape(src) + r"\.(weight|bias)", dst + "/{1}")
            for src, dst, _ in _seanet_convs(cfg)] + _RULES


def expected_shapes(cfg: EncoderConfig) -> dict:
    """{official key: shape} of every `encoder.*` tensor of the official module for `cfg`."""
    out = {}
    for src, _, shape in _seanet_convs(cfg):
        out[src + ".weight"], out[src + ".bias"] = shape, shape[:1]
    D, H, K, Dh, F = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                      cfg.head_dim, cfg.intermediate_size)
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.encoder_transformer.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (H * Dh, D),
                    p + "self_attn.k_proj.weight": (K * Dh, D),
                    p + "self_attn.v_proj.weight": (K * Dh, D),
                    p + "self_attn.o_proj.weight": (D, H * Dh),
                    p + "mlp.fc1.weight": (F, D), p + "mlp.fc2.weight": (D, F),
                    p + "self_attn_layer_scale.scale": (D,), p + "mlp_layer_scale.scale": (D,)})
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[p + norm + ".weight"] = out[p + norm + ".bias"] = (D,)
    out["encoder.downsample.conv.weight"] = (D, D, cfg.downsample_kernel)
    Dq, N = cfg.vector_quantization_hidden_dimension, cfg.codebook_size
    for name, n in (("semantic", cfg.num_semantic_quantizers),
                    ("acoustic", cfg.num_quantizers - cfg.num_semantic_quantizers)):
        p = f"encoder.quantizer.{name}_residual_vector_quantizer."
        if cfg.has_input_proj:
            out[p + "input_proj.weight"], out[p + "output_proj.weight"] = (Dq, D, 1), (D, Dq, 1)
        for i in range(n):
            out[p + f"layers.{i}.codebook.initialized"] = (1,)
            out[p + f"layers.{i}.codebook.embed_sum"] = (N, cfg.codebook_dim)
            out[p + f"layers.{i}.codebook.cluster_usage"] = (N,)
    return out


def _used(path: str, cfg: EncoderConfig) -> bool:
    """Whether encoding reads the tensor at our `path` (see the module docstring)."""
    if path.endswith(("/initialized", "/output_proj")):
        return False
    m = re.match(r"quantizer/(semantic|acoustic)/codebooks/(\d+)/", path)
    return m is None or int(m.group(2)) < cfg.used_codebooks[m.group(1) == "acoustic"]


def expected_params(cfg: EncoderConfig) -> dict:
    """{our path: shape} of the params `load` returns (for `weights.load_params` of a fast form)."""
    return {k: s for k, s in expected_ours(rules(cfg), expected_shapes(cfg)).items()
            if _used(k, cfg)}


def load(files: list[str], cfg: EncoderConfig, dtype=jnp.float32, what: str = "speech tokenizer"):
    """The encoder params from the official safetensors `files` (keys `encoder.*`). Raises
    CheckpointError listing every missing, unexpected or misshapen key."""
    params = load_official(files, rules(cfg), expected_shapes(cfg), dtype,
                           what=f"{what} encoder", prefix="encoder.")
    return nest({k: v for k, v in flatten(params).items() if _used(k, cfg)})


# ----------------------------------------------------------------------------- stages

def _ceil_div(a, b):
    return -(-a // b)


def conv1d(p, x_BxTxC, stride: int = 1, dilation: int = 1):
    """`MimiConv1d`, causal: left-pad (k - 1) * dilation + 1 - stride zeros and, on the right, the
    zeros that make the length a whole number of strides; T frames -> ceil(T / stride)."""
    w_OxIxK = p["weight"]
    T = x_BxTxC.shape[1]
    extra = _ceil_div(T, stride) * stride - T
    left = (w_OxIxK.shape[-1] - 1) * dilation + 1 - stride
    y = jax.lax.conv_general_dilated(x_BxTxC, w_OxIxK, window_strides=(stride,),
                                     padding=[(left, extra)], rhs_dilation=(dilation,),
                                     dimension_numbers=("NWC", "OIW", "NWC"))
    return y + p["bias"] if "bias" in p else y


def _frame_index(x_BxTxC):
    return jnp.arange(x_BxTxC.shape[1])[None, :, None]


def resnet_block(p, x_BxTxC, dilation: int):
    """`MimiResnetBlock`: x + conv2(ELU(conv1(ELU(x)))), conv1 (k, dilated) halves the channels,
    conv2 (k = 1) restores them; identity shortcut."""
    h = conv1d(p["conv1"], jax.nn.elu(x_BxTxC), dilation=dilation)
    return x_BxTxC + conv1d(p["conv2"], jax.nn.elu(h))


def conv_encoder(p, cfg: EncoderConfig, wave_BxL, widths_B=None):
    """`MimiEncoder` (SEANet): wave (B, L) -> (B, ceil(L / hop_length), hidden_size), as the
    official computes it on each row's first `widths_B` samples (default: all L; see the module
    docstring: before each strided conv the frames beyond the official input length are zeroed,
    which is what the official's extra right padding holds)."""
    x = wave_BxL[..., None]
    widths_B = jnp.full(wave_BxL.shape[:1], wave_BxL.shape[1]) if widths_B is None else widths_B
    x = conv1d(p["conv_in"], x)
    hop = 1
    for sp, ratio in zip(p["stages"], reversed(cfg.upsampling_ratios)):
        for j, rp in enumerate(sp["res"]):
            x = resnet_block(rp, x, cfg.dilation_growth_rate ** j)
        x = jax.nn.elu(x)
        x = jnp.where(_frame_index(x) < _ceil_div(widths_B, hop)[:, None, None], x, 0.0)
        x = conv1d(sp["down"], x, stride=ratio)
        hop *= ratio
    return conv1d(p["conv_out"], jax.nn.elu(x))


def encoder_transformer(p, cfg: EncoderConfig, x_BxTxD):
    """`MimiTransformerModel` as `MimiModel._encode_frame` calls it: pre-LayerNorm layers with
    LayerScale on both branches, RoPE over positions 0..T-1, causal attention over ALL previous
    frames (no sliding window: see the module docstring), MLP fc1 -> exact GELU -> fc2, no final
    norm. (B, T, D) -> (B, T, D)."""
    T = x_BxTxD.shape[1]
    cos_sin = layers.rope_cos_sin(jnp.arange(T)[None], cfg.head_dim, cfg.rope_theta, x_BxTxD.dtype,
                                  cfg.rope_scaling, cfg.max_position_embeddings)
    mask_TxT = jnp.tril(jnp.ones((T, T), bool))

    def layer(x, lp):
        h = attention(lp["attn"], cfg, layer_norm(lp["input_norm"], x, cfg.norm_eps), cos_sin,
                      mask_TxT)
        x = x + lp["attn_scale"] * h
        h = layer_norm(lp["post_norm"], x, cfg.norm_eps)
        h = ACTIVATIONS[cfg.hidden_act](h @ lp["mlp"]["fc1"]) @ lp["mlp"]["fc2"]
        return x + lp["mlp_scale"] * h, None

    # One compiled layer body for all layers (compile time), weights stacked along a leading axis.
    return jax.lax.scan(layer, x_BxTxD, _stack(p["layers"]))[0]


def _stack(trees: list):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def downsample(p, cfg: EncoderConfig, x_BxTxD, widths_B=None):
    """`MimiModel.downsample`: causal conv (k = downsample_kernel, stride 2, no bias) padded by
    repeating the edge frames (pad_mode "replicate"). (B, T, D) -> (B, ceil(T / 2), D), for each
    row as the official computes it at width `widths_B` samples (frames past the official length
    repeat its last frame)."""
    if widths_B is not None:
        n_B = _ceil_div(widths_B, cfg.hop_length)
        last_Bx1xD = jnp.take_along_axis(x_BxTxD, (n_B - 1)[:, None, None], axis=1)
        x_BxTxD = jnp.where(_frame_index(x_BxTxD) < n_B[:, None, None], x_BxTxD, last_Bx1xD)
    T = x_BxTxD.shape[1]
    x = jnp.pad(x_BxTxD, ((0, 0), (cfg.downsample_kernel - 2, _ceil_div(T, 2) * 2 - T), (0, 0)),
                mode="edge")
    return jax.lax.conv_general_dilated(x, p["weight"], window_strides=(2,), padding="VALID",
                                        dimension_numbers=("NWC", "OIW", "NWC"))


def codebook(p):
    """`MimiEuclideanCodebook.embed`: embed_sum / clamp(cluster_usage, 1e-5). (N, Dq)."""
    return p["embed_sum"] / jnp.maximum(p["cluster_usage"], CODEBOOK_EPS)[:, None]


def nearest(x_NxD, embed_KxD):
    """Index of the nearest codebook row, computed like `torch.cdist` (its matmul form for more than
    25 rows: sqrt(max(|x|^2 - 2 x.e + |e|^2, 1e-30))) followed by `argmin` (first of equal values),
    so that near-ties break the way the official's do as far as float32 allows."""
    d2 = (jnp.sum(x_NxD * x_NxD, -1, keepdims=True) - 2.0 * (x_NxD @ embed_KxD.T)
          + jnp.sum(embed_KxD * embed_KxD, -1)[None])
    return jnp.argmin(jnp.sqrt(jnp.maximum(d2, 1e-30)), axis=-1).astype(jnp.int32)


def rvq_encode(p, x_BxTxD, num_codebooks: int):
    """`MimiResidualVectorQuantizer.encode` with its first `num_codebooks` codebooks: 1x1 input
    projection (when present), then per codebook the nearest row of the residual, which is
    then reduced by that row. (B, T, D) -> (B, T, num_codebooks) int32."""
    B, T, _ = x_BxTxD.shape
    x = x_BxTxD @ p["input_proj"][:, :, 0].T if "input_proj" in p else x_BxTxD
    books = p.get("codebooks", [])[:num_codebooks]
    if not books:
        return jnp.zeros((B, T, 0), jnp.int32)

    def step(residual_NxD, cb):
        embed = codebook(cb)
        idx_N = nearest(residual_NxD, embed)
        return residual_NxD - jnp.take(embed, idx_N, axis=0), idx_N

    _, codes_KxN = jax.lax.scan(step, x.reshape(B * T, -1), _stack(books))
    return codes_KxN.T.reshape(B, T, len(books))


def quantize(p, cfg: EncoderConfig, latents_BxTxD):
    """`MimiSplitResidualVectorQuantizer.encode` keeping the first `valid_num_quantizers` codes:
    the semantic and the acoustic quantizer both encode the same latents (not one another's
    residual). (B, T, D) -> (B, T, valid_num_quantizers) int32."""
    sem, aco = cfg.used_codebooks
    codes = [rvq_encode(p["semantic"], latents_BxTxD, sem)]
    if aco:
        codes.append(rvq_encode(p["acoustic"], latents_BxTxD, aco))
    return jnp.concatenate(codes, -1)


def encode_stages(params, cfg: EncoderConfig, wave_BxL, widths_B=None) -> dict:
    """The official `MimiModel._encode_frame` on wave (B, L) float32, for row b as computed at width
    `widths_B[b]` samples (default L); every stage channels-last under the official module's name:
      "encoder" (B, ceil(L / hop), D), "encoder_transformer" (same), "downsample" (B, T, D) and
      "codes" (B, T, valid_num_quantizers) int32, with T = ceil(L / frame_size).
    Frames past a row's width are not meaningful.

    Runs with float32 matmuls and convolutions even where the default would be TF32 or bf16
    passes (GPU, TPU): codes are nearest-neighbour decisions, and reduced precision flips close
    ones. `jit_encode_stages` is this function jitted: static are `cfg` (it decides the program)
    and the buffer length L (a shape); the waveform and the widths are traced, so one program
    serves every width <= L."""
    with jax.default_matmul_precision("float32"):
        s = {}
        h = s["encoder"] = conv_encoder(params["seanet"], cfg, wave_BxL, widths_B)
        h = s["encoder_transformer"] = encoder_transformer(params["transformer"], cfg, h)
        h = s["downsample"] = downsample(params["downsample"], cfg, h, widths_B)
        s["codes"] = quantize(params["quantizer"], cfg, h)
    return s


jit_encode_stages = jax.jit(encode_stages, static_argnames=("cfg",))


# ----------------------------------------------------------------------------- host side

def frame_bucket(num_frames: int) -> int:
    """Code frames a buffer is rounded up to: 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x
    powers of two, the decoder's ladder in tokenizer.py): at most +50 % work, few programs."""
    return ladder(num_frames, MIN_BUCKET_FRAMES)


def pad_batch(waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """What `EncodecFeatureExtractor` (padding=True, right, value 0) makes of 1-D float32 waves:
    (B, max length) zero-padded on the right, and the lengths (the padding mask's sums)."""
    lengths_B = np.array([len(w) for w in waves], np.int64)
    wave_BxT = np.zeros((len(waves), int(lengths_B.max(initial=0))), np.float32)
    for b, w in enumerate(waves):
        wave_BxT[b, :len(w)] = w
    return wave_BxT, lengths_B


def encode(params, cfg: EncoderConfig, wave_BxT, lengths_B) -> list[np.ndarray]:
    """The official `Qwen3TTSTokenizerV2Model.encode(wave_BxT, padding_mask)`: 24 kHz float32 audio
    (B, T), right-padded, with each row's valid sample count -> one int32 array of codes
    (ceil(length / 1920), 16) per row.

    Exactly the official computation on the (B, T) array, including its dependence on T (see the
    module docstring); the buffer is zero-padded to a bucket of `frame_bucket` frames, which does
    not change the result. Like the official, attention spans the whole utterance: memory grows
    with (T / 960)^2 * num_attention_heads floats per row (~70 MB for a 60 s reference).

    >>> wave_BxT, lengths_B = pad_batch([wave_a, wave_b])
    >>> codes = encode(params, cfg, wave_BxT, lengths_B)      # [(Ta, 16), (Tb, 16)]
    """
    wave = np.asarray(wave_BxT, np.float32)
    lengths = np.asarray(lengths_B, np.int64)
    if wave.ndim != 2 or wave.shape[1] == 0:
        raise ValueError(f"expected a (batch, samples) waveform array; got shape {wave.shape}")
    if lengths.shape != wave.shape[:1] or (lengths < 0).any() or (lengths > wave.shape[1]).any():
        raise ValueError(f"lengths {lengths.tolist()} must give each row's valid samples, in "
                         f"[0, {wave.shape[1]}]")
    B, T = wave.shape
    L = frame_bucket(_ceil_div(T, cfg.frame_size)) * cfg.frame_size
    buf = np.zeros((B, L), np.float32)
    buf[:, :T] = wave
    # The stages other than the codes stay on the device: returning them costs B * T * D floats,
    # and sharing one program with the stage-by-stage parity tests halves their compile time.
    codes = np.asarray(jit_encode_stages(params, cfg, buf, np.full(B, T, np.int32))["codes"])
    # The official keeps ceil(length / encode_downsample_rate) frames of a code array that has
    # ceil(T / frame_size): where a frame is longer than that rate, the array is the limit.
    frames = np.minimum(_ceil_div(lengths, cfg.encode_downsample_rate),
                        _ceil_div(T, cfg.frame_size))
    return [codes[b, :frames[b]].copy() for b in range(B)]
