"""The speech tokenizer's decoder (official `Qwen3TTSTokenizerV2Decoder`, TM:824-896): 16 codebooks
of 12.5 Hz codes -> 24 kHz waveform, as pure functions over nested-dict params, in float32.

    codes (B, T, 16) --quantizer_decode--> (B, T, codebook_dim) --pre_conv--> (B, T, latent_dim)
      --pre_transformer--> (B, T, latent_dim) --upsample_block x2--> (B, 4T, latent_dim)
      --decoder (conv, decoder_block x4, SnakeBeta, conv)--> (B, 1920 T) in [-1, 1]

Activations are channels-last (B, T, C) throughout; the official code is channels-first. Every stage is
causal (left-padded convolutions, transposed convolutions trimmed on the right, causal sliding-window
attention, per-frame norms): output sample s depends only on frames <= s // 1920. So appending frames
on the right and trimming the output is exact, which is what the shape buckets and the chunked decoding
in `tokenizer.py` rely on.

Precision (`pack_bf16`, `codec_precision="bf16"`): the full convolutions' weights as
`cpu_kernels.PackedBf16Conv`, which `causal_conv` / `causal_trans_conv` run on the AVX-512 BF16
kernel (inputs and weights rounded to bf16, float32 sums); the type of the weight picks the kernel,
so it is part of the compiled program's key.

Streaming (`stream_decode`): the same functions with a `_Stream` threaded through them carry the
decoder's state from one call to the next: each convolution's last input samples (what its left
padding would otherwise be), and each attention layer's keys and values of the last
sliding_window - 1 frames with the frame counter for RoPE. Decoding frames a chunk at a time that
way is the whole-sequence decode (float rounding), at the cost of the new frames only.

params (from `RULES`; Linear weights are (in, out); the vocoder's conv weights are stored in the
layout the convolutions take, so that no call copies them (`weights.Rule` transforms): Conv1d
(out, in / groups, k) as (k, in / groups, out), ConvTranspose1d (in, out, m * stride) as its
polyphase form (m, in, stride * out), `weights.polyphase`; the quantizer's 1x1 projections keep
the torch layout):
  quantizer/{first,rest}: codebooks/[i]/{embedding_sum (N, Dq), cluster_usage (N,)},
                          output_proj (codebook_dim, Dq, 1), input_proj (Dq, codebook_dim, 1)
                          (input_proj is only used for encoding; it is loaded so that the fast form
                          is a complete copy of the official `decoder.*` tensors)
  pre_conv/{weight, bias}
  pre_transformer/{input_proj, output_proj}/{weight, bias}, norm,
                  layers/[i]/{input_norm, post_norm, attn_scale, mlp_scale, attn/{q,k,v,o},
                              mlp/{gate,up,down}}
  upsample/[i]/{trans_conv/{weight, bias}, convnext/{dwconv/{weight, bias}, norm/{weight, bias},
                pwconv1/{weight, bias}, pwconv2/{weight, bias}, gamma}}
  decoder/[0]: {weight, bias} (conv), [1..n]: decoder blocks {snake, trans_conv, units/[3]},
          [n+1]: {alpha, beta} (SnakeBeta), [n+2]: {weight, bias} (conv)   -- the official list
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import cpu_kernels, layers
from ..cpu_kernels import PackedBf16Conv
from ..weights import Rule
from .config import DecoderConfig

RESIDUAL_DILATIONS = (1, 3, 9)   # hard-coded in the official DecoderBlock (TM:650)

_P = r"decoder\."
RULES = [
    Rule(_P + r"quantizer\.rvq_(first|rest)\.vq\.layers\.(\d+)\._codebook\."
              r"(embedding_sum|cluster_usage)", "quantizer/{1}/codebooks/{2}/{3}"),
    Rule(_P + r"quantizer\.rvq_(first|rest)\.(input_proj|output_proj)\.weight", "quantizer/{1}/{2}"),
    Rule(_P + r"pre_conv\.conv\.weight", "pre_conv/weight", "conv"),
    Rule(_P + r"pre_conv\.conv\.bias", "pre_conv/bias"),
    Rule(_P + r"pre_transformer\.(input_proj|output_proj)\.weight", "pre_transformer/{1}/weight",
         "linear"),
    Rule(_P + r"pre_transformer\.(input_proj|output_proj)\.bias", "pre_transformer/{1}/bias"),
    Rule(_P + r"pre_transformer\.norm\.weight", "pre_transformer/norm"),
    Rule(_P + r"pre_transformer\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight",
         "pre_transformer/layers/{1}/attn/{2}", "linear"),
    Rule(_P + r"pre_transformer\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight",
         "pre_transformer/layers/{1}/mlp/{2}", "linear"),
    Rule(_P + r"pre_transformer\.layers\.(\d+)\.input_layernorm\.weight",
         "pre_transformer/layers/{1}/input_norm"),
    Rule(_P + r"pre_transformer\.layers\.(\d+)\.post_attention_layernorm\.weight",
         "pre_transformer/layers/{1}/post_norm"),
    Rule(_P + r"pre_transformer\.layers\.(\d+)\.self_attn_layer_scale\.scale",
         "pre_transformer/layers/{1}/attn_scale"),
    Rule(_P + r"pre_transformer\.layers\.(\d+)\.mlp_layer_scale\.scale",
         "pre_transformer/layers/{1}/mlp_scale"),
    # upsample transposed convs have k = stride (one tap), decoder blocks' k = 2 * stride (two)
    Rule(_P + r"upsample\.(\d+)\.0\.conv\.weight", "upsample/{1}/trans_conv/weight", "polyphase1"),
    Rule(_P + r"upsample\.(\d+)\.0\.conv\.bias", "upsample/{1}/trans_conv/bias"),
    Rule(_P + r"upsample\.(\d+)\.1\.dwconv\.conv\.weight", "upsample/{1}/convnext/dwconv/weight",
         "conv"),
    Rule(_P + r"upsample\.(\d+)\.1\.dwconv\.conv\.bias", "upsample/{1}/convnext/dwconv/bias"),
    Rule(_P + r"upsample\.(\d+)\.1\.(pwconv1|pwconv2)\.weight", "upsample/{1}/convnext/{2}/weight",
         "linear"),
    Rule(_P + r"upsample\.(\d+)\.1\.(pwconv1|pwconv2|norm)\.bias", "upsample/{1}/convnext/{2}/bias"),
    Rule(_P + r"upsample\.(\d+)\.1\.norm\.weight", "upsample/{1}/convnext/norm/weight"),
    Rule(_P + r"upsample\.(\d+)\.1\.gamma", "upsample/{1}/convnext/gamma"),
    Rule(_P + r"decoder\.(\d+)\.conv\.weight", "decoder/{1}/weight", "conv"),
    Rule(_P + r"decoder\.(\d+)\.conv\.bias", "decoder/{1}/bias"),
    Rule(_P + r"decoder\.(\d+)\.(alpha|beta)", "decoder/{1}/{2}"),
    Rule(_P + r"decoder\.(\d+)\.block\.0\.(alpha|beta)", "decoder/{1}/snake/{2}"),
    Rule(_P + r"decoder\.(\d+)\.block\.1\.conv\.weight", "decoder/{1}/trans_conv/weight",
         "polyphase2"),
    Rule(_P + r"decoder\.(\d+)\.block\.1\.conv\.bias", "decoder/{1}/trans_conv/bias"),
    # block.2..4 are the residual units (dilations 1, 3, 9): units/0..2 here.
    *(Rule(_P + rf"decoder\.(\d+)\.block\.{u + 2}\.(act1|act2)\.(alpha|beta)",
           f"decoder/{{1}}/units/{u}/{{2}}/{{3}}") for u in range(3)),
    *(Rule(_P + rf"decoder\.(\d+)\.block\.{u + 2}\.(conv1|conv2)\.conv\.weight",
           f"decoder/{{1}}/units/{u}/{{2}}/weight", "conv") for u in range(3)),
    *(Rule(_P + rf"decoder\.(\d+)\.block\.{u + 2}\.(conv1|conv2)\.conv\.bias",
           f"decoder/{{1}}/units/{u}/{{2}}/bias") for u in range(3)),
]


def expected_shapes(cfg: DecoderConfig) -> dict:
    """{official key: shape} of every `decoder.*` tensor of the official module with config `cfg`."""
    out = {}
    Dc, Dq, N, L = cfg.codebook_dim, cfg.codebook_dim // 2, cfg.codebook_size, cfg.latent_dim
    for name, n in (("first", 1), ("rest", cfg.num_quantizers - 1)):
        p = f"decoder.quantizer.rvq_{name}."
        out[p + "input_proj.weight"] = (Dq, Dc, 1)
        out[p + "output_proj.weight"] = (Dc, Dq, 1)
        for i in range(n):
            out[p + f"vq.layers.{i}._codebook.embedding_sum"] = (N, Dq)
            out[p + f"vq.layers.{i}._codebook.cluster_usage"] = (N,)
    out["decoder.pre_conv.conv.weight"] = (L, Dc, 3)
    out["decoder.pre_conv.conv.bias"] = (L,)

    D, H, K, Dh, F = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                      cfg.head_dim, cfg.intermediate_size)
    p = "decoder.pre_transformer."
    out.update({p + "input_proj.weight": (D, L), p + "input_proj.bias": (D,),
                p + "output_proj.weight": (L, D), p + "output_proj.bias": (L,),
                p + "norm.weight": (D,)})
    for i in range(cfg.num_hidden_layers):
        lp = f"{p}layers.{i}."
        out.update({
            lp + "self_attn.q_proj.weight": (H * Dh, D), lp + "self_attn.k_proj.weight": (K * Dh, D),
            lp + "self_attn.v_proj.weight": (K * Dh, D), lp + "self_attn.o_proj.weight": (D, H * Dh),
            lp + "mlp.gate_proj.weight": (F, D), lp + "mlp.up_proj.weight": (F, D),
            lp + "mlp.down_proj.weight": (D, F),
            lp + "input_layernorm.weight": (D,), lp + "post_attention_layernorm.weight": (D,),
            lp + "self_attn_layer_scale.scale": (D,), lp + "mlp_layer_scale.scale": (D,),
        })

    for i, r in enumerate(cfg.upsampling_ratios):
        p = f"decoder.upsample.{i}."
        out.update({
            p + "0.conv.weight": (L, L, r), p + "0.conv.bias": (L,),
            p + "1.dwconv.conv.weight": (L, 1, 7), p + "1.dwconv.conv.bias": (L,),
            p + "1.norm.weight": (L,), p + "1.norm.bias": (L,),
            p + "1.pwconv1.weight": (4 * L, L), p + "1.pwconv1.bias": (4 * L,),
            p + "1.pwconv2.weight": (L, 4 * L), p + "1.pwconv2.bias": (L,),
            p + "1.gamma": (L,),
        })

    n = len(cfg.upsample_rates)
    out["decoder.decoder.0.conv.weight"] = (cfg.decoder_dim, L, 7)
    out["decoder.decoder.0.conv.bias"] = (cfg.decoder_dim,)
    for i, r in enumerate(cfg.upsample_rates):
        cin, cout = cfg.decoder_dim // 2 ** i, cfg.decoder_dim // 2 ** (i + 1)
        p = f"decoder.decoder.{i + 1}.block."
        out.update({p + "0.alpha": (cin,), p + "0.beta": (cin,),
                    p + "1.conv.weight": (cin, cout, 2 * r), p + "1.conv.bias": (cout,)})
        for u in range(len(RESIDUAL_DILATIONS)):
            up = f"{p}{u + 2}."
            out.update({up + "act1.alpha": (cout,), up + "act1.beta": (cout,),
                        up + "act2.alpha": (cout,), up + "act2.beta": (cout,),
                        up + "conv1.conv.weight": (cout, cout, 7), up + "conv1.conv.bias": (cout,),
                        up + "conv2.conv.weight": (cout, cout, 1), up + "conv2.conv.bias": (cout,)})
    cout = cfg.decoder_dim // 2 ** n
    out.update({f"decoder.decoder.{n + 1}.alpha": (cout,), f"decoder.decoder.{n + 1}.beta": (cout,),
                f"decoder.decoder.{n + 2}.conv.weight": (1, cout, 7),
                f"decoder.decoder.{n + 2}.conv.bias": (1,)})
    return out


# ----------------------------------------------------------------------------- precision

PRECISIONS = ("float32", "bf16")
# Convolutions narrower than this stay float32 in bf16 mode (the final conv to one channel: a
# 16-column kernel tile would multiply 15 zero columns); so do the depthwise ConvNeXt convs
# (grouped), the pre-transformer and the ConvNeXt's Linear layers (a few % of the work).
BF16_MIN_OUT = 16


def check_precision(precision: str) -> None:
    """ValueError for a precision that is not one of PRECISIONS, and, for "bf16", where its
    kernel cannot run (`cpu_kernels.check_bf16_conv`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"codec precision must be one of {', '.join(map(repr, PRECISIONS))}; "
                         f"got {precision!r}")
    if precision == "bf16":
        cpu_kernels.check_bf16_conv()


def pack_bf16(params) -> dict:
    """The decoder's params with the weights of its full (not grouped) convolutions and
    transposed convolutions of at least BF16_MIN_OUT output channels as `PackedBf16Conv`, which
    `causal_conv` / `causal_trans_conv` run on the bf16 kernel (`codec_precision="bf16"`:
    inputs and weights rounded to bf16, float32 sums; benchmarks/RESULTS.md, Decisions: "bf16
    codec"). The rest stays float32."""
    def pk(p):
        w = p["weight"]
        if isinstance(w, PackedBf16Conv) or w.shape[-1] < BF16_MIN_OUT:
            return p
        return {**p, "weight": cpu_kernels.pack_conv_bf16(w)}

    out = dict(params)
    out["pre_conv"] = pk(params["pre_conv"])
    if "upsample" in params:
        out["upsample"] = [{**u, "trans_conv": pk(u["trans_conv"])} for u in params["upsample"]]
    dec = list(params["decoder"])
    n = len(dec) - 3
    dec[0], dec[n + 2] = pk(dec[0]), pk(dec[n + 2])
    for i in range(1, n + 1):
        dec[i] = {**dec[i], "trans_conv": pk(dec[i]["trans_conv"]),
                  "units": [{**u, "conv1": pk(u["conv1"]), "conv2": pk(u["conv2"])}
                            for u in dec[i]["units"]]}
    out["decoder"] = dec
    return out


# ----------------------------------------------------------------------------- building blocks

def causal_conv(p, x_BxTxC, dilation: int = 1, st: "_Stream | None" = None):
    """`CausalConvNet` with stride 1 (all of the decoder's): left-pad (k - 1) * dilation zeros, so the
    output has T frames (the official right padding is 0 for stride 1). Grouped (depthwise) when the
    weight's in-channels are fewer than the input's. Streaming (`st`): the padding is the previous
    call's last input samples. Weight (k, in / groups, out): XLA:CPU's layout for the kernel, so
    that no call copies it; or a `PackedBf16Conv` (`pack_bf16`): the bf16 kernel."""
    w_KxIxO = p["weight"]
    pad = (w_KxIxO.shape[0] - 1) * dilation
    if st is not None:
        x_BxTxC, pad = st.extend(x_BxTxC, pad), 0
    if isinstance(w_KxIxO, PackedBf16Conv):
        return cpu_kernels.conv_bf16(x_BxTxC, w_KxIxO, dilation, pad) + p["bias"]
    y = jax.lax.conv_general_dilated(
        x_BxTxC, w_KxIxO, window_strides=(1,), padding=[(pad, 0)], rhs_dilation=(dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=x_BxTxC.shape[-1] // w_KxIxO.shape[1])
    return y + p["bias"]


def causal_trans_conv(p, x_BxTxC, stride: int, st: "_Stream | None" = None):
    """`CausalTransConvNet`: ConvTranspose1d(k, stride) with the last k - stride samples dropped, so
    T frames -> T * stride samples.

    Computed polyphase, without the zeros a dilated convolution would multiply: with k = m * stride,
    out[t * stride + r] = sum_{j < m} x[t - j] @ w[:, :, j * stride + r], i.e. a causal convolution
    with m taps and stride * out channels, reshaped; the weight is stored in that form
    (m, in, stride * out) (`weights.polyphase`). m is 1 or 2 in this decoder."""
    w_MxIxRO = p["weight"]
    m = w_MxIxRO.shape[0]
    B, T, _ = x_BxTxC.shape
    pad = m - 1
    if st is not None:
        x_BxTxC, pad = st.extend(x_BxTxC, pad), 0
    if isinstance(w_MxIxRO, PackedBf16Conv):
        y = cpu_kernels.conv_bf16(x_BxTxC, w_MxIxRO, 1, pad)
    else:
        y = jax.lax.conv_general_dilated(x_BxTxC, w_MxIxRO, window_strides=(1,),
                                         padding=[(pad, 0)],
                                         dimension_numbers=("NWC", "WIO", "NWC"))
    return y.reshape(B, T * stride, -1) + p["bias"]


def snake_beta(p, x_BxTxC):
    """x + sin(e^alpha x)^2 / (e^beta + 1e-9); alpha and beta are stored as logs (TM:578-616)."""
    alpha, beta = jnp.exp(p["alpha"]), jnp.exp(p["beta"])
    return x_BxTxC + (1.0 / (beta + 1e-9)) * sin_squared(x_BxTxC * alpha)


# sin(r)^2 / r^2 as a polynomial in r^2 on |r| <= pi/2 (weighted least squares toward the minimax
# fit of sin(r)^2's absolute error; in float32 within 2.0e-7 of sin(r)^2 there, relative too)
_SIN2_COEFFS = (1.0, -0.3333333134651184, 0.04444437101483345, -0.0031744795851409435,
                0.00014098294195719063, -4.220916252961615e-06, 7.978869831504198e-08)
# pi in three parts (Cody-Waite): k * _PI_1 is exact for |k| < 2**16 (|x| < 2e5)
_PI_1, _PI_2, _PI_3 = 3.140625, 9.67502593994140625e-4, 1.509957990978376432e-7


def sin_squared(x):
    """sin(x)^2, the Snake activations' transcendental: x - k pi (k = round(x / pi)) has the same
    squared sine, and a polynomial takes it from there. Within 3e-7 of float64 sin(x)^2 for
    |x| < 2e5 (jnp.sin(x)**2: 1e-7), as plain multiply-adds that XLA vectorizes: 3.8x faster than
    jnp.sin on XLA:CPU, where the decoder's Snake activations were a third of the decode time
    (benchmarks/RESULTS.md, Decisions: "Snake's sin(x)^2")."""
    k = jnp.round(x * (1.0 / jnp.pi))
    r = ((x - k * _PI_1) - k * _PI_2) - k * _PI_3
    u = r * r
    q = _SIN2_COEFFS[-1]
    for c in _SIN2_COEFFS[-2::-1]:
        q = q * u + c
    return u * q


def layer_norm(p, x_BxTxC, eps: float):
    mean = jnp.mean(x_BxTxC, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x_BxTxC - mean), axis=-1, keepdims=True)
    return (x_BxTxC - mean) * jax.lax.rsqrt(var + eps) * p["weight"] + p["bias"]


def linear(p, x_BxTxI):
    return x_BxTxI @ p["weight"] + p["bias"]


# ----------------------------------------------------------------------------- stages

def codebook(p):
    """`EuclideanCodebook.decode`'s table: embedding_sum / clamp(cluster_usage, 1e-5)."""
    return p["embedding_sum"] / jnp.maximum(p["cluster_usage"], 1e-5)[:, None]


def quantizer_decode(p, codes_BxTxQ):
    """`SplitResidualVectorQuantizer.decode` (TM:780-821): codebook 0 through rvq_first, the sum of
    codebooks 1..Q-1 through rvq_rest, each followed by its 1x1 output projection (no bias).
    (B, T, Q) -> (B, T, codebook_dim)."""
    def rvq(pr, codes_BxTxK):
        e_BxTxDq = sum(jnp.take(codebook(cb), codes_BxTxK[..., i], axis=0)
                       for i, cb in enumerate(pr["codebooks"]))
        return e_BxTxDq @ pr["output_proj"][:, :, 0].T

    return rvq(p["first"], codes_BxTxQ[..., :1]) + rvq(p["rest"], codes_BxTxQ[..., 1:])


def attention(p, cfg: DecoderConfig, x_BxTxD, cos_sin, mask, st: "_Stream | None" = None):
    """`DecoderAttention` (TM:282-354): GQA with rotate-half RoPE, no q/k norm (Identity), no bias;
    mask (T, T) or, streaming, (B, T, W - 1 + T) (True = visible). Uses cfg's head counts and
    head_dim. Streaming (`st`): the keys and values of the previous call's last W - 1 frames come
    first."""
    B, T, _ = x_BxTxD.shape
    q = (x_BxTxD @ p["q"]).reshape(B, T, cfg.num_attention_heads, cfg.head_dim)
    k = (x_BxTxD @ p["k"]).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
    v = (x_BxTxD @ p["v"]).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
    q, k = layers.apply_rope(q, *cos_sin), layers.apply_rope(k, *cos_sin)
    if st is not None:
        k, v = st.extend(k, cfg.sliding_window - 1), st.extend(v, cfg.sliding_window - 1)
    out = layers.dot_product_attention(q, k, v, mask if mask.ndim == 3 else mask[None])
    return out.reshape(B, T, -1) @ p["o"]


def transformer_layer(p, cfg: DecoderConfig, x_BxTxD, cos_sin, mask, st=None):
    """`DecoderTransformerLayer` (TM:409-473): pre-norm, LayerScale on both residual branches."""
    h = attention(p["attn"], cfg, layers.rms_norm(p["input_norm"], x_BxTxD, cfg.rms_norm_eps),
                  cos_sin, mask, st)
    x_BxTxD = x_BxTxD + p["attn_scale"] * h
    h = layers.mlp(p["mlp"], layers.rms_norm(p["post_norm"], x_BxTxD, cfg.rms_norm_eps),
                   cfg.hidden_act)
    return x_BxTxD + p["mlp_scale"] * h


def sliding_window_mask(num_frames: int, window: int):
    """Key j is visible to query i iff i - window < j <= i (HF sliding_window_overlay + causal).

    Dense (T, T): the decoder runs on windows of at most 325 frames by default, and even whole-
    utterance decoding is dominated by the vocoder's activations (~184k floats per frame against
    heads * T for the scores), so a banded kernel would not change the memory picture."""
    i = jnp.arange(num_frames)[:, None]
    j = jnp.arange(num_frames)[None, :]
    return (j <= i) & (j > i - window)


def pre_transformer(p, cfg: DecoderConfig, x_BxTxL, st: "_Stream | None" = None):
    """`Qwen3TTSTokenizerV2DecoderTransformerModel` on inputs_embeds: input_proj, sliding-window
    layers with RoPE over positions 0..T-1, final RMSNorm, output_proj. (B, T, L) -> (B, T, L).
    Streaming: positions continue from the frames decoded before, whose keys come first."""
    x = linear(p["input_proj"], x_BxTxL)
    T = x.shape[1]
    if st is None:
        pos, mask = jnp.arange(T)[None], sliding_window_mask(T, cfg.sliding_window)
    else:
        pos, mask = st.pos_B[:, None] + jnp.arange(T), st.window_mask(cfg.sliding_window)
    cos_sin = layers.rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype,
                                  cfg.rope_scaling, cfg.max_position_embeddings)
    for lp in p["layers"]:
        x = transformer_layer(lp, cfg, x, cos_sin, mask, st)
    return linear(p["output_proj"], layers.rms_norm(p["norm"], x, cfg.rms_norm_eps))


def convnext_block(p, x_BxTxC, st=None):
    """`ConvNeXtBlock` (TM:211-243): depthwise causal conv k7, LayerNorm(eps 1e-6), Linear(C, 4C),
    exact GELU, Linear(4C, C), times gamma, plus the input."""
    h = causal_conv(p["dwconv"], x_BxTxC, st=st)
    h = layer_norm(p["norm"], h, 1e-6)
    h = linear(p["pwconv2"], jax.nn.gelu(linear(p["pwconv1"], h), approximate=False))
    return x_BxTxC + p["gamma"] * h


def upsample_block(p, x_BxTxL, ratio: int, st=None):
    """One `upsample` entry: causal transposed conv (k = stride = ratio), then ConvNeXt."""
    return convnext_block(p["convnext"], causal_trans_conv(p["trans_conv"], x_BxTxL, ratio, st), st)


def residual_unit(p, x_BxTxC, dilation: int, st=None):
    h = causal_conv(p["conv1"], snake_beta(p["act1"], x_BxTxC), dilation, st)
    return x_BxTxC + causal_conv(p["conv2"], snake_beta(p["act2"], h), st=st)


def decoder_block(p, x_BxTxC, rate: int, st=None):
    """`DecoderBlock` (TM:638-658): SnakeBeta, causal transposed conv (k = 2 * rate, stride rate,
    channels halved), three residual units with dilations 1, 3, 9. (B, T, C) -> (B, rate T, C / 2)."""
    x = causal_trans_conv(p["trans_conv"], snake_beta(p["snake"], x_BxTxC), rate, st)
    for up, d in zip(p["units"], RESIDUAL_DILATIONS):
        x = residual_unit(up, x, d, st)
    return x


def decode_stages(params, cfg: DecoderConfig, codes_BxTxQ, st: "_Stream | None" = None) -> dict:
    """The official `Decoder.forward`, keeping every stage's output under the official module's
    name (for parity tests stage by stage); all (B, T_stage, C):
      "quantizer", "pre_conv", "pre_transformer", "upsample.{i}",
      "decoder.0" (conv to decoder_dim), "decoder.{1..n}" (decoder blocks), "decoder.{n+1}"
      (SnakeBeta), "decoder.{n+2}" (conv to one channel, before the clamp),
    and "wave" (B, T * total_upsample), clamped to [-1, 1]. Under jit the stages that are not
    returned are dead code, so `decode` costs nothing extra. `st`: see `stream_decode`."""
    s = {}
    h = s["quantizer"] = quantizer_decode(params["quantizer"], codes_BxTxQ)
    h = s["pre_conv"] = causal_conv(params["pre_conv"], h, st=st)
    h = s["pre_transformer"] = pre_transformer(params["pre_transformer"], cfg, h, st)
    for i, (p, ratio) in enumerate(zip(params.get("upsample", ()), cfg.upsampling_ratios)):
        h = s[f"upsample.{i}"] = upsample_block(p, h, ratio, st)
    dec, n = params["decoder"], len(cfg.upsample_rates)
    h = s["decoder.0"] = causal_conv(dec[0], h, st=st)
    for i, rate in enumerate(cfg.upsample_rates, start=1):
        h = s[f"decoder.{i}"] = decoder_block(dec[i], h, rate, st)
    h = s[f"decoder.{n + 1}"] = snake_beta(dec[n + 1], h)
    h = s[f"decoder.{n + 2}"] = causal_conv(dec[n + 2], h, st=st)
    s["wave"] = jnp.clip(h[..., 0], -1.0, 1.0)
    return s


def decode(params, cfg: DecoderConfig, codes_BxTxQ):
    """The official `Decoder.forward` on a whole utterance: codes (B, T, Q) int in [0, codebook_size)
    -> waveform (B, T * total_upsample) float32 in [-1, 1].

    Pure and traceable; T is static. `jit_decode` is this function jitted (cfg static: it is
    hashable and decides the program's structure)."""
    return decode_stages(params, cfg, codes_BxTxQ)["wave"]


def chunked_decode(params, cfg: DecoderConfig, codes_BxTxQ, chunk_size: int = 300,
                   left_context: int = 25):
    """The official `Decoder.chunked_decode` (TM:886-896) as one traceable function, for use inside
    a larger jitted program: chunks of `chunk_size` frames, each decoded on its own (positions from
    0) after `left_context` frames of context (none for the first) whose samples are dropped.
    (B, T, Q) -> (B, T * total_upsample); T, chunk_size and left_context are static.

    All chunks run as windows of chunk_size + left_context frames under one `lax.map`: the decoder
    is compiled once and holds one window's activations at a time, whatever T. The first chunk is
    the window [0, W) with its LAST left_context frames dropped (exact: the decoder is causal); the
    codes are padded on the right to whole chunks. `tokenizer.bucketed_decode` is the host-side
    equivalent, which also rounds the last window's length to a bucket."""
    B, T = codes_BxTxQ.shape[:2]
    if T <= chunk_size:
        return decode(params, cfg, codes_BxTxQ)
    assert 0 <= left_context <= chunk_size, (left_context, chunk_size)
    n, window, up = -(-T // chunk_size), chunk_size + left_context, cfg.total_upsample
    codes = jnp.pad(codes_BxTxQ, ((0, 0), (0, n * chunk_size - T), (0, 0)))
    starts_N = jnp.array([0] + [c * chunk_size - left_context for c in range(1, n)])
    keep_from_N = jnp.array([0] + [left_context * up] * (n - 1))
    windows_NxBxWxQ = jnp.moveaxis(codes[:, starts_N[:, None] + jnp.arange(window)], 1, 0)

    def one(args):
        window_BxWxQ, keep_from = args
        return jax.lax.dynamic_slice_in_dim(decode(params, cfg, window_BxWxQ), keep_from,
                                            chunk_size * up, axis=1)

    waves_NxBxS = jax.lax.map(one, (windows_NxBxWxQ, keep_from_N))
    return jnp.moveaxis(waves_NxBxS, 0, 1).reshape(B, n * chunk_size * up)[:, :T * up]


jit_decode = jax.jit(decode, static_argnames=("cfg",))


# ----------------------------------------------------------------------------- streaming

class _Stream:
    """The decoder's state threaded through one `stream_decode` call.

    Every stage with memory calls `extend(x, keep)` in the same order on every call: it returns
    x (B, S, ...) with the `keep` entries that preceded it prepended (zeros for a fresh row: the
    whole-sequence decode's left padding) and records the `keep` entries before the row's end
    (its n_B valid frames times the stage's rate), which are the next call's. Rows whose input
    has fewer frames than the window are padded on the right; padding never enters the state."""

    def __init__(self, state: dict | None, T: int, n_B, reset_B):
        self.T, self.n_B = T, n_B
        self.fresh_B = reset_B
        self.old = None if state is None else state["memory"]
        pos = jnp.zeros_like(n_B) if state is None else state["pos"]
        self.pos_B = jnp.where(reset_B, 0, pos)
        self.memory: list = []

    def extend(self, x, keep: int):
        if keep == 0:
            return x
        B, S = x.shape[:2]
        i = len(self.memory)
        if self.old is None:
            tail = jnp.zeros((B, keep) + x.shape[2:], x.dtype)
        else:
            tail = self.old[i]
            tail = jnp.where(self.fresh_B.reshape((B,) + (1,) * (tail.ndim - 1)), 0, tail)
        xx = jnp.concatenate([tail, x], axis=1)
        end_B = self.n_B * (S // self.T)        # valid entries of x in this row
        self.memory.append(jax.vmap(
            lambda r, e: jax.lax.dynamic_slice_in_dim(r, e, keep, axis=0))(xx, end_B))
        return xx

    def window_mask(self, window: int):
        """(B, T, W - 1 + T): query i (frame pos + i) sees key s (frame pos - (W - 1) + s) iff that
        frame exists (>= 0) and is among the last `window` frames up to the query's."""
        q_BxTx1 = self.pos_B[:, None, None] + jnp.arange(self.T)[None, :, None]
        k_Bx1xS = (self.pos_B[:, None, None] - (window - 1)
                   + jnp.arange(window - 1 + self.T)[None, None, :])
        return (k_Bx1xS >= 0) & (k_Bx1xS <= q_BxTx1) & (k_Bx1xS > q_BxTx1 - window)

    def state(self) -> dict:
        return {"pos": self.pos_B + self.n_B, "memory": self.memory}


def stream_decode(params, cfg: DecoderConfig, state: dict | None, codes_BxTxQ, n_B, reset_B):
    """Decode the next frames of B code streams, carrying the decoder's state between calls.

    codes (B, T, Q): row b's next n_B[b] frames, then padding; reset_B: rows that start a new
    stream (their state is dropped first; `state=None` starts every row). Returns (waveform
    (B, T * total_upsample), of which row b's first n_B[b] * total_upsample samples are its new
    audio, and the state after each row's n_B[b] frames). A row with n_B = 0 keeps its state.
    Feeding a sequence in any split this way gives `decode` of the whole sequence (float
    rounding): every stage is causal and sees exactly the history it would see there."""
    st = _Stream(state, codes_BxTxQ.shape[1], n_B.astype(jnp.int32), reset_B)
    wave = decode_stages(params, cfg, codes_BxTxQ, st)["wave"]
    return wave, st.state()


_STATE_SHAPES: dict = {}


def init_stream_state(params, cfg: DecoderConfig, batch: int) -> dict:
    """The state of `batch` fresh streams (zeros: what `stream_decode` with state=None starts
    from). Its shapes are traced once per (cfg, batch)."""
    if (cfg, batch) not in _STATE_SHAPES:
        _STATE_SHAPES[cfg, batch] = jax.eval_shape(
            lambda p: stream_decode(p, cfg, None,
                                    jnp.zeros((batch, 1, cfg.num_quantizers), jnp.int32),
                                    jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool))[1],
            params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _STATE_SHAPES[cfg, batch])


jit_stream_decode = jax.jit(stream_decode, static_argnames=("cfg",))
