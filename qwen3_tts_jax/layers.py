"""The Qwen3 decoder layer shared by the talker and the code predictor, as pure functions.

Params are nested dicts of arrays (see `talker.RULES`); linear weights are stored (in, out). The
checkpoint layout (what `checkpoint.load_params` returns and training uses) has attn {q, k, v, o,
q_norm, k_norm} and mlp {gate, up, down}; generation runs the one inference layout
(`pack_layer`): each layer's attention and MLP as the typed blocks `Attention` and `MLP`.
Activations run in the params' dtype (bf16 on accelerators, f32 on CPU); RMSNorm statistics,
RoPE angles and softmax are computed in float32 like the official code.

Kernel and layout choices come from a static `options.Options` argument.

KV caches are preallocated: one cache per layer with room for S positions; a call writes its T new
positions at `write_index` (the same for every row: batches are left-padded so that all rows
advance together) and attends over all S slots through an explicit mask. Two layouts, the same
values: `KVCache` (B, S, KV heads, head_dim), what `jax.nn.dot_product_attention` (and cuDNN) take,
and `KVCacheHeadsMajor` (B, KV heads, head_dim, S), what XLA:CPU's batched products take without
copying: with the first, XLA:CPU transposes every layer's whole cache on every step.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .config import TransformerConfig
from . import cpu_kernels
from .activations import ACTIVATIONS
from .cpu_kernels import linear
from .options import Options


def _put_rows(cache, prefix, start_B, count_B, axis: int):
    """`cache` with row b's slots [start_b, start_b + count_b) along `axis` set to `prefix`'s
    slots [0, count_b) (a gather over the slots, then a select: starts and counts are traced)."""
    S, P = cache.shape[axis], prefix.shape[axis]
    idx_BxS = jnp.arange(S)[None, :] - start_B[:, None]
    take_BxS = (idx_BxS >= 0) & (idx_BxS < count_B[:, None])
    rows = jax.vmap(lambda p, i: jnp.take(p, i, axis=axis - 1))(prefix,
                                                                 jnp.clip(idx_BxS, 0, P - 1))
    shape = [1] * cache.ndim
    shape[0], shape[axis] = take_BxS.shape
    return jnp.where(take_BxS.reshape(shape), rows.astype(cache.dtype), cache)


class KVCache(NamedTuple):
    """Positions-major cache: k, v (B, S, K, Dh)."""
    k: jax.Array
    v: jax.Array

    @property
    def length(self) -> int:
        return self.k.shape[1]

    def write(self, k_BxTxKxD, v_BxTxKxD, index) -> "KVCache":
        put = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), index, axis=1)
        return KVCache(put(self.k, k_BxTxKxD), put(self.v, v_BxTxKxD))

    def put_prefix(self, prefix: "KVCache", start_B, count_B) -> "KVCache":
        """Row b's slots [start_b, start_b + count_b) from a stored prompt prefix (the same
        layout, any number of slots, `count_b` <= them; 0: the row unchanged)."""
        return KVCache(_put_rows(self.k, prefix.k, start_B, count_B, 1),
                       _put_rows(self.v, prefix.v, start_B, count_B, 1))

    def attend(self, q_BxTxHxD, mask_BxTxS, filled, options: Options):
        return dot_product_attention(q_BxTxHxD, self.k, self.v, mask_BxTxS, options.attention)

    def grow(self, extra: int) -> "KVCache":
        pad = lambda a: jnp.pad(a, [(0, 0), (0, extra), (0, 0), (0, 0)])
        return KVCache(pad(self.k), pad(self.v))

    def drop(self, m) -> "KVCache":
        """Slots moved m to the left (traced m; the first m go to the end, stale)."""
        return KVCache(jnp.roll(self.k, -m, axis=1), jnp.roll(self.v, -m, axis=1))


class KVCacheHeadsMajor(NamedTuple):
    """Heads-major cache: k, v (B, K, Dh, S), for XLA:CPU (see `Options.cache_layout`)."""
    k: jax.Array
    v: jax.Array

    @property
    def length(self) -> int:
        return self.k.shape[3]

    def write(self, k_BxTxKxD, v_BxTxKxD, index) -> "KVCacheHeadsMajor":
        put = lambda c, x: jax.lax.dynamic_update_slice_in_dim(
            c, jnp.transpose(x, (0, 2, 3, 1)).astype(c.dtype), index, axis=3)
        return KVCacheHeadsMajor(put(self.k, k_BxTxKxD), put(self.v, v_BxTxKxD))

    def put_prefix(self, prefix: "KVCacheHeadsMajor", start_B, count_B) -> "KVCacheHeadsMajor":
        """Row b's slots [start_b, start_b + count_b) from a stored prompt prefix (see
        `KVCache.put_prefix`)."""
        return KVCacheHeadsMajor(_put_rows(self.k, prefix.k, start_B, count_B, 3),
                                 _put_rows(self.v, prefix.v, start_B, count_B, 3))

    def attend(self, q_BxTxHxD, mask_BxTxS, filled, options: Options):
        """One query position (a decode step) with `options.cpu_kernels`: `cpu_kernels.attend`,
        which reads the `filled` slots only. Otherwise
        `jax.nn.dot_product_attention`'s XLA computation (float32 logits and softmax, masked
        logits set to its large negative number) on this layout; in float32 throughout (XLA:CPU's
        own products have no bfloat16 x bfloat16 -> float32), the result in q's dtype."""
        B, T, H, Dh = q_BxTxHxD.shape
        if T == 1 and filled is not None and options.cpu_kernels:
            out = cpu_kernels.attend(q_BxTxHxD[:, 0], self.k, self.v, mask_BxTxS[:, 0], filled)
            return out[:, None].astype(q_BxTxHxD.dtype)
        K = self.k.shape[1]
        f32 = jnp.float32
        q = q_BxTxHxD.reshape(B, T, K, H // K, Dh).astype(f32)
        logits = jnp.einsum("btkgd,bkds->bkgts", q, self.k.astype(f32))
        logits = logits * f32(1.0 / float(Dh) ** 0.5)
        logits = jnp.where(mask_BxTxS[:, None, None], logits, f32(-0.7 * jnp.finfo(f32).max))
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bkgts,bkds->btkgd", probs, self.v.astype(f32))
        return out.reshape(B, T, H, Dh).astype(q_BxTxHxD.dtype)

    def grow(self, extra: int) -> "KVCacheHeadsMajor":
        pad = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, 0), (0, extra)])
        return KVCacheHeadsMajor(pad(self.k), pad(self.v))

    def drop(self, m) -> "KVCacheHeadsMajor":
        """Slots moved m to the left (traced m; the first m go to the end, stale)."""
        return KVCacheHeadsMajor(jnp.roll(self.k, -m, axis=3), jnp.roll(self.v, -m, axis=3))


def init_cache(cfg: TransformerConfig, batch: int, length: int, dtype, options: Options) -> list:
    """Zeroed caches for every layer, in `options.cache_layout`."""
    K, Dh = cfg.num_key_value_heads, cfg.head_dim
    if options.cache_layout == "heads":
        cls, shape = KVCacheHeadsMajor, (batch, K, Dh, length)
    else:
        cls, shape = KVCache, (batch, length, K, Dh)
    return [cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            for _ in range(cfg.num_hidden_layers)]


def rms_norm(w_D, x_BxTxD, eps):
    x = x_BxTxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return w_D * x.astype(x_BxTxD.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling=None, max_positions: int = 32768):
    """(inverse frequencies (Dh/2,) f32, factor on cos/sin) of transformers' RoPE initialisers for
    the types in `config.ROPE_TYPES` (None: plain RoPE): linear divides every frequency by
    `factor`; llama3 divides the low ones and blends the middle band; yarn blends interpolated and
    original frequencies over a ramp of dimensions and scales cos/sin (its attention factor)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv = 1.0 / (theta ** exponents)
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "default":
        return inv, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        old = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return jnp.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        def mscale(m=1.0):
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
        attn = scaling.get("attention_factor")
        if attn is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attn = float(mscale(m) / mscale(m_all)) if m and m_all else mscale()
        original = scaling.get("original_max_position_embeddings") or max_positions

        def dim_for(rotations):  # the dimension that turns `rotations` times over `original`
            return (head_dim * math.log(original / (rotations * 2 * math.pi))
                    / (2 * math.log(theta)))
        lo, hi = dim_for(scaling.get("beta_fast") or 32), dim_for(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - lo) / (hi - lo), 0, 1)
        keep = 1 - ramp       # 1: the original frequency (extrapolation), 0: divided by factor
        pos_freqs = theta ** exponents
        return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep, attn
    raise ValueError(f"unsupported rope_type {kind!r}")   # config.parse_talker refuses it first


def rope_cos_sin(pos_BxT, head_dim: int, theta: float, dtype, scaling=None,
                 max_positions: int = 32768):
    """cos/sin (B, T, Dh) for rotate-half RoPE. The talker's interleaved MRoPE receives three equal
    position rows, which makes it exactly this plain 1-D RoPE."""
    inv_freq, factor = rope_frequencies(head_dim, theta, scaling, max_positions)
    ang_BxTxF = pos_BxT.astype(jnp.float32)[..., None] * inv_freq
    ang = jnp.concatenate([ang_BxTxF, ang_BxTxF], axis=-1)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.astype(dtype), sin.astype(dtype)


def transformer_rope(pos_BxT, cfg: TransformerConfig, dtype):
    """`rope_cos_sin` with a decoder stack's own RoPE settings."""
    return rope_cos_sin(pos_BxT, cfg.head_dim, cfg.rope_theta, dtype, cfg.rope_scaling,
                        cfg.max_position_embeddings)


def apply_rope(x_BxTxHxD, cos_BxTxD, sin_BxTxD):
    Dh = x_BxTxHxD.shape[-1]
    half = Dh // 2
    rot = jnp.concatenate([-x_BxTxHxD[..., half:], x_BxTxHxD[..., :half]], axis=-1)
    return x_BxTxHxD * cos_BxTxD[:, :, None] + rot * sin_BxTxD[:, :, None]


class Attention(NamedTuple):
    """A decoder layer's attention block in the inference layout: q|k|v concatenated along the
    output dimension (one product instead of three). Products are arrays, `quantize.Int8Weight`
    or `cpu_kernels` packed weights (`cpu_kernels.linear` dispatches on their type)."""
    qkv: Any
    o: Any
    q_norm: jax.Array
    k_norm: jax.Array


class MLP(NamedTuple):
    """A decoder layer's MLP block in the inference layout: gate|up concatenated."""
    gate_up: Any
    down: Any


def attention(p: Attention, x_BxTxD, cos_sin, cache, write_index, mask_BxTxS,
              cfg: TransformerConfig, options: Options):
    """GQA self-attention with q/k RMSNorm over head_dim, before RoPE. Returns (out, new cache)."""
    B, T, _ = x_BxTxD.shape
    H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q, k, v = jnp.split(linear(x_BxTxD, p.qkv), [H * Dh, (H + K) * Dh], axis=-1)
    q, k, v = q.reshape(B, T, H, Dh), k.reshape(B, T, K, Dh), v.reshape(B, T, K, Dh)
    q = rms_norm(p.q_norm, q, cfg.rms_norm_eps)
    k = rms_norm(p.k_norm, k, cfg.rms_norm_eps)
    q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
    cache = cache.write(k, v, write_index)
    # slots [0, write_index + T) are written
    out = cache.attend(q, mask_BxTxS, write_index + T, options)
    return linear(out.reshape(B, T, -1), p.o), cache


def dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS,
                          implementation: str | None = None):
    """softmax(q k^T / sqrt(Dh) + mask) v with grouped kv heads; `implementation` is
    `Options.attention` (cuDNN only takes 16-bit inputs, so float32 calls, such as the codec's,
    stay on XLA)."""
    impl = None if implementation == "xla" else implementation
    if impl == "cudnn" and q_BxTxHxD.dtype not in (jnp.bfloat16, jnp.float16):
        impl = None
    return jax.nn.dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD,
                                        mask=mask_BxTxS[:, None], implementation=impl)


def mlp(p: dict, x_BxTxD, act: str = "silu"):
    """The MLP in the checkpoint layout ({"gate", "up", "down"}: training, the codec)."""
    gate, up = linear(x_BxTxD, p["gate"]), linear(x_BxTxD, p["up"])
    return linear(ACTIVATIONS[act](gate) * up, p["down"])


def packed_mlp(p: MLP, x_BxTxD, act: str = "silu"):
    """The MLP in the inference layout (`MLP`)."""
    gate, up = jnp.split(linear(x_BxTxD, p.gate_up), 2, axis=-1)
    return linear(ACTIVATIONS[act](gate) * up, p.down)


def pack_layer(lp: dict) -> dict:
    """The inference layout of one decoder layer in the checkpoint layout (what
    `checkpoint.load_params` returns and training uses: attn {q, k, v, o, q_norm, k_norm}, mlp
    {gate, up, down}): `Attention` and `MLP` blocks, so that a layer is 4 matmuls instead of 7
    (at batch 1 on a GPU each matmul is a kernel launch, and launches, not bytes, bound the frame
    time). The values are the same."""
    a, m = lp["attn"], lp["mlp"]
    return {**lp,
            "attn": Attention(jnp.concatenate([a["q"], a["k"], a["v"]], axis=-1), a["o"],
                              a["q_norm"], a["k_norm"]),
            "mlp": MLP(jnp.concatenate([m["gate"], m["up"]], axis=-1), m["down"])}


def decoder_layer(p, x_BxTxD, cos_sin, cache, write_index, mask_BxTxS, cfg: TransformerConfig,
                  options: Options):
    h, cache = attention(p["attn"], rms_norm(p["input_norm"], x_BxTxD, cfg.rms_norm_eps), cos_sin,
                         cache, write_index, mask_BxTxS, cfg, options)
    x = x_BxTxD + h
    x = x + packed_mlp(p["mlp"], rms_norm(p["post_norm"], x, cfg.rms_norm_eps), cfg.hidden_act)
    return x, cache


def transformer(p, x_BxTxD, pos_BxT, caches, write_index, mask_BxTxS, cfg: TransformerConfig,
                options: Options):
    """The decoder stack (inference layout, `pack_layer`) + final norm. Returns (normed hidden
    (B, T, D), new caches)."""
    cos_sin = transformer_rope(pos_BxT, cfg, x_BxTxD.dtype)
    new = []
    for lp, cache in zip(p["layers"], caches):
        x_BxTxD, cache = decoder_layer(lp, x_BxTxD, cos_sin, cache, write_index, mask_BxTxS, cfg,
                                       options)
        new.append(cache)
    return rms_norm(p["norm"], x_BxTxD, cfg.rms_norm_eps), new


def layer_rules(src_prefix: str, dst_prefix: str):
    """Key-map rows for a stack of official Qwen3TTSDecoderLayer modules."""
    from .weights import Rule

    s, d = src_prefix.replace(".", r"\."), dst_prefix
    return [
        Rule(rf"{s}layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight", d + "layers/{1}/attn/{2}",
             "linear"),
        Rule(rf"{s}layers\.(\d+)\.self_attn\.(q|k)_norm\.weight", d + "layers/{1}/attn/{2}_norm"),
        Rule(rf"{s}layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", d + "layers/{1}/mlp/{2}",
             "linear"),
        Rule(rf"{s}layers\.(\d+)\.input_layernorm\.weight", d + "layers/{1}/input_norm"),
        Rule(rf"{s}layers\.(\d+)\.post_attention_layernorm\.weight", d + "layers/{1}/post_norm"),
        Rule(rf"{s}norm\.weight", d + "norm"),
    ]


def layer_shapes(prefix: str, cfg: TransformerConfig, in_dim: int | None = None) -> dict:
    """{official key: shape} for a decoder stack (`in_dim` = hidden size)."""
    D, Dh = in_dim or cfg.hidden_size, cfg.head_dim
    H, K, F = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    out = {f"{prefix}norm.weight": (D,)}
    for i in range(cfg.num_hidden_layers):
        lp = f"{prefix}layers.{i}."
        out.update({
            lp + "self_attn.q_proj.weight": (H * Dh, D), lp + "self_attn.k_proj.weight": (K * Dh, D),
            lp + "self_attn.v_proj.weight": (K * Dh, D), lp + "self_attn.o_proj.weight": (D, H * Dh),
            lp + "self_attn.q_norm.weight": (Dh,), lp + "self_attn.k_norm.weight": (Dh,),
            lp + "mlp.gate_proj.weight": (F, D), lp + "mlp.up_proj.weight": (F, D),
            lp + "mlp.down_proj.weight": (D, F),
            lp + "input_layernorm.weight": (D,), lp + "post_attention_layernorm.weight": (D,),
        })
    return out
