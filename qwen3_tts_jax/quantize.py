"""Weight-only quantization of the decoder products (opt-in: `Qwen3TTS.from_pretrained(...,
quantize="int8" | "int4")`, `--quantize int8|int4`).

What: each decoder layer's products of the talker and the code predictor (q|k|v, o, gate|up, down:
~97 % of the bytes a frame reads) are stored as int8 with one float32 scale per output column,
symmetric absmax: w[k, n] ~ values[k, n] * scale[n], values in [-127, 127]. Activations, sums,
norms, attention, embeddings and the talker's codec head stay in the model's dtype (float32 on the
CPU). The code predictor's 15 heads (read 15 times a frame, ~9 % of a frame's time on the CPU in
float32) are int8 as well where the products are int8 x int8 on the CPU kernels
(`int8_activations="int8"`, and with int4 weights: int8 heads, not int4;
`cpu_kernels.PackedInt8DotStack`); elsewhere they stay in the model's dtype.

Why: a batch-1 frame on the CPU is bound by memory bandwidth (it reads the talker once and the
predictor 15 times); int8 weights are a quarter of the float32 bytes. On a single CPU device the
products run one of the CPU kernel's int8 forms, `Options.int8_activations`: "float"
(`cpu_kernels.PackedInt8Weight`: the panels are widened to float32 in registers, the scale
applied once per output) or "int8" (`cpu_kernels.PackedInt8DotWeight`: the activations are
quantized to int8 per block of 32 k as well, and the products run on the CPU's integer dot
instructions). Elsewhere (GPU, TPU, meshes) the
product is XLA's with the int8 -> activation-dtype convert fused in: a smaller model in memory.

int4 (`quantize="int4"`, CPU kernels only): 4-bit values in [-8, 7] with a float32 scale per
output column and group of 32 consecutive k (`Int4Weight`, GGML's Q4_0 rounding), packed two per
byte for the CPU's int4 x int8 kernel (`cpu_kernels.PackedInt4Weight`, activations quantized per
block of 32 as above): 5 bits a weight with the scales, 0.625 of int8's bytes.

Not the official model: the logits err about twice as much as bf16's against float32, and codes
differ from the float32 ones after a near-tie. benchmarks/RESULTS.md ("int8 weights") gives the
measured closeness (benchmarks/bench_quantize.py) and speed (bench_scale.py --variants int8).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

METHODS = ("int8", "int4")

# int4: k per weight scale (the CPU kernel's activation block as well, cpu_kernels.ACT_BLOCK)
INT4_GROUP = 32


class _Quantized:
    """What a quantized weight answers like the (K, N) array it stands for: shape and ndim."""
    values: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Weight(_Quantized):
    """A (K, N) weight as int8 `values` (K, N) and float32 `scale` (N,): w ~ values * scale."""
    values: jax.Array
    scale: jax.Array

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return self.values.astype(dtype) * self.scale.astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int4Weight(_Quantized):
    """A (K, N) weight as 4-bit `values` (K, N) in [-8, 7] (held as int8 until packed) and a
    float32 `scale` (ceil(K / INT4_GROUP), N) per column and group of INT4_GROUP consecutive k
    (of either sign, `quantize_int4`): w[k, n] ~ values[k, n] * scale[k // INT4_GROUP, n]."""
    values: jax.Array
    scale: jax.Array

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        K = self.values.shape[0]
        s = jnp.repeat(self.scale.astype(dtype), INT4_GROUP, axis=0)[:K]
        return self.values.astype(dtype) * s


def check_method(method: str | None) -> str | None:
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; known: {', '.join(METHODS)} "
                         "(or none)")
    return method


def quantize_int8(w) -> Int8Weight:
    """Per output column: scale = max |w[:, n]| / 127, values = round(w / scale)."""
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=0)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    values = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return Int8Weight(values, scale.astype(jnp.float32))


def quantize_int4(w) -> Int4Weight:
    """Per output column and group of INT4_GROUP consecutive k (the last one shorter where K is
    not a multiple), as GGML's Q4_0: the group's weight m of largest magnitude is code -8
    exactly, scale = m / -8 (negative where m > 0), values = clip(round(w / scale), -8, 7).
    All 16 codes are used, so the step is max |w| / 8 instead of the symmetric [-7, 7]'s
    max |w| / 7: 11 % less RMS error on Gaussian, Laplace and Student-t(3) groups of 32 (a
    weight of the other sign near -m is clipped to 7, one step off)."""
    w = jnp.asarray(w, jnp.float32)
    K, N = w.shape
    G = -(-K // INT4_GROUP)
    padded = jnp.pad(w, ((0, G * INT4_GROUP - K), (0, 0))).reshape(G, INT4_GROUP, N)
    top = jnp.take_along_axis(padded, jnp.argmax(jnp.abs(padded), axis=1)[:, None], axis=1)[:, 0]
    scale = jnp.where(top != 0, top / -8.0, 1.0).astype(jnp.float32)
    values = jnp.clip(jnp.round(padded / scale[:, None, :]), -8, 7).astype(jnp.int8)
    return Int4Weight(values.reshape(G * INT4_GROUP, N)[:K], scale)


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}


def quantize_layer(lp: dict, method: str = "int8") -> dict:
    """One decoder layer in the inference layout (`layers.Attention`, `layers.MLP`, see
    `layers.pack_layer`) with its products (q|k|v, o, gate|up, down) quantized."""
    check_method(method)
    a, m = lp["attn"], lp["mlp"]
    q = QUANTIZERS[method]
    return {**lp, "attn": a._replace(qkv=q(a.qkv), o=q(a.o)),
            "mlp": m._replace(gate_up=q(m.gate_up), down=q(m.down))}


def matmul(x, w: Int8Weight | Int4Weight):
    """x (..., K) @ w through XLA: the int8 values converted to x's dtype (exact: |v| <= 127),
    float32 sums, the scale applied to the sums; an `Int4Weight` dequantized to float32 first
    (its scales vary along k), for the few products the CPU kernel does not take."""
    if isinstance(w, Int4Weight):
        y = jnp.dot(x, w.dequantize(jnp.float32), preferred_element_type=jnp.float32)
        return y.astype(x.dtype)
    y = jnp.dot(x, w.values.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * w.scale).astype(x.dtype)
