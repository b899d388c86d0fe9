"""CPU kernels for the frame loop: XLA:CPU FFI custom calls in kernels/cpu_kernels.cc, built once
per machine with the system's C++ compiler.

Products. A frame is ~100 sequential decoder layers whose products are a few rows (the batch)
times a weight read from memory once. XLA:CPU's products (Eigen, YNNPACK) repack the weight on
every call; at 8 rows they reach a third of the memory bandwidth. Here the decoder weights are
packed once, at load time, into column panels (`PackedWeight`), and the kernel streams each panel
once: 1.7-2.5x XLA's product at 8-16 rows, as fast as YNNPACK at hundreds (the prefill), so every
product with a packed weight takes it (benchmarks/RESULTS.md, Decisions: "C++ kernels").

int8 weights (`quantize.py`) have two kernels, `Options.int8_activations`: "float" widens the
int8 panels to float32 in registers (`PackedInt8Weight`); "int8" quantizes each activation row
per block of `ACT_BLOCK` k on the fly and multiplies bytes on the CPU's integer dot instructions,
AVX-512 VNNI or AVX2, whichever CPUID reports at run time (`PackedInt8DotWeight`). int4 weights
(`quantize="int4"`) have the second only (`PackedInt4Weight`): nibbles unpacked in registers,
then the same instructions.

The codec decoder's convolutions (`codec_precision="bf16"`): `PackedBf16Conv` holds a causal
convolution's weight rounded to bf16 in the layout of kernels/cpu_kernels.cc `ConvBf16`, which
rounds the input to bf16 once per call and multiplies on AVX-512 BF16 (`vdpbf16ps`, float32 sums).
Only where CPUID reports AVX512_BF16; elsewhere `check_bf16_conv` refuses it by name.

Attention. The KV cache is preallocated for hundreds of frames; a decode step needs only the
slots written so far, but XLA's products read (and multiply) them all. `attend` reads the filled
slots of the heads-major cache (`layers.KVCacheHeadsMajor`) only.

When: `Options.cpu_kernels`, which `Options.for_backend` sets where `available()`: the CPU backend
with a single local device (the custom calls have no sharding rule, so data- and tensor-parallel
meshes keep XLA's ops) and the kernels built and loaded (into ~/.cache/qwen3-tts-jax/kernels,
keyed by source, compiler flags, JAX version and CPU). `checkpoint.pack_for_inference` packs
float32 decoder weights when it is on; without a compiler everything runs on XLA's ops, with one
warning.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from .quantize import INT4_GROUP, Int4Weight, Int8Weight, quantize_int8
from .quantize import matmul as int8_matmul

log = logging.getLogger(__name__)

PANEL = 16                        # output columns per panel (kernels/cpu_kernels.cc: PANEL)
TARGET = "qwen3_tts_jax_rows_matmul"
TARGET_STACKED = "qwen3_tts_jax_rows_matmul_stacked"
TARGET_INT8 = "qwen3_tts_jax_rows_matmul_int8"
TARGET_INT8_DOT = "qwen3_tts_jax_rows_matmul_int8_dot"
TARGET_INT4_DOT = "qwen3_tts_jax_rows_matmul_int4_dot"
TARGET_INT8_DOT_STACKED = "qwen3_tts_jax_rows_matmul_int8_dot_stacked"
ATTEND = "qwen3_tts_jax_attend"
TARGET_CONV_BF16 = "qwen3_tts_jax_conv_bf16"
SOURCE = os.path.join(os.path.dirname(__file__), "kernels", "cpu_kernels.cc")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedWeight:
    """A (K, N) float32 weight stored as panels (N / PANEL, K, PANEL): panels[p, k, j] = w[k, p *
    PANEL + j]. A pytree with one array leaf, so it moves, saves and jits like the array."""
    panels: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        P, K, J = self.panels.shape
        return K, P * J

    @property
    def dtype(self):
        return self.panels.dtype

    def unpack(self) -> jax.Array:
        P, K, J = self.panels.shape
        return jnp.transpose(self.panels, (1, 0, 2)).reshape(K, P * J)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedStack:
    """H float32 (K, N) weights stacked (H, K, N) as panels (H, N / PANEL, K, PANEL), for products
    with one weight picked by a traced index (`linear_at`): the code predictor's heads, one per
    step of its loop. XLA copies a weight picked from a stack before its product, every step
    (benchmarks/RESULTS.md, Decisions: "predictor heads read in place")."""
    panels: jax.Array

    @property
    def shape(self) -> tuple[int, int, int]:
        H, P, K, J = self.panels.shape
        return H, K, P * J

    @property
    def dtype(self):
        return self.panels.dtype

    def unpack(self) -> jax.Array:
        H, P, K, J = self.panels.shape
        return jnp.transpose(self.panels, (0, 2, 1, 3)).reshape(H, K, P * J)

    def __getitem__(self, j: int) -> PackedWeight:
        """Weight j (a Python int) as a `PackedWeight` (its panels, not a copy's layout)."""
        return PackedWeight(self.panels[j])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedInt8Weight:
    """An `Int8Weight` for the kernel: int8 panels (N / PANEL, K, PANEL) as in `PackedWeight`
    and the float32 scale (N,) of each output column."""
    panels: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, int]:
        P, K, J = self.panels.shape
        return K, P * J

    def unpack(self) -> Int8Weight:
        P, K, J = self.panels.shape
        return Int8Weight(jnp.transpose(self.panels, (1, 0, 2)).reshape(K, P * J), self.scale)


# int8 x int8 products (`Options.int8_activations="int8"`, kernels/cpu_kernels.cc
# `RowsMatmulInt8Dot`): the activations are quantized per block of ACT_BLOCK consecutive k of a
# row (benchmarks/RESULTS.md, Decisions: "int8 activations"), and the products run on the
# fastest of these instruction paths that the CPU has, picked at run time from CPUID ("auto");
# naming one forces it (tests).
ACT_BLOCK = 32
INT8_PATHS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512vnni": 3}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedInt8DotWeight:
    """An `Int8Weight` for the int8 x int8 kernel: panels (N / PANEL, ceil(K / 4), 4 * PANEL)
    uint8, panels[p, g, 4 j + i] = values[4 g + i, p * PANEL + j] + 128 (rows past K: 128, a zero
    weight), the float32 scale (N,) of each output column, K, and the activations' block (`block`
    consecutive k share a scale; 0: the whole row)."""
    panels: jax.Array
    scale: jax.Array
    k: int = dataclasses.field(metadata=dict(static=True))
    block: int = dataclasses.field(default=ACT_BLOCK, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        return self.k, self.panels.shape[0] * PANEL

    def unpack(self) -> Int8Weight:
        P, G, _ = self.panels.shape
        v = (self.panels.astype(jnp.int16) - 128).astype(jnp.int8).reshape(P, G, PANEL, 4)
        v = jnp.transpose(v, (1, 3, 0, 2)).reshape(G * 4, P * PANEL)[:self.k]
        return Int8Weight(v, self.scale)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedInt8DotStack:
    """H (K, N) weights stacked, each quantized to int8 with a scale per output column
    (`quantize.quantize_int8`) and laid out as `PackedInt8DotWeight`: panels (H, N / PANEL,
    ceil(K / 4), 4 * PANEL) uint8, scale (H, N); products with one weight picked by a traced
    index on the int8 x int8 kernel (`linear_at`): the code predictor's heads with quantized
    weights (`checkpoint.pack_for_inference`)."""
    panels: jax.Array
    scale: jax.Array
    k: int = dataclasses.field(metadata=dict(static=True))
    block: int = dataclasses.field(default=ACT_BLOCK, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int, int]:
        H, P, _, _ = self.panels.shape
        return H, self.k, P * PANEL

    def __getitem__(self, j: int) -> "PackedInt8DotWeight":
        return PackedInt8DotWeight(self.panels[j], self.scale[j], self.k, self.block)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedInt4Weight:
    """An `Int4Weight` for the int4 x int8 kernel (kernels/cpu_kernels.cc `RowsMatmulInt4Dot`):
    nibbles (N' / PANEL, K' / 8, 4 * PANEL) uint8 and scales (N' / PANEL, K' / INT4_GROUP,
    PANEL) float32, K' and N' the shape padded with zero weights to multiples of INT4_GROUP and
    PANEL. Byte 4 j + i of line h holds values[8 h + i, n] + 8 in its low nibble and values[8 h
    + 4 + i, n] + 8 in its high one, n = p * PANEL + j (the int8 x int8 layout's k-groups, two
    per byte); scales[p, g, j] = scale[g, n]. The activations are quantized per INT4_GROUP k.
    `k`, `n`: the weight's shape (the kernel's output is cut to n columns)."""
    nibbles: jax.Array
    scales: jax.Array
    k: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        return self.k, self.n

    def unpack(self) -> Int4Weight:
        P, H, _ = self.nibbles.shape
        b = self.nibbles.astype(jnp.int16).reshape(P, H, PANEL, 4)
        v = jnp.stack([b & 0x0F, b >> 4], axis=2) - 8            # (P, H, 2, PANEL, 4)
        v = jnp.transpose(v, (1, 2, 4, 0, 3)).reshape(H * 8, P * PANEL)
        scale = jnp.transpose(self.scales, (1, 0, 2)).reshape(-1, P * PANEL)
        G = -(-self.k // INT4_GROUP)
        return Int4Weight(v[:self.k, :self.n].astype(jnp.int8), scale[:G, :self.n])


def _int4_panels(w: Int4Weight):
    K, N = w.shape
    G, P = -(-K // INT4_GROUP), -(-N // PANEL)
    v = jnp.pad(jnp.asarray(w.values, jnp.int8), ((0, G * INT4_GROUP - K), (0, P * PANEL - N)))
    v = (v.astype(jnp.uint8) + 8) & 0x0F                               # 0..15, padding 8
    v = jnp.transpose(v.reshape(G * 4, 2, 4, P, PANEL), (3, 0, 1, 4, 2))   # (P, H, 2, PANEL, 4)
    nibbles = (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(P, G * 4, 4 * PANEL)
    s = jnp.pad(jnp.asarray(w.scale, jnp.float32), ((0, 0), (0, P * PANEL - N)))
    scales = jnp.transpose(s.reshape(G, P, PANEL), (1, 0, 2))
    return PackedInt4Weight(nibbles, scales, int(K), int(N))


def _dot_panels(values):
    K, N = values.shape
    G = -(-K // 4)
    v = jnp.pad(jnp.asarray(values, jnp.int8), ((0, 4 * G - K), (0, 0))).astype(jnp.int16)
    v = jnp.transpose(v.reshape(G, 4, N // PANEL, PANEL), (2, 0, 3, 1))
    return (v + 128).astype(jnp.uint8).reshape(N // PANEL, G, 4 * PANEL)


def _panels(w):
    K, N = w.shape
    return jnp.transpose(jnp.reshape(w, (K, N // PANEL, PANEL)), (1, 0, 2))


def pack(w, int8_activations: str = "float",
         block: int = ACT_BLOCK
         ) -> PackedWeight | PackedInt8Weight | PackedInt8DotWeight | PackedInt4Weight:
    """The kernel's layout of a float32 weight or an `Int8Weight`; `int8_activations`
    (`Options.int8_activations`) picks the int8 weight's kernel: "float" (float32 activations,
    `PackedInt8Weight`) or "int8" (activations quantized per `block`, `PackedInt8DotWeight`).
    An `Int4Weight` has one kernel (`PackedInt4Weight`, activations per INT4_GROUP k)."""
    if isinstance(w, Int4Weight):   # int8 activations whatever `int8_activations` says
        return _int4_panels(w)
    if isinstance(w, Int8Weight):
        if int8_activations == "int8":
            return PackedInt8DotWeight(_dot_panels(w.values), w.scale, int(w.shape[0]), block)
        return PackedInt8Weight(_panels(w.values), w.scale)
    return PackedWeight(_panels(w))


def pack_stack(w_HxKxN, int8: bool = False, block: int = ACT_BLOCK
               ) -> PackedStack | PackedInt8DotStack:
    """The kernel's layout of stacked float32 weights (H, K, N), N a multiple of PANEL: as they
    are (`PackedStack`), or with `int8` quantized per output column for the int8 x int8 kernel
    (`PackedInt8DotStack`, activations per `block` k)."""
    H, K, N = w_HxKxN.shape
    if int8:
        q = jax.vmap(lambda w: tuple(jax.tree_util.tree_leaves(quantize_int8(w))))(w_HxKxN)
        values, scale = q
        return PackedInt8DotStack(jax.vmap(_dot_panels)(values), scale, int(K), block)
    return PackedStack(jnp.transpose(jnp.reshape(w_HxKxN, (H, K, N // PANEL, PANEL)),
                                     (0, 2, 1, 3)))


def stackable(w) -> bool:
    return (getattr(w, "ndim", 0) == 3 and w.dtype == jnp.float32 and w.shape[2] % PANEL == 0)


def linear_at(x, w, index, path: str = "auto"):
    """x (..., K) @ w[index] for stacked weights w (H, K, N) and an index that may be traced: a
    `PackedStack` or `PackedInt8DotStack` is read in place by the kernel (from `LIBRARY_ROWS`
    rows: XLA's product of the picked weight); an array is sliced and multiplied by XLA. An index
    outside [0, H) is clamped. `path`: as in `linear`."""
    if not isinstance(w, (PackedStack, PackedInt8DotStack)):
        return x @ jax.lax.dynamic_index_in_dim(w, index, keepdims=False)
    H, K, N = w.shape
    lead = x.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    index = jnp.clip(jnp.asarray(index, jnp.int32), 0, H - 1).reshape(())
    if rows >= LIBRARY_ROWS:
        pick = lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False)
        one = (PackedWeight(pick(w.panels)) if isinstance(w, PackedStack) else
               PackedInt8DotWeight(pick(w.panels), pick(w.scale), w.k, w.block))
        return linear(x, one)
    if not _registered():
        raise RuntimeError("a packed weight needs the CPU kernels, which did not build or "
                           "load here (see the warning above); load the params with "
                           "Options(cpu_kernels=False)")
    out = jax.ShapeDtypeStruct((rows, N), jnp.float32)
    x32 = x.reshape(rows, K).astype(jnp.float32)
    if isinstance(w, PackedStack):
        y = jax.ffi.ffi_call(TARGET_STACKED, out)(x32, w.panels, index)
    else:
        y = jax.ffi.ffi_call(TARGET_INT8_DOT_STACKED, out)(
            x32, w.panels, w.scale, index, path=np.int32(INT8_PATHS[path]),
            block=np.int32(w.block))
    return y.reshape(*lead, N).astype(x.dtype)


def packable(w) -> bool:
    if isinstance(w, Int4Weight):
        return True
    if isinstance(w, Int8Weight):
        return w.shape[1] % PANEL == 0
    return (getattr(w, "ndim", 0) == 2 and w.dtype == jnp.float32 and w.shape[1] % PANEL == 0)


def pack_layer(lp: dict, int8_activations: str = "float", block: int = ACT_BLOCK) -> dict:
    """One decoder layer in the inference layout (`layers.Attention`, `layers.MLP`) with its
    products (q|k|v, o, gate|up, down; float32 or `Int8Weight`) packed (`pack`), the norms as
    they are. Weights whose width is not a multiple of PANEL stay as they are."""
    a, m = lp["attn"], lp["mlp"]
    p = lambda w: pack(w, int8_activations, block) if packable(w) else w
    return {**lp, "attn": a._replace(qkv=p(a.qkv), o=p(a.o)),
            "mlp": m._replace(gate_up=p(m.gate_up), down=p(m.down))}


# From this many rows (a prefill of a large batch) XLA's library product beats the kernel (its
# register tile re-reads x once per 16-column panel): 118-138 vs 94-105 GFLOP/s at 1024-6144 rows,
# while the kernel leads at 128-256 rows (benchmarks/RESULTS.md, Decisions: "products of 1024+
# rows"). Such a call takes the weight back to (K, N) (a copy of a few ms next to a product of
# 100+ ms) and XLA's product.
LIBRARY_ROWS = 1024


def linear(x, w, path: str = "auto"):
    """x (..., K) @ w (K, N): the kernel for a `PackedWeight`, `PackedInt8Weight` or
    `PackedInt8DotWeight` or `PackedInt4Weight` (XLA's product from `LIBRARY_ROWS` rows, float32
    activations), XLA for an array, an `Int8Weight` or an `Int4Weight`. `path` (`INT8_PATHS`)
    forces the integer dot kernels' instruction path (tests); a path the CPU lacks fails when
    the program runs."""
    if isinstance(w, (Int8Weight, Int4Weight)):
        return int8_matmul(x, w)
    if not isinstance(w, (PackedWeight, PackedInt8Weight, PackedInt8DotWeight,
                          PackedInt4Weight)):
        return x @ w
    if int(np.prod(x.shape[:-1], dtype=np.int64)) >= LIBRARY_ROWS:
        return linear(x, w.unpack())
    if not _registered():
        raise RuntimeError("a packed weight needs the CPU kernels, which did not build or "
                           "load here (see the warning above); load the params with "
                           "Options(cpu_kernels=False)")
    K, N = w.shape
    lead = x.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    out = jax.ShapeDtypeStruct((rows, N), jnp.float32)
    x32 = x.reshape(rows, K).astype(jnp.float32)
    if isinstance(w, PackedInt8Weight):   # also under bf16 activations: float32 inside
        y = jax.ffi.ffi_call(TARGET_INT8, out)(x32, w.panels, w.scale)
    elif isinstance(w, PackedInt4Weight):
        wide = jax.ShapeDtypeStruct((rows, w.nibbles.shape[0] * PANEL), jnp.float32)
        y = jax.ffi.ffi_call(TARGET_INT4_DOT, wide)(x32, w.nibbles, w.scales,
                                                    path=np.int32(INT8_PATHS[path]))[:, :N]
    elif isinstance(w, PackedInt8DotWeight):
        y = jax.ffi.ffi_call(TARGET_INT8_DOT, out)(x32, w.panels, w.scale,
                                                   path=np.int32(INT8_PATHS[path]),
                                                   block=np.int32(w.block))
    else:
        y = jax.ffi.ffi_call(TARGET, out)(x32, w.panels)
    return y.reshape(*lead, N).astype(x.dtype)


def attend(q_BxHxD, k_BxKxDxS, v_BxKxDxS, mask_BxS, filled):
    """softmax(q k / sqrt(Dh), masked) v for one query position per row over a heads-major
    cache, reading slots [0, filled) only (`filled`: a traced int, at least 1); float32."""
    if not _registered():
        raise RuntimeError("cpu_kernels.attend needs the CPU kernels, which did not build or load")
    f32 = jnp.float32
    return jax.ffi.ffi_call(ATTEND, jax.ShapeDtypeStruct(q_BxHxD.shape, f32))(
        q_BxHxD.astype(f32), k_BxKxDxS.astype(f32), v_BxKxDxS.astype(f32),
        mask_BxS.astype(f32), jnp.reshape(filled, (1,)).astype(jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedBf16Conv:
    """A convolution weight (k, C, N) (`codec.decoder` layout: taps, in, out) rounded to bf16
    (nearest even) for `conv_bf16`: column blocks of NB = 16 V columns (V in 1..4, the last
    block padded with zero weights), blocks[nb, j, i, 2 n + e] = w[j, 2 i + e, nb * NB + n] (C
    padded to even with zero weights). `c`, `n`: the weight's in and out channels."""
    blocks: jax.Array
    c: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.blocks.shape[1], self.c, self.n

    def unpack(self) -> jax.Array:
        """The (k, C, N) float32 weight the kernel multiplies (the bf16-rounded values)."""
        nb, k, P, W = self.blocks.shape
        w = self.blocks.astype(jnp.float32).reshape(nb, k, P, W // 2, 2)
        w = jnp.transpose(w, (1, 2, 4, 0, 3)).reshape(k, 2 * P, nb * (W // 2))
        return w[:, :self.c, :self.n]


def pack_conv_bf16(w_KxCxN) -> PackedBf16Conv:
    """`PackedBf16Conv` of a float32 (k, C, N) weight; the block width is the V (4, 3, 2, 1)
    that pads N least (the widest of equals): 96 columns are two blocks of 48, 1536 24 of 64."""
    w = np.asarray(w_KxCxN, np.float32)
    k, C, N = w.shape
    V = min((4, 3, 2, 1), key=lambda v: (-(-N // (16 * v)) * 16 * v, -v))
    NB, Cp = 16 * V, C + C % 2
    nb = -(-N // NB)
    w = np.pad(w, ((0, 0), (0, Cp - C), (0, nb * NB - N))).astype(jnp.bfloat16)  # nearest even
    w = np.transpose(w.reshape(k, Cp // 2, 2, nb, NB), (3, 0, 1, 4, 2))
    return PackedBf16Conv(jnp.asarray(w.reshape(nb, k, Cp // 2, 2 * NB)), int(C), int(N))


def conv_bf16(x_BxTxC, w: PackedBf16Conv, dilation: int = 1, pad: int | None = None):
    """y[b, t] = sum_{j < k} xe[b, t + j dilation] @ w[j] (no bias), xe: x with `pad` zero rows
    prepended (default (k - 1) dilation: a causal convolution with T outputs; 0 for input that
    already carries its history, as streaming passes). x rounded to bf16, float32 sums: the
    kernel's arithmetic (kernels/cpu_kernels.cc `ConvBf16`). (B, pad + T - (k - 1) dilation, N)
    float32."""
    if not _registered():
        raise RuntimeError("conv_bf16 needs the CPU kernels, which did not build or load here")
    k, C, N = w.shape
    B, T, _ = x_BxTxC.shape
    pad = (k - 1) * dilation if pad is None else pad
    out = jax.ShapeDtypeStruct((B, pad + T - (k - 1) * dilation, N), jnp.float32)
    return jax.ffi.ffi_call(TARGET_CONV_BF16, out)(
        x_BxTxC.astype(jnp.float32), w.blocks, dilation=np.int32(dilation), pad=np.int32(pad))


def bf16_conv_missing() -> str | None:
    """Why `conv_bf16` cannot run here (None: it can): the CPU backend, the kernels built, and a
    CPU with AVX512_BF16 (CPUID, asked by the kernel library)."""
    if jax.default_backend() != "cpu":
        return f"the default JAX backend is {jax.default_backend()!r}, not the CPU"
    if _library() is None:
        return "the CPU kernels did not build or load (see the warning above)"
    if not _cpu_has_bf16_dot():
        return "this CPU lacks the AVX512_BF16 instructions (vdpbf16ps)"
    return None


def _cpu_has_bf16_dot() -> bool:
    """CPUID's AVX512_BF16 (with AVX512F and BW), asked by the kernel library."""
    fn = _library().qwen3_tts_jax_bf16_dot
    fn.restype = ctypes.c_int32
    return bool(fn())


def check_bf16_conv() -> None:
    """ValueError naming what is missing where `conv_bf16` cannot run (`bf16_conv_missing`)."""
    why = bf16_conv_missing()
    if why is not None:
        raise ValueError(f"the bf16 codec (codec_precision='bf16') runs on the CPU kernels with "
                         f"AVX512_BF16 only; here {why}. Use codec_precision='float32'")


def available() -> bool:
    """Can the kernels run here? The CPU backend, one local device, the kernels built and loaded
    (`Options.for_backend` turns `Options.cpu_kernels` on where they can)."""
    if jax.default_backend() != "cpu" or jax.local_device_count() != 1:
        return False
    return _registered()


def int8_paths() -> tuple[str, ...]:
    """The int8 x int8 kernel's instruction paths this CPU runs (CPUID, asked by the kernel
    library), slowest first; () without the kernels."""
    lib = _library()
    if lib is None:
        return ()
    fn = lib.qwen3_tts_jax_int8_paths
    fn.restype = ctypes.c_int32
    bits = fn()
    return tuple(name for name, p in INT8_PATHS.items() if p and bits & (1 << p))


def _cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "qwen3-tts-jax", "kernels")


def _library_path() -> str:
    """Where this kernel source, built for this CPU with these headers, lives."""
    h = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        h.update(f.read())
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    for part in (" ".join(FLAGS), jax.ffi.include_dir(), jax.__version__, platform.machine(), cpu):
        h.update(part.encode())
    return os.path.join(_cache_dir(), f"cpu_kernels-{h.hexdigest()[:16]}.so")


def build(path: str | None = None) -> str:
    """Compile kernels/cpu_kernels.cc (a few seconds) into `path`; atomic, so that concurrent
    processes never load a half-written library. Raises if the compiler fails."""
    path = path or _library_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    compiler = os.environ.get("CXX", "c++")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _registered() -> bool:
    return _library() is not None


@functools.cache
def _library():
    """The kernel library, built if needed, with its FFI targets registered; None (and one
    warning) where it cannot be built or loaded."""
    try:
        path = _library_path()
        if not os.path.exists(path):
            build(path)
        lib = ctypes.cdll.LoadLibrary(path)
        for name in (TARGET, TARGET_STACKED, TARGET_INT8, TARGET_INT8_DOT, TARGET_INT4_DOT,
                     TARGET_INT8_DOT_STACKED, ATTEND, TARGET_CONV_BF16):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                        platform="cpu")
        return lib
    except (OSError, subprocess.CalledProcessError, AttributeError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("qwen3-tts-jax: the CPU kernels are not available (%s); using XLA's ops "
                    "(slower at small batches)", detail.strip()[-500:])
        return None
