"""Pallas (Triton) kernels for the code predictor's one-position steps on NVIDIA GPUs: a decoder
layer in TWO kernels instead of XLA's ~13 (`Options.predictor_kernels`).

At batch 1 a frame is 98 decoder-layer steps, 70 of them in the 5-layer code predictor, and the
time goes to the number of kernels rather than to bytes (benchmarks/RESULTS.md: ~1800 kernels a
frame, a third of the bandwidth limit). An earlier attempt, five kernels a layer (commit 6664a51),
was 1.17x XLA's one-row program but slower than its two-row one. Here a layer is:

  1. `attention_block`, one program per query head: input RMSNorm + the head's q, k and v
     products + q/k norms + RoPE + the KV-cache write + attention over the slots so far + the
     head's share of the o product, added into the residual with float32 atomic adds;
  2. `mlp_block`, one program per block of the intermediate width: post RMSNorm + its gate and up
     columns + SiLU(gate) * up + its share of the down product, added into the residual the same
     way.

Split-K by atomic adds is what removes the kernel boundaries (no program needs another's output
inside a block); its cost is that on a GPU the order of the float32 additions into the residual
varies from run to run (outputs equal up to float rounding, not bit-identical between runs; the
interpreter adds in program order). Program 0 of each kernel also adds the block's input (the
residual connection), so the accumulators start at zero.

Values: those of `layers.decoder_layer` (the same roundings to the activation dtype, the same
float32 statistics), except that a block's product and its residual are summed in float32 and
rounded once, the softmax is the online one, and additions come in another order.

Scope (`covers`): the code predictor's steps 1..14 (one position per row at write index j + 1,
every earlier slot attended), at most 16 rows (padded to 16, Triton's smallest product tile), the
positions-major cache, unquantized weights in the activation dtype, SiLU, and widths that split
into power-of-two tiles of at least 16. Anything else takes XLA's path. `interpret=True` runs the
same kernels through Pallas' interpreter on any backend (the tests, on the CPU).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .config import TransformerConfig

ROWS = 16             # rows of every product tile (the smallest Triton `dot`)
DEFAULT_TILES = (128, 32, 128, 4, 2)
"""(k: reduction chunk, f: intermediate columns per MLP program, n: output columns per atomic
add, Triton warps, pipeline stages): `Options.predictor_tiles` when it is empty."""


def _triton():
    from jax.experimental.pallas import triton as plgpu
    return plgpu


def _block(n: int, most: int) -> int | None:
    """The largest power of two <= most dividing n, at least 16 (Triton's smallest dot side)."""
    b = 1 << max(most.bit_length() - 1, 0)
    while b >= 16:
        if n % b == 0:
            return b
        b //= 2
    return None


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def tiles(cfg: TransformerConfig, requested: tuple = ()) -> dict | None:
    """The tile sizes for this predictor's widths (None where they do not split)."""
    k, f, n, warps, stages = requested or DEFAULT_TILES
    D, F = cfg.hidden_size, cfg.intermediate_size
    t = dict(k=_block(D, k), f=_block(F, f), n=_block(D, n), warps=warps, stages=stages)
    return None if None in t.values() else t


def why_not(layers_p, cfg: TransformerConfig, rows: int, dtype, cache_layout: str,
            requested_tiles: tuple = ()) -> str | None:
    """Why these kernels cannot run this predictor (None: they can)."""
    from .layers import Attention, MLP
    Dh, H, K = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    if rows > ROWS:
        return f"{rows} rows (the kernels take at most {ROWS})"
    if cache_layout != "positions":
        return f"cache_layout {cache_layout!r} (the kernels read the positions-major cache)"
    if cfg.hidden_act not in ("silu", "swish"):
        return f"hidden_act {cfg.hidden_act!r} (the kernels apply SiLU)"
    if Dh % 2 or not _pow2(Dh // 2) or Dh // 2 < 16:
        return f"head_dim {Dh} (half of it must be a power of two >= 16)"
    if H % K:
        return f"{H} heads over {K} kv heads"
    if tiles(cfg, requested_tiles) is None:
        return (f"widths {cfg.hidden_size}/{cfg.intermediate_size} (no power-of-two tiles >= 16 "
                f"divide them)")
    for lp in layers_p:
        a, m = lp["attn"], lp["mlp"]
        if not (isinstance(a, Attention) and isinstance(m, MLP)):
            return "the layers are not in the inference layout"
        for w in (a.qkv, a.o, m.gate_up, m.down):
            if not isinstance(w, jax.Array) or w.dtype != dtype:
                return f"weights of type {type(w).__name__} (the kernels take plain {dtype} arrays)"
    return None


def _call(kernel, interpret: bool, t: dict, **kw):
    params = None if interpret else _triton().CompilerParams(num_warps=t["warps"],
                                                             num_stages=t["stages"])
    return pl.pallas_call(kernel, interpret=interpret, compiler_params=params, **kw)


def _dot(a, b):
    precise = {"allow_tf32": False} if a.dtype == jnp.float32 else {}
    return _triton().dot(a, b, **precise)


def _rms_inverse(x_ref, D: int, bk: int, eps: float, dt):
    """1 / RMS of each row of x (read in `bk` chunks, rounded to dt first), float32."""
    f32 = jnp.float32

    def sumsq(c, ss):
        xk = x_ref[:, pl.ds(c * bk, bk)].astype(dt).astype(f32)
        return ss + jnp.sum(xk * xk, axis=1)
    ss = jax.lax.fori_loop(0, D // bk, sumsq, jnp.zeros((x_ref.shape[0],), f32))
    return jax.lax.rsqrt(ss / D + eps)


def _normed_chunk(x_ref, w_ref, inv, c, bk: int, dt):
    """Columns [c bk, (c+1) bk) of RMSNorm(x) * w, rounded like `layers.rms_norm`."""
    xk = x_ref[:, pl.ds(c * bk, bk)].astype(dt).astype(jnp.float32)
    return w_ref[pl.ds(c * bk, bk)][None, :] * (xk * inv[:, None]).astype(dt)


def _add_out(acc_ref, part_fn, x_ref, first, D: int, bn: int, rows: int, dt, interpret: bool):
    """acc[:, cols] += part_fn(cols) (+ x[:, cols] in program `first`), `bn` columns at a time,
    by atomic adds (on the GPU only the first `rows` rows: the others are padding)."""
    f32 = jnp.float32
    R = acc_ref.shape[0]
    mask = None if interpret else jnp.broadcast_to((jnp.arange(R) < rows)[:, None], (R, bn))

    def chunk(c, _):
        cols = pl.ds(c * bn, bn)
        val = part_fn(cols) + jnp.where(first, x_ref[:, cols].astype(dt).astype(f32), 0.0)
        _triton().atomic_add(acc_ref, (slice(None), cols), val, mask=mask)
        return 0
    jax.lax.fori_loop(0, D // bn, chunk, 0)


def _attention_kernel(x_ref, nw_ref, qkv_ref, qn_ref, kn_ref, cos_ref, sin_ref, o_ref, idx_ref,
                      _k_in, _v_in, _acc_in, k_ref, v_ref, acc_ref, *, H: int, K: int, eps: float,
                      dt, rows: int, t: dict, interpret: bool):
    f32 = jnp.float32
    h = pl.program_id(0)
    G = H // K
    g = h // G
    R, D = x_ref.shape
    Dh = qn_ref.shape[0]
    half = Dh // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    bk = t["k"]
    idx = idx_ref[()]

    inv = _rms_inverse(x_ref, D, bk, eps, dt)
    starts = (h * Dh, h * Dh + half, (H + g) * Dh, (H + g) * Dh + half,
              (H + K + g) * Dh, (H + K + g) * Dh + half)

    def product(c, accs):
        xn = _normed_chunk(x_ref, nw_ref, inv, c, bk, dt)
        return tuple(a + _dot(xn, qkv_ref[pl.ds(c * bk, bk), pl.ds(s, half)])
                     for a, s in zip(accs, starts))
    zero = jnp.zeros((R, half), f32)
    accs = jax.lax.fori_loop(0, D // bk, product, (zero,) * 6)
    q_lo, q_hi, k_lo, k_hi, v_lo, v_hi = (a.astype(dt) for a in accs)

    cos_lo, cos_hi = cos_ref[idx, lo][None, :], cos_ref[idx, hi][None, :]
    sin_lo, sin_hi = sin_ref[idx, lo][None, :], sin_ref[idx, hi][None, :]

    def norm_rope(x_lo, x_hi, w_ref):  # `layers.rms_norm` over head_dim, then `apply_rope`
        a, b = x_lo.astype(f32), x_hi.astype(f32)
        r = jax.lax.rsqrt((jnp.sum(a * a, axis=1) + jnp.sum(b * b, axis=1)) / Dh + eps)[:, None]
        a = w_ref[lo][None, :] * (a * r).astype(dt)
        b = w_ref[hi][None, :] * (b * r).astype(dt)
        return a * cos_lo - b * sin_lo, b * cos_hi + a * sin_hi

    q_lo, q_hi = norm_rope(q_lo, q_hi, qn_ref)
    k_lo, k_hi = norm_rope(k_lo, k_hi, kn_ref)
    cdt = k_ref.dtype
    k_lo, k_hi, v_lo, v_hi = (a.astype(cdt) for a in (k_lo, k_hi, v_lo, v_hi))

    @pl.when(h % G == 0)   # one program per kv head writes its slot
    def _write():
        k_ref[:, idx, g, lo] = k_lo
        k_ref[:, idx, g, hi] = k_hi
        v_ref[:, idx, g, lo] = v_lo
        v_ref[:, idx, g, hi] = v_hi

    # online softmax over slots [0, idx) from the cache, then this step's slot from registers
    scale = 1.0 / math.sqrt(Dh)
    qa, qb = q_lo.astype(f32), q_hi.astype(f32)

    def attend(carry, kl, kh, vl, vh):
        m, den, a_lo, a_hi = carry
        logit = (jnp.sum(qa * kl.astype(f32), axis=1)
                 + jnp.sum(qb * kh.astype(f32), axis=1)) * scale
        m_new = jnp.maximum(m, logit)
        corr, p = jnp.exp(m - m_new), jnp.exp(logit - m_new)
        return (m_new, den * corr + p, a_lo * corr[:, None] + p[:, None] * vl.astype(f32),
                a_hi * corr[:, None] + p[:, None] * vh.astype(f32))

    def slot(s, carry):
        return attend(carry, k_ref[:, s, g, lo], k_ref[:, s, g, hi], v_ref[:, s, g, lo],
                      v_ref[:, s, g, hi])
    neg = jnp.full((R,), -0.7 * float(jnp.finfo(f32).max), f32)
    carry = jax.lax.fori_loop(0, idx, slot, (neg, jnp.zeros((R,), f32), zero, zero))
    _, den, a_lo, a_hi = attend(carry, k_lo, k_hi, v_lo, v_hi)
    out_lo = (a_lo / den[:, None]).astype(dt)
    out_hi = (a_hi / den[:, None]).astype(dt)

    def part(cols):  # this head's rows of the o product
        return (_dot(out_lo, o_ref[pl.ds(h * Dh, half), cols])
                + _dot(out_hi, o_ref[pl.ds(h * Dh + half, half), cols]))
    _add_out(acc_ref, part, x_ref, h == 0, D, t["n"], rows, dt, interpret)


def _mlp_kernel(x_ref, nw_ref, gu_ref, down_ref, _acc_in, acc_ref, *, eps: float, dt, rows: int,
                t: dict, interpret: bool):
    f32 = jnp.float32
    j = pl.program_id(0)
    R, D = x_ref.shape
    F = down_ref.shape[0]
    bk, bf = t["k"], t["f"]
    inv = _rms_inverse(x_ref, D, bk, eps, dt)

    def product(c, accs):
        xn = _normed_chunk(x_ref, nw_ref, inv, c, bk, dt)
        rows_k = pl.ds(c * bk, bk)
        return (accs[0] + _dot(xn, gu_ref[rows_k, pl.ds(j * bf, bf)]),
                accs[1] + _dot(xn, gu_ref[rows_k, pl.ds(F + j * bf, bf)]))
    zero = jnp.zeros((R, bf), f32)
    gate, up = jax.lax.fori_loop(0, D // bk, product, (zero, zero))
    g = gate.astype(dt).astype(f32)
    act = (g / (1.0 + jnp.exp(-g))).astype(dt) * up.astype(dt)

    def part(cols):
        return _dot(act, down_ref[pl.ds(j * bf, bf), cols])
    _add_out(acc_ref, part, x_ref, j == 0, D, t["n"], rows, dt, interpret)


def attention_block(x_RxD, lp, cos_SxDh, sin_SxDh, k_cache, v_cache, write_index,
                    cfg: TransformerConfig, rows: int, t: dict, interpret: bool):
    """x + attention(RMSNorm(x)) for one position per row (float32, (R, D)), and the caches with
    this position's k and v at `write_index`. x: (R, D), the activation dtype or float32."""
    a = lp["attn"]
    dt = a.qkv.dtype
    R, D = x_RxD.shape
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    kernel = functools.partial(_attention_kernel, H=H, K=K, eps=cfg.rms_norm_eps, dt=dt,
                               rows=rows, t=t, interpret=interpret)
    out_shape = (jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
                 jax.ShapeDtypeStruct((R, D), jnp.float32))
    k, v, acc = _call(kernel, interpret, t, grid=(H,), out_shape=out_shape,
                      input_output_aliases={9: 0, 10: 1, 11: 2})(
        x_RxD, lp["input_norm"].astype(dt), a.qkv, a.q_norm.astype(dt), a.k_norm.astype(dt),
        cos_SxDh, sin_SxDh, a.o, jnp.asarray(write_index, jnp.int32), k_cache, v_cache,
        jnp.zeros((R, D), jnp.float32))
    return acc, k, v


def mlp_block(x_RxD, lp, cfg: TransformerConfig, rows: int, t: dict, interpret: bool):
    """x + MLP(RMSNorm(x)) (float32, (R, D)); x float32 (rounded to the weights' dtype first)."""
    m = lp["mlp"]
    dt = m.gate_up.dtype
    R, D = x_RxD.shape
    F = m.down.shape[0]
    kernel = functools.partial(_mlp_kernel, eps=cfg.rms_norm_eps, dt=dt, rows=rows, t=t,
                               interpret=interpret)
    return _call(kernel, interpret, t, grid=(F // t["f"],),
                 out_shape=jax.ShapeDtypeStruct((R, D), jnp.float32),
                 input_output_aliases={4: 0})(
        x_RxD, lp["post_norm"].astype(dt), m.gate_up, m.down, jnp.zeros((R, D), jnp.float32))


def decoder_stack(layers_p, x_RxD, write_index, caches, cos_SxDh, sin_SxDh,
                  cfg: TransformerConfig, rows: int, t: dict, interpret: bool = False):
    """`layers.decoder_layer` over the stack for one position per row at `write_index`, attending
    to every slot before it (the code predictor's steps), two kernels a layer. x: (R = 16, D) with
    `rows` real rows; caches: `layers.KVCache` with R rows. Returns (hidden (R, D) in the
    activation dtype, before the final norm; the new caches)."""
    dt = x_RxD.dtype
    new = []
    x = x_RxD
    for lp, cache in zip(layers_p, caches):
        x, k, v = attention_block(x, lp, cos_SxDh, sin_SxDh, cache.k, cache.v, write_index, cfg,
                                  rows, t, interpret)
        new.append(type(cache)(k, v))
        x = mlp_block(x, lp, cfg, rows, t, interpret)
    return x.astype(dt), new
